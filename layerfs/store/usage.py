"""Disk usage of a store, per image and in total (like ``docker system df -v``).

Sizes are disk bytes (st_blocks, each inode once): a layer's size is its
driver directory plus its tar-split record; an image's size is the sum of its
layers; *shared* is the part held by layers other images use too, *unique*
the rest (what removing the image would free).  Blobs are counted apart: the
original compressed layers, configs and manifests; ``regenerable`` is what
``prune --blobs`` could free (layer blobs a tar-split record can rebuild).
"""
from __future__ import annotations

import os
from collections import Counter
from ._fs import disk_usage

__all__ = ["df"]


def _blob_bytes(store, digest: str) -> int:
    try:
        return os.stat(store.blob_path(digest)).st_blocks * 512
    except FileNotFoundError:
        return 0


def df(store) -> dict:
    with store.reading():
        images = store.images()
        names = store.names()
        layers = {l.chain_id: l for l in store.layers()}
        layer_bytes = {c: store.layer_usage(c) for c in layers}
        layer_users: Counter = Counter()
        blob_users: Counter = Counter()
        for img in images:
            layer_users.update(set(img.chain_ids))
            blob_users.update(set(img.blob_digests()))
        blobs = {d: _blob_bytes(store, d) for d in store.blob_digests()}
        regenerable = set()
        for img in images:
            for l in img.layers:
                rec = layers.get(l.chain_id)
                if rec is not None and rec.record and store.records and l.digest in blobs:
                    regenerable.add(l.digest)
        rows = []
        for img in images:
            chain = [c for c in dict.fromkeys(img.chain_ids) if c in layers]
            size = sum(layer_bytes[c] for c in chain)
            shared = sum(layer_bytes[c] for c in chain if layer_users[c] > 1)
            own_blobs = [d for d in dict.fromkeys(img.blob_digests()) if d in blobs]
            bsize = sum(blobs[d] for d in own_blobs)
            bshared = sum(blobs[d] for d in own_blobs if blob_users[d] > 1)
            rows.append({
                "id": img.id, "manifest_digest": img.manifest_digest,
                "names": store.names_of(img.manifest_digest, names),
                "created": img.created, "layers": len(img.layers),
                "size": size, "shared_size": shared, "unique_size": size - shared,
                "blobs_size": bsize, "blobs_shared_size": bshared,
                "blobs_unique_size": bsize - bshared,
                "blobs_missing": sum(1 for l in img.layers if l.digest not in blobs),
                "mounted": store.mount_count(img),
            })
        unref_layers = [c for c in layers if layer_users[c] == 0]
        unref_blobs = [d for d in blobs if blob_users[d] == 0]
        layer_rows = [{"chain_id": c, "diff_id": l.diff_id, "parent": l.parent,
                       "size": layer_bytes[c], "tar_size": l.tar_size, "images": layer_users[c],
                       "record": l.record, "record_size": l.record_size}
                      for c, l in layers.items()]
        seen: set = set()
        total = disk_usage(store.root, seen, one_fs=True)
        return {
            "root": store.root, "driver": store.driver_name, "records": store.records,
            "images": rows,
            "layers": layer_rows,
            "totals": {
                "images": len(images),
                "layers": len(layers),
                "layers_size": sum(layer_bytes.values()),
                "layers_unreferenced": len(unref_layers),
                "layers_unreferenced_size": sum(layer_bytes[c] for c in unref_layers),
                "blobs": len(blobs),
                "blobs_size": sum(blobs.values()),
                "blobs_regenerable_size": sum(blobs[d] for d in regenerable),
                "blobs_unreferenced": len(unref_blobs),
                "blobs_unreferenced_size": sum(blobs[d] for d in unref_blobs),
                "store_size": total,
            },
        }

