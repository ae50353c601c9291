"""The ``overlay`` driver: kernel overlayfs (or fuse-overlayfs).

Each layer keeps only its own changes, in overlay format, in
``layers/<id>/diff``: a deleted path is a character device 0:0, an opaque
directory carries the xattr ``trusted.overlay.opaque=y`` (``user.overlay.*``
with ``userxattr`` in a user namespace).  A bottom layer (no parent) is applied
with whiteouts carried out, as there is nothing below it to hide.

Views
    - a writable layer: overlay with ``lowerdir`` = its ancestors (nearest
      first), ``upperdir`` = its diff, ``workdir`` = its work dir; with no
      parent, a bind mount of its diff;
    - a read-only layer: read-only overlay of lower dirs only, its own diff
      first; with no parent, a read-only bind mount of its diff.

Deep stacks
    mount(2) takes at most a page of options.  Like docker's overlay2, every
    layer gets a short name ``l/<26 chars>`` (a symlink to its diff dir) and
    the lower dirs are listed as ``l/A:l/B:...``, relative to the driver root;
    such a mount runs with the working directory at the root (see
    :mod:`layerfs.drivers._mount`).  About 135 layers fit in a page.

Diff and changes
    Natively from the upper (diff) dir: create_layer(source_format="overlay")
    turns char 0:0 and the opaque xattr into AUFS whiteouts; changes() walks the
    upper dir, deciding added/modified by a lookup in the parent's layers.
    Where the upper dir cannot be trusted to hold the whole change (the mount
    used redirect_dir or metacopy, or the upper dir carries
    ``overlay.redirect``/``overlay.metacopy`` xattrs), both fall back to the
    exact diff of the parent's view and the layer's view.

Options
    ``mount_program="fuse-overlayfs"``: mount through that program instead of
    the kernel; ``mount_options=[...]``: extra overlay options (e.g.
    ``"redirect_dir=on"``); ``userxattr``: True/False (default: on inside a user
    namespace).
"""
from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence, Set, Tuple

from ..diff import compare_trees, with_parents
from ..errors import NotSupported, PreconditionFailed
from . import _mount
from .base import (Change, DirectoryDriver, LayerInfo, Support, backing_filesystem, in_user_namespace,
                   is_mountpoint, remove_tree, tar_stream_of)

LINK_DIR = "l"
_PAGE = os.sysconf("SC_PAGE_SIZE")
_AUFS_OPQ = b".wh..wh..opq"
_WH = b".wh."


# ----------------------------------------------------------------- environment

def _module_param(name: str) -> Optional[str]:
    try:
        with open(f"/sys/module/overlay/parameters/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def _overlay_in_kernel() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(l.split()[-1] == "overlay" for l in f if l.strip())
    except OSError:
        return False


def _option_value(options: Sequence[str], key: str) -> Optional[str]:
    val = None
    for o in options:
        k, _, v = o.partition("=")
        if k == key:
            val = v or "on"
    return val


def features_untrusted(options: Sequence[str]) -> List[str]:
    """The overlay features in force for a mount with these options that move
    content outside the upper dir's plain shape (redirect_dir, metacopy)."""
    out = []
    redirect = _option_value(options, "redirect_dir")
    if redirect is None:
        redirect = "on" if _module_param("redirect_dir") == "Y" else "off"
    if redirect == "on":
        out.append("redirect_dir")
    metacopy = _option_value(options, "metacopy")
    if metacopy is None:
        metacopy = "on" if _module_param("metacopy") == "Y" else "off"
    if metacopy == "on":
        out.append("metacopy")
    return out


_support_cache: Dict[Tuple[str, bool], Support] = {}


def _probe_mount(root: str, userxattr: bool) -> Optional[str]:
    """Try a real overlay mount with a whiteout under root; None if it works."""
    tmp = tempfile.mkdtemp(prefix=".overlay-check-", dir=root)
    try:
        for sub in ("l1", "l2", "u", "w", "m"):
            os.mkdir(os.path.join(tmp, sub))
        with open(os.path.join(tmp, "l1", "f"), "w"):
            pass
        data = f"lowerdir={tmp}/l1:{tmp}/l2,upperdir={tmp}/u,workdir={tmp}/w"
        if userxattr:
            data += ",userxattr"
        # volatile (Linux 5.10+): the unmount does not sync the whole upper
        # filesystem, which with other writers' dirty data can take a second
        try:
            _mount.mount("overlay", os.path.join(tmp, "m"), "overlay", 0, data + ",volatile")
        except OSError:
            try:
                _mount.mount("overlay", os.path.join(tmp, "m"), "overlay", 0, data)
            except OSError as e:
                return f"a test overlay mount under {root} failed: {e.strerror}"
        try:
            os.unlink(os.path.join(tmp, "m", "f"))  # needs a whiteout in the upper dir
            st = os.lstat(os.path.join(tmp, "u", "f"))
            if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
                return f"overlay on {root} did not write a char 0:0 whiteout"
        except OSError as e:
            return f"overlay on {root} cannot write whiteouts: {e.strerror}"
        finally:
            _mount.umount(os.path.join(tmp, "m"))
        if not _has_d_type(os.path.join(tmp, "l1")):
            return (f"the filesystem of {root} does not report file types in directory "
                    "listings (d_type), which overlay needs: use ext4, or xfs made with "
                    "ftype=1 (mkfs.xfs -n ftype=1)")
        return None
    finally:
        with contextlib.suppress(OSError):
            remove_tree(tmp)


class _Dirent(ctypes.Structure):
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                ("d_name", ctypes.c_char * 256)]


def _has_d_type(path: str) -> bool:
    """Whether readdir(3) in path says what each entry is (d_type != DT_UNKNOWN)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir64.restype = ctypes.POINTER(_Dirent)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    d = libc.opendir(os.fsencode(path))
    if not d:
        return True  # cannot tell: let the mount decide
    try:
        while True:
            ent = libc.readdir64(d)
            if not ent:
                return True
            if ent.contents.d_name not in (b".", b".."):
                return ent.contents.d_type != 0
    finally:
        libc.closedir(d)


def _short_id() -> str:
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=")


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


# ----------------------------------------------------------------- lower stack

class LowerStack:
    """Lookups in the union of overlay-format layer dirs (top first), without mounting.

    Understands char 0:0 whiteouts and the opaque xattr, and also the AUFS-style
    markers fuse-overlayfs may leave (``.wh.NAME`` files, ``.wh..wh..opq``).
    """

    def __init__(self, dirs: Sequence[bytes], opaque_xattr: str):
        self.dirs = list(dirs)
        self.opaque_xattr = opaque_xattr
        self._opaque: Dict[bytes, bool] = {}

    def is_opaque(self, path: bytes) -> bool:
        v = self._opaque.get(path)
        if v is None:
            v = is_opaque_dir(path, self.opaque_xattr)
            self._opaque[path] = v
        return v

    def lookup(self, rel: bytes) -> Optional[os.stat_result]:
        """lstat of rel in the union view, or None if the view has no such path."""
        comps = rel.split(b"/")
        last = len(comps) - 1
        for d in self.dirs:
            p = d
            stop_after = False
            for i, c in enumerate(comps):
                parent = p
                p = p + b"/" + c
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    if os.path.lexists(parent + b"/" + _WH + c):
                        return None  # AUFS-style whiteout
                    break
                except NotADirectoryError:
                    return None
                if _is_whiteout(st):
                    return None
                if i == last:
                    return st
                if not stat.S_ISDIR(st.st_mode):
                    return None  # a non-directory here hides everything below
                if self.is_opaque(p):
                    stop_after = True
            if stop_after:
                return None
        return None

    def names(self, rel: bytes) -> Set[bytes]:
        """The entry names of directory rel in the union view."""
        candidates: Set[bytes] = set()
        for d in self.dirs:
            try:
                with os.scandir(d + b"/" + rel) as it:
                    for e in it:
                        if not e.name.startswith(_WH):
                            candidates.add(e.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
        return {n for n in candidates if self.lookup(rel + b"/" + n) is not None}


def is_opaque_dir(path: bytes, xattr_name: str) -> bool:
    try:
        if os.getxattr(path, xattr_name, follow_symlinks=False) == b"y":
            return True
    except OSError as e:
        if e.errno not in (errno.ENODATA, errno.ENOTSUP):
            raise
    return os.path.lexists(path + b"/" + _AUFS_OPQ)


class _Untrusted(Exception):
    """The upper dir holds redirects or metacopy files: use the exact diff."""


# ----------------------------------------------------------------- the driver

class OverlayDriver(DirectoryDriver):
    """Kernel overlayfs; see the module docstring."""

    name = "overlay"
    whiteout_mode = "overlay"

    @classmethod
    def supported(cls, root: Optional[str] = None) -> Support:
        if not _overlay_in_kernel():
            with contextlib.suppress(OSError):
                subprocess.run(["modprobe", "overlay"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
            if not _overlay_in_kernel():
                return Support(False, "the kernel has no overlay filesystem: load it with "
                                      "'modprobe overlay' (kernel option CONFIG_OVERLAY_FS)")
        userns = in_user_namespace()
        if os.geteuid() != 0:
            return Support(False, "overlay mounts need root, or root inside a user namespace "
                                  "(unshare --user --map-root-user --mount; kernel >= 5.11)")
        if root is None:
            return Support(True, "kernel overlayfs" + (" (userxattr)" if userns else ""))
        root = os.path.abspath(os.fsdecode(root))
        fs = backing_filesystem(root)
        if fs in ("overlay", "aufs"):
            return Support(False, f"{root} is on {fs}, which overlay cannot use as its upper "
                                  "layer: put the store on ext4, xfs or btrfs (e.g. a volume)")
        key = (root, userns)
        if key not in _support_cache:
            probe_dir = root
            while not os.path.isdir(probe_dir):
                probe_dir = os.path.dirname(probe_dir)
            why = _probe_mount(probe_dir, userns)
            _support_cache[key] = Support(why is None, why or
                                          f"kernel overlayfs on {fs}" +
                                          (" (userxattr)" if userns else ""))
        return _support_cache[key]

    def __init__(self, root: str, **options):
        unknown = set(options) - {"mount_program", "mount_options", "userxattr"}
        if unknown:
            raise TypeError(f"unknown overlay option(s): {', '.join(sorted(unknown))}")
        if options.get("userxattr") is None:
            options["userxattr"] = in_user_namespace()
        mo = options.get("mount_options") or ()
        options["mount_options"] = tuple(mo.split(",") if isinstance(mo, str) else mo)
        prog = options.get("mount_program")
        if prog:
            path = shutil.which(prog)
            if path is None:
                raise NotSupported(f"mount program {prog!r} not found: install it "
                                   "(apt-get install fuse-overlayfs) or leave mount_program unset")
            options["mount_program"] = path
        super().__init__(root, **options)
        os.makedirs(os.path.join(self.root, LINK_DIR), mode=0o700, exist_ok=True)

    # -- names -------------------------------------------------------------
    @property
    def _xattr_prefix(self) -> str:
        return "user.overlay." if self.options.get("userxattr") else "trusted.overlay."

    def _link(self, id: str) -> str:
        with open(os.path.join(self.layer_dir(id), "link")) as f:
            return f.read().strip()

    def _lowers(self, id: str) -> List[str]:
        """The layer's lower dirs as "l/<short>" names, nearest first."""
        try:
            with open(os.path.join(self.layer_dir(id), "lower")) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return []
        return text.split(":") if text else []

    # -- hooks -------------------------------------------------------------
    def _populate(self, stage: str, info: LayerInfo, parent: Optional[LayerInfo]) -> None:
        os.mkdir(os.path.join(stage, "diff"), 0o755)
        if info.rw:
            os.mkdir(os.path.join(stage, "work"), 0o700)
        lowers: List[str] = []
        if parent is not None:
            lowers = [f"{LINK_DIR}/{self._link(parent.id)}"] + self._lowers(parent.id)
        # the deepest view of this layer (a writable layer on top of it) must fit in a page
        need = len(self._mount_data(lowers + ["l/" + "X" * 26], "l/" + "X" * 26,
                                    f"layers/{info.id}/work", relative=True))
        if need >= _PAGE:
            raise PreconditionFailed(f"layer {info.id!r} would stack {len(lowers) + 1} layers; "
                                     f"overlay mount options must fit in {_PAGE} bytes",
                                     self.layer_dir(parent.id) if parent else None)
        link = _short_id()
        with open(os.path.join(stage, "lower"), "w") as f:
            f.write(":".join(lowers))
        with open(os.path.join(stage, "link"), "w") as f:
            f.write(link)
        os.symlink(f"../layers/{info.id}/diff", os.path.join(self.root, LINK_DIR, link))
        info.extra["link"] = link

    def _before_remove(self, info: LayerInfo) -> None:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.root, LINK_DIR, self._link(info.id)))

    def apply_diff(self, id: str, source, **options):
        if self.get(id).parent is None:
            options.setdefault("whiteouts", "apply")  # nothing below a bottom layer to hide
        return super().apply_diff(id, source, **options)

    # -- mounting ----------------------------------------------------------
    def _base_options(self) -> List[str]:
        if self.options.get("mount_program"):
            return list(self.options["mount_options"])
        out = ["index=off"]
        if self.options.get("userxattr"):
            out.append("userxattr")
        return out + list(self.options["mount_options"])

    def _mount_data(self, lowers: Sequence[str], upper: Optional[str], work: Optional[str],
                    relative: bool, extra: Sequence[str] = ()) -> str:
        def p(x: str) -> str:
            return x if relative else os.path.join(self.root, x)
        parts = ["lowerdir=" + ":".join(p(x) for x in lowers)]
        if upper:
            parts += ["upperdir=" + p(upper), "workdir=" + p(work)]
        return ",".join(parts + self._base_options() + list(extra))

    def mounts(self, id: str):
        """The mount giving the layer's view (as :class:`~layerfs.drivers.base.Mount`)."""
        from .base import Mount
        info = self.get(id)
        spec = self._view_spec(info)
        if spec is None:
            opts = ("bind",) if info.rw else ("bind", "ro")
            return [Mount("bind", self.diff_dir(id), opts)]
        lowers, upper, work = spec
        data, cwd = self._choose_data(lowers, upper, work, ro=not info.rw)
        return [Mount("overlay", "overlay", tuple(data.split(",")), cwd)]

    def _view_spec(self, info: LayerInfo):
        """(lowers, upper, work) of the layer's overlay view, None for a bind mount."""
        parents = self._lowers(info.id)
        if not parents:
            return None
        if info.rw:
            return parents, f"{LINK_DIR}/{self._link(info.id)}", f"layers/{info.id}/work"
        return [f"{LINK_DIR}/{self._link(info.id)}"] + parents, None, None

    def _choose_data(self, lowers, upper, work, ro: bool, extra: Sequence[str] = ()):
        extra = list(extra) + (["ro"] if ro and self.options.get("mount_program") else [])
        data = self._mount_data(lowers, upper, work, relative=False, extra=extra)
        if len(data) < _PAGE:
            return data, None
        return self._mount_data(lowers, upper, work, relative=True, extra=extra), self.root

    def _mount_overlay(self, target: str, lowers, upper, work, ro: bool,
                       extra: Sequence[str] = ()) -> List[str]:
        data, cwd = self._choose_data(lowers, upper, work, ro, extra)
        prog = self.options.get("mount_program")
        if prog:
            _mount.run_program([prog, "-o", data, target], cwd=cwd or self.root)
        else:
            _mount.mount("overlay", target, "overlay", _mount.MS_RDONLY if ro else 0, data, cwd)
        return data.split(",")

    def _mount_view(self, info: LayerInfo, target: str) -> None:
        spec = self._view_spec(info)
        if spec is None:
            _mount.bind(self.diff_dir(info.id), target, readonly=not info.rw)
            return
        lowers, upper, work = spec
        if upper:
            # a work dir left by an earlier mount may hold stale entries
            workdir = os.path.join(self.root, work)
            for name in os.listdir(workdir):
                with contextlib.suppress(OSError):
                    remove_tree(os.path.join(workdir, name))
        opts = self._mount_overlay(target, lowers, upper, work, ro=not info.rw)
        if info.rw:
            untrusted = features_untrusted(opts) if not self.options.get("mount_program") else []
            if untrusted != info.extra.get("untrusted_features", []) and untrusted:
                info.extra["untrusted_features"] = sorted(
                    set(info.extra.get("untrusted_features", [])) | set(untrusted))
                self._write_info(self.layer_dir(info.id), info)

    def _unmount_view(self, info: LayerInfo, target: str) -> None:
        self._umount(target)

    def _umount(self, target: str) -> None:
        if not is_mountpoint(target):
            return
        if os.geteuid() != 0 and self.options.get("mount_program"):
            _mount.run_program(["fusermount3", "-u", target])
        else:
            _mount.umount(target)

    # -- read-only views for the exact diff --------------------------------
    @contextlib.contextmanager
    def _temp_view(self, id: Optional[str]) -> Iterator[Optional[str]]:
        """A private read-only mount of layer id's whole view (None: no layer)."""
        if id is None:
            yield None
            return
        info = self.get(id)
        stage = os.path.join(self.root, "staging", f"view-{secrets.token_hex(8)}")
        target = os.path.join(stage, "merged")
        os.makedirs(target, 0o700)
        try:
            lowers = [f"{LINK_DIR}/{self._link(id)}"] + self._lowers(id)
            if len(lowers) == 1:
                _mount.bind(self.diff_dir(id), target, readonly=True)
            else:
                extra = []
                for feat in info.extra.get("untrusted_features", []):
                    extra.append("metacopy=on" if feat == "metacopy" else "redirect_dir=follow")
                if self.options.get("mount_program"):
                    extra = []
                self._mount_overlay(target, lowers, None, None, ro=True, extra=extra)
            try:
                yield target
            finally:
                self._umount(target)
        finally:
            with contextlib.suppress(OSError):
                remove_tree(stage)

    def cleanup(self) -> None:
        with self._locked():
            staging = os.path.join(self.root, "staging")
            for name in os.listdir(staging):
                target = os.path.join(staging, name, "merged")
                if name.startswith("view-") and is_mountpoint(target):
                    with contextlib.suppress(OSError):
                        self._umount(target)
            links = os.path.join(self.root, LINK_DIR)
            for name in os.listdir(links):
                p = os.path.join(links, name)
                if not os.path.exists(p):  # dangling: its layer is gone
                    with contextlib.suppress(OSError):
                        os.unlink(p)
        super().cleanup()

    # -- diff and changes --------------------------------------------------
    def _upper_trusted(self, info: LayerInfo) -> bool:
        if info.extra.get("untrusted_features"):
            return False
        if self.options.get("mount_program") or not info.rw:
            return True
        return not features_untrusted(self._base_options())

    def _walk_upper(self, info: LayerInfo) -> Iterator[Tuple[bytes, str]]:
        """(relative path, kind) of each change in the upper dir, kind one of
        "added", "modified", "deleted", "opaque" (an opaque directory's marker);
        raises _Untrusted at a redirect or metacopy xattr."""
        upper = os.fsencode(self.diff_dir(info.id))
        parents = self.chain(info.parent) if info.parent else []
        lower = LowerStack([os.fsencode(self.diff_dir(p.id)) for p in parents],
                           self._xattr_prefix + "opaque")
        redirect = self._xattr_prefix + "redirect"
        metacopy = self._xattr_prefix + "metacopy"
        opaque_x = self._xattr_prefix + "opaque"
        # stack of (rel dir, sorted entries iterator, everything below is new)
        stack = [(b"", iter(_sorted_entries(upper)), not parents)]
        while stack:
            drel, it, fresh = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                continue
            name, st = nxt
            rel = drel + b"/" + name if drel else name
            if name.startswith(_WH):
                if name == _AUFS_OPQ or name == b".wh..opq":
                    continue  # opaque markers: handled with their directory
                if not fresh and lower.lookup((drel + b"/" if drel else b"") +
                                              name[len(_WH):]) is not None:
                    yield (drel + b"/" if drel else b"") + name[len(_WH):], "deleted"
                continue
            if _is_whiteout(st):
                if not fresh and lower.lookup(rel) is not None:
                    yield rel, "deleted"
                continue
            path = upper + b"/" + rel
            try:
                xnames = os.listxattr(path, follow_symlinks=False)
            except OSError:
                xnames = []
            if redirect in xnames or metacopy in xnames:
                raise _Untrusted(os.fsdecode(rel))
            lst = None if fresh else lower.lookup(rel)
            yield rel, ("modified" if lst is not None else "added")
            if stat.S_ISDIR(st.st_mode):
                opaque = (opaque_x in xnames and os.getxattr(path, opaque_x,
                                                             follow_symlinks=False) == b"y") \
                    or os.path.lexists(path + b"/" + _AUFS_OPQ)
                below_new = fresh or lst is None or not stat.S_ISDIR(lst.st_mode)
                if opaque and not below_new:
                    yield rel, "opaque"
                    mine = set(os.listdir(path))
                    for n in sorted(lower.names(rel)):
                        if n not in mine:
                            yield rel + b"/" + n, "deleted"
                stack.append((rel, iter(_sorted_entries(path)), below_new))

    def _native_changes(self, info: LayerInfo) -> List[Change]:
        out = []
        for rel, kind in self._walk_upper(info):
            if kind != "opaque":
                out.append(Change("/" + os.fsdecode(rel), kind))
        return out

    def _changes(self, info: LayerInfo) -> List[Change]:
        if self._upper_trusted(info):
            try:
                return self._native_changes(info)
            except _Untrusted:
                pass
        with self._temp_view(info.parent) as old, self._temp_view(info.id) as new:
            return [Change(c.path, c.kind) for c in with_parents(compare_trees(old, new))]

    def _check_upper(self, info: LayerInfo) -> None:
        """Raise _Untrusted if the upper dir holds a redirect or a metacopy file."""
        redirect = self._xattr_prefix + "redirect"
        metacopy = self._xattr_prefix + "metacopy"
        for dirpath, dirnames, filenames in os.walk(os.fsencode(self.diff_dir(info.id))):
            for n in dirnames + filenames:
                try:
                    xn = os.listxattr(dirpath + b"/" + n, follow_symlinks=False)
                except OSError:
                    continue
                if redirect in xn or metacopy in xn:
                    raise _Untrusted(os.fsdecode(n))

    def _diff_stream(self, info: LayerInfo) -> BinaryIO:
        if self._upper_trusted(info):
            try:
                if info.rw and self.options.get("mount_program"):
                    # fuse-overlayfs leaves its own markers and user.fuseoverlayfs.*
                    # xattrs in the upper dir: list the changes from the upper dir,
                    # read the entries through a view, which hides them
                    changes = [(os.fsdecode(rel), kind) for rel, kind in self._walk_upper(info)]
                    return self._stream_from_view(info, changes)
                if info.rw:
                    self._check_upper(info)
                return tar_stream_of(self.diff_dir(info.id), source_format="overlay",
                                     overlay_user_xattr=bool(self.options.get("userxattr")))
            except _Untrusted:
                pass
        return self._naive_diff_stream(info)

    def _stream_from_view(self, info: LayerInfo, changes) -> BinaryIO:
        views = contextlib.ExitStack()
        try:
            new = views.enter_context(self._temp_view(info.id))
            return tar_stream_of(new, changes=changes, on_done=views.close)
        except BaseException:
            views.close()
            raise

    def _naive_diff_stream(self, info: LayerInfo) -> BinaryIO:
        views = contextlib.ExitStack()
        try:
            old = views.enter_context(self._temp_view(info.parent))
            new = views.enter_context(self._temp_view(info.id))
            changes = [(c.path, c.kind) for c in with_parents(compare_trees(old, new))]
            return tar_stream_of(new, changes=changes, on_done=views.close)
        except BaseException:
            views.close()
            raise

    def metadata(self, id: str) -> Dict[str, object]:
        md = super().metadata(id)
        info = self.get(id)
        md.update({"link": self._link(id), "lower": self._lowers(id),
                   "work": os.path.join(self.layer_dir(id), "work") if info.rw else None,
                   "native_diff": self._upper_trusted(info),
                   "mount_program": self.options.get("mount_program")})
        return md

    def status(self) -> Dict[str, object]:
        st = super().status()
        st.update({"userxattr": bool(self.options.get("userxattr")),
                   "mount_program": self.options.get("mount_program"),
                   "native_diff": not features_untrusted(self._base_options())
                   if not self.options.get("mount_program") else True})
        return st


def _sorted_entries(path: bytes) -> List[Tuple[bytes, os.stat_result]]:
    out = []
    with os.scandir(path) as it:
        for e in it:
            out.append((e.name, e.stat(follow_symlinks=False)))
    out.sort(key=lambda t: t[0])
    return out
