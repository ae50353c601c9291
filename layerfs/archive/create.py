"""Writing layer tarballs from directories or from change lists."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple, Union

from .. import _native
from ..errors import LayerError
from .._io import open_output

# What a change list may say about a path: the diff engine's kinds and the tar writer's.
_KIND = {"added": "path", "modified": "path", "path": "path", "A": "path", "M": "path",
         "deleted": "delete", "delete": "delete", "D": "delete", "opaque": "opaque"}

Change = Union[Tuple[str, str], object]


@dataclass(frozen=True)
class CreateResult:
    digest: str          # sha256 of the output as written (compressed)
    diff_id: str         # sha256 of the tar stream
    size: int
    tar_size: int
    compression: str
    entries: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _normalise_changes(changes: Iterable[Change]):
    out = []
    for c in changes:
        if hasattr(c, "path") and hasattr(c, "kind"):
            path, kind = c.path, c.kind   # Change, TreeChange and the like
        else:
            path, kind = c
        kind = getattr(kind, "value", kind)
        if kind not in _KIND:
            raise ValueError(f"unknown change kind {kind!r} for {path!r}")
        path = os.fsdecode(path).lstrip("/")
        while path.startswith("./"):
            path = path[2:]
        if not path:
            continue
        out.append((path, _KIND[kind]))
    return out


def create_layer(source_dir, output, *, changes: Optional[Iterable[Change]] = None,
                 compression: str = "none", level: Optional[int] = None,
                 source_format: str = "plain", overlay_user_xattr: bool = False,
                 sparse: bool = False, source_date_epoch: Optional[int] = None,
                 no_xattrs: bool = False, threads: int = 0) -> CreateResult:
    """Write a layer tarball of source_dir (or of the listed changes) to output.

    changes: (path, kind) pairs or objects with .path and .kind, kind one of
    "added", "modified", "deleted" (written as .wh. whiteouts) or "opaque";
    None writes the whole tree.  source_format="overlay" converts an overlay upper
    directory's whiteouts (char 0:0, opaque xattr) into AUFS entries.
    Output is deterministic: sorted, numeric owners, optional mtime clamp.
    A path output is written beside itself and renamed into place on success.
    """
    if compression not in ("none", "gzip", "zstd"):
        raise ValueError(f"unknown compression {compression!r} (none, gzip, zstd)")
    if source_format not in _native.SOURCE_FORMATS:
        raise ValueError(f"unknown source format {source_format!r} (plain, overlay)")
    norm = None if changes is None else _normalise_changes(changes)
    src = os.fsdecode(source_dir)
    root_fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with open_output(output) as (fd, name):
            try:
                r = _native.create(root_fd, fd, changes=norm,
                                   compression=_native.COMPRESSION_CODES[compression],
                                   level=level or 0, threads=threads, source=source_format,
                                   overlay_user_xattr=overlay_user_xattr, sparse=sparse,
                                   source_date_epoch=source_date_epoch, no_xattrs=no_xattrs,
                                   name=src)
            except LayerError as e:
                if not e.filename:
                    e.filename = src
                raise
    finally:
        os.close(root_fd)
    d = r.digests
    return CreateResult(d.digest, d.diff_id, d.compressed_size, d.tar_size, d.compression,
                        r.entries)
