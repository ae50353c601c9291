"""The ``aufs`` driver: AUFS-format layer directories, served as a union by
layerfs's own FUSE filesystem (no AUFS kernel module needed).

Each layer's ``diff/`` directory holds the layer as AUFS stores it: deleted
paths are ``.wh.NAME`` files and an opaque directory holds ``.wh..wh..opq``.
apply_diff stores a layer tarball's whiteouts as they are (whiteout mode
"keep"), so a layer directory *is* its diff.

- mount: ``python -m layerfs.drivers._union_server`` mounts the union of the
  layer's chain (C core, csrc/union.c) and daemonizes once the mount works;
  where the kernel has FUSE passthrough (Linux >= 6.9, root), files that are
  never copied up are read and written by the kernel on the backing file;
  mount() waits for its readiness line, so it returns a working mount or
  raises with the server's reason.  A writable (container) layer is the union's
  writable branch: changes copy lower files up into it and deletions leave
  whiteouts.  A read-only layer's mount refuses every write (EROFS).
  If the server dies, the next mount() notices the dead mount, detaches it and
  starts a new one.
- diff: the layer directory itself as a tar (its .wh. files are already the
  AUFS entries of the diff).
- changes: a walk of the layer directory, each entry compared with the union
  of the layers below (the same rules as :func:`layerfs.diff.compare_trees`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from ..diff import TreeChange, compare_entries, type_name, with_parents
from ..errors import LayerError, NotSupported
from .base import (Change, DirectoryDriver, LayerInfo, Mount, Support, is_mountpoint,
                   tar_stream_of)

WH_PREFIX = ".wh."
WH_META = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"

#: How long mount() waits for the server's readiness line.
READY_TIMEOUT = 60.0

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def _fuse_problem() -> Optional[str]:
    """None when FUSE mounts can be made here, else what to do about it."""
    if not os.path.exists("/dev/fuse"):
        return ("/dev/fuse is missing: load the module (modprobe fuse), or in a container "
                "pass the device (--device /dev/fuse)")
    try:
        with open("/proc/filesystems") as f:
            if not any(line.split()[-1:] == ["fuse"] for line in f):
                return "the kernel has no FUSE filesystem: modprobe fuse"
    except OSError:
        pass
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user (run as root)"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 is missing (apt-get install fuse3), or run as root"
    try:
        from .._core import lib
    except ImportError as e:
        return f"the C core cannot be loaded: {e}"
    if not hasattr(lib, "lfs_union_serve"):
        return ("the C core was built without the FUSE union (apt-get install libfuse3-dev, "
                "then rebuild)")
    return None


def _umount(target: str, lazy: bool = False) -> None:
    """Unmount target (umount2 as root, fusermount3 -u otherwise)."""
    if os.geteuid() != 0:
        argv = ["fusermount3", "-u" + ("z" if lazy else ""), target]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if p.returncode != 0:
            msg = p.stderr.decode("utf-8", "replace").strip()
            raise OSError(errno.EIO, f"fusermount3 -u {target}: {msg}", target)
        return
    t = os.fsencode(target)
    for i in range(20):
        if _libc.umount2(t, _MNT_DETACH if lazy else 0) == 0:
            return
        e = ctypes.get_errno()
        if e == errno.EBUSY and not lazy:
            time.sleep(0.005 * (i + 1))
            continue
        if e == errno.EBUSY:
            break
        raise OSError(e, f"umount {target}: {os.strerror(e)}", target)
    if _libc.umount2(t, _MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"umount {target}: {os.strerror(e)}", target)


def _mount_alive(target: str) -> bool:
    """Whether the FUSE mount on target answers (a dead server gives ENOTCONN)."""
    try:
        os.stat(target)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            return False
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


class AufsDriver(DirectoryDriver):
    """AUFS-format layers served by a FUSE union; see the module docstring.

    Options: ``entry_timeout`` / ``attr_timeout`` (seconds the kernel caches
    names and attributes; default 1 day for read-only views, 1 s for writable
    ones), ``threads`` (server request threads), ``passthrough`` (default
    True: where the kernel can, it reads and writes files that are never copied
    up directly on the backing file; False sends all file I/O through the
    server), ``debug`` (trace requests into the layer's ``union.log``).
    """

    name = "aufs"
    whiteout_mode = "keep"

    _OPTIONS = {"entry_timeout", "attr_timeout", "threads", "passthrough", "debug"}

    @classmethod
    def supported(cls, root: Optional[str] = None) -> Support:
        why = _fuse_problem()
        if why:
            return Support(False, why)
        return Support(True, "AUFS-format layers (.wh. whiteouts) served by layerfs's own FUSE "
                             "union filesystem; any backing filesystem")

    def __init__(self, root: str, **options):
        unknown = set(options) - self._OPTIONS
        if unknown:
            raise TypeError(f"unknown aufs option(s): {', '.join(sorted(unknown))}")
        super().__init__(root, **options)

    # -- layout ------------------------------------------------------------
    def _work_dir(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "work")

    def _pid_path(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "union.pid")

    def _log_path(self, id: str) -> str:
        return os.path.join(self.layer_dir(id), "union.log")

    def branches(self, id: str) -> List[str]:
        """The layer directories of the layer's view, top first."""
        return [self.diff_dir(i.id) for i in self.chain(id)]

    def mounts(self, id: str) -> List[Mount]:
        info = self.get(id)
        dirs = self.branches(id)
        br = ":".join(f"{d}={'rw' if (i == 0 and info.rw) else 'ro'}" for i, d in enumerate(dirs))
        opts = ["rw" if info.rw else "ro", f"br={br}"]
        if info.rw:
            opts.append(f"workdir={self._work_dir(id)}")
        return [Mount("fuse.layerfs", f"layerfs:{id}", tuple(opts))]

    def metadata(self, id: str) -> Dict[str, object]:
        out = super().metadata(id)
        out["branches"] = self.branches(id)
        try:
            with open(self._pid_path(id)) as f:
                out["server_pid"] = int(f.read().strip())
        except (OSError, ValueError):
            pass
        return out

    # -- hooks -------------------------------------------------------------
    def _populate(self, stage: str, info: LayerInfo, parent: Optional[LayerInfo]) -> None:
        diff = os.path.join(stage, "diff")
        os.mkdir(diff, 0o755)
        if parent is not None:
            # the union's root shows the top layer's root: start from the parent's
            _copy_dir_meta(self.diff_dir(parent.id), diff)
        if info.rw:
            os.mkdir(os.path.join(stage, "work"), 0o700)

    def _server_argv(self, info: LayerInfo, target: str, ready_fd: int) -> List[str]:
        argv = [sys.executable, "-m", "layerfs.drivers._union_server",
                "--ready-fd", str(ready_fd), "--fsname", f"layerfs:{info.id}"]
        if info.rw:
            argv += ["--rw", "--workdir", self._work_dir(info.id)]
        for opt in ("entry_timeout", "attr_timeout"):
            if opt in self.options:
                argv += ["--" + opt.replace("_", "-"), str(float(self.options[opt]))]
        if "threads" in self.options:
            argv += ["--threads", str(int(self.options["threads"]))]
        if not self.options.get("passthrough", True):
            argv.append("--no-passthrough")
        if self.options.get("debug"):
            argv.append("--debug")
        return argv + ["--", target] + self.branches(info.id)

    def _mount_view(self, info: LayerInfo, target: str) -> None:
        why = _fuse_problem()
        if why:
            raise NotSupported(why, target)
        if is_mountpoint(target):  # left by a server that died
            _umount(target, lazy=True)
        if info.rw:
            os.makedirs(self._work_dir(info.id), mode=0o700, exist_ok=True)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                          if env.get("PYTHONPATH") else "")
        rfd, wfd = os.pipe()
        try:
            with open(self._log_path(info.id), "wb") as log:
                proc = subprocess.Popen(self._server_argv(info, target, wfd), cwd="/", env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=log, pass_fds=(wfd,), close_fds=True)
            os.close(wfd)
            wfd = -1
            line = _read_line(rfd, READY_TIMEOUT)
        finally:
            os.close(rfd)
            if wfd >= 0:
                os.close(wfd)
        if not line.startswith("ok "):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if is_mountpoint(target):
                _umount(target, lazy=True)
            code, msg = errno.EIO, line or self._log_tail(info.id) or "the server exited"
            if line.startswith("error "):
                parts = line.split(" ", 2)
                try:
                    code = int(parts[1])
                except (IndexError, ValueError):
                    pass
                msg = parts[2] if len(parts) > 2 else msg
            raise LayerError(code, f"aufs union mount of layer {info.id!r} failed: {msg}", target)
        proc.wait()  # the first process exits as soon as the server has forked
        with open(self._pid_path(info.id), "w") as f:
            f.write(line.split()[1])

    def _log_tail(self, id: str) -> str:
        try:
            with open(self._log_path(id), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
            return lines[-1] if lines else ""
        except OSError:
            return ""

    def _server_pid(self, id: str) -> Optional[int]:
        try:
            with open(self._pid_path(id)) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def _unmount_view(self, info: LayerInfo, target: str) -> None:
        pid = self._server_pid(info.id)
        if is_mountpoint(target):
            _umount(target, lazy=not _mount_alive(target))
        if pid is not None:
            deadline = time.monotonic() + 10.0   # it exits as soon as the kernel lets go
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.002)
        try:
            os.unlink(self._pid_path(info.id))
        except FileNotFoundError:
            pass

    def _view_is_mounted(self, info: LayerInfo, target: str) -> bool:
        return is_mountpoint(target) and _mount_alive(target)

    def _diff_stream(self, info: LayerInfo) -> BinaryIO:
        return tar_stream_of(self.diff_dir(info.id), source_format="plain")

    def _changes(self, info: LayerInfo) -> List[Change]:
        below = UnionView(self.branches(info.id)[1:])
        found = _diff_changes(self.diff_dir(info.id), below)
        return [Change(c.path, c.kind) for c in with_parents(found)]


def _copy_dir_meta(src: str, dst: str) -> None:
    """Owner, mode, xattrs and times of directory src onto directory dst."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        names = os.listxattr(src, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.ENOTSUP:
            raise
        names = []
    for n in names:
        os.setxattr(dst, n, os.getxattr(src, n, follow_symlinks=False), follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _read_line(fd: int, timeout: float) -> str:
    """One line from fd (without the newline); "" at end of file or timeout."""
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


# ----------------------------------------------------------------- the union below a layer

Entry = Tuple[bytes, os.stat_result]   # (real path, lstat)


def _lstat(path: bytes) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


class UnionView:
    """Read-only lookups in the union of AUFS layer directories (top first),
    by the rules the FUSE server follows (see csrc/union.c)."""

    def __init__(self, dirs: List[str]):
        self.dirs = [os.fsencode(d) for d in dirs]
        self._merged: Dict[bytes, Optional[List[int]]] = {}

    def _p(self, layer: int, rel: bytes, name: bytes = b"") -> bytes:
        parts = [self.dirs[layer]] + [x for x in (rel, name) if x]
        return b"/".join(parts)

    def merged_layers(self, rel: bytes) -> Optional[List[int]]:
        """The layers whose directory rel merges into the union's, or None if
        rel is not a directory of the union."""
        if rel in self._merged:
            return self._merged[rel]
        if not rel:
            out: Optional[List[int]] = []
            for i in range(len(self.dirs)):
                out.append(i)
                if _lstat(self._p(i, b"", WH_OPAQUE.encode())):
                    break
            if not self.dirs:
                out = None
        else:
            parent, _, name = rel.rpartition(b"/")
            above = self.merged_layers(parent)
            out = None
            if above is not None:
                layers: List[int] = []
                for i in above:
                    st = _lstat(self._p(i, rel))
                    if st is not None:
                        if not stat.S_ISDIR(st.st_mode):
                            break              # a non-directory hides (or ends) the merge
                        layers.append(i)
                    if _lstat(self._p(i, parent, WH_PREFIX.encode() + name)):
                        break
                    if st is not None and _lstat(self._p(i, rel, WH_OPAQUE.encode())):
                        break
                out = layers or None
        self._merged[rel] = out
        return out

    def lookup(self, rel: bytes) -> Optional[Entry]:
        """The visible entry at rel ("" is the root), or None."""
        if not rel:
            layers = self.merged_layers(b"")
            return (self._p(layers[0], b""), os.lstat(self._p(layers[0], b""))) if layers else None
        parent, _, name = rel.rpartition(b"/")
        above = self.merged_layers(parent)
        if above is None:
            return None
        for i in above:
            p = self._p(i, rel)
            st = _lstat(p)
            if st is not None:
                return p, st
            if _lstat(self._p(i, parent, WH_PREFIX.encode() + name)):
                return None
        return None


def _listdir(path: bytes) -> List[Tuple[bytes, os.stat_result]]:
    out = []
    with os.scandir(path) as it:
        for e in it:
            try:
                out.append((e.name, e.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    out.sort(key=lambda t: t[0])
    return out


def _display(rel: bytes) -> str:
    return "/" + os.fsdecode(rel)


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _walk_added(top: bytes, rel: bytes) -> Iterator[TreeChange]:
    for name, st in _listdir(_join(top, rel)):
        if name.startswith(WH_PREFIX.encode()):
            continue
        r = _join(rel, name)
        yield TreeChange(_display(r), "added", {}, type_name(st.st_mode))
        if stat.S_ISDIR(st.st_mode):
            yield from _walk_added(top, r)


def _diff_changes(top: str, below: UnionView) -> List[TreeChange]:
    """What the layer directory top changes over the union below it, in
    compare_trees order (parents first, names sorted)."""
    topb = os.fsencode(top).rstrip(b"/")
    out: List[TreeChange] = []
    root_old = below.lookup(b"")
    if root_old is not None:
        nst = os.lstat(topb)
        f = compare_entries(root_old[0], topb, root_old[1], nst)
        if f:
            out.append(TreeChange("/", "modified", f, "dir"))
    _walk_dir(topb, b"", below, False, out)
    return out


def _walk_dir(top: bytes, rel: bytes, below: UnionView, opaque_above: bool,
              out: List[TreeChange]) -> None:
    entries = _listdir(_join(top, rel))
    wh = WH_PREFIX.encode()
    names = {n: st for n, st in entries if not n.startswith(wh)}
    whited = {n[len(wh):] for n, _ in entries
              if n.startswith(wh) and not n.startswith(WH_META.encode()) and len(n) > len(wh)}
    opaque = opaque_above or any(n == WH_OPAQUE.encode() for n, _ in entries)
    gone: List[bytes] = []
    if opaque:
        layers = below.merged_layers(rel)
        if layers is not None:
            seen = set()
            for i in layers:
                try:
                    lower = _listdir(below._p(i, rel))
                except (FileNotFoundError, NotADirectoryError):
                    continue
                for n, _ in lower:
                    if n.startswith(wh) or n in names or n in seen:
                        continue
                    seen.add(n)
                    if below.lookup(_join(rel, n)) is not None:
                        gone.append(n)
    else:
        gone = [n for n in whited if n not in names and below.lookup(_join(rel, n)) is not None]
    events: List[Tuple[bytes, Optional[os.stat_result]]] = [(n, None) for n in gone]
    events += list(names.items())
    for name, nst in sorted(events, key=lambda t: t[0]):
        r = _join(rel, name)
        if nst is None:
            old = below.lookup(r)
            out.append(TreeChange(_display(r), "deleted", {},
                                  type_name(old[1].st_mode) if old else "unknown"))
            continue
        old = below.lookup(r)
        if old is None:
            out.append(TreeChange(_display(r), "added", {}, type_name(nst.st_mode)))
            if stat.S_ISDIR(nst.st_mode):
                _walk_added_into(top, r, out)
            continue
        opath, ost = old
        fields = compare_entries(opath, _join(top, r), ost, nst)
        if fields:
            out.append(TreeChange(_display(r), "modified", fields, type_name(nst.st_mode)))
        if stat.S_ISDIR(nst.st_mode):
            if stat.S_ISDIR(ost.st_mode):
                _walk_dir(top, r, below, opaque, out)
            else:
                _walk_added_into(top, r, out)


def _walk_added_into(top: bytes, rel: bytes, out: List[TreeChange]) -> None:
    out.extend(_walk_added(top, rel))


__all__ = ["AufsDriver", "UnionView"]
