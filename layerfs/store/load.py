"""Bringing images into the store: ``load`` (OCI layouts, docker-archives) and
``import`` (a root filesystem tarball as a one-layer image).

For each layer of an image, bottom first:

- a layer whose ChainID the store has is reused (only a missing blob is copied);
- otherwise its blob is copied into tmp/ (reflink or copy_file_range from a
  directory source; a thread copies the next blobs while a layer is applied),
  then applied into a new driver layer (id: the ChainID hex) with a tar-split
  record, both digests checked; the blob is renamed into blobs/ and the layer's
  record directory into layers/ -- only then does the layer exist.

An uncompressed layer blob is the layer tar itself: when a tar-split record is
kept it is applied straight from the source and not stored (the record
regenerates it bit for bit).  The config and manifest blobs come next, the
image record last, then its names.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import fcntl
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

from ..digest import layer_digests, sha256_file
from ..errors import DigestMismatch
from ..images import SourceImage, open_image_source
from ..images._io import refuse_unseekable
from ..images.manifest import (OCI_CONFIG, OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
                               OCI_MANIFEST, Descriptor, FormatError, Platform, canonical_json,
                               current_platform, layer_compression, parse_platform,
                               sha256_bytes)
from ._fs import copy_blob_file, fsync_dir, remove_path, tmp_name, write_json_atomic
from .progress import NULL, Progress, Task, watching
from .records import ImageLayer, ImageRecord, LayerRecord, check_reuse, hex_of
from .store import tag_names

__all__ = ["LoadedImage", "load", "import_rootfs", "create_layer", "MAX_LAYERS"]

# The deepest layer stack an image may have: docker's layer store allows 125.
# Every layer is a driver layer (vfs copies its parent whole), and a manifest
# of a few KiB can list one blob thousands of times.
MAX_LAYERS = 125


@dataclass
class LoadedImage:
    image: ImageRecord
    names: List[str]
    tags: List[str] = field(default_factory=list)   # bare tags that became no name
    new_layers: int = 0
    reused_layers: int = 0
    blobs_written: int = 0
    bytes_written: int = 0

    @property
    def stored_nothing(self) -> bool:
        return self.new_layers == 0 and self.blobs_written == 0

    def to_json(self) -> dict:
        return {"id": self.image.id, "manifest_digest": self.image.manifest_digest,
                "names": self.names, "tags": self.tags, "layers": len(self.image.layers),
                "new_layers": self.new_layers, "reused_layers": self.reused_layers,
                "blobs_written": self.blobs_written, "bytes_written": self.bytes_written}


def _keeps_blob(store, media_type: str, has_record: bool) -> bool:
    try:
        comp = layer_compression(media_type)
    except ValueError:
        comp = "unknown"
    return comp != "none" or not (has_record and store.records)


def _fetch(store, src, desc: Descriptor) -> str:
    """Copy a layer blob from the source into tmp/ (size checked; the digest is
    checked by whoever reads it next)."""
    tmp = tmp_name(store.tmp_dir, "blob")
    path = src.blob_path(desc.digest)
    try:
        if path is not None:
            copy_blob_file(path, tmp)
        else:
            with src.open_blob(desc.digest) as f, open(tmp, "xb") as out:
                shutil.copyfileobj(f, out, 1 << 20)
        size = os.stat(tmp).st_size
        if size != desc.size:
            raise DigestMismatch(f"layer blob {desc.digest}: {size} bytes, the manifest says "
                                 f"{desc.size}", path or src.path)
    except BaseException:
        remove_path(tmp)
        raise
    return tmp


def create_layer(store, chain_id: str, parent: Optional[str], diff_id: str,
                 expected_digest: Optional[str], source,
                 task: Task = Task()) -> Tuple[LayerRecord, bool]:
    """Make the layer chain_id on parent from a layer blob (path or stream), unless
    it exists: (record, whether this call made it).  The layer is visible only
    once complete; anything half-made is removed."""
    lock = store.layer_lock(chain_id)
    lock.acquire(fcntl.LOCK_EX)
    try:
        rec = store.layer(chain_id)
        if rec is not None:
            check_reuse(rec, parent, diff_id, store.layer_dir(chain_id))
            return rec, False
        hexid = hex_of(chain_id)
        store._remove_driver_layer(hexid)          # left by a process that died
        stage = tmp_name(store.tmp_dir, f"layer-{hexid[:12]}")
        os.mkdir(stage, 0o700)
        made = False
        try:
            store.driver.create(hexid, hex_of(parent) if parent else None)
            made = True
            opts: Dict[str, object] = {}
            record = os.path.join(stage, "tar-split")
            if store.records:
                opts["record"] = record
            with watching(source, task) as arg:
                r = store.driver.apply_diff(hexid, arg, **opts)
            label = getattr(source, "name", source) if not isinstance(source, str) else source
            if expected_digest is not None and r.digest != expected_digest:
                raise DigestMismatch(f"layer blob has digest {r.digest}, the manifest says "
                                     f"{expected_digest}", str(label))
            if r.diff_id != diff_id:
                raise DigestMismatch(f"layer {expected_digest or ''} has DiffID {r.diff_id}, "
                                     f"the config says {diff_id}", str(label))
            rec = LayerRecord(chain_id, diff_id, parent, r.tar_size, time.time(),
                              store.driver_name, record=bool(opts),
                              record_size=os.stat(record).st_size if opts else 0,
                              entries=r.entries)
            write_json_atomic(os.path.join(stage, "layer.json"), rec.to_json(), stage,
                              sync=store.durable)
            os.rename(stage, store.layer_dir(chain_id))
            if store.durable:
                fsync_dir(os.path.dirname(store.layer_dir(chain_id)))
            task.done()
            return rec, True
        except BaseException:
            remove_path(stage)
            if made:
                with contextlib.suppress(Exception):
                    store._remove_driver_layer(hexid)
            raise
    finally:
        lock.release()


def _check_blob_is_layer(path: str, digest: str, diff_id: str) -> None:
    """Check a layer blob the layer was not made from here: its digest, and that
    it decompresses to the layer's DiffID."""
    d = layer_digests(path)
    if d.digest != digest:
        raise DigestMismatch(f"layer blob has digest {d.digest}, the manifest says {digest}", path)
    if d.diff_id != diff_id:
        raise DigestMismatch(f"layer blob {digest} has DiffID {d.diff_id}, the config says "
                             f"{diff_id} (the stored layer {diff_id} was not made from it)", path)


class _KnownBlobs:
    """The layer blobs the store's images pair with each DiffID: a blob that made
    or was checked against a layer.  Read from the image records when first asked."""

    def __init__(self, store):
        self._store = store
        self._pairs: Optional[Dict[str, set]] = None

    def pairs(self, digest: str, diff_id: str) -> bool:
        if digest == diff_id:
            return True         # an uncompressed blob is the tar itself
        if self._pairs is None:
            self._pairs = {}
            for img in self._store.images():
                self.note(img)
        return diff_id in self._pairs.get(digest, ())

    def note(self, img: ImageRecord) -> None:
        """Add the pairs of an image record (one this load wrote, or read)."""
        if self._pairs is not None:
            for l in img.layers:
                self._pairs.setdefault(l.digest, set()).add(l.diff_id)


def _commit_fetched(store, tmp: str, digest: str, verify: bool,
                    diff_id: Optional[str] = None) -> None:
    """Move a fetched blob into blobs/; with verify, check its digest first (and,
    given a diff_id, that it decompresses to that DiffID)."""
    if verify:
        try:
            if diff_id is not None and diff_id != digest:
                _check_blob_is_layer(tmp, digest, diff_id)
            else:
                actual = sha256_file(tmp)
                if actual != digest:
                    raise DigestMismatch(f"layer blob has digest {actual}, the manifest says "
                                         f"{digest}", tmp)
        except BaseException:
            remove_path(tmp)
            raise
    if store.durable:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    store.commit_blob_file(tmp, digest)


def _load_image(store, src, img: SourceImage, names: Optional[List[str]],
                progress: Progress, pool: cf.ThreadPoolExecutor,
                known: _KnownBlobs) -> LoadedImage:
    chain = img.chain_ids
    recs = [store.layer(cid) for cid in chain]
    for i, (rec, diff_id) in enumerate(zip(recs, img.diff_ids)):
        if rec is not None:         # checked before any blob is fetched into tmp/
            check_reuse(rec, chain[i - 1] if i else None, diff_id, store.layer_dir(chain[i]))
    plan = []
    fetches: Dict[int, cf.Future] = {}
    for i, (desc, diff_id, cid, rec) in enumerate(zip(img.layers, img.diff_ids, chain, recs)):
        has_record = rec.record if rec is not None else store.records
        keep = _keeps_blob(store, desc.media_type, has_record)
        plan.append((desc, diff_id, cid, rec, keep))
        if keep and not store.has_blob(desc.digest):
            fetches[i] = pool.submit(_fetch, store, src, desc)
    out = LoadedImage(image=None, names=[])  # type: ignore[arg-type]

    def check_stored_blob(desc: Descriptor, diff_id: str) -> None:
        # a layer reused with a blob already stored: the blob must be that layer's
        if not known.pairs(desc.digest, diff_id):
            _check_blob_is_layer(store.blob_path(desc.digest), desc.digest, diff_id)

    try:
        for i, (desc, diff_id, cid, rec, keep) in enumerate(plan):
            parent = chain[i - 1] if i else None
            if rec is None:
                task = progress.task(f"layer {i + 1}/{len(plan)} {hex_of(desc.digest)[:12]}",
                                     desc.size)
                if i in fetches:
                    source: Union[str, object] = fetches[i].result()
                else:
                    source = src.blob_path(desc.digest) or src.open_blob(desc.digest)
                _, made = create_layer(store, cid, parent, diff_id, desc.digest, source, task)
                if made:
                    out.new_layers += 1
                else:
                    out.reused_layers += 1      # another process made it meanwhile
                if i in fetches:
                    # the apply checked the copy's digests only if this call applied it
                    _commit_fetched(store, source, desc.digest, verify=not made,  # type: ignore
                                    diff_id=diff_id)
                    out.blobs_written += 1
                    out.bytes_written += desc.size
                else:
                    if not isinstance(source, str):
                        source.close()  # type: ignore[attr-defined]
                    if not made and keep:
                        check_stored_blob(desc, diff_id)
                task.done()
            else:
                out.reused_layers += 1
                if i in fetches:
                    _commit_fetched(store, fetches[i].result(), desc.digest, verify=True,
                                    diff_id=diff_id)
                    out.blobs_written += 1
                    out.bytes_written += desc.size
                elif keep:
                    check_stored_blob(desc, diff_id)
    except BaseException:
        for f in fetches.values():
            f.cancel()
        for f in fetches.values():
            with contextlib.suppress(BaseException):
                remove_path(f.result())
        raise
    for digest, data in ((img.config_digest, img.config_bytes),
                         (img.manifest_digest, img.manifest_bytes)):
        if not store.has_blob(digest):
            store.put_blob_bytes(digest, data)
            out.blobs_written += 1
    rec_img = store.image(img.manifest_digest)
    if rec_img is None:
        cfg = img.config if isinstance(img.config, dict) else {}
        rec_img = ImageRecord(
            img.manifest_digest, img.manifest_media_type, len(img.manifest_bytes),
            img.config_digest, img.config_media_type or OCI_CONFIG, len(img.config_bytes),
            [ImageLayer(cid, diff, d.digest, d.media_type, d.size)
             for d, diff, cid in zip(img.layers, img.diff_ids, chain)],
            str(img.platform) if img.platform else None,
            cfg.get("created") if isinstance(cfg.get("created"), str) else None,
            time.time(), str(src.path))
        store.put_image(rec_img)
    out.image = rec_img
    known.note(rec_img)
    want = list(names) if names is not None else _without_digests(img.names)
    store.set_names(img.manifest_digest, want)
    out.names = store.names_of(img.manifest_digest)
    out.tags = [] if want else list(img.tags)
    return out


def _without_digests(names: List[str]) -> List[str]:
    """A source's names without those that carry a digest: such a name states
    the image's digest, which is the store's to know, not the source's to say."""
    from ..images import parse_reference
    return [n for n in names if not parse_reference(n).digest]


def load(store, source, *, platform: Union[Platform, str, None] = None,
         base_name: Optional[str] = None, names: Optional[List[str]] = None,
         progress: Progress = NULL) -> List[LoadedImage]:
    """Load every image of an OCI layout or docker-archive (directory, tarball or
    transport reference; an index narrowed to ``platform``).  ``base_name`` turns
    bare OCI tags into names; ``names`` replaces the source's names."""
    if names is not None:
        names = tag_names(names)     # checked before anything is stored
    with store.reading():
        with open_image_source(source, platform=platform, base_name=base_name) as src:
            images = src.images()
            if not images:
                from ..errors import NotFound
                raise NotFound("the source holds no image", str(src.path))
            for img in images:
                if len(img.layers) > MAX_LAYERS:
                    raise FormatError(f"image {img.manifest_digest} has {len(img.layers)} "
                                      f"layers, more than the {MAX_LAYERS} a stack may have",
                                      str(src.path))
            if names is not None and len(images) > 1:
                raise ValueError(f"the source holds {len(images)} images: names can be given "
                                 "only for one (select it, e.g. oci:PATH:TAG)")
            with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="layerfs-fetch") as pool:
                known = _KnownBlobs(store)      # read once for all the images of the source
                return [_load_image(store, src, img, names, progress, pool, known)
                        for img in images]


# --- import --------------------------------------------------------------------------------

_MEDIA = {"none": OCI_LAYER, "gzip": OCI_LAYER_GZIP, "zstd": OCI_LAYER_ZSTD}


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc) \
        .strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def import_rootfs(store, tarball, name: Optional[str] = None, *,
                  message: Optional[str] = None, platform: Union[Platform, str, None] = None,
                  config: Optional[dict] = None, progress: Progress = NULL) -> LoadedImage:
    """Make a one-layer image of a root filesystem tarball (plain, gzip or zstd),
    as ``docker import`` does: an OCI config with rootfs.diff_ids and a history
    entry, an OCI manifest; named ``name`` when given."""
    tarball = os.fspath(tarball)
    if name:
        tag_names([name])
    refuse_unseekable(tarball, "a rootfs tarball is read twice")
    plat = current_platform() if platform is None else \
        parse_platform(platform) if isinstance(platform, str) else platform
    with store.reading():
        d = layer_digests(tarball)
        media = _MEDIA[d.compression]
        chain_id = d.diff_id
        rec = store.layer(chain_id)
        keep = _keeps_blob(store, media, rec.record if rec is not None else store.records)
        out = LoadedImage(image=None, names=[])  # type: ignore[arg-type]
        tmp = None
        if keep and not store.has_blob(d.digest):
            tmp = tmp_name(store.tmp_dir, "blob")
            copy_blob_file(tarball, tmp)
        try:
            if rec is None:
                task = progress.task(f"layer {hex_of(d.diff_id)[:12]}", d.compressed_size)
                _, made = create_layer(store, chain_id, None, d.diff_id, d.digest,
                                       tmp or tarball, task)
            else:
                made = False
            out.new_layers, out.reused_layers = (1, 0) if made else (0, 1)
            if tmp is not None:
                _commit_fetched(store, tmp, d.digest, verify=not made)
                out.blobs_written += 1
                out.bytes_written += d.compressed_size
        except BaseException:
            if tmp is not None:
                remove_path(tmp)
            raise
        created = _rfc3339(time.time())
        doc = {"created": created, "architecture": plat.architecture, "os": plat.os}
        if plat.variant:
            doc["variant"] = plat.variant
        doc["config"] = dict(config or {})
        doc["rootfs"] = {"type": "layers", "diff_ids": [d.diff_id]}
        doc["history"] = [{"created": created,
                           "created_by": f"layerfs import {os.path.basename(tarball)}",
                           "comment": message or f"Imported from {os.path.basename(tarball)}"}]
        cbytes = canonical_json(doc)
        cdigest = sha256_bytes(cbytes)
        mbytes = canonical_json({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": len(cbytes)},
            "layers": [{"mediaType": media, "digest": d.digest, "size": d.compressed_size}]})
        mdigest = sha256_bytes(mbytes)
        store.put_blob_bytes(cdigest, cbytes)
        store.put_blob_bytes(mdigest, mbytes)
        img = ImageRecord(mdigest, OCI_MANIFEST, len(mbytes), cdigest, OCI_CONFIG, len(cbytes),
                          [ImageLayer(chain_id, d.diff_id, d.digest, media, d.compressed_size)],
                          str(plat), created, time.time(), os.path.abspath(tarball))
        store.put_image(img)
        out.blobs_written += 2
        out.image = img
        if name:
            store.set_names(mdigest, [name])
        out.names = store.names_of(mdigest)
        return out
