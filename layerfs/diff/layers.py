"""Per-layer attribution and waste of a layer stack (an image).

For each layer: its sizes, what it added, modified and deleted, and the bytes
it *wastes*: bytes of file content the layer stores that a later layer
overwrites or deletes (an image only grows, so those bytes are shipped and
stored for nothing).  A file rewritten in three layers wastes the two earlier
copies, once each; a copy shared by hardlinks is wasted only when its last
name goes.  Each wasted copy says which later layer made it waste and why:
``deleted`` (a whiteout or opaque directory), ``replaced`` (a parent
directory was replaced by a non-directory), ``type`` (replaced by a
non-file), or the fields that differ between the two copies (``content``,
``mode``, ``owner``, ``mtime``, ``xattr``) — a re-copy for ``mode`` only is
the classic ``chmod`` in a later build step; ``duplicate`` means nothing
differs at all.

    efficiency = 1 - wasted bytes / bytes of content stored in all layers

>>> r = analyze_layers("oci:image:1.0")                       # doctest: +SKIP
>>> r.wasted_bytes, round(r.efficiency, 3)                    # doctest: +SKIP
(1048576, 0.991)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .sources import (IMPLICIT, EntryMeta, FoldObserver, LayerInfo, LayerStackSource,
                      SourceArg, Tree, fold_layer, open_source)


@dataclass
class WasteItem:
    path: str
    size: int
    layer: int               # the layer whose copy is wasted
    by_layer: int            # the later layer that overwrote or deleted it
    reason: List[str]        # see the module doc

    def as_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "size": self.size, "layer": self.layer,
                "by_layer": self.by_layer, "reason": list(self.reason)}


@dataclass
class LayerReport:
    info: LayerInfo
    entries: int = 0                 # entries in the layer's tar (whiteouts included)
    content_bytes: int = 0           # file content it stores (hardlinks once)
    added: int = 0                   # paths it creates
    modified: int = 0                # paths it writes over
    deleted: int = 0                 # paths its whiteouts / opaque dirs remove
    added_bytes: int = 0
    modified_bytes: int = 0
    deleted_bytes: int = 0           # content bytes of lower layers it removes
    wasted_bytes: int = 0            # its own bytes that later layers overwrite or delete
    wasted: List[WasteItem] = field(default_factory=list)
    causes_bytes: int = 0            # bytes of earlier layers it makes waste
    causes: Dict[str, int] = field(default_factory=dict)   # reason -> bytes it makes waste
    paths: Optional[Dict[str, List[str]]] = None           # with details=True

    @property
    def index(self) -> int:
        return self.info.index

    def as_dict(self, details: bool = False) -> Dict[str, Any]:
        d = self.info.as_dict()
        d.update(entries=self.entries, content_bytes=self.content_bytes, added=self.added,
                 modified=self.modified, deleted=self.deleted, added_bytes=self.added_bytes,
                 modified_bytes=self.modified_bytes, deleted_bytes=self.deleted_bytes,
                 wasted_bytes=self.wasted_bytes, causes_bytes=self.causes_bytes,
                 causes=dict(sorted(self.causes.items())),
                 wasted=[w.as_dict() for w in self.wasted])
        if details and self.paths is not None:
            d["paths"] = self.paths
        return d


@dataclass
class StackReport:
    source: Dict[str, Any]
    layers: List[LayerReport]
    total_bytes: int                 # content bytes stored over all layers
    wasted_bytes: int
    image_bytes: int                 # content bytes of the final tree (hardlinks once)
    files: int                       # regular files in the final tree

    @property
    def efficiency(self) -> float:
        return 1.0 if self.total_bytes == 0 else 1.0 - self.wasted_bytes / self.total_bytes

    def as_dict(self, details: bool = False) -> Dict[str, Any]:
        return {"source": self.source, "total_bytes": self.total_bytes,
                "wasted_bytes": self.wasted_bytes, "image_bytes": self.image_bytes,
                "files": self.files, "efficiency": self.efficiency,
                "layers": [l.as_dict(details) for l in self.layers]}


_OWNER = ("uid", "gid")


def copy_differences(old: EntryMeta, new: EntryMeta) -> List[str]:
    """Why a file was copied again: the fields in which two copies differ."""
    if new.type != "file":
        return ["type"]
    out = []
    if old.digest != new.digest or old.size != new.size:
        out.append("content")
    if old.mode != new.mode:
        out.append("mode")
    if old.uid != new.uid or old.gid != new.gid:
        out.append("owner")
    if old.mtime_ns != new.mtime_ns:
        out.append("mtime")
    if old.xattrs != new.xattrs:
        out.append("xattr")
    return out or ["duplicate"]


class _Waste(FoldObserver):
    def __init__(self, reports: List[LayerReport], details: bool):
        self.reports = reports
        self.details = details
        self.refs: Dict[Any, int] = {}          # content copy -> names in the tree
        self.owner: Dict[Any, int] = {}         # content copy -> layer that stored it
        self.size: Dict[Any, int] = {}

    def _paths(self, layer: int, what: str, path: str) -> None:
        r = self.reports[layer]
        if self.details:
            if r.paths is None:
                r.paths = {"added": [], "modified": [], "deleted": []}
            r.paths[what].append(path)

    def added(self, layer: int, path: str, new: EntryMeta, existed: bool) -> None:
        r = self.reports[layer]
        if not new.flags & IMPLICIT:
            if existed:
                r.modified += 1
                self._paths(layer, "modified", path)
            else:
                r.added += 1
                self._paths(layer, "added", path)
        if new.type != "file":
            return
        key = new.link
        n = self.refs.get(key)
        if n is None:
            self.refs[key] = 1
            self.owner[key] = layer
            self.size[key] = new.size
            r.content_bytes += new.size
            if existed:
                r.modified_bytes += new.size
            else:
                r.added_bytes += new.size
        else:
            self.refs[key] = n + 1

    def removed(self, layer: int, path: str, old: EntryMeta, new: Optional[EntryMeta],
                whiteout: bool) -> None:
        r = self.reports[layer]
        if whiteout:
            if not old.flags & IMPLICIT:
                r.deleted += 1
                self._paths(layer, "deleted", path)
        if old.type != "file":
            return
        key = old.link
        n = self.refs.get(key, 0) - 1
        if n > 0:
            self.refs[key] = n
            return
        self.refs.pop(key, None)
        size = self.size.pop(key, 0)
        owner = self.owner.pop(key, layer)
        if whiteout:
            reason = ["deleted"]
            r.deleted_bytes += size
        elif new is None:
            reason = ["replaced"]
        else:
            reason = copy_differences(old, new)
        self.reports[owner].wasted_bytes += size
        self.reports[owner].wasted.append(WasteItem(path, size, owner, layer, reason))
        r.causes_bytes += size
        for why in reason:
            r.causes[why] = r.causes.get(why, 0) + size


def analyze_layers(source: SourceArg, *, details: bool = False) -> StackReport:
    """Fold the layers of an image (or of layer tarballs) and account for
    every stored byte: which layer stores it, and which later layer wastes it."""
    src = source if isinstance(source, LayerStackSource) else open_source(source)
    try:
        if not isinstance(src, LayerStackSource):
            raise ValueError(f"{src.name}: not an image or layer tarball (a {src.kind})")
        reports = [LayerReport(l) for l in src.layers]
        obs = _Waste(reports, details)
        tree = Tree()
        for layer, entries in src.scans():
            reports[layer.index].entries = len(entries)
            fold_layer(tree, entries, layer.index, observer=obs)
        described = src.describe()
    finally:
        if src is not source:
            src.close()
    for r in reports:
        r.wasted.sort(key=lambda w: (-w.size, w.path))
    total = sum(r.content_bytes for r in reports)
    wasted = sum(r.wasted_bytes for r in reports)
    files = 0
    image_bytes = 0
    seen = set()
    for m in tree.entries.values():
        if m.type == "file":
            files += 1
            if m.link not in seen:
                seen.add(m.link)
                image_bytes += m.size
    return StackReport(described, reports, total, wasted, image_bytes, files)


__all__ = ["LayerReport", "StackReport", "WasteItem", "analyze_layers", "copy_differences"]
