"""Tar-split records: rebuild a layer's tar stream, bit for bit, from its unpacked tree.

An image store that keeps layers unpacked may drop the compressed blobs and
still serve each layer's uncompressed tar stream (same DiffID) when an image is
pushed or saved.  Applying a layer with a record keeps everything of the stream
that is not the content of a file it wrote -- headers, PAX/GNU extension
blocks, padding, end blocks, trailing bytes, and content the layer itself
replaced or deleted -- plus, for the rest, the path of the file that holds it::

    from layerfs.archive import apply_layer
    from layerfs.archive.tarsplit import reassemble

    r = apply_layer("layer.tar.gz", "layers/1/diff", whiteouts="overlay",
                    record="layers/1/tar-split")
    d = reassemble("layers/1/tar-split", "layers/1/diff", "layer.tar")
    assert d.diff_id == r.diff_id

The tree must be the directory the layer was applied to as it was left
(vfs: the full tree; overlay: the upper dir; aufs: the layer dir with .wh.
files).  A file changed since then is an error naming it; the rebuilt stream is
also checked against the recorded DiffID.  The output is the uncompressed tar;
compress it again if needed.  The record format is described in
csrc/tarsplit.c.

Before deleting a blob, check its record once: ``reassemble(record, root)``
(no output) rebuilds and hashes the stream without writing it.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from typing import Iterator, Tuple

from .. import _native
from .._io import _real_fileno, open_output, source_name
from .._native import Digests, RecordInfo
from ..errors import LayerError

__all__ = ["Digests", "RecordInfo", "reassemble", "record_info"]


@contextmanager
def _record_fd(record) -> Iterator[Tuple[int, str]]:
    """(fd positioned at the record's start, name).  The C core reads a regular
    file with pread; any other stream is spooled to a temporary file first."""
    name = source_name(record)
    if isinstance(record, (str, bytes, os.PathLike)):
        fd = os.open(record, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd, name
        finally:
            os.close(fd)
        return
    fd = _real_fileno(record)
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        try:
            pos = record.tell()
        except (OSError, ValueError, AttributeError):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
        dup = os.dup(fd)        # our own offset: the caller's file position stays put
        try:
            os.lseek(dup, pos, os.SEEK_SET)
            yield dup, name
        finally:
            os.close(dup)
        return
    with tempfile.TemporaryFile(prefix="layerfs-record-") as spool:
        shutil.copyfileobj(record, spool, 1 << 20)
        spool.flush()
        spool.seek(0)
        yield spool.fileno(), name


def _named(e: LayerError, record_name: str) -> LayerError:
    """Errors about the record name the record; errors about a file name the file."""
    if not e.filename:
        e.filename = record_name
    return e


def reassemble(record, root, output=None) -> Digests:
    """Rebuild the uncompressed tar stream of a layer from its record and tree.

    record: path or binary file (read from its current position);
    root: the directory the layer was applied to;
    output: path (written beside itself, renamed into place only when the
    stream matches the recorded DiffID), binary file (receives the stream even
    when the check fails: discard it on error), or None (check only).
    Returns the stream's digests (digest == diff_id, compression "none").
    Raises LayerError: ESTALE naming the file when the tree changed, EILSEQ when
    the stream does not match the DiffID, EBADMSG for a damaged record.
    """
    root = os.fsdecode(root)
    with _record_fd(record) as (rfd, rname):
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                if output is None:
                    return _native.reassemble(rfd, root_fd, -1, name=rname)
                with open_output(output) as (ofd, _):
                    return _native.reassemble(rfd, root_fd, ofd, name=rname)
            except LayerError as e:
                raise _named(e, rname)
        finally:
            os.close(root_fd)


def record_info(record) -> RecordInfo:
    """The DiffID, tar size and counts a record holds (its trailer, checked)."""
    with _record_fd(record) as (rfd, rname):
        return _native.record_info(rfd, name=rname)
