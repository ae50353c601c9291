"""File access for image sources and writers.

- :class:`DirFiles` / :class:`TarFiles`: read the files of an image directory, or
  the members of an image tarball in place (member offsets; no extraction);
- :class:`VerifyingReader`: a stream that checks a blob's size and digest at EOF;
- :class:`TarWriter`: a small ustar writer that streams blobs of unknown size by
  patching the header afterwards;
- :func:`staged_file`: write a file beside its destination, fsync, rename.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import tempfile
from contextlib import contextmanager
from typing import BinaryIO, Dict, Iterator, Optional, Tuple

from .. import _native
from .._io import lexical_parts
from ..errors import DigestMismatch, LayerError, NotFound
from .manifest import FormatError, Where, detect_compression

CHUNK = 1 << 20


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_member_name(name: str) -> str:
    """A path inside an image archive or directory, normalised: no "./", no leading "/"."""
    return "/".join(lexical_parts(name.replace("\\", "/")))


def _safe_relpath(path: str, where: Where, field: Optional[str]) -> str:
    """A relative path from a manifest: refuse absolute paths and "..": they
    would point outside the image."""
    if not isinstance(path, str) or not path:
        raise where.error("must be a non-empty path", field)
    if "\0" in path:
        raise where.error(f"path {path!r} holds a NUL byte", field)
    if path.startswith("/") or ".." in path.replace("\\", "/").split("/"):
        raise where.error(f"path {path!r} points outside the image", field)
    return clean_member_name(path)


class RangeReader(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``start`` of a file (os.pread on its own
    fd, so several readers can run at once).  No fileno(): a consumer that wants
    an fd must read through it, never past the member's end."""

    def __init__(self, fd: int, start: int, size: int, name: str):
        super().__init__()
        self._fd = os.dup(fd)
        self._start = start
        self._size = size
        self._pos = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a member of an archive has no file descriptor")

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        data = os.pread(self._fd, n, self._start + self._pos)
        if not data:
            raise LayerError(errno.EIO, f"archive truncated: {self.name} ends early", self.name)
        b[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


class VerifyingReader(io.RawIOBase):
    """Pass a blob's bytes through, hashing them; at EOF (or past the expected
    size) raise DigestMismatch naming the blob and the file."""

    def __init__(self, raw: BinaryIO, digest: str, size: Optional[int], where: Where):
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._where = where
        self._hash = hashlib.sha256()
        self._count = 0
        self._checked = False
        self.name = f"{where.filename}:{where.entry}" if where.entry else where.filename

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a verifying stream has no file descriptor")

    def _fail(self, message: str):
        return DigestMismatch(f"blob {self._digest}: {message}", self._where.filename,
                              entry=self._where.entry)

    def readinto(self, b) -> int:
        if self._checked:
            return 0
        data = self._raw.read(len(b))
        if data:
            self._hash.update(data)
            self._count += len(data)
            if self._size is not None and self._count > self._size:
                raise self._fail(f"more than the {self._size} bytes the descriptor gives")
            b[:len(data)] = data
            return len(data)
        self._checked = True
        if self._size is not None and self._count != self._size:
            raise self._fail(f"size is {self._count} bytes, descriptor says {self._size}")
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise self._fail(f"content has digest {actual}")
        return 0

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


# --- reading a directory or a tarball -------------------------------------------------------

class DirFiles:
    """The files of an image directory (OCI layout or unpacked docker-archive)."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._real_root = os.path.realpath(self.root)
        self.label = self.root

    def where(self, path: str) -> Where:
        return Where(os.path.join(self.root, path))

    def _resolve(self, path: str) -> str:
        full = os.path.join(self.root, path)
        real = os.path.realpath(full)
        if real != self._real_root and not real.startswith(self._real_root + os.sep):
            raise FormatError(f"{path!r} resolves outside the image directory", full)
        return real

    def size(self, path: str) -> Optional[int]:
        try:
            st = os.stat(self._resolve(path))
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size

    def open(self, path: str) -> BinaryIO:
        real = self._resolve(path)
        try:
            # O_NONBLOCK: a FIFO put there (or swapped in after the check above)
            # is refused below instead of blocking the open until a writer comes
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{path} does not exist", os.path.join(self.root, path)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FormatError(f"{path} is not a regular file", os.path.join(self.root, path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def real_path(self, path: str) -> Optional[str]:
        return self._resolve(path) if self.size(path) is not None else None

    def head(self, path: str, n: int = 8) -> bytes:
        with self.open(path) as f:
            return f.read(n)

    def close(self) -> None:
        pass


class _Member:
    __slots__ = ("name", "kind", "offset", "size", "link")

    def __init__(self, name: str, kind: str, offset: int, size: int, link: str):
        self.name, self.kind, self.offset, self.size, self.link = name, kind, offset, size, link


def refuse_unseekable(path: str, why: str) -> None:
    """Refuse, naming it, an input that is neither a regular file nor a
    directory (a pipe, a device) where it must be read with seeks or twice:
    reading one blocks with no writer, or fails with a bare 'Illegal seek'."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return                      # missing: the caller's own error names it
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        kind = "a pipe" if stat.S_ISFIFO(st.st_mode) else "not a regular file"
        raise LayerError(errno.ESPIPE, f"{kind}: {why}; write it to a file first", path)


def big_temp_dir() -> Optional[str]:
    """Where a decompressed image tarball goes: $TMPDIR, else /var/tmp, as
    Podman puts its image copies (/tmp is often a small tmpfs)."""
    if os.environ.get("TMPDIR"):
        return None                       # tempfile's own choice: $TMPDIR
    return "/var/tmp" if os.access("/var/tmp", os.W_OK | os.X_OK) else None


class TarFiles:
    """The members of an image tarball, read in place.

    The tar headers are scanned once (data is skipped by seeking); a member is
    then read with pread at its data offset.  A gzip or zstd compressed tarball
    is first decompressed to a temporary file (not unpacked).
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.label = self.path
        self._tmp: Optional[str] = None
        self._fd = -1
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        refuse_unseekable(self.path, "an image tarball is read with seeks")
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 8, 0)
            comp = detect_compression(head)
            if comp != "none":
                fd2 = self._decompress(fd, comp)
                os.close(fd)
                fd = fd2
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._members: Dict[str, _Member] = {}
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.fdopen(os.dup(fd), "rb")
        try:
            try:
                with tarfile.open(fileobj=raw, mode="r:") as tf:
                    for ti in tf:
                        self._add(ti)
            except tarfile.TarError as e:
                raise FormatError(f"not a readable tar archive: {e}", self.path) from None
        finally:
            raw.close()

    def _decompress(self, fd: int, comp: str) -> int:
        tmp = tempfile.TemporaryFile(prefix="layerfs-image-", dir=big_temp_dir())
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                _native.decompress(fd, tmp.fileno(), _native.COMPRESSION_CODES[comp], self.path)
            except LayerError as e:
                if e.errno != errno.EINVAL:         # not the data's fault (a full disk...)
                    raise
                raise FormatError(f"cannot decompress {comp} tarball: {e.strerror}",
                                  self.path) from None
            return os.dup(tmp.fileno())
        finally:
            tmp.close()

    def _add(self, ti: tarfile.TarInfo) -> None:
        name = clean_member_name(ti.name)
        if not name:
            return
        if ti.isreg():
            kind = "sparse" if ti.issparse() else "file"
        elif ti.issym():
            kind = "symlink"
        elif ti.islnk():
            kind = "hardlink"
        elif ti.isdir():
            kind = "dir"
        else:
            kind = "other"
        self._members[name] = _Member(name, kind, ti.offset_data, ti.size, ti.linkname)

    def where(self, path: str) -> Where:
        return Where(self.path, path)

    def _lookup(self, path: str) -> Optional[_Member]:
        name = clean_member_name(path)
        for _ in range(40):
            m = self._members.get(name)
            if m is None or m.kind in ("file", "dir", "other", "sparse"):
                return m
            if m.kind == "hardlink":
                name = clean_member_name(m.link)
            else:
                link = m.link
                name = clean_member_name(link if link.startswith("/") else
                                         posixpath.join(posixpath.dirname(m.name), link))
        raise FormatError(f"too many levels of links resolving {path!r}", self.path, entry=path)

    def size(self, path: str) -> Optional[int]:
        m = self._lookup(path)
        return m.size if m is not None and m.kind == "file" else None

    def open(self, path: str) -> BinaryIO:
        m = self._lookup(path)
        if m is None:
            raise NotFound(f"archive has no member {path}", self.path, entry=path)
        if m.kind == "sparse":
            raise FormatError("sparse archive members are not supported", self.path, entry=path)
        if m.kind != "file":
            raise FormatError(f"member is not a regular file ({m.kind})", self.path, entry=path)
        return RangeReader(self._fd, m.offset, m.size, f"{self.path}:{path}")

    def real_path(self, path: str) -> Optional[str]:
        return None

    def head(self, path: str, n: int = 8) -> bytes:
        with self.open(path) as f:
            return f.read(n)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_limited(files, path: str, limit: int) -> bytes:
    size = files.size(path)
    if size is not None and size > limit:
        raise FormatError(f"{path} is {size} bytes, more than the {limit} allowed",
                          files.where(path).filename, entry=files.where(path).entry)
    with files.open(path) as f:
        return f.read(limit + 1)


# --- writing --------------------------------------------------------------------------------

_BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def _size_field(size: int) -> bytes:
    if size < 8 ** 11:
        return _octal(size, 12)
    # GNU base-256: the high bit of the first byte set, big-endian binary after it
    return bytes([0x80]) + size.to_bytes(11, "big")


def _header(name: str, size: int, mode: int, mtime: int, typeflag: bytes) -> bytes:
    raw = name.encode("utf-8")
    prefix = b""
    if len(raw) > 100:
        cut = raw.rfind(b"/", 0, 156)
        if cut <= 0 or len(raw) - cut - 1 > 100:
            raise ValueError(f"name too long for a ustar header: {name!r}")
        prefix, raw = raw[:cut], raw[cut + 1:]
    h = bytearray(_BLOCK)
    h[0:len(raw)] = raw
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(0, 8)
    h[116:124] = _octal(0, 8)
    h[124:136] = _size_field(size)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[329:337] = _octal(0, 8)
    h[337:345] = _octal(0, 8)
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


class TarWriter:
    """Write a ustar archive to a seekable binary file: root owned, fixed mtime."""

    def __init__(self, f: BinaryIO, mtime: int = 0):
        self._f = f
        self._mtime = mtime
        self._dirs = set()

    def add_dir(self, name: str) -> None:
        name = name.rstrip("/") + "/"
        if name in self._dirs:
            return
        self._dirs.add(name)
        self._f.write(_header(name, 0, 0o755, self._mtime, b"5"))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._f.write(_header(name, len(data), 0o644, self._mtime, b"0"))
        self._f.write(data)
        self._pad(len(data))

    def add_stream(self, name: str, stream: BinaryIO, size: Optional[int] = None) -> Tuple[int, str]:
        """Copy a stream into a member; returns (size, "sha256:<hex>") of what was
        written.  With ``size`` None the header is patched after the copy."""
        start = self._f.tell()
        self._f.write(_header(name, size or 0, 0o644, self._mtime, b"0"))
        h = hashlib.sha256()
        count = 0
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                break
            count += len(chunk)
            if size is not None and count > size:
                raise LayerError(errno.EIO, f"{name}: stream is longer than {size} bytes", name)
            h.update(chunk)
            self._f.write(chunk)
        if size is not None and count != size:
            raise LayerError(errno.EIO, f"{name}: stream gave {count} bytes, expected {size}", name)
        self._pad(count)
        if size is None:
            end = self._f.tell()
            self._f.seek(start)
            self._f.write(_header(name, count, 0o644, self._mtime, b"0"))
            self._f.seek(end)
        return count, "sha256:" + h.hexdigest()

    def _pad(self, n: int) -> None:
        rem = n % _BLOCK
        if rem:
            self._f.write(b"\0" * (_BLOCK - rem))

    def finish(self) -> None:
        self._f.write(b"\0" * (_BLOCK * 2))


@contextmanager
def staged_file(dest: str) -> Iterator[BinaryIO]:
    """Yield a file opened beside dest; on success fsync it and rename it onto
    dest (then fsync the directory), on failure remove it."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.tmp-", dir=parent)
    f = os.fdopen(fd, "w+b")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.chmod(tmp, 0o644)
        os.rename(tmp, dest)
    except BaseException:
        try:
            f.close()               # may fail again (flushing onto a full disk)
        except OSError:
            pass
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    fsync_dir(parent)


def write_file_atomic(dest: str, data: bytes) -> None:
    with staged_file(dest) as f:
        f.write(data)
