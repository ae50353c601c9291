"""Exception types.

Every error layerfs raises is an :class:`LayerError`, which subclasses
:class:`OSError`: ``e.errno`` and ``e.filename`` work as usual, and errors from
archives also carry the entry name and the byte offset in the tar stream.
The typed errors also subclass the matching builtin, so ``except
FileNotFoundError`` catches :class:`NotFound`.
"""
from __future__ import annotations

import errno as _errno
from typing import Optional


class LayerError(OSError):
    """An error from layerfs, with the file, archive entry and offset concerned."""

    def __init__(self, code: int, message: str, filename: Optional[str] = None, *,
                 entry: Optional[str] = None, offset: Optional[int] = None):
        super().__init__(code, message, filename)
        self.entry = entry
        self.offset = offset

    def __str__(self) -> str:
        parts = []
        if self.filename:
            parts.append(str(self.filename))
        if self.entry:
            parts.append(f"entry {self.entry!r}")
        if self.offset is not None:
            parts.append(f"offset {self.offset}")
        where = ": ".join([", ".join(parts)]) if parts else ""
        return f"{where}: {self.strerror}" if where else str(self.strerror)


def _typed(name: str, builtin: type, code: int, doc: str) -> type:
    def __init__(self, message: str, filename: Optional[str] = None, **kw):
        LayerError.__init__(self, code, message, filename, **kw)
    return type(name, (LayerError, builtin), {"__init__": __init__, "__doc__": doc})


NotFound = _typed("NotFound", FileNotFoundError, _errno.ENOENT,
                  "The layer, image or path does not exist.")
AlreadyExists = _typed("AlreadyExists", FileExistsError, _errno.EEXIST,
                       "Something with that name or id already exists.")
PreconditionFailed = _typed("PreconditionFailed", OSError, _errno.EBUSY,
                            "The operation is refused in the current state (mounted, has children, ...).")
NotSupported = _typed("NotSupported", OSError, _errno.EOPNOTSUPP,
                      "The operation or driver is not supported here; the message says why.")
DigestMismatch = _typed("DigestMismatch", ValueError, _errno.EILSEQ,
                        "Content did not match the expected digest.")
