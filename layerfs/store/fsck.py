"""Checking a store: every digest re-verified, every reference followed.

- blobs: each file's sha256 is its name;
- layers: the record is well-formed, its ChainID follows from its parent and
  DiffID, the driver has the layer complete, and -- when a tar-split record is
  kept -- the unpacked files still rebuild the layer tar with its DiffID;
- images: manifest and config blobs present, the manifest lists the record's
  layer blobs, the config's diff_ids give the record's ChainIDs, every layer
  exists, every layer blob is present or regenerable;
- names point at images; nothing is left half-made.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List

from ..digest import chain_ids, sha256_file
from ..errors import DigestMismatch, NotFound
from ..images.manifest import FormatError, Where, layer_compression, parse_config, parse_manifest
from . import _tarsplit
from .progress import NULL, Progress
from ._fs import read_record
from .records import ImageRecord, LayerRecord, check_reuse, hex_of

__all__ = ["Problem", "FsckReport", "fsck"]


@dataclass
class Problem:
    what: str           # "blob sha256:...", "layer sha256:...", "image sha256:...", "name ..."
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.message}"


@dataclass
class FsckReport:
    problems: List[Problem] = field(default_factory=list)
    blobs: int = 0
    layers: int = 0
    layers_verified: int = 0        # rebuilt from their record with the right DiffID
    images: int = 0
    names: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {"ok": self.ok, "blobs": self.blobs, "layers": self.layers,
                "layers_verified": self.layers_verified, "images": self.images,
                "names": self.names,
                "problems": [{"what": p.what, "message": p.message} for p in self.problems]}


def fsck(store, *, content: bool = True, progress: Progress = NULL) -> FsckReport:
    """Check the store; ``content=False`` skips re-hashing blobs and layer files."""
    rep = FsckReport()
    bad = rep.problems.append
    with store.reading():
        blobs = set(store.blob_digests())
        for d in sorted(blobs):
            rep.blobs += 1
            if not content:
                continue
            task = progress.task(f"blob {hex_of(d)[:12]}", None)
            try:
                actual = sha256_file(store.blob_path(d))
            except OSError as e:
                bad(Problem(f"blob {d}", f"cannot be read: {e}"))
                continue
            finally:
                task.done()
            if actual != d:
                bad(Problem(f"blob {d}", f"content has digest {actual}"))
        layers = {}
        for name in sorted(os.listdir(store._p("layers"))):
            path = store._p("layers", name, "layer.json")
            if not os.path.exists(path):
                bad(Problem(f"layer directory {name}", "has no layer.json (half-made; swept "
                            "when the store is next opened unused)"))
                continue
            try:
                rec = read_record(path, LayerRecord)
            except ValueError as e:
                bad(Problem(f"layer {name}", f"unreadable layer.json: {e}"))
                continue
            layers[rec.chain_id] = rec
        for c, rec in layers.items():
            rep.layers += 1
            what = f"layer {c}"
            if hex_of(c) != os.path.basename(store.layer_dir(c)):
                bad(Problem(what, "stored under another name"))
            if rec.parent is None:
                if c != rec.diff_id:
                    bad(Problem(what, f"a bottom layer's ChainID must be its DiffID {rec.diff_id}"))
            else:
                if rec.parent not in layers:
                    bad(Problem(what, f"its parent {rec.parent} is missing"))
                want = chain_ids([rec.parent, rec.diff_id])[1] if rec.parent else rec.diff_id
                if want != c:
                    bad(Problem(what, f"ChainID does not follow from parent and DiffID "
                                      f"({want})"))
            try:
                info = store.driver.get(hex_of(c))
            except NotFound:
                bad(Problem(what, f"the {store.driver_name} driver has no layer {hex_of(c)}"))
                continue
            if not info.complete:
                bad(Problem(what, "the driver's layer is incomplete"))
                continue
            if (info.parent or None) != (hex_of(rec.parent) if rec.parent else None):
                bad(Problem(what, f"the driver's layer has parent {info.parent}"))
            if rec.record and content:
                if not store.records:
                    continue
                task = progress.task(f"layer {hex_of(c)[:12]}", rec.tar_size)
                try:
                    _tarsplit.check(store.record_path(c), store.layer_files(c))
                    rep.layers_verified += 1
                except (OSError, ValueError) as e:
                    bad(Problem(what, f"the unpacked files no longer rebuild the layer: {e}"))
                finally:
                    task.done()
        records = []
        for name in sorted(os.listdir(store._p("images"))):
            if not name.endswith(".json") or len(name) != 69:
                continue
            path = store._p("images", name)
            try:
                img = read_record(path, ImageRecord)
            except ValueError as e:
                bad(Problem(f"image record {path}", str(e)))
                continue
            if img is None:
                continue
            if img.key + ".json" != name:
                bad(Problem(f"image record {path}", f"holds image {img.manifest_digest}"))
            records.append(img)
        for img in records:
            rep.images += 1
            what = f"image {img.id} ({img.manifest_digest})"
            if img.manifest_digest not in blobs:
                bad(Problem(what, "its manifest blob is missing"))
                continue
            if img.config_digest not in blobs:
                bad(Problem(what, "its config blob is missing"))
                continue
            try:
                m = parse_manifest(store.read_blob(img.manifest_digest),
                                   Where(store.blob_path(img.manifest_digest)),
                                   img.manifest_media_type)
                cfg = parse_config(store.read_blob(img.config_digest),
                                   Where(store.blob_path(img.config_digest)))
            except (FormatError, OSError) as e:
                bad(Problem(what, str(e)))
                continue
            if m.config.digest != img.config_digest:
                bad(Problem(what, f"the manifest names config {m.config.digest}"))
            if [l.digest for l in m.layers] != [l.digest for l in img.layers]:
                bad(Problem(what, "the manifest's layers differ from the image record's"))
            if cfg.diff_ids and chain_ids(cfg.diff_ids) != img.chain_ids:
                bad(Problem(what, "the config's diff_ids do not give the record's ChainIDs"))
            for i, l in enumerate(img.layers):
                rec = layers.get(l.chain_id)
                if rec is None:
                    bad(Problem(what, f"layer {l.chain_id} is missing"))
                    continue
                try:
                    check_reuse(rec, img.layers[i - 1].chain_id if i else None, l.diff_id, what)
                except DigestMismatch as e:
                    bad(Problem(what, e.strerror))
                if l.digest in blobs:
                    continue
                try:
                    comp = layer_compression(l.media_type)
                except ValueError:
                    comp = "unknown"
                if not (rec.record and store.records):
                    bad(Problem(what, f"layer blob {l.digest} is missing and has no tar-split "
                                      "record to rebuild it from"))
                elif comp != "none":
                    pass    # pruned on purpose: a docker-archive save is exact, OCI recompresses
        images = {i.manifest_digest for i in records}
        try:
            names = store.names()
        except ValueError as e:
            bad(Problem("names", str(e)))
            names = {}
        for n, d in sorted(names.items()):
            rep.names += 1
            if d not in images:
                bad(Problem(f"name {n}", f"points at {d}, which is not in the store"))
        recorded = {hex_of(c) for c in layers}
        for info in store.driver.layers():
            if info.id not in recorded:
                bad(Problem(f"driver layer {info.id}", "has no layer record (left by an "
                            "interrupted load; swept when the store is next opened unused)"))
    return rep
