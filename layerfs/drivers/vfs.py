"""The ``vfs`` driver: every layer is a full copy of its parent.

A new layer starts as a copy of its parent's directory (C core tree copy:
reflinks where the filesystem has them, hardlinks kept), and apply_diff
applies the layer tarball onto it with whiteouts carried out.  It needs no
kernel feature beyond bind mounts and works on any filesystem, at the cost of
disk space (less on btrfs/xfs, where files are reflinked).

- mount: a bind mount of the layer's directory, read-only for a read-only layer
  (writes fail with EROFS).
- diff/changes: the exact diff (:func:`layerfs.diff.compare_trees`) between the
  parent's directory and the layer's, written with ``create_layer(changes=...)``.
"""
from __future__ import annotations

import os
from typing import BinaryIO, List, Optional

from .. import _native
from ..diff import compare_trees, with_parents
from ..errors import NotSupported
from . import _mount
from .base import (Change, DirectoryDriver, LayerInfo, Mount, Support, is_mountpoint,
                   tar_stream_of)


def _can_mount() -> Optional[str]:
    """None when bind mounts can be made here, else why not."""
    if os.geteuid() == 0:
        return None
    return ("bind mounts need root (run as root, or in a user and mount namespace: "
            "unshare --user --map-root-user --mount)")


class VfsDriver(DirectoryDriver):
    """Full copies; see the module docstring."""

    name = "vfs"
    whiteout_mode = "apply"

    @classmethod
    def supported(cls, root: Optional[str] = None) -> Support:
        why = _can_mount()
        if why:
            return Support(False, why)
        return Support(True, "a full copy of the parent per layer; any filesystem "
                             "(reflinked copies on btrfs/xfs)")

    def __init__(self, root: str, **options):
        unknown = set(options) - {"copy_flags"}
        if unknown:
            raise TypeError(f"unknown vfs option(s): {', '.join(sorted(unknown))}")
        super().__init__(root, **options)

    # -- hooks -------------------------------------------------------------
    def _populate(self, stage: str, info: LayerInfo, parent: Optional[LayerInfo]) -> None:
        if parent is None:
            os.mkdir(os.path.join(stage, "diff"), 0o755)
            return
        src = os.open(self.layer_dir(parent.id), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dst = os.open(stage, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                stats = _native.copy_tree(src, "diff", dst, "diff",
                                          int(self.options.get("copy_flags", 0)))
            finally:
                os.close(dst)
        finally:
            os.close(src)
        info.extra["copy"] = {"files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
                              "reflinked": stats.reflinked, "hardlinks": stats.hardlinks}

    def mounts(self, id: str) -> List[Mount]:
        info = self.get(id)
        return [Mount("bind", self.diff_dir(id), ("bind",) if info.rw else ("bind", "ro"))]

    def _mount_view(self, info: LayerInfo, target: str) -> None:
        why = _can_mount()
        if why:
            raise NotSupported(why, target)
        _mount.bind(self.diff_dir(info.id), target, readonly=not info.rw)

    def _unmount_view(self, info: LayerInfo, target: str) -> None:
        if is_mountpoint(target):
            _mount.umount(target)

    def _tree_changes(self, info: LayerInfo):
        old = self.diff_dir(info.parent) if info.parent else None
        return compare_trees(old, self.diff_dir(info.id))

    def _diff_stream(self, info: LayerInfo) -> BinaryIO:
        if info.parent is None:
            return tar_stream_of(self.diff_dir(info.id))
        changes = [(c.path, c.kind) for c in with_parents(self._tree_changes(info))]
        return tar_stream_of(self.diff_dir(info.id), changes=changes)

    def _changes(self, info: LayerInfo) -> List[Change]:
        return [Change(c.path, c.kind) for c in with_parents(self._tree_changes(info))]
