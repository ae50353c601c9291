"""Applying layer changesets to directories (OCI image-spec semantics)."""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .. import _native
from ..digest import parse_digest
from ..errors import DigestMismatch, LayerError
from .._io import Source, open_output, open_source, source_name

IdMap = Sequence[Tuple[int, int, int]]


@dataclass(frozen=True)
class ApplyResult:
    """What applying one layer did, and the layer's digests."""
    source: str
    digest: str          # sha256 of the blob as read
    diff_id: str         # sha256 of the uncompressed tar stream
    size: int            # bytes of the blob
    tar_size: int        # bytes of the tar stream
    compression: str     # "none", "gzip" or "zstd"
    entries: int
    whiteouts: int
    warnings: int
    first_warning: Optional[str]

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_OPTION_NAMES = ("whiteouts", "overlay_user_xattr", "owners", "uid_map", "gid_map",
                 "skip_devices", "no_xattrs", "threads", "max_entries", "max_pax_size",
                 "max_xattrs_size")


def _compression_code(compression: str) -> int:
    try:
        return _native.COMPRESSION_CODES[compression]
    except KeyError:
        raise ValueError(f"unknown compression {compression!r} (auto, none, gzip, zstd)") from None


def _check(name: str, what: str, expected: Optional[str], actual: str) -> None:
    if expected is not None and parse_digest(expected) != actual:
        raise DigestMismatch(f"{what} mismatch: expected {parse_digest(expected)}, got {actual}", name)


def _apply_fd(fd: int, name: str, root_fd: int, compression: int, options: dict,
              expected_digest: Optional[str], expected_diff_id: Optional[str],
              record_fd: Optional[int] = None) -> ApplyResult:
    try:
        r = _native.apply(fd, root_fd, compression=compression, name=name,
                          record_fd=record_fd, **options)
    except LayerError as e:
        if not e.filename:
            e.filename = name
        raise
    d = r.digests
    _check(name, "digest", expected_digest, d.digest)
    _check(name, "DiffID", expected_diff_id, d.diff_id)
    return ApplyResult(name, d.digest, d.diff_id, d.compressed_size, d.tar_size, d.compression,
                       r.entries, r.whiteouts, r.warnings, r.first_warning)


def _is_empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except NotADirectoryError:
        raise LayerError(20, "destination is not a directory", path) from None


def stages(dest: str) -> bool:
    """Whether unpack_layers builds dest in a staging directory beside it (dest
    missing or an empty directory) rather than writing into it."""
    return not os.path.lexists(dest) or _is_empty_dir(dest)


class _Staging:
    """A new directory staged beside ``dest`` and renamed into place on success.

    Used when dest does not exist or is an empty directory, so that a failure
    (corrupt layer, digest mismatch) leaves nothing visible.
    """

    def __init__(self, dest: str):
        self.dest = dest
        # a relative dest stays relative: the working directory's parents may be
        # closed to this user
        parent = os.path.dirname(os.path.normpath(dest)) or "."
        os.makedirs(parent, exist_ok=True)
        base = os.path.basename(os.path.normpath(dest))
        made = tempfile.mkdtemp(prefix=f".{base}.new-", dir=parent)
        self.path = os.path.join(parent, os.path.basename(made))
        mode = 0o755
        try:
            st = os.stat(dest)
            mode = st.st_mode & 0o7777
            os.chown(self.path, st.st_uid, st.st_gid)
        except FileNotFoundError:
            pass
        os.chmod(self.path, mode)

    def commit(self) -> None:
        os.rename(self.path, self.dest)  # replaces an empty directory atomically

    def discard(self) -> None:
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _native.remove_tree(fd, os.path.basename(self.path))
        except OSError:
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            os.close(fd)


def _read_through(sources: Sequence[Source], compression: int) -> None:
    """Read every layer given as a path to a regular file through (headers,
    sizes, compression) before a dest that already holds files is touched:
    such a dest is written in place, not staged, so a layer found broken
    half-way would leave the layers before it applied.  A stream or a FIFO
    cannot be read twice and is not checked (nor opened); failures of the
    writing itself (a full disk) are not foreseen."""
    for src in sources:
        if not isinstance(src, (str, bytes, os.PathLike)):
            continue
        try:
            if not stat.S_ISREG(os.stat(src).st_mode):
                continue
        except OSError:
            continue                    # the apply names what is wrong with it
        name = source_name(src)
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _native.scan(fd, compression=compression, hash=False, stream_hash=False, name=name,
                         factory=_native.discard)
        finally:
            os.close(fd)


def _verify_first(source: Source, compression: int, expected_digest, expected_diff_id):
    """For in-place application: check the expected digests before touching dest.
    Returns a source to apply from (a spooled copy for a stream, or for a path
    that is not a regular file: a pipe or FIFO gives its bytes only once), the
    spool to close, and the name to report."""
    from ..digest import layer_digests
    spool = None
    name = source_name(source)
    is_path = isinstance(source, (str, bytes, os.PathLike))
    if is_path and not stat.S_ISREG(os.stat(source).st_mode):
        with open(source, "rb") as f:
            spool = tempfile.TemporaryFile(prefix="layerfs-spool-")
            shutil.copyfileobj(f, spool, 1 << 20)
    elif not is_path:
        spool = tempfile.TemporaryFile(prefix="layerfs-spool-")
        shutil.copyfileobj(source, spool, 1 << 20)
    if spool is not None:
        spool.seek(0)
        source = spool
        if not is_path:
            name = source_name(source)
    try:
        d = layer_digests(source, {v: k for k, v in _native.COMPRESSION_CODES.items()}[compression])
        _check(name, "digest", expected_digest, d.digest)
        _check(name, "DiffID", expected_diff_id, d.diff_id)
    except BaseException:
        if spool is not None:
            spool.close()
        raise
    if spool is not None:
        spool.seek(0)
    return source, spool, name


def unpack_layers(sources: Iterable[Source], dest, *, compression: str = "auto",
                  expected: Optional[Sequence[Tuple[Optional[str], Optional[str]]]] = None,
                  progress=None, records: Optional[Sequence] = None,
                  **options) -> List[ApplyResult]:
    """Apply several layers in order onto dest (flatten an image).

    When dest is missing or empty, everything is staged in a temp directory beside
    it and renamed into place at the end: any failure leaves dest as it was.
    ``expected`` gives (digest, diff_id) per layer (either may be None).
    ``progress(i, name, result)`` is called after each layer.
    ``records`` gives per layer a tar-split record output (path or binary file,
    or None); see :mod:`layerfs.archive.tarsplit`.  A record reads its layer's
    files back, so it rebuilds the layer only from a tree where later layers did
    not replace them (as in a driver's per-layer directories).
    """
    for k in options:
        if k not in _OPTION_NAMES:
            raise TypeError(f"unknown option {k!r}")
    sources = list(sources)
    expected = list(expected) if expected is not None else [(None, None)] * len(sources)
    if len(expected) != len(sources):
        raise ValueError("expected must give one (digest, diff_id) pair per layer")
    records = list(records) if records is not None else [None] * len(sources)
    if len(records) != len(sources):
        raise ValueError("records must give one record output (or None) per layer")
    comp = _compression_code(compression)
    dest = os.fsdecode(dest)
    staged = stages(dest)
    if not staged:
        _read_through(sources, comp)
    stage = _Staging(dest) if staged else None
    root = stage.path if stage else dest
    results: List[ApplyResult] = []
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i, (src, (exp_digest, exp_diff), rec) in enumerate(zip(sources, expected, records)):
                spool = shown = None
                if not staged and (exp_digest or exp_diff):
                    src, spool, shown = _verify_first(src, comp, exp_digest, exp_diff)
                try:
                    with open_source(src) as (fd, name):
                        name = shown or name
                        if rec is None:
                            r = _apply_fd(fd, name, root_fd, comp, options, exp_digest, exp_diff)
                        else:
                            with open_output(rec) as (rfd, _):
                                r = _apply_fd(fd, name, root_fd, comp, options, exp_digest,
                                              exp_diff, rfd)
                finally:
                    if spool is not None:
                        spool.close()
                results.append(r)
                if progress:
                    progress(i, r.source, r)
        finally:
            os.close(root_fd)
        if stage:
            stage.commit()
    except BaseException:
        if stage:
            stage.discard()
        raise
    return results


def apply_layer(source: Source, dest, *, compression: str = "auto",
                expected_digest: Optional[str] = None, expected_diff_id: Optional[str] = None,
                record=None, **options) -> ApplyResult:
    """Apply one layer (path or binary stream; gzip, zstd or plain tar) onto dest.

    Options: whiteouts ("apply", "overlay", "keep"), overlay_user_xattr, owners
    ("keep", "skip", "map") with uid_map/gid_map [(inner, outer, count)],
    skip_devices, no_xattrs, threads, max_entries, max_pax_size, max_xattrs_size.
    If an expected digest or DiffID is given and does not match, DigestMismatch is
    raised and nothing the call wrote remains visible.
    record (path or binary file): also write a tar-split record, from which
    :func:`layerfs.archive.tarsplit.reassemble` rebuilds the layer's tar stream
    from dest; a path is written beside itself and renamed into place on success.
    """
    return unpack_layers([source], dest, compression=compression,
                         expected=[(expected_digest, expected_diff_id)], records=[record],
                         **options)[0]
