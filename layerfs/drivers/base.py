"""The storage driver interface.

Vocabulary
----------
A driver keeps **layers** by id under its root directory.  Each layer has an
optional **parent**; a layer's **view** is its parent's view with the layer's
own changes on top (an image's rootfs is the view of its top layer).

- A **read-only layer** (:meth:`Driver.create`) receives its content through
  :meth:`Driver.apply_diff` (a layer tarball) and is then only read: its mount
  is read-only.  Image layers are read-only layers.
- A **writable layer** (:meth:`Driver.create_rw`) is a container's layer: its
  mount is writable, and everything written lands in the layer itself — the
  layers below never change.
- The layer's **diff** is what it changed against its parent, as a tar stream
  with AUFS whiteouts (``.wh.NAME``, ``.wh..wh..opq``): exactly what goes into
  an image when a container is committed.

Import a layer::

    d = layerfs.drivers.get("overlay", "/var/lib/layerfs/overlay")
    d.create("base")                        # empty, read-only
    info = d.apply_diff("base", "base.tar.gz")
    info.diff_id                            # sha256 of the uncompressed tar

Import the next layer on top of it::

    d.create("app", parent="base")
    d.apply_diff("app", "app.tar.zst")

Run a container::

    d.create_rw("ctr", parent="app")
    rootfs = d.mount("ctr")                 # a directory: the merged view, writable
    ...                                     # run the container in rootfs
    d.unmount("ctr")
    d.changes("ctr")                        # [Change("/etc/hosts", "modified"), ...]
    with d.diff("ctr") as tar:              # commit: the changes as a layer
        ...
    d.remove("ctr")

Mounts are reference-counted: each :meth:`mount` needs one :meth:`unmount`.
A layer cannot be removed while it has children or is mounted
(:class:`~layerfs.errors.PreconditionFailed`).  :meth:`cleanup` unmounts
everything and sweeps what a crash left behind.

Crash safety: every new layer is built in ``staging/new-*`` and renamed into
``layers/<id>``; a removal renames to ``trash/rm-*`` first and deletes after.
A crash therefore never leaves a half-made layer visible, and the leftovers are
swept on the next start.  Several processes may share one root: mutations hold
an exclusive ``flock`` on ``<root>/lock``.
"""
from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterator, List, NamedTuple, Optional, Tuple

from .. import _native
from .._io import ThreadPipeReader
from ..archive import ApplyResult, apply_layer
from ..errors import AlreadyExists, LayerError, NotFound, NotSupported, PreconditionFailed

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the initial one."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = [l.split() for l in f.read().splitlines() if l.strip()]
    except OSError:
        return False
    return lines != [["0", "0", "4294967295"]]


class Support(NamedTuple):
    """Whether a driver can run here, and if not, what to do about it."""
    ok: bool
    reason: str


class Change(NamedTuple):
    """One change of a layer against its parent (path is absolute, "/etc/hosts")."""
    path: str
    kind: str  # "added", "modified" or "deleted"


@dataclass(frozen=True)
class Mount:
    """A mount a driver describes and the caller (or :meth:`Driver.mount`) performs."""
    type: str
    source: str
    options: Tuple[str, ...] = ()
    cwd: Optional[str] = None   # relative lowerdir paths (overlay, long stacks)


@dataclass
class LayerInfo:
    id: str
    parent: Optional[str]
    rw: bool
    created: float
    driver: str
    complete: bool = True
    extra: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"id": self.id, "parent": self.parent, "rw": self.rw, "created": self.created,
                "driver": self.driver, "complete": self.complete, "extra": self.extra}

    @classmethod
    def from_json(cls, doc: dict) -> "LayerInfo":
        return cls(doc["id"], doc.get("parent"), bool(doc.get("rw")), float(doc["created"]),
                   doc["driver"], bool(doc.get("complete", True)), dict(doc.get("extra") or {}))


class Driver(abc.ABC):
    """A storage driver.  See the module docstring for the tutorial."""

    name: str = "abstract"

    def __init__(self, root: str, **options):
        self.root = os.path.abspath(os.fsdecode(root))
        self.options = options

    # -- support -----------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def supported(cls, root: Optional[str] = None) -> Support:
        """Can this driver run here (with a store at root)?  The reason says why not."""

    # -- lifecycle ---------------------------------------------------------
    @abc.abstractmethod
    def create(self, id: str, parent: Optional[str] = None) -> LayerInfo:
        """Create an empty read-only layer on parent (filled by :meth:`apply_diff`)."""

    @abc.abstractmethod
    def create_rw(self, id: str, parent: Optional[str] = None) -> LayerInfo:
        """Create a writable (container) layer on parent."""

    @abc.abstractmethod
    def remove(self, id: str) -> None:
        """Remove a layer; refused while it has children or is mounted."""

    @abc.abstractmethod
    def exists(self, id: str) -> bool:
        """Whether the layer exists (and is complete)."""

    @abc.abstractmethod
    def get(self, id: str) -> LayerInfo:
        """The layer's record; NotFound if there is none."""

    @abc.abstractmethod
    def layers(self) -> List[LayerInfo]:
        """Every complete layer, parents before children."""

    # -- mounts ------------------------------------------------------------
    @abc.abstractmethod
    def mounts(self, id: str) -> List[Mount]:
        """Describe the mount(s) that give the layer's view (nothing is mounted)."""

    @abc.abstractmethod
    def mount(self, id: str) -> str:
        """Mount the layer's view and return its path (reference-counted)."""

    @abc.abstractmethod
    def unmount(self, id: str) -> None:
        """Drop one mount reference; the last one unmounts."""

    # -- content -----------------------------------------------------------
    @abc.abstractmethod
    def apply_diff(self, id: str, source, **options) -> ApplyResult:
        """Apply a layer tarball (path or binary stream, any compression) to a
        read-only layer that has no children and is not mounted."""

    @abc.abstractmethod
    def diff(self, id: str) -> BinaryIO:
        """The layer's changes against its parent: a readable uncompressed tar
        stream with AUFS whiteouts.  Close it when done."""

    @abc.abstractmethod
    def changes(self, id: str) -> List[Change]:
        """The layer's changes against its parent, sorted by path."""

    @abc.abstractmethod
    def diff_size(self, id: str) -> int:
        """Bytes of file content the layer's diff holds."""

    # -- information and housekeeping -------------------------------------
    @abc.abstractmethod
    def status(self) -> Dict[str, object]:
        """Driver facts for display: name, root, backing filesystem, layer count..."""

    @abc.abstractmethod
    def metadata(self, id: str) -> Dict[str, object]:
        """Driver-specific facts about a layer (its directories, lower dirs...)."""

    @abc.abstractmethod
    def cleanup(self) -> None:
        """Unmount everything this driver mounted and sweep crash leftovers."""

    def close(self) -> None:
        """Release resources held by this object (mounts stay)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_id(id: str) -> str:
    if not isinstance(id, str) or not _ID_RE.match(id):
        raise ValueError(f"invalid layer id {id!r} (letters, digits, '_', '.', ':', '-'; "
                         "at most 128 characters)")
    return id


def _dir_fd(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def remove_tree(path: str) -> None:
    """rm -rf without following symlinks (C core)."""
    if not os.path.lexists(path):
        return
    fd = _dir_fd(os.path.dirname(path) or ".")
    try:
        _native.remove_tree(fd, os.path.basename(path))
    finally:
        os.close(fd)


def is_mountpoint(path: str) -> bool:
    """Whether path is a mount point (per /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                target = line.split(b" ")[4].decode("utf-8", "surrogateescape")
                target = target.replace("\\040", " ").replace("\\011", "\t") \
                               .replace("\\012", "\n").replace("\\134", "\\")
                if target == real:
                    return True
    except OSError:
        pass
    return False


class DirectoryDriver(Driver):
    """Shared machinery of drivers that keep each layer in a directory.

    Layout under root::

        lock                    flock for mutations
        layers/<id>/layer.json  the LayerInfo record
        layers/<id>/diff/       the layer's own content (driver format)
        layers/<id>/merged/     mount point of the layer's view
        layers/<id>/mountcount  reference count of mounts
        staging/new-*           layers being made (swept on start)
        trash/rm-*              layers being removed (swept on start)

    Subclasses implement the hooks ``_populate``, ``_mount_view``,
    ``_unmount_view``, ``_diff_stream`` and ``_changes`` and set
    ``whiteout_mode`` (how apply_diff writes whiteouts).
    """

    whiteout_mode = "apply"

    def __init__(self, root: str, **options):
        super().__init__(root, **options)
        for sub in ("layers", "staging", "trash"):
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        self._lock_path = os.path.join(self.root, "lock")
        with self._locked():  # another process may be staging a layer right now
            self._sweep()

    # -- locking and records ----------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def layer_dir(self, id: str) -> str:
        return os.path.join(self.root, "layers", check_id(id))

    def diff_dir(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "diff")

    def _read_info(self, id: str) -> Optional[LayerInfo]:
        try:
            with open(os.path.join(self.layer_dir(id), "layer.json")) as f:
                return LayerInfo.from_json(json.load(f))
        except FileNotFoundError:
            return None

    def _write_info(self, path: str, info: LayerInfo) -> None:
        tmp = os.path.join(path, ".layer.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(path, "layer.json"))

    def get(self, id: str) -> LayerInfo:
        info = self._read_info(id)
        if info is None:
            raise NotFound(f"no layer {id!r}", self.layer_dir(id))
        return info

    def exists(self, id: str) -> bool:
        info = self._read_info(id)
        return info is not None and info.complete

    def layers(self) -> List[LayerInfo]:
        infos = {}
        for name in os.listdir(os.path.join(self.root, "layers")):
            info = self._read_info(name)
            if info is not None:
                infos[name] = info
        out, seen = [], set()

        def visit(i: LayerInfo):
            if i.id in seen:
                return
            seen.add(i.id)
            if i.parent in infos:
                visit(infos[i.parent])
            out.append(i)

        for i in sorted(infos.values(), key=lambda x: (x.created, x.id)):
            visit(i)
        return out

    def chain(self, id: str) -> List[LayerInfo]:
        """The layer and its ancestors, top first."""
        out = []
        cur: Optional[str] = id
        while cur is not None:
            info = self.get(cur)
            out.append(info)
            cur = info.parent
            if len(out) > 4096:
                raise LayerError(40, "layer parent chain too long or cyclic", self.layer_dir(id))
        return out

    def _children(self, id: str) -> List[str]:
        return [i.id for i in self.layers() if i.parent == id]

    # -- creation and removal ---------------------------------------------
    def _new(self, id: str, parent: Optional[str], rw: bool) -> LayerInfo:
        check_id(id)
        with self._locked():
            if os.path.lexists(self.layer_dir(id)):
                raise AlreadyExists(f"layer {id!r} already exists", self.layer_dir(id))
            parent_info = None
            if parent is not None:
                parent_info = self.get(check_id(parent))
                if not parent_info.complete:
                    raise PreconditionFailed(f"parent layer {parent!r} is incomplete",
                                             self.layer_dir(parent))
            stage = os.path.join(self.root, "staging", f"new-{secrets.token_hex(8)}")
            os.mkdir(stage, 0o700)
            try:
                os.mkdir(os.path.join(stage, "merged"), 0o700)
                info = LayerInfo(id, parent, rw, time.time(), self.name)
                self._populate(stage, info, parent_info)
                self._write_info(stage, info)
                os.rename(stage, self.layer_dir(id))
            except BaseException:
                remove_tree(stage)
                raise
            return info

    def create(self, id: str, parent: Optional[str] = None) -> LayerInfo:
        return self._new(id, parent, rw=False)

    def create_rw(self, id: str, parent: Optional[str] = None) -> LayerInfo:
        return self._new(id, parent, rw=True)

    def remove(self, id: str) -> None:
        with self._locked():
            info = self.get(id)
            children = self._children(id)
            if children:
                raise PreconditionFailed(f"layer {id!r} has children: {', '.join(children)}",
                                         self.layer_dir(id))
            if self._mount_count(id) > 0 and is_mountpoint(self._merged(id)):
                raise PreconditionFailed(f"layer {id!r} is mounted", self._merged(id))
            self._before_remove(info)
            trash = os.path.join(self.root, "trash", f"rm-{id}-{secrets.token_hex(4)}")
            os.rename(self.layer_dir(id), trash)
        remove_tree(trash)

    def _sweep(self) -> None:
        """Delete what a crash left in staging/ and trash/."""
        for sub in ("staging", "trash"):
            d = os.path.join(self.root, sub)
            for name in os.listdir(d):
                p = os.path.join(d, name)
                if is_mountpoint(os.path.join(p, "merged")):
                    continue
                remove_tree(p)

    # -- mounts ------------------------------------------------------------
    def _merged(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "merged")

    def _count_path(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "mountcount")

    def _mount_count(self, id: str) -> int:
        try:
            with open(self._count_path(id)) as f:
                return int(f.read().strip() or 0)
        except FileNotFoundError:
            return 0

    def _set_mount_count(self, id: str, n: int) -> None:
        p = self._count_path(id)
        if n <= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            return
        with open(p + ".tmp", "w") as f:
            f.write(str(n))
        os.rename(p + ".tmp", p)

    def mount(self, id: str) -> str:
        with self._locked():
            info = self.get(id)
            if not info.complete:
                raise PreconditionFailed(f"layer {id!r} is incomplete", self.layer_dir(id))
            target = self._merged(id)
            n = self._mount_count(id)
            if n > 0 and not self._view_is_mounted(info, target):
                n = 0  # stale count from a process that died
            if n == 0:
                self._mount_view(info, target)
            self._set_mount_count(id, n + 1)
            return target

    def unmount(self, id: str) -> None:
        with self._locked():
            info = self.get(id)
            n = self._mount_count(id)
            if n <= 0:
                raise PreconditionFailed(f"layer {id!r} is not mounted", self._merged(id))
            if n == 1:
                self._unmount_view(info, self._merged(id))
            self._set_mount_count(id, n - 1)

    def _view_is_mounted(self, info: LayerInfo, target: str) -> bool:
        return is_mountpoint(target)

    def cleanup(self) -> None:
        with self._locked():
            for info in reversed(self.layers()):
                target = self._merged(info.id)
                if self._mount_count(info.id) > 0 or self._view_is_mounted(info, target):
                    with contextlib.suppress(OSError):
                        self._unmount_view(info, target)
                    self._set_mount_count(info.id, 0)
            for info in self._incomplete():
                trash = os.path.join(self.root, "trash", f"rm-{info.id}-{secrets.token_hex(4)}")
                os.rename(self.layer_dir(info.id), trash)
            self._sweep()

    def _incomplete(self) -> List[LayerInfo]:
        out = []
        for name in os.listdir(os.path.join(self.root, "layers")):
            info = self._read_info(name)
            if info is not None and not info.complete:
                out.append(info)
        return out

    # -- content -----------------------------------------------------------
    def apply_diff(self, id: str, source, **options) -> ApplyResult:
        with self._locked():
            info = self.get(id)
            if info.rw:
                raise PreconditionFailed(f"layer {id!r} is writable; apply_diff takes a "
                                         "read-only layer", self.layer_dir(id))
            if self._children(id):
                raise PreconditionFailed(f"layer {id!r} has children", self.layer_dir(id))
            if self._mount_count(id) > 0:
                raise PreconditionFailed(f"layer {id!r} is mounted", self._merged(id))
            info.complete = False
            self._write_info(self.layer_dir(id), info)
        options.setdefault("whiteouts", self.whiteout_mode)
        if options["whiteouts"] == "overlay" and self.options.get("userxattr"):
            options.setdefault("overlay_user_xattr", True)
        if in_user_namespace():
            # no device can be made here: like Docker's and Podman's rootless
            # storage, leave them out (the result counts a warning)
            options.setdefault("skip_devices", True)
        result = apply_layer(source, self._apply_target(info), **options)
        with self._locked():
            info.complete = True
            info.extra.setdefault("diffs", []).append(
                {"digest": result.digest, "diff_id": result.diff_id, "size": result.size,
                 "tar_size": result.tar_size})
            self._write_info(self.layer_dir(id), info)
        return result

    def _apply_target(self, info: LayerInfo) -> str:
        return self.diff_dir(info.id)

    def diff(self, id: str) -> BinaryIO:
        return self._diff_stream(self.get(id))

    def changes(self, id: str) -> List[Change]:
        return sorted(self._changes(self.get(id)), key=lambda c: c.path)

    def diff_size(self, id: str) -> int:
        total = 0
        with self.diff(id) as stream:
            import tarfile
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for m in tf:
                    if m.isreg():
                        total += m.size
        return total

    def metadata(self, id: str) -> Dict[str, object]:
        info = self.get(id)
        return {"id": id, "parent": info.parent, "rw": info.rw, "driver": self.name,
                "dir": self.layer_dir(id), "diff": self.diff_dir(id),
                "merged": self._merged(id), "mount_count": self._mount_count(id),
                "diffs": info.extra.get("diffs", [])}

    def status(self) -> Dict[str, object]:
        return {"driver": self.name, "root": self.root,
                "backing_filesystem": backing_filesystem(self.root),
                "layers": len(self.layers()), "options": dict(self.options)}

    # -- hooks -------------------------------------------------------------
    @abc.abstractmethod
    def _populate(self, stage: str, info: LayerInfo, parent: Optional[LayerInfo]) -> None:
        """Build the layer's directories inside the staging directory."""

    @abc.abstractmethod
    def _mount_view(self, info: LayerInfo, target: str) -> None:
        """Mount the layer's view on target."""

    @abc.abstractmethod
    def _unmount_view(self, info: LayerInfo, target: str) -> None:
        """Undo _mount_view."""

    @abc.abstractmethod
    def _diff_stream(self, info: LayerInfo) -> BinaryIO:
        """The layer's diff as a readable tar stream."""

    @abc.abstractmethod
    def _changes(self, info: LayerInfo) -> List[Change]:
        """The layer's changes against its parent."""

    def _before_remove(self, info: LayerInfo) -> None:
        """Driver-specific clean-up before a layer's directory goes."""


def backing_filesystem(path: str) -> str:
    """The filesystem type holding path, from /proc/self/mountinfo."""
    real = os.path.realpath(path)
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                parts = line.decode("utf-8", "surrogateescape").split(" ")
                target = parts[4]
                sep = parts.index("-")
                if (real == target or real.startswith(target.rstrip("/") + "/")) \
                        and len(target) >= len(best):
                    best, fstype = target, parts[sep + 1]
    except OSError:
        pass
    return fstype


def tar_stream_of(root: str, *, on_done=None, **create_options) -> BinaryIO:
    """A readable stream of create_layer(root, ...) run in a background thread.
    on_done() runs in that thread once the tar is written (or failed), e.g. to
    unmount a view the tar was read from."""
    from ..archive import create_layer
    rfd, wfd = os.pipe()
    failure: List[BaseException] = []

    def write():
        try:
            create_layer(root, _FdWriter(wfd), **create_options)
        except BaseException as e:  # noqa: BLE001 - re-raised on close
            failure.append(e)
        finally:
            with contextlib.suppress(OSError):
                os.close(wfd)
            if on_done is not None:
                try:
                    on_done()
                except BaseException as e:  # noqa: BLE001 - re-raised on close
                    failure.append(e)

    t = threading.Thread(target=write, name="layerfs-diff", daemon=True)
    t.start()
    return ThreadPipeReader(rfd, t, failure)


class _FdWriter:
    """A minimal binary file object over a raw fd (create_layer uses its fileno)."""

    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass

    def write(self, b) -> int:
        return os.write(self._fd, b)


__all__ = ["Driver", "DirectoryDriver", "LayerInfo", "Mount", "Change", "Support",
           "NotFound", "AlreadyExists", "PreconditionFailed", "NotSupported",
           "is_mountpoint", "remove_tree", "tar_stream_of", "backing_filesystem"]
