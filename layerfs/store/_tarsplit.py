"""The store's use of tar-split records (:mod:`layerfs.archive.tarsplit`).

A record is written while a layer is applied (``apply_layer(..., record=PATH)``);
with the layer's unpacked files it regenerates the uncompressed layer tar bit
for bit (``reassemble(record, root, output)``).  When the C core in use has no
records, :func:`available` is False and the store keeps every blob instead.
"""
from __future__ import annotations

import io
import os
import threading
from typing import BinaryIO, List

from .._io import ThreadPipeReader

_checked: List[bool] = []


def available() -> bool:
    """Whether apply_layer can write records and reassemble can read them."""
    if not _checked:
        ok = False
        try:
            import inspect
            from .. import _native
            from ..archive import apply_layer, tarsplit
            ok = "record" in inspect.signature(apply_layer).parameters and \
                hasattr(tarsplit, "reassemble") and hasattr(_native.lib, "lfs_reassemble")
        except (ImportError, AttributeError):
            ok = False
        _checked.append(ok)
    return _checked[0]


def reassemble_to(record: str, root: str, output) -> None:
    """Regenerate the layer tar of record from the files under root into output
    (a path or a file object); raises if a file changed or the DiffID differs."""
    from ..archive.tarsplit import reassemble
    reassemble(record, root, output)


def check(record: str, root: str) -> None:
    """Rebuild the stream without keeping it: verifies the files and the DiffID."""
    from ..archive.tarsplit import reassemble
    reassemble(record, root, None)


def open_reassembled(record: str, root: str) -> BinaryIO:
    """A readable stream of the regenerated layer tar (made by a thread)."""
    rfd, wfd = os.pipe()
    failure: list = []

    def run() -> None:
        try:
            with os.fdopen(wfd, "wb", closefd=True) as out:
                reassemble_to(record, root, out)
        except BrokenPipeError:
            pass
        except BaseException as e:  # noqa: BLE001 - raised by the reader
            failure.append(e)       # (the with block closed the write end)

    t = threading.Thread(target=run, name="layerfs-reassemble", daemon=True)
    t.start()
    return io.BufferedReader(ThreadPipeReader(rfd, t, failure), 1 << 20)  # type: ignore[arg-type]


def reassemble_file(record: str, root: str, dest: str) -> None:
    reassemble_to(record, root, dest)


__all__ = ["available", "reassemble_to", "check", "open_reassembled", "reassemble_file"]
