"""Turning the sources and outputs people pass in (paths, file objects) into fds.

The C core reads and writes file descriptors.  A path is opened; a file object
with a working ``fileno()`` is used as it is (from its current position); any
other binary stream is fed through a pipe by a Python thread while the C call
runs with the GIL released.
"""
from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, List, Optional, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[PathLike, BinaryIO]

_CHUNK = 1 << 20


def lexical_parts(name: str) -> List[str]:
    """The components of a "/"-separated path resolved lexically: empty and "."
    components dropped, ".." removes the one before it (never above the top)."""
    parts: List[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
            continue
        parts.append(p)
    return parts


def source_name(source) -> str:
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.fsdecode(source)
    name = getattr(source, "name", None)
    return name if isinstance(name, str) else "<stream>"


def _real_fileno(f) -> Optional[int]:
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation, ValueError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


@contextmanager
def open_source(source: Source) -> Iterator[Tuple[int, str]]:
    """Yield (readable fd, display name) for a layer source."""
    name = source_name(source)
    if isinstance(source, (str, bytes, os.PathLike)):
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield fd, name
        finally:
            os.close(fd)
        return
    fd = _real_fileno(source)
    if fd is not None:
        # A buffered reader may hold bytes it already read: start the fd where
        # the object's logical position is.
        try:
            pos = source.tell()
        except (OSError, ValueError, AttributeError):
            pos = None
        if pos is not None:
            try:
                os.lseek(fd, pos, os.SEEK_SET)
            except OSError:
                pos = None
        try:
            yield fd, name
        finally:
            if pos is not None:
                try:
                    source.seek(os.lseek(fd, 0, os.SEEK_CUR))
                except (OSError, ValueError):
                    pass
        return
    def feed(wfd: int) -> None:
        try:
            while True:
                chunk = source.read(_CHUNK)
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    n = os.write(wfd, view)
                    view = view[n:]
        except BrokenPipeError:
            pass  # the reader stopped early; its own error says why

    with _pumped_pipe(feed, reader=True, name="layerfs-feed") as rfd:
        yield rfd, name


@contextmanager
def open_output(output) -> Iterator[Tuple[int, str]]:
    """Yield (writable fd, display name).  A path is written to a temp file beside
    it and renamed into place only when the block succeeds."""
    if isinstance(output, (str, bytes, os.PathLike)):
        path = os.fsdecode(output)
        d = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            yield fd, path
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, path)
        return
    name = source_name(output)
    fd = _real_fileno(output)
    if fd is not None:
        output.flush()
        yield fd, name
        return
    def drain(rfd: int) -> None:
        try:
            while True:
                chunk = os.read(rfd, _CHUNK)
                if not chunk:
                    break
                output.write(chunk)
        except BaseException:
            while os.read(rfd, _CHUNK):     # keep draining: the writer never blocks forever
                pass
            raise

    with _pumped_pipe(drain, reader=False, name="layerfs-drain") as wfd:
        yield wfd, name


@contextmanager
def _pumped_pipe(pump: Callable[[int], None], *, reader: bool, name: str) -> Iterator[int]:
    """A pipe whose other end pump(fd) serves in a thread: yield the read end
    (reader) or the write end; afterwards join the thread and raise its error."""
    rfd, wfd = os.pipe()
    mine, theirs = (rfd, wfd) if reader else (wfd, rfd)
    failure: List[BaseException] = []

    def run() -> None:
        try:
            pump(theirs)
        except BaseException as e:  # noqa: BLE001 - raised after the caller's block
            failure.append(e)
        finally:
            os.close(theirs)

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    try:
        yield mine
    finally:
        os.close(mine)
        t.join()
        if failure:     # the cause of whatever the block raised, if it raised
            raise failure[0]


class ThreadPipeReader(io.RawIOBase):
    """The read end of a pipe fed by a writer thread.  The thread appends its
    error to failure; it is raised when the reader meets the end of the pipe.
    Closing the reader closes the fd and waits for the thread."""

    def __init__(self, fd: int, thread: threading.Thread, failure: list):
        super().__init__()
        self._fd, self._thread, self._failure = fd, thread, failure

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, b) -> int:
        n = os.readv(self._fd, [b])
        if n == 0:
            self._thread.join()
            if self._failure:
                raise self._failure[0]
        return n

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
            self._thread.join()
        super().close()
