"""Progress reporting for long store operations (loads, imports, saves).

The store reports through a :class:`Progress`: one task per layer, with the
bytes done and the total.  :data:`NULL` reports nothing; the CLI renders tasks
with rich on stderr.  :func:`watching` follows how far the C core has read a
file (its fd offset) while a call that releases the GIL consumes it.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
from typing import Iterator, Optional


class Task:
    """One unit of progress (a layer); the default does nothing."""

    def update(self, completed: int) -> None:
        pass

    def done(self, note: str = "") -> None:
        pass


class Progress:
    """Creates tasks; subclass to display them."""

    enabled = False

    def task(self, description: str, total: Optional[int]) -> Task:
        return Task()

    def message(self, text: str) -> None:
        pass


NULL = Progress()


class CountingReader(io.RawIOBase):
    """A stream that tells a task how many bytes have been read through it."""

    def __init__(self, raw, task: Task):
        super().__init__()
        self._raw, self._task, self._n = raw, task, 0
        self.name = getattr(raw, "name", "<stream>")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self._n += n
        self._task.update(self._n)
        return n

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


@contextlib.contextmanager
def watching(source, task: Task, interval: float = 0.1) -> Iterator[object]:
    """Yield what to hand to a consumer of ``source`` (a path or a stream) so that
    task follows its progress: a path is opened and its fd offset polled; a
    stream is read through a :class:`CountingReader`."""
    if task.__class__ is Task:       # nothing to report: hand the source over as it is
        yield source
        return
    if not isinstance(source, (str, bytes, os.PathLike)):
        reader = CountingReader(source, task)
        try:
            yield reader
        finally:
            reader.close()
        return
    f = open(source, "rb", buffering=0)
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(interval):
            try:
                task.update(os.lseek(f.fileno(), 0, os.SEEK_CUR))
            except (OSError, ValueError):
                return

    t = threading.Thread(target=poll, name="layerfs-progress", daemon=True)
    t.start()
    try:
        yield f
    finally:
        stop.set()
        t.join()
        f.close()


__all__ = ["Task", "Progress", "NULL", "CountingReader", "watching"]
