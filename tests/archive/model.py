"""A small pure-Python reference model of OCI layer application, and the tree
snapshots it is compared with.

A tree (real or modelled) is a dict ``{relative path (bytes): node}``, where a
node is a dict with the keys of :data:`NODE_KEYS`:

    type      "f" regular, "d" dir, "l" symlink, "c"/"b" device, "p" fifo, "s" socket
    mode      permission bits incl. setuid/setgid/sticky (07777)
    uid, gid
    size      regular files: byte size; otherwise None
    sha256    regular files: hex digest of the content; otherwise None
    target    symlinks: the link target (bytes); otherwise None
    rdev      devices: (major, minor); otherwise None
    xattrs    {name (str): value (bytes)}
    mtime_ns  None for symlinks (not compared)
    link      hardlink group: the smallest path sharing the inode, when the
              inode has more than one name in the tree; otherwise None
    data_map  with holes=True: [(start, end), ...] data extents of regular files

The model applies layers given as lists of :class:`Entry` (tar entries in
archive order) with the OCI image-spec changeset semantics:

- ``.wh.NAME`` removes NAME (and everything beneath it) of the lower layers;
- ``DIR/.wh..wh..opq`` removes every lower child of DIR, wherever the marker
  sits in the layer;
- whiteouts apply to lower layers only: what this layer adds stays;
- a directory over a directory merges (the entry's attributes replace the old
  ones); any other entry replaces whatever was at its path.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

NODE_KEYS = ("type", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs",
             "mtime_ns", "link")

Tree = Dict[bytes, dict]

WH_PREFIX = b".wh."
OPAQUE = b".wh..wh..opq"


# --------------------------------------------------------------------------
# snapshots of real trees

def _type(mode: int) -> str:
    for test, t in ((stat.S_ISREG, "f"), (stat.S_ISDIR, "d"), (stat.S_ISLNK, "l"),
                    (stat.S_ISCHR, "c"), (stat.S_ISBLK, "b"), (stat.S_ISFIFO, "p"),
                    (stat.S_ISSOCK, "s")):
        if test(mode):
            return t
    raise ValueError(f"unknown file type {mode:o}")


def file_sha256(path: bytes) -> str:
    h = hashlib.sha256()
    # O_NONBLOCK so that a file that is unexpectedly a fifo never blocks us
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


def data_map(path: bytes) -> List[Tuple[int, int]]:
    """Data extents of a file as SEEK_DATA / SEEK_HOLE report them."""
    out = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def read_xattrs(path: bytes) -> Dict[str, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            return out
        raise
    for name in names:
        out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def stat_node(path: bytes, st: Optional[os.stat_result] = None, *, holes: bool = False,
              extra: bool = False) -> dict:
    st = st or os.lstat(path)
    t = _type(st.st_mode)
    node = {
        "type": t,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size if t == "f" else None,
        "sha256": file_sha256(path) if t == "f" else None,
        "target": os.readlink(path) if t == "l" else None,
        "rdev": (os.major(st.st_rdev), os.minor(st.st_rdev)) if t in "cb" else None,
        "xattrs": read_xattrs(path),
        "mtime_ns": None if t == "l" else st.st_mtime_ns,
        "link": None,
    }
    if holes and t == "f":
        node["data_map"] = data_map(path)
    if extra:
        node.update(ino=st.st_ino, dev=st.st_dev, nlink=st.st_nlink, ctime_ns=st.st_ctime_ns,
                    mtime_ns=st.st_mtime_ns)
    return node


def snapshot(root, *, holes: bool = False, extra: bool = False, include_root: bool = False,
             exclude: Tuple[bytes, ...] = (), ghosts: Optional[List[bytes]] = None) -> Tree:
    """Snapshot of the tree under root, keyed by path relative to root (bytes).

    extra=True adds inode, device, link count and ctime (to prove that nothing
    was touched, not even chmod'ed to the same value); exclude lists relative
    paths whose subtrees are left out.

    ghosts: for overlay mounts.  overlayfs passes readdir of a directory that
    is not merged straight to the layer, so a whiteout there is listed although
    no lookup finds it.  Names that readdir lists but lstat does not find are
    appended to this list instead of failing the snapshot.
    """
    root = os.fsencode(root)
    tree: Tree = {}
    inodes: Dict[Tuple[int, int], List[bytes]] = {}

    def walk(rel: bytes):
        full = os.path.join(root, rel) if rel else root
        with os.scandir(full) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = os.path.join(rel, e.name) if rel else e.name
            if r in exclude:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                if ghosts is None:
                    raise
                ghosts.append(r)
                continue
            tree[r] = stat_node(e.path, st, holes=holes, extra=extra)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault((st.st_dev, st.st_ino), []).append(r)
            if stat.S_ISDIR(st.st_mode):
                walk(r)

    if include_root:
        tree[b"."] = stat_node(root, holes=holes, extra=extra)
    walk(b"")
    for names in inodes.values():
        if len(names) > 1:
            first = min(names)
            for n in names:
                tree[n]["link"] = first
    return tree


def project(tree: Tree, *, drop: Tuple[str, ...] = (), dirs_mtime: bool = True,
            xattr_prefixes: Optional[Tuple[str, ...]] = None) -> Tree:
    """A copy of tree without some fields: drop names node keys to remove;
    dirs_mtime=False forgets directory mtimes; xattr_prefixes keeps only the
    xattrs whose names start with one of them."""
    out = {}
    for p, n in tree.items():
        n = {k: v for k, v in n.items() if k not in drop}
        if not dirs_mtime and n.get("type") == "d":
            n["mtime_ns"] = None
        if xattr_prefixes is not None and "xattrs" in n:
            n["xattrs"] = {k: v for k, v in n["xattrs"].items() if k.startswith(xattr_prefixes)}
        out[p] = n
    return out


def diff_trees(expected: Tree, actual: Tree, limit: int = 40) -> List[str]:
    """Human-readable differences (empty list when equal)."""
    out = []
    for p in sorted(set(expected) | set(actual)):
        if p not in actual:
            out.append(f"missing   {p!r}: {expected[p]}")
        elif p not in expected:
            out.append(f"unexpected {p!r}: {actual[p]}")
        else:
            e, a = expected[p], actual[p]
            for k in sorted(set(e) | set(a)):
                if e.get(k) != a.get(k):
                    out.append(f"differs   {p!r} {k}: expected {e.get(k)!r}, got {a.get(k)!r}")
        if len(out) >= limit:
            out.append("...")
            break
    return out


def assert_same_tree(expected: Tree, actual: Tree, what: str = "tree") -> None:
    d = diff_trees(expected, actual)
    assert not d, f"{what} differs:\n" + "\n".join(d)


@contextmanager
def overlay_mount(lowers: List[str], mnt: str, opts: str = ""):
    """A real read-only overlayfs of the layer directories lowers (bottom first)."""
    if len(lowers) == 1:
        empty = os.path.join(os.path.dirname(mnt), "empty-lower")
        os.makedirs(empty, exist_ok=True)
        lowers = [empty] + list(lowers)
    options = "lowerdir=" + ":".join(reversed([os.fspath(p) for p in lowers]))
    if opts:
        options += "," + opts
    os.makedirs(mnt, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, os.fspath(mnt)],
                   check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", os.fspath(mnt)], check=True)


# --------------------------------------------------------------------------
# the reference model

@dataclass
class Entry:
    """One tar entry of a layer.  kind: "file", "dir", "symlink", or the markers
    "whiteout" (path names what is deleted; the archive holds .wh.<name>) and
    "opaque" (path names the directory; the archive holds <dir>/.wh..wh..opq)."""
    path: bytes
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    data: bytes = b""
    target: bytes = b""
    xattrs: Dict[str, bytes] = field(default_factory=dict)

    def tar_name(self) -> bytes:
        if self.kind == "whiteout":
            d, _, base = self.path.rpartition(b"/")
            return (d + b"/" if d else b"") + WH_PREFIX + base
        if self.kind == "opaque":
            return self.path + b"/" + OPAQUE if self.path else OPAQUE
        return self.path


def _node(e: Entry) -> dict:
    t = {"file": "f", "dir": "d", "symlink": "l"}[e.kind]
    return {
        "type": t,
        "mode": e.mode & 0o7777,
        "uid": e.uid,
        "gid": e.gid,
        "size": len(e.data) if t == "f" else None,
        "sha256": hashlib.sha256(e.data).hexdigest() if t == "f" else None,
        "target": e.target if t == "l" else None,
        "rdev": None,
        "xattrs": dict(e.xattrs),
        "mtime_ns": None if t == "l" else e.mtime_ns,
        "link": None,
    }


def _under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def remove_subtree(tree: Tree, path: bytes) -> None:
    for p in [p for p in tree if _under(p, path)]:
        del tree[p]


def apply_layer(tree: Tree, layer: List[Entry]) -> Tree:
    """The tree after applying layer on top of it (a new dict; tree is kept)."""
    lower = dict(tree)
    out = dict(tree)
    # Whiteouts and opaque markers act on the lower layers only, wherever they
    # sit in the archive: apply them first.
    for e in layer:
        if e.kind == "whiteout":
            remove_subtree(out, e.path)
        elif e.kind == "opaque":
            for p in [p for p in out if p in lower and p != e.path and _under(p, e.path)]:
                del out[p]
    for e in layer:
        if e.kind in ("whiteout", "opaque"):
            continue
        parent = e.path.rpartition(b"/")[0]
        if parent and out.get(parent, {}).get("type") != "d":
            raise ValueError(f"model: parent of {e.path!r} is not a directory in the layer")
        old = out.get(e.path)
        if e.kind == "dir" and old is not None and old["type"] == "d":
            out[e.path] = _node(e)          # merge: children stay, attributes replaced
            continue
        remove_subtree(out, e.path)
        out[e.path] = _node(e)
    return out


def apply_stack(layers: List[List[Entry]]) -> Tree:
    tree: Tree = {}
    for layer in layers:
        tree = apply_layer(tree, layer)
    return tree


def layer_tar(layer: List[Entry], long: str = "pax") -> bytes:
    """The layer as a tar (built with tarbuild, nanosecond mtimes and xattrs in PAX
    records, hardlinks included)."""
    from .tarbuild import Tar
    t = Tar(long=long)
    for e in layer:
        sec, nsec = divmod(e.mtime_ns, 10**9)
        pax = {}
        if nsec:
            pax[b"mtime"] = b"%d.%09d" % (sec, nsec)
        for k, v in e.xattrs.items():
            pax[b"SCHILY.xattr." + k.encode()] = v
        common = dict(uid=e.uid, gid=e.gid, mtime=sec, pax=pax or None)
        name = e.tar_name()
        if e.kind == "file":
            t.file(name, e.data, mode=e.mode, **common)
        elif e.kind == "dir":
            t.dir(name + b"/", mode=e.mode, **common)
        elif e.kind == "symlink":
            t.symlink(name, e.target, **common)
        elif e.kind == "hardlink":
            t.hardlink(name, e.target)
        else:  # whiteout / opaque marker: an empty regular file
            t.file(name, b"", mode=0o644, mtime=sec)
    return t.bytes()
