"""The one place that calls the C core (``layerfs._core``) and maps its errors.

Each C entry point is wrapped once here, with argument conversion and error
mapping; everything above this module works with paths, file objects and
Python values.  cffi releases the GIL for the whole of each call.
"""
import errno as _errno
import fcntl
import io
import os
import struct
import threading
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ._core import ffi, lib
from .errors import LayerError

COMP_AUTO = lib.LFS_COMP_AUTO
COMP_NONE = lib.LFS_COMP_NONE
COMP_GZIP = lib.LFS_COMP_GZIP
COMP_ZSTD = lib.LFS_COMP_ZSTD

COMPRESSION_NAMES = {COMP_NONE: "none", COMP_GZIP: "gzip", COMP_ZSTD: "zstd"}
COMPRESSION_CODES = {v: k for k, v in COMPRESSION_NAMES.items()}
COMPRESSION_CODES["auto"] = COMP_AUTO

WHITEOUT_MODES = {"apply": lib.LFS_WH_APPLY, "overlay": lib.LFS_WH_OVERLAY, "keep": lib.LFS_WH_KEEP}
OWNER_MODES = {"keep": lib.LFS_OWNER_KEEP, "skip": lib.LFS_OWNER_SKIP, "map": lib.LFS_OWNER_MAP}
SOURCE_FORMATS = {"plain": lib.LFS_SRC_PLAIN, "overlay": lib.LFS_SRC_OVERLAY}
CHANGE_KINDS = {"path": lib.LFS_CHANGE_PATH, "delete": lib.LFS_CHANGE_DELETE,
                "opaque": lib.LFS_CHANGE_OPAQUE}

COPY_NO_OWNER = lib.LFS_COPY_NO_OWNER
COPY_NO_XATTRS = lib.LFS_COPY_NO_XATTRS
COPY_NO_REFLINK = lib.LFS_COPY_NO_REFLINK


def _str(buf) -> str:
    return ffi.string(buf).decode("utf-8", "surrogateescape")


def _raise(rc: int, err, default_path: Optional[str] = None, *, source: Optional[str] = None):
    """Turn a failed C call (rc < 0, err filled) into a LayerError.

    For calls that read an archive, ``source`` names the layer file: it becomes
    the error's filename, and a path the C core named (other than the entry
    itself, e.g. a hardlink target) goes into the message.
    """
    code = err.code or -rc or _errno.EIO
    message = _str(err.message) or os.strerror(code)
    entry = _str(err.entry) or None
    path = _str(err.path) or default_path
    if source is not None:
        c_path = _str(err.path)
        if c_path and c_path != entry and c_path.lstrip("/") != (entry or "").lstrip("/"):
            message = f"{c_path}: {message}"
        path = source
    raise LayerError(code, message, path, entry=entry,
                     offset=err.offset if err.offset >= 0 else None)


def _new_error():
    err = ffi.new("lfs_error *")
    err.offset = -1
    return err


class Digests(NamedTuple):
    digest: Optional[str]   # "sha256:<hex>" of the blob as read or written (None: not computed)
    diff_id: Optional[str]  # "sha256:<hex>" of the uncompressed tar stream (None: not computed)
    compressed_size: int
    tar_size: int
    compression: str     # "none", "gzip" or "zstd"


def _digests(d) -> Digests:
    return Digests(
        digest="sha256:" + bytes(ffi.buffer(d.digest, 32)).hex(),
        diff_id="sha256:" + bytes(ffi.buffer(d.diff_id, 32)).hex(),
        compressed_size=int(d.compressed_size),
        tar_size=int(d.tar_size),
        compression=COMPRESSION_NAMES.get(d.compression, "none"),
    )


class ApplyResult(NamedTuple):
    digests: Digests
    entries: int
    whiteouts: int
    warnings: int
    first_warning: Optional[str]
    record_size: int = 0           # bytes of the tar-split record written (record_fd)


IdMap = Sequence[Tuple[int, int, int]]  # (inner, outer, count)


def _idmap(m: Optional[IdMap]):
    if not m:
        return ffi.NULL, 0
    arr = ffi.new("lfs_idmap[]", len(m))
    for i, (inner, outer, count) in enumerate(m):
        arr[i].inner, arr[i].outer, arr[i].count = inner, outer, count
    return arr, len(m)


def apply(in_fd: int, root_fd: int, *, compression: int = COMP_AUTO,
          whiteouts: str = "apply", overlay_user_xattr: bool = False,
          owners: str = "keep", uid_map: Optional[IdMap] = None,
          gid_map: Optional[IdMap] = None, skip_devices: bool = False,
          no_xattrs: bool = False, threads: int = 0, max_entries: int = 0,
          max_pax_size: int = 0, max_xattrs_size: int = 0,
          record_fd: Optional[int] = None, name: Optional[str] = None) -> ApplyResult:
    """Apply the layer stream on in_fd to the directory root_fd (lfs_apply).

    record_fd: also write a tar-split record of the stream there (see reassemble).
    """
    opts = ffi.new("lfs_apply_opts *")
    opts.compression = compression
    opts.whiteouts = WHITEOUT_MODES[whiteouts]
    opts.overlay_user_xattr = int(overlay_user_xattr)
    opts.owners = OWNER_MODES[owners]
    uids, nuids = _idmap(uid_map)
    gids, ngids = _idmap(gid_map)
    opts.uid_map, opts.uid_map_len = uids, nuids
    opts.gid_map, opts.gid_map_len = gids, ngids
    opts.skip_devices = int(skip_devices)
    opts.no_xattrs = int(no_xattrs)
    opts.threads = threads
    opts.max_entries = max_entries
    opts.max_pax_size = max_pax_size
    opts.max_xattrs_size = max_xattrs_size
    if record_fd is not None:
        opts.record = 1
        opts.record_fd = record_fd
    res = ffi.new("lfs_apply_result *")
    err = _new_error()
    rc = lib.lfs_apply(in_fd, root_fd, opts, res, err)
    if rc < 0:
        _raise(rc, err, source=name or "<stream>")
    warn = _str(res.first_warning)
    return ApplyResult(_digests(res.digests), int(res.entries), int(res.whiteouts),
                       int(res.warnings), warn or None, int(res.record_size))


def digest_stream(in_fd: int, compression: int = COMP_AUTO, name: Optional[str] = None) -> Digests:
    out = ffi.new("lfs_digests *")
    err = _new_error()
    rc = lib.lfs_digest_stream(in_fd, compression, out, err)
    if rc < 0:
        _raise(rc, err, source=name or "<stream>")
    return _digests(out[0])


def decompress(in_fd: int, out_fd: int, compression: int = COMP_AUTO,
               name: Optional[str] = None) -> Digests:
    """Write the decompressed stream of in_fd (gzip, zstd or plain) to out_fd,
    decompressing in a second thread while writing (lfs_decompress_fd)."""
    out = ffi.new("lfs_digests *")
    err = _new_error()
    rc = lib.lfs_decompress_fd(in_fd, out_fd, compression, out, err)
    if rc < 0:
        _raise(rc, err, source=name or "<stream>")
    return _digests(out[0])


class CompressingWriter(io.RawIOBase):
    """A raw binary file that writes what it is given to fd compressed
    (COMP_NONE, COMP_GZIP or COMP_ZSTD at level; 0: the C core's default, as
    create_layer), compressing in a second thread (lfs_sink).  ``finish()``
    flushes and returns the Digests (digest of the bytes written to fd, DiffID
    of the tar); closing without it drops what is still buffered."""

    def __init__(self, fd: int, compression: int, level: int = 0, name: Optional[str] = None):
        super().__init__()
        self._name = name or "<stream>"
        self.digests: Optional[Digests] = None
        p = ffi.new("lfs_sink **")
        err = _new_error()
        rc = lib.lfs_sink_open(p, fd, compression, level, 0, err)
        if rc < 0:
            _raise(rc, err, source=self._name)
        self._s = p[0]

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        if self._s is None:
            raise ValueError("I/O operation on closed writer")
        m = memoryview(b).cast("B")
        err = _new_error()
        rc = lib.lfs_sink_write(self._s, ffi.from_buffer(m), len(m), err)
        if rc < 0:
            _raise(rc, err, source=self._name)
        return len(m)

    def finish(self) -> Digests:
        if self._s is None:
            raise ValueError("I/O operation on closed writer")
        out = ffi.new("lfs_digests *")
        err = _new_error()
        rc = lib.lfs_sink_finish(self._s, out, err)
        if rc < 0:
            _raise(rc, err, source=self._name)
        self.digests = _digests(out[0])
        return self.digests

    def close(self) -> None:
        if self._s is not None:
            s, self._s = self._s, None
            lib.lfs_sink_free(s)
        super().close()


class DecompressedReader(io.RawIOBase):
    """The decompressed stream of fd (gzip, zstd or plain, detected) as a raw
    binary file; decompression (and with hash, both digests) runs ahead in a
    second thread.  ``digests`` once the end was read with hash (else None).
    Closing frees the C reader and calls ``on_close`` (e.g. closing the
    compressed file)."""

    def __init__(self, fd: int, compression: int = COMP_AUTO, name: Optional[str] = None,
                 on_close: Optional[Callable[[], None]] = None, hash: bool = True):
        super().__init__()
        self._name = name or "<stream>"
        self._on_close = on_close
        self._hash = hash
        self._eof = False
        self.digests: Optional[Digests] = None
        p = ffi.new("lfs_reader **")
        err = _new_error()
        rc = lib.lfs_reader_open(p, fd, compression, int(hash), err)
        if rc < 0:
            _raise(rc, err, source=self._name)
        self._r = p[0]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._r is None:
            raise ValueError("I/O operation on closed reader")
        m = memoryview(b).cast("B")
        if not len(m) or self._eof:
            return 0
        err = _new_error()
        n = lib.lfs_reader_read(self._r, ffi.from_buffer(m), len(m), err)
        if n < 0:
            _raise(n, err, source=self._name)
        if n == 0:
            out = ffi.new("lfs_digests *")
            rc = lib.lfs_reader_finish(self._r, out, err)
            if rc < 0:
                _raise(rc, err, source=self._name)
            self._eof = True
            if self._hash:
                self.digests = _digests(out[0])
        return n

    def close(self) -> None:
        if self._r is not None:
            r, self._r = self._r, None
            lib.lfs_reader_free(r)
            if self._on_close is not None:
                self._on_close()
        super().close()


def sha256_fd(fd: int, name: Optional[str] = None) -> Tuple[str, int]:
    out = ffi.new("unsigned char[32]")
    size = ffi.new("uint64_t *")
    err = _new_error()
    rc = lib.lfs_sha256_fd(fd, out, size, err)
    if rc < 0:
        _raise(rc, err, name)
    return "sha256:" + bytes(ffi.buffer(out, 32)).hex(), int(size[0])


class CreateResult(NamedTuple):
    digests: Digests
    entries: int


def create(root_fd: int, out_fd: int, *, changes: Optional[Iterable[Tuple[str, str]]] = None,
           compression: int = COMP_NONE, level: int = 0, threads: int = 0,
           source: str = "plain", overlay_user_xattr: bool = False, sparse: bool = False,
           source_date_epoch: Optional[int] = None, no_xattrs: bool = False,
           name: Optional[str] = None) -> CreateResult:
    """Write a layer tar of root_fd (or of the listed changes) to out_fd (lfs_create).

    changes: iterable of (relative path, kind) with kind "path", "delete" or "opaque".
    """
    opts = ffi.new("lfs_create_opts *")
    opts.compression = compression
    opts.level = level
    opts.threads = threads
    opts.source = SOURCE_FORMATS[source]
    opts.overlay_user_xattr = int(overlay_user_xattr)
    opts.sparse = int(sparse)
    if source_date_epoch is not None:
        opts.clamp_mtime = 1
        opts.source_date_epoch = int(source_date_epoch)
    opts.no_xattrs = int(no_xattrs)
    keep = []
    if changes is None:
        carr, n = ffi.NULL, 0
    else:
        changes = list(changes)
        n = len(changes)
        carr = ffi.new("lfs_change[]", max(n, 1))
        for i, (path, kind) in enumerate(changes):
            b = ffi.new("char[]", os.fsencode(path))
            keep.append(b)
            carr[i].path = b
            carr[i].kind = CHANGE_KINDS[kind]
    res = ffi.new("lfs_create_result *")
    err = _new_error()
    rc = lib.lfs_create(root_fd, carr, n, out_fd, opts, res, err)
    if rc < 0:
        _raise(rc, err, name)
    return CreateResult(_digests(res.digests), int(res.entries))


class CopyStats(NamedTuple):
    files: int
    dirs: int
    bytes: int
    reflinked: int
    hardlinks: int


def _stats(s) -> CopyStats:
    return CopyStats(int(s.files), int(s.dirs), int(s.bytes), int(s.reflinked), int(s.hardlinks))


def copy_file(src_dirfd: int, src: str, dst_dirfd: int, dst: str, flags: int = 0) -> CopyStats:
    st = ffi.new("lfs_copy_stats *")
    err = _new_error()
    rc = lib.lfs_copy_file(src_dirfd, os.fsencode(src), dst_dirfd, os.fsencode(dst), flags, st, err)
    if rc < 0:
        _raise(rc, err, src)
    return _stats(st)


def copy_tree(src_dirfd: int, src: str, dst_dirfd: int, dst: str, flags: int = 0) -> CopyStats:
    st = ffi.new("lfs_copy_stats *")
    err = _new_error()
    rc = lib.lfs_copy_tree(src_dirfd, os.fsencode(src), dst_dirfd, os.fsencode(dst), flags, st, err)
    if rc < 0:
        _raise(rc, err, src)
    return _stats(st)


def remove_tree(dirfd: int, path: str) -> None:
    err = _new_error()
    rc = lib.lfs_remove_tree(dirfd, os.fsencode(path), err)
    if rc < 0:
        _raise(rc, err, path)


SCAN_HASH = lib.LFS_SCAN_HASH


class ScanEntry(NamedTuple):
    """One archive entry as the C tar parser saw it (see lfs_scan in csrc/layerfs.h)."""
    path: str                      # as in the archive (not normalised); surrogateescape-decoded
    type: str                      # "0" file, "1" hardlink, "2" symlink, "3" char, "4" block, "5" dir, "6" fifo
    mode: int                      # permission bits (07777)
    uid: int
    gid: int
    size: int                      # file size (the real size for sparse files); 0 unless a regular file
    mtime_sec: int
    mtime_nsec: int
    devmajor: int
    devminor: int
    header_offset: int             # offset of the entry's first header in the tar stream
    digest: Optional[str]          # "sha256:<hex>" of the (expanded) content, regular files when hashing
    linkname: str                  # hardlink/symlink target, "" otherwise
    xattrs: Dict[str, bytes]       # name -> value, as the archive carries them
    sparse: Tuple[Tuple[int, int], ...] = ()   # (offset, length) data segments of a sparse file
    key: Any = None                # everything above but path and header_offset, as one
                                   # value: equal keys, equal entries
    data_offset: int = -1          # scan(offsets=True): where a non-sparse regular file's
                                   # data starts in the uncompressed stream; -1 otherwise

    @property
    def mtime(self) -> float:
        return self.mtime_sec + self.mtime_nsec / 1e9


_SCAN_FIXED = struct.Struct("<IBBHIIIqqiIIq32sIIII")


def _record_names(buf, p: int, plen: int, llen: int, nx: int):
    """Decode the variable part shared by scan and walk records: path, link
    target and xattrs starting at byte p; returns them and the next offset."""
    path = buf[p:p + plen].decode("utf-8", "surrogateescape")
    p += plen
    link = buf[p:p + llen].decode("utf-8", "surrogateescape") if llen else ""
    p += llen
    xattrs = {}
    for _ in range(nx):
        nl, vl = struct.unpack_from("<II", buf, p)
        p += 8
        xattrs[buf[p:p + nl].decode("utf-8", "surrogateescape")] = bytes(buf[p + nl:p + nl + vl])
        p += nl + vl
    return path, link, xattrs, p


def _parse_scan_records(buf: bytearray, out: list, factory: Callable = ScanEntry,
                        offsets: bool = False) -> int:
    """Parse the complete records at the start of buf into out (factory(fields
    of a ScanEntry) each); returns the bytes used.  offsets: the records end
    with a data offset (LFS_SCAN_DATA_OFFSET)."""
    pos, n = 0, len(buf)
    extra = 8 if offsets else 0
    unpack_fixed, fixed = _SCAN_FIXED.unpack_from, _SCAN_FIXED.size
    unpack_from, append = struct.unpack_from, out.append
    while n - pos >= 4:
        end = pos + 4 + unpack_from("<I", buf, pos)[0]
        if end > n:
            break
        (_, typ, has_digest, _, mode, uid, gid, size, msec, mnsec, dmaj, dmin, hoff, dig,
         plen, llen, nx, ns) = unpack_fixed(buf, pos)
        p = pos + fixed
        last = end - extra
        if llen or nx or ns:
            path, link, xattrs, q = _record_names(buf, p, plen, llen, nx)
            sparse = ()
            if ns:
                sparse = tuple(struct.iter_unpack("<qq", buf[q:q + 16 * ns]))
                q += 16 * ns
            if q != last:
                raise ValueError(f"malformed scan record at byte {pos}")
            tail = bytes(buf[p + plen:last])        # link, xattrs, sparse map
        else:
            if p + plen != last:
                raise ValueError(f"malformed scan record at byte {pos}")
            path = buf[p:last].decode("utf-8", "surrogateescape")
            link, xattrs, sparse, tail = "", {}, (), b""
        key = (typ, has_digest, mode, uid, gid, size, msec, mnsec, dmaj, dmin, dig, tail)
        data_offset = unpack_from("<q", buf, last)[0] if extra else -1
        append(factory(path, chr(typ), mode, uid, gid, size, msec, mnsec, dmaj, dmin, hoff,
                       "sha256:" + dig.hex() if has_digest else None, link, xattrs, sparse, key,
                       data_offset))
        pos = end
    return pos


_PIPE_SIZE = 1 << 20


def _call_with_record_pipe(call: Callable[[int], int], parse: Callable[[bytearray, list], int],
                           entries: list, what: str) -> Tuple[int, List[BaseException]]:
    """Run call(write fd) -- a C call that writes records into a pipe -- in this
    thread while a helper thread drains the pipe, parse(pending, entries) taking
    the whole records (it returns the bytes it used).  Returns the call's result
    and the parse errors (the pipe is still drained after one)."""
    failure: List[BaseException] = []
    r, w = os.pipe()
    try:
        # room for a few record batches: the C side rarely waits for the parser
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    except OSError:
        pass

    def reader() -> None:
        pending = bytearray()
        try:
            while True:
                chunk = os.read(r, 1 << 20)
                if not chunk:
                    break
                if failure:
                    continue            # keep draining so the writer never blocks
                pending += chunk
                try:
                    used = parse(pending, entries)
                    del pending[:used]
                except Exception as exc:  # noqa: BLE001 - re-raised in the caller
                    failure.append(exc)
            if pending and not failure:
                failure.append(ValueError(f"{what} records end inside a record"))
        finally:
            os.close(r)

    thread = threading.Thread(target=reader, name=f"layerfs-{what}", daemon=True)
    thread.start()
    try:
        rc = call(w)
    finally:
        os.close(w)
        thread.join()
    return rc, failure


def discard(*fields) -> None:
    """A scan or walk factory that keeps nothing (the call is made for its
    checks and digests)."""
    return None


def scan(in_fd: int, *, compression: int = COMP_AUTO, hash: bool = True,
         name: Optional[str] = None, factory: Optional[Callable[..., Any]] = None,
         offsets: bool = False, stream_hash: bool = True) -> Tuple[List[Any], Digests]:
    """List the layer stream on in_fd without extracting it (lfs_scan).

    Returns the entries in archive order and the digests of the stream.  The C
    call runs in this thread (without the GIL) and writes records into a pipe
    that a helper thread drains and parses.  factory: called with a
    ScanEntry's fields, positionally, for each entry (in the helper thread,
    while the scan goes on); the list holds what it returns.  Default: ScanEntry.
    offsets: give each non-sparse regular file's data_offset, and hash the
    sparse ones even without hash (their data is not one range).
    stream_hash=False: the stream's digest and DiffID are not computed (None in
    the result), and an uncompressed layer file is read only where needed.
    """
    entries: List[Any] = []
    out = ffi.new("lfs_digests *")
    err = _new_error()
    make = factory or ScanEntry
    flags = (SCAN_HASH if hash else 0) | \
        (lib.LFS_SCAN_DATA_OFFSET | lib.LFS_SCAN_HASH_SPARSE if offsets else 0) | \
        (0 if stream_hash else lib.LFS_SCAN_NO_STREAM_HASH)
    rc, failure = _call_with_record_pipe(
        lambda w: lib.lfs_scan(in_fd, w, compression, flags, out, err),
        lambda buf, got: _parse_scan_records(buf, got, make, offsets), entries, "scan")
    if rc < 0:
        _raise(rc, err, name)
    if failure:
        raise failure[0]
    d = _digests(out[0])
    if not stream_hash:
        d = d._replace(digest=None, diff_id=None)
    return entries, d


def layers_prematch(fd_a: int, fd_b: int, threads: int = 0
                    ) -> Dict[Tuple[int, int, int], Tuple[bool, Optional[str], Optional[str]]]:
    """Same-named, same-size regular files of two uncompressed layer files,
    found from their headers alone and compared in place (lfs_layers_prematch):
    (data offset a, data offset b, size) -> (same bytes, sha256 of a, of b),
    the digests given when not the same."""
    out = ffi.new("lfs_pairs *")
    err = _new_error()
    rc = lib.lfs_layers_prematch(fd_a, fd_b, threads, out, err)
    try:
        if rc < 0:
            _raise(rc, err)
        n = out.n
        jobs = ffi.unpack(out.jobs, 4 * n) if n else []
        result = bytes(ffi.buffer(out.result, n)) if n else b""
        digests = bytes(ffi.buffer(out.digests, 64 * n)) if n else b""
    finally:
        lib.lfs_pairs_free(out)
    return {(jobs[4 * i], jobs[4 * i + 2], jobs[4 * i + 1]): r
            for i, r in enumerate(_range_results(result, digests))}


def _range_results(result: bytes, digests: bytes
                   ) -> List[Tuple[bool, Optional[str], Optional[str]]]:
    """(same, digest a, digest b) of each range pair from lfs_ranges_compare's
    result flags and digests."""
    out = []
    for i, r in enumerate(result):
        da = "sha256:" + digests[64 * i:64 * i + 32].hex() if r & lib.LFS_RANGE_DIGEST_A else None
        db = "sha256:" + digests[64 * i + 32:64 * i + 64].hex() \
            if r & lib.LFS_RANGE_DIGEST_B else None
        out.append((bool(r & lib.LFS_RANGE_SAME), da, db))
    return out


def ranges_compare(fd_a: int, fd_b: int, jobs: Sequence[Tuple[int, int, int, int]],
                   threads: int = 0) -> List[Tuple[bool, Optional[str], Optional[str]]]:
    """For each job (offset a, length a, offset b, length b) -- byte ranges of
    the files fd_a and fd_b, an offset < 0 for none: (same bytes, sha256 of
    range a, of range b), the digests given when not the same and readable
    (lfs_ranges_compare, pread on a few threads)."""
    n = len(jobs)
    if n == 0:
        return []
    arr = ffi.new("int64_t[]", [v for job in jobs for v in job])
    result = ffi.new("unsigned char[]", n)
    digests = ffi.new("unsigned char[]", 64 * n)
    err = _new_error()
    rc = lib.lfs_ranges_compare(fd_a, fd_b, arr, n, threads, result, digests, err)
    if rc < 0:
        _raise(rc, err)
    return _range_results(bytes(ffi.buffer(result, n)), bytes(ffi.buffer(digests, 64 * n)))


class RecordInfo(NamedTuple):
    """What a tar-split record says about itself (lfs_record_read_info)."""
    diff_id: str         # "sha256:<hex>" of the tar stream it rebuilds
    tar_size: int
    files: int           # file contents read from the tree
    captured: int        # file contents kept in the record instead
    kept_bytes: int      # tar bytes kept in the record (headers, padding, ...)
    record_size: int


def reassemble(record_fd: int, root_fd: int, out_fd: int = -1,
               name: Optional[str] = None) -> Digests:
    """Rebuild a layer's tar stream from its record and tree (lfs_reassemble).

    out_fd -1 only checks.  The stream's sha256 is compared with the recorded
    DiffID; on any error out_fd may have received a partial or wrong stream.
    """
    out = ffi.new("lfs_digests *")
    err = _new_error()
    rc = lib.lfs_reassemble(record_fd, root_fd, out_fd, out, err)
    if rc < 0:
        _raise(rc, err, name)
    return _digests(out[0])


def record_info(record_fd: int, name: Optional[str] = None) -> RecordInfo:
    out = ffi.new("lfs_record_info *")
    err = _new_error()
    rc = lib.lfs_record_read_info(record_fd, out, err)
    if rc < 0:
        _raise(rc, err, name)
    return RecordInfo("sha256:" + bytes(ffi.buffer(out.diff_id, 32)).hex(), int(out.tar_size),
                      int(out.files), int(out.captured), int(out.kept_bytes),
                      int(out.record_size))


def has_openat2() -> bool:
    return bool(lib.lfs_has_openat2())


# ---- directory trees for the diff engine (csrc/treescan.c) ----

_WALK_FIXED = struct.Struct("<I4sIIIIqqIIIQQIIII")


class WalkEntry(NamedTuple):
    """One entry of a directory tree as lfs_walk saw it (lstat, no symlink followed)."""
    path: str                      # relative to the root ("" for the root), surrogateescape
    type: str                      # "0" file, "2" symlink, "3" char, "4" block, "5" dir, "6" fifo, "s" socket
    mode: int                      # permission bits (07777)
    uid: int
    gid: int
    nlink: int
    size: int                      # regular files; 0 otherwise
    mtime_ns: int
    devmajor: int
    devminor: int
    dev: int
    ino: int
    linkname: str                  # symlink target, "" otherwise
    xattrs: Dict[str, bytes]
    key: Any = None                # everything above but dev, ino and path, as one value:
                                   # equal keys, equal entries (content aside)


def _parse_walk_records(buf: bytearray, out: list, factory: Callable = WalkEntry,
                        compared: Optional[Dict[str, Tuple[bool, Optional[str],
                                                           Optional[str]]]] = None) -> int:
    pos, n = 0, len(buf)
    unpack_fixed, fixed = _WALK_FIXED.unpack_from, _WALK_FIXED.size
    unpack_from, append = struct.unpack_from, out.append
    while n - pos >= 4:
        end = pos + 4 + unpack_from("<I", buf, pos)[0]
        if end > n:
            break
        if buf[pos + 4] == 0x43 and compared is not None:       # 'C': a comparison
            same, has, plen = buf[pos + 5], buf[pos + 6], unpack_from("<I", buf, pos + 8)[0]
            p = pos + 12
            da = db = None
            if has:
                da = "sha256:" + buf[p:p + 32].hex()
                db = "sha256:" + buf[p + 32:p + 64].hex()
                p += 64
            if p + plen != end:
                raise ValueError(f"malformed walk record at byte {pos}")
            compared[buf[p:end].decode("utf-8", "surrogateescape")] = (bool(same), da, db)
            pos = end
            continue
        (_, head, mode, uid, gid, nlink, size, msec, mnsec, dmaj, dmin, dev, ino,
         plen, llen, nx, _) = unpack_fixed(buf, pos)
        p = pos + fixed
        if llen or nx:
            path, link, xattrs, q = _record_names(buf, p, plen, llen, nx)
            if q != end:
                raise ValueError(f"malformed walk record at byte {pos}")
            key = (head, mode, uid, gid, nlink, size, msec, mnsec, dmaj, dmin,
                   bytes(buf[p + plen:end]))
        else:
            if p + plen != end:
                raise ValueError(f"malformed walk record at byte {pos}")
            path = buf[p:end].decode("utf-8", "surrogateescape")
            link, xattrs = "", {}
            key = (head, mode, uid, gid, nlink, size, msec, mnsec, dmaj, dmin)
        append(factory(path, chr(head[0]), mode, uid, gid, nlink, size,
                       msec * 1_000_000_000 + mnsec, dmaj, dmin, dev, ino, link, xattrs, key))
        pos = end
    return pos


def walk(root: str, factory: Optional[Callable[..., Any]] = None) -> List[Any]:
    """Every entry of the tree at root, sorted preorder (lfs_walk; one C call
    without the GIL, records drained from a pipe by a helper thread).

    factory: called with a WalkEntry's fields, positionally, for each entry
    (in the helper thread, while the walk goes on); the list holds what it
    returns.  Default: WalkEntry."""
    entries: List[Any] = []
    err = _new_error()
    make = factory or WalkEntry
    rc, failure = _call_with_record_pipe(
        lambda w: lib.lfs_walk(os.fsencode(root), w, 0, err),
        lambda buf, out: _parse_walk_records(buf, out, make), entries, "walk")
    if rc < 0:
        _raise(rc, err, os.fsdecode(root))
    if failure:
        raise failure[0]
    return entries


WALK_TRUST_MTIME = lib.LFS_WALK_TRUST_MTIME


def walk_compare(root: str, ref_root: str, *, trust_mtime: bool = False, threads: int = 0,
                 factory: Optional[Callable[..., Any]] = None
                 ) -> Tuple[List[Any], Dict[str, Tuple[bool, Optional[str], Optional[str]]]]:
    """walk(root, factory) and, while it goes, the comparison of each regular
    file with the regular file of the same size at the same path under
    ref_root (lfs_walk_compare; not for one inode, nor with trust_mtime for
    equal mtimes with a non-zero nanosecond part).  Returns the entries and
    {relative path: (same bytes, sha256 of the ref_root file, of the root
    file)}; the digests are given when the bytes differ and both could be read."""
    entries: List[Any] = []
    compared: Dict[str, Tuple[bool, Optional[str], Optional[str]]] = {}
    err = _new_error()
    make = factory or WalkEntry
    rc, failure = _call_with_record_pipe(
        lambda w: lib.lfs_walk_compare(os.fsencode(root), os.fsencode(ref_root), w,
                                       WALK_TRUST_MTIME if trust_mtime else 0, threads, err),
        lambda buf, out: _parse_walk_records(buf, out, make, compared), entries, "walk")
    if rc < 0:
        _raise(rc, err, os.fsdecode(root))
    if failure:
        raise failure[0]
    return entries, compared


def files_equal(pairs: Sequence[Tuple[bytes, bytes]], threads: int = 0) -> List[bool]:
    """For each (path a, path b): whether the two regular files hold the same
    bytes (lfs_files_equal; False also when one cannot be read)."""
    n = len(pairs)
    if n == 0:
        return []
    try:
        blob = b"\0".join([p for pair in pairs for p in pair]) + b"\0"
    except TypeError:               # str or path-like paths
        blob = b"\0".join([os.fsencode(p) for pair in pairs for p in pair]) + b"\0"
    same = ffi.new("unsigned char[]", n)
    err = _new_error()
    rc = lib.lfs_files_equal(blob, n, threads, same, err)
    if rc < 0:
        _raise(rc, err)
    return [bool(x) for x in bytes(ffi.buffer(same, n))]
