"""Small filesystem helpers of the store: locks, staged writes, disk usage."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
from typing import Any, Iterator, Optional, Set, Tuple

from .._native import COPY_NO_OWNER, COPY_NO_REFLINK, COPY_NO_XATTRS, copy_file
from ..drivers.base import remove_tree
from ..errors import LayerError

__all__ = ["Flock", "fsync_dir", "write_atomic", "write_json_atomic", "read_json", "read_record",
           "DamagedRecord",
           "read_unsynced_json", "tmp_name",
           "copy_blob_file", "disk_usage", "remove_path"]


class Flock:
    """An flock(2) on one file.  ``shared()`` / ``exclusive()`` are context managers;
    ``try_exclusive()`` takes the lock only if no one holds it (True when taken)."""

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None
        self.mode: Optional[int] = None

    def _open(self) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self.fd

    def acquire(self, mode: int, blocking: bool = True) -> bool:
        fd = self._open()
        try:
            fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        self.mode = mode
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing drops the lock
            self.fd = None
            self.mode = None

    def try_exclusive(self) -> bool:
        return self.acquire(fcntl.LOCK_EX, blocking=False)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire(fcntl.LOCK_SH)
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        self.acquire(fcntl.LOCK_EX)
        try:
            yield
        finally:
            self.release()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(tmp_dir: str, prefix: str) -> str:
    return os.path.join(tmp_dir, f"{prefix}-{os.getpid()}-{secrets.token_hex(6)}")


def write_atomic(path: str, data: bytes, tmp_dir: Optional[str] = None, *,
                 mode: int = 0o644, sync: bool = True) -> None:
    """Write data to a staged file and rename it onto path."""
    tmp = tmp_name(tmp_dir or os.path.dirname(path), ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, doc: Any, tmp_dir: Optional[str] = None, *,
                      sync: bool = True) -> None:
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), tmp_dir,
                 sync=sync)


class DamagedRecord(LayerError, ValueError):
    """A store file that is not the JSON record it should be."""

    def __init__(self, path: str, why: object, text: Optional[str] = None):
        LayerError.__init__(self, errno.EUCLEAN, text or f"damaged record: {why}", path)
        self.why = why


def read_json(path: str) -> Optional[Any]:
    """The JSON document at path, or None when the file does not exist;
    DamagedRecord (a ValueError naming the file) when it is not JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise DamagedRecord(path, e) from None


def read_record(path: str, cls) -> Optional[Any]:
    """``cls.from_json`` of the JSON document at path (None when absent);
    DamagedRecord when the file is not such a record."""
    doc = read_json(path)
    if doc is None:
        return None
    try:
        return cls.from_json(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedRecord(path, f"not a {cls.__name__}: {e!r}") from None


def read_unsynced_json(path: str) -> Optional[Any]:
    """A JSON file written without fsync (a cache, a mount count): None when it
    does not exist or when a crash left it empty or partly written."""
    try:
        doc = read_json(path)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def copy_blob_file(src: str, dst: str) -> None:
    """Copy a file (reflink, copy_file_range or read/write; C core, GIL released);
    dst must not exist."""
    sd = os.open(os.path.dirname(os.path.abspath(src)) or ".",
                 os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dd = os.open(os.path.dirname(os.path.abspath(dst)),
                     os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            copy_file(sd, os.path.basename(src), dd, os.path.basename(dst),
                      COPY_NO_OWNER | COPY_NO_XATTRS)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL):
                raise
            copy_file(sd, os.path.basename(src), dd, os.path.basename(dst),
                      COPY_NO_OWNER | COPY_NO_XATTRS | COPY_NO_REFLINK)
        finally:
            os.close(dd)
    finally:
        os.close(sd)


def disk_usage(path: str, seen: Optional[Set[Tuple[int, int]]] = None, *,
               one_fs: bool = True) -> int:
    """Bytes of disk the tree at path takes (st_blocks, each inode once); with
    one_fs, directories on another filesystem (mounted views) are not entered."""
    seen = set() if seen is None else seen
    total = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    dev = st.st_dev
    if (st.st_dev, st.st_ino) not in seen:
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    if not stat.S_ISDIR(st.st_mode):
        return total
    stack = [path]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode) and (st.st_dev == dev or not one_fs):
                    stack.append(e.path)
    return total


def remove_path(path: str) -> None:
    """Remove a file or a whole tree (no symlink followed); absent is fine."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
