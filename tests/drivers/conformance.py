"""The driver conformance suite: what every storage driver must do.

Every test runs against a real store with real mounts (as root), nothing mocked,
and unmounts in ``finally``.  A driver's own test file runs the suite with a
few lines::

    from .conformance import Conformance

    class TestOverlay(Conformance):
        DRIVER = "overlay"
        OPTIONS = {}            # driver options, e.g. {"mount_program": "fuse-overlayfs"}

and this module runs it (``TestBuiltin``) for every driver in
``layerfs.drivers.BUILTIN`` whose ``test_<name>.py`` does not, so a new built-in
driver goes through the suite from the moment it is registered.

Reference trees come from the pure-Python OCI model of tests/archive/model.py.
"""
from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import subprocess
import sys
import tarfile
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Set

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import layerfs.drivers as drivers
from layerfs.archive import unpack_layers
from layerfs.errors import AlreadyExists, DigestMismatch, NotFound, PreconditionFailed
from tests.archive.model import (Entry, apply_layer, assert_same_tree, layer_tar, project,
                                 snapshot)
from tests.archive.tarbuild import zstd_bytes

from .conftest import mounts_under

HERE = Path(__file__).resolve().parent
USER_X = ("user.",)


# ----------------------------------------------------------------- layers and trees

def hardlink(path: bytes, target: bytes) -> Entry:
    """A hardlink entry to target, which must be a file entry earlier in the same layer."""
    return Entry(path, "hardlink", target=target)


def model_apply(tree, layer: Sequence[Entry]):
    """The model tree after the layer (hardlinks become copies of their target entry)."""
    files = {}
    plain = []
    for e in layer:
        if e.kind == "file":
            files[e.path] = e
        if e.kind == "hardlink":
            src = files[e.target]
            e = replace(src, path=e.path)
            files[e.path] = e
        plain.append(e)
    return apply_layer(tree, plain)


def view_of(root) -> dict:
    """What the tests compare of a tree: no dir mtimes, user.* xattrs, no link groups."""
    return project(snapshot(root), drop=("link",), dirs_mtime=False, xattr_prefixes=USER_X)


def expected_view(tree) -> dict:
    return project(tree, drop=("link",), dirs_mtime=False, xattr_prefixes=USER_X)


def file_(path, data=b"", mode=0o644, uid=0, gid=0, mtime=1_600_000_000, xattrs=None) -> Entry:
    return Entry(path.encode(), "file", mode, uid, gid, mtime * 10**9, data,
                 xattrs=dict(xattrs or {}))


def dir_(path, mode=0o755, uid=0, gid=0) -> Entry:
    return Entry(path.encode(), "dir", mode, uid, gid, 1_600_000_000 * 10**9)


def whiteout(path) -> Entry:
    return Entry(path.encode(), "whiteout")


class Member(NamedTuple):
    info: tarfile.TarInfo
    data: bytes


def tar_members(stream) -> Dict[str, Member]:
    """name -> (TarInfo, content) of every entry of a tar stream."""
    out = {}
    with tarfile.open(fileobj=stream, mode="r|") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            out[m.name.rstrip("/")] = Member(m, f.read() if f else b"")
    return out


def diff_bytes(d, id: str) -> bytes:
    with d.diff(id) as s:
        return s.read()


class Mounted:
    """with Mounted(driver, id) as path: ... (unmounts in finally)."""

    def __init__(self, d, id):
        self.d, self.id = d, id

    def __enter__(self) -> str:
        self.path = self.d.mount(self.id)
        return self.path

    def __exit__(self, *exc):
        self.d.unmount(self.id)


def build_stack(d, layers: Sequence[Sequence[Entry]], prefix="L") -> List[str]:
    ids = []
    parent = None
    for i, layer in enumerate(layers):
        id = f"{prefix}{i}"
        d.create(id, parent)
        d.apply_diff(id, io.BytesIO(layer_tar(layer)))
        ids.append(id)
        parent = id
    return ids


# ----------------------------------------------------------------- random layer stacks

NAMES = [b"a", b"b", b"c", b"d.txt", b"e"]
FILE_MODES = [0o644, 0o600, 0o755, 0o444, 0o640]
DIR_MODES = [0o755, 0o700, 0o750]
IDS = [0, 1000, 65534]
LINK_TARGETS = [b"a", b"../b", b"/etc/passwd", b"nowhere/x"]
OPS = ["file", "file", "modify", "chmod", "chown", "xattr", "delete", "delete", "mkdir",
       "replace_dir", "file_to_dir", "opaque", "symlink", "hardlink"]


def _parent(p: bytes) -> bytes:
    return p.rpartition(b"/")[0]


def _ancestors(p: bytes) -> List[bytes]:
    out = []
    while b"/" in p:
        p = _parent(p)
        out.append(p)
    return list(reversed(out))


def _under(p: bytes, top: bytes) -> bool:
    return p == top or p.startswith(top + b"/")


class LayerGen:
    """Draws one layer's entries against the tree below it, keeping the layer
    well-formed: each path at most once, parents written before children (with
    their current attributes, as image builders do), nothing written beneath a
    path the layer deletes or replaces."""

    def __init__(self, draw, lower: dict, n: int):
        self.draw, self.lower, self.n = draw, lower, n
        self.entries: List[Entry] = []
        self.touched: Set[bytes] = set()
        self.killed: Set[bytes] = set()
        self.new_dirs: Set[bytes] = set()
        self.new_files: List[bytes] = []

    def ok(self, p: bytes, recursive: bool) -> bool:
        if p in self.touched or any(_under(p, k) for k in self.killed):
            return False
        if recursive and any(_under(t, p) for t in self.touched):
            return False
        return all(a not in self.killed for a in _ancestors(p))

    def emit_parents(self, p: bytes) -> None:
        for a in _ancestors(p):
            if a in self.touched:
                continue
            node = self.lower[a]
            self.entries.append(Entry(a, "dir", node["mode"], node["uid"], node["gid"],
                                      node["mtime_ns"] or 0, xattrs=dict(node["xattrs"])))
            self.touched.add(a)

    def mtime(self) -> int:
        return (1_600_000_000 + self.draw(st.integers(0, 1000))) * 10**9 + \
            self.draw(st.sampled_from([0, 0, 500_000_000, 123_456_789]))

    def xattrs(self) -> Dict[str, bytes]:
        return self.draw(st.dictionaries(st.sampled_from(["user.k1", "user.k2"]),
                                         st.binary(min_size=1, max_size=8), max_size=1))

    def dirs(self) -> List[bytes]:
        """Directories in which something may be added."""
        out = [b""] + [p for p, n in self.lower.items() if n["type"] == "d"] + \
            sorted(self.new_dirs)
        return [p for p in out if p == b"" or
                (p not in self.killed and all(a not in self.killed for a in _ancestors(p)))]

    def existing(self, types: str) -> List[bytes]:
        return sorted(p for p, n in self.lower.items() if n["type"] in types)

    def new_path(self) -> Optional[bytes]:
        parent = self.draw(st.sampled_from(self.dirs()))
        name = self.draw(st.sampled_from(NAMES))
        p = parent + b"/" + name if parent else name
        if p in self.new_dirs or p in self.new_files:
            return None
        existing = self.lower.get(p)
        if not self.ok(p, recursive=existing is not None and existing["type"] == "d"):
            return None
        return p

    def pick(self, types: str, recursive: bool = False) -> Optional[bytes]:
        cands = [p for p in self.existing(types) if self.ok(p, recursive)]
        return self.draw(st.sampled_from(cands)) if cands else None

    def put(self, e: Entry, kill: bool = False) -> None:
        self.emit_parents(e.path)
        self.entries.append(e)
        self.touched.add(e.path)
        if kill:
            self.killed.add(e.path)

    def new_file(self, p: bytes) -> Entry:
        return Entry(p, "file", self.draw(st.sampled_from(FILE_MODES)),
                     self.draw(st.sampled_from(IDS)), self.draw(st.sampled_from(IDS)),
                     self.mtime(), self.draw(st.binary(max_size=40)), xattrs=self.xattrs())

    def op(self, kind: str) -> None:
        lower = self.lower
        if kind == "file":
            p = self.new_path()
            if p is not None:
                replaced_dir = p in lower and lower[p]["type"] == "d"
                self.put(self.new_file(p), kill=replaced_dir)
                if not replaced_dir:
                    self.new_files.append(p)
        elif kind == "modify":
            p = self.pick("f")
            if p is not None:
                n = lower[p]
                self.put(Entry(p, "file", n["mode"], n["uid"], n["gid"], self.mtime(),
                               self.draw(st.binary(max_size=40)), xattrs=dict(n["xattrs"])))
        elif kind in ("chmod", "chown", "xattr"):
            p = self.pick("fd")
            if p is None:
                return
            n = lower[p]
            mode, uid, gid, xattrs = n["mode"], n["uid"], n["gid"], dict(n["xattrs"])
            if kind == "chmod":
                mode = self.draw(st.sampled_from(DIR_MODES if n["type"] == "d" else FILE_MODES))
            elif kind == "chown":
                uid, gid = self.draw(st.sampled_from(IDS)), self.draw(st.sampled_from(IDS))
            else:
                xattrs.update(self.xattrs() or {"user.k1": b"v"})
            if n["type"] == "d":
                self.put(Entry(p, "dir", mode, uid, gid, n["mtime_ns"] or 0, xattrs=xattrs))
            else:
                # a file's attributes travel with its content: the entry is the whole file
                data = self._lower_data(p)
                self.put(Entry(p, "file", mode, uid, gid, n["mtime_ns"], data, xattrs=xattrs))
        elif kind == "delete":
            p = self.pick("fdl", recursive=True)
            if p is not None:
                self.emit_parents(p)
                self.entries.append(Entry(p, "whiteout"))
                self.touched.add(p)
                self.killed.add(p)
        elif kind == "mkdir":
            p = self.new_path()
            if p is not None and p not in lower:
                self.put(Entry(p, "dir", self.draw(st.sampled_from(DIR_MODES)),
                               self.draw(st.sampled_from(IDS)), 0, self.mtime(),
                               xattrs=self.xattrs()))
                self.new_dirs.add(p)
        elif kind == "replace_dir":
            p = self.pick("d", recursive=True)
            if p is not None:
                self.put(self.new_file(p), kill=True)
        elif kind == "file_to_dir":
            p = self.pick("fl")
            if p is not None:
                self.put(Entry(p, "dir", 0o755, 0, 0, self.mtime()))
                self.new_dirs.add(p)
        elif kind == "opaque":
            p = self.pick("d", recursive=True)
            if p is not None:
                n = lower[p]
                self.put(Entry(p, "dir", n["mode"], n["uid"], n["gid"], n["mtime_ns"] or 0,
                               xattrs=dict(n["xattrs"])))
                self.entries.append(Entry(p, "opaque"))
                child = p + b"/" + self.draw(st.sampled_from(NAMES))
                self.entries.append(self.new_file(child))
                self.touched.add(child)
                self.killed.add(p)
        elif kind == "symlink":
            p = self.new_path()
            if p is not None and not (p in lower and lower[p]["type"] == "d"):
                self.put(Entry(p, "symlink", 0o777, self.draw(st.sampled_from(IDS)), 0,
                               self.mtime(), target=self.draw(st.sampled_from(LINK_TARGETS))))
        elif kind == "hardlink":
            srcs = [f for f in self.new_files if f not in self.killed]
            p = self.new_path()
            if srcs and p is not None and not (p in lower and lower[p]["type"] == "d"):
                self.put(hardlink(p, self.draw(st.sampled_from(srcs))))
                self.new_files.append(p)

    def _lower_data(self, p: bytes) -> bytes:
        return self.lower_data[p]

    def layer(self, ops: Sequence[str]) -> List[Entry]:
        for k in ops:
            self.op(k)
        return self.entries


def draw_stack(data, max_layers: int = 4):
    """Random layers (lists of Entry) and the model tree after each."""
    n = data.draw(st.integers(1, max_layers), label="layers")
    tree: dict = {}
    contents: Dict[bytes, bytes] = {}
    layers, trees = [], []
    for i in range(n):
        gen = LayerGen(data.draw, tree, i)
        gen.lower_data = contents
        ops = data.draw(st.lists(st.sampled_from(OPS), min_size=1, max_size=8), label=f"ops{i}")
        if i == 0:
            ops = ["mkdir", "file", "file", "mkdir", "file"] + ops
        layer = gen.layer(ops)
        tree = model_apply(tree, layer)
        contents = _contents(contents, layer)
        layers.append(layer)
        trees.append(tree)
    return layers, trees


def _contents(prev: Dict[bytes, bytes], layer: Sequence[Entry]) -> Dict[bytes, bytes]:
    out = dict(prev)
    files = {}
    for e in layer:
        if e.kind == "file":
            out[e.path] = e.data
            files[e.path] = e.data
        elif e.kind == "hardlink":
            out[e.path] = files[e.path] = files[e.target]
    return out


# ----------------------------------------------------------------- writes through a mount

RW_OPS = ["write", "write", "overwrite", "chmod", "chown", "xattr", "unlink", "rmtree", "mkdir",
          "symlink", "link", "dir_to_file", "recreate_dir", "file_to_dir"]


def _node(kind: str, mode: int, uid: int, gid: int, mtime_ns, data: bytes = b"",
          target: bytes = b"", xattrs=None) -> dict:
    import hashlib
    return {"type": kind, "mode": mode, "uid": uid, "gid": gid,
            "size": len(data) if kind == "f" else None,
            "sha256": hashlib.sha256(data).hexdigest() if kind == "f" else None,
            "target": target if kind == "l" else None, "rdev": None,
            "xattrs": dict(xattrs or {}), "mtime_ns": None if kind == "l" else mtime_ns,
            "link": None}


class RwGen:
    """Random changes made with plain file system calls through a writable
    layer's mount, mirrored in a model tree (the expected view)."""

    def __init__(self, draw, mnt: str, tree: dict, linked: Iterable[bytes] = ()):
        self.draw, self.m = draw, os.fsencode(mnt)
        self.tree = dict(tree)
        self.base = tree
        # Paths sharing an inode below: whether a write through one name shows
        # through the others differs between union filesystems (kernel overlayfs
        # without index breaks the link on copy-up, fuse-overlayfs keeps it),
        # so leave them be.
        self.linked: Set[bytes] = set(linked) | \
            {p for p, n in snapshot(mnt).items() if n["link"] is not None}

    def full(self, p: bytes) -> bytes:
        return self.m + b"/" + p

    def pick(self, types: str, plain: bool = False) -> Optional[bytes]:
        c = sorted(p for p, n in self.tree.items() if n["type"] in types and
                   not (plain and p in self.linked))
        return self.draw(st.sampled_from(c)) if c else None

    def new_path(self) -> Optional[bytes]:
        dirs = [b""] + sorted(p for p, n in self.tree.items() if n["type"] == "d")
        parent = self.draw(st.sampled_from(dirs))
        p = (parent + b"/" if parent else b"") + self.draw(st.sampled_from(NAMES))
        return None if p in self.tree else p

    def mtime(self) -> int:
        return (1_650_000_000 + self.draw(st.integers(0, 1000))) * 10**9 + \
            self.draw(st.sampled_from([0, 250_000_000]))

    def remove(self, p: bytes) -> None:
        for q in [q for q in self.tree if _under(q, p)]:
            del self.tree[q]
            self.linked.discard(q)

    def write(self, p: bytes) -> None:
        data = self.draw(st.binary(max_size=40))
        mode = self.draw(st.sampled_from(FILE_MODES))
        uid, gid = self.draw(st.sampled_from(IDS)), self.draw(st.sampled_from(IDS))
        t = self.mtime()
        f = self.full(p)
        with open(f, "wb") as fh:
            fh.write(data)
        os.chown(f, uid, gid)
        os.chmod(f, mode)
        os.utime(f, ns=(t, t))
        self.tree[p] = _node("f", mode, uid, gid, t, data)

    def mkdir(self, p: bytes) -> None:
        mode = self.draw(st.sampled_from(DIR_MODES))
        os.mkdir(self.full(p))
        os.chmod(self.full(p), mode)
        # A layer tar cannot take an xattr away from a directory that stays a
        # directory (appliers merge directory entries): a directory made where
        # one was gets the old one's xattrs.
        old = self.base.get(p)
        xattrs = dict(old["xattrs"]) if old is not None and old["type"] == "d" else {}
        for k, v in xattrs.items():
            os.setxattr(self.full(p), k, v)
        self.tree[p] = _node("d", mode, 0, 0, None, xattrs=xattrs)

    def op(self, kind: str) -> None:
        tree = self.tree
        if kind == "write":
            p = self.new_path()
            if p is not None:
                self.write(p)
        elif kind == "overwrite":
            p = self.pick("f", plain=True)
            if p is not None:
                n = tree[p]
                data = self.draw(st.binary(min_size=1, max_size=40))
                t = self.mtime()
                with open(self.full(p), "r+b") as fh:
                    fh.truncate(0)
                    fh.write(data)
                os.utime(self.full(p), ns=(t, t))
                tree[p] = _node("f", n["mode"], n["uid"], n["gid"], t, data, xattrs=n["xattrs"])
        elif kind == "chmod":
            p = self.pick("fd", plain=True)
            if p is not None:
                n = dict(tree[p])
                n["mode"] = self.draw(st.sampled_from(DIR_MODES if n["type"] == "d"
                                                      else FILE_MODES))
                os.chmod(self.full(p), n["mode"])
                tree[p] = n
        elif kind == "chown":
            p = self.pick("fdl", plain=True)
            if p is not None:
                n = dict(tree[p])
                n["uid"], n["gid"] = self.draw(st.sampled_from(IDS)), self.draw(st.sampled_from(IDS))
                os.lchown(self.full(p), n["uid"], n["gid"])
                if n["type"] == "f":
                    os.chmod(self.full(p), n["mode"])  # chown may clear set-id bits
                tree[p] = n
        elif kind == "xattr":
            p = self.pick("fd", plain=True)
            if p is not None:
                n = dict(tree[p])
                k = self.draw(st.sampled_from(["user.k1", "user.k2"]))
                v = self.draw(st.binary(min_size=1, max_size=8))
                os.setxattr(self.full(p), k, v, follow_symlinks=False)
                n["xattrs"] = {**n["xattrs"], k: v}
                tree[p] = n
        elif kind == "unlink":
            p = self.pick("fl")
            if p is not None:
                os.unlink(self.full(p))
                self.remove(p)
        elif kind == "rmtree":
            p = self.pick("d")
            if p is not None:
                from layerfs.drivers.base import remove_tree
                remove_tree(os.fsdecode(self.full(p)))
                self.remove(p)
        elif kind == "mkdir":
            p = self.new_path()
            if p is not None:
                self.mkdir(p)
        elif kind == "symlink":
            p = self.new_path()
            if p is not None:
                target = self.draw(st.sampled_from(LINK_TARGETS))
                uid = self.draw(st.sampled_from(IDS))
                os.symlink(target, self.full(p))
                os.lchown(self.full(p), uid, 0)
                tree[p] = _node("l", 0o777, uid, 0, None, target=target)
        elif kind == "link":
            src = self.pick("f")
            p = self.new_path()
            if src is not None and p is not None:
                os.link(self.full(src), self.full(p))
                tree[p] = dict(tree[src])
                self.linked.update((src, p))
        elif kind == "dir_to_file":
            p = self.pick("d")
            if p is not None:
                from layerfs.drivers.base import remove_tree
                remove_tree(os.fsdecode(self.full(p)))
                self.remove(p)
                self.write(p)
        elif kind == "recreate_dir":
            p = self.pick("d")
            if p is not None:
                from layerfs.drivers.base import remove_tree
                remove_tree(os.fsdecode(self.full(p)))
                self.remove(p)
                self.mkdir(p)
                self.write(p + b"/" + self.draw(st.sampled_from(NAMES)))
        elif kind == "file_to_dir":
            p = self.pick("fl")
            if p is not None:
                os.unlink(self.full(p))
                self.remove(p)
                self.mkdir(p)


def expected_changes(old: dict, new: dict):
    """(added, deleted, modified non-directories) between two model trees, as
    compare_trees reports them (a deleted directory is one path)."""
    def parent_kept(p):
        q = _parent(p)
        return q == b"" or (q in new and new[q]["type"] == "d" and old[q]["type"] == "d")
    added = {p for p in new if p not in old}
    deleted = {p for p in old if p not in new and parent_kept(p)}
    keys = ("type", "mode", "uid", "gid", "size", "sha256", "target", "xattrs", "mtime_ns")
    modified = {p for p in new if p in old and new[p]["type"] != "d" and
                any(old[p].get(k) != new[p].get(k) for k in keys)}
    fmt = lambda s: {"/" + os.fsdecode(p) for p in s}  # noqa: E731
    return fmt(added), fmt(deleted), fmt(modified)


# ----------------------------------------------------------------- the suite

class Conformance:
    """Tests every driver passes.  Subclasses set DRIVER (and OPTIONS)."""

    DRIVER: Optional[str] = None
    OPTIONS: dict = {}
    MAX_EXAMPLES = 20  # per hypothesis test; LAYERFS_DRIVER_EXAMPLES scales them all

    @property
    def examples(self) -> int:
        scale = os.environ.get("LAYERFS_DRIVER_EXAMPLES")
        return int(scale) if scale else self.MAX_EXAMPLES

    # -- the union example ---------------------------------------------------
    def fruits_and_vegetables(self, d):
        d.create("vegetables")
        d.apply_diff("vegetables", io.BytesIO(layer_tar([
            file_("carrots", b"carrots from the vegetables branch\n"),
            file_("tomato", b"tomato from the vegetables branch\n")])))
        d.create("fruits", "vegetables")
        d.apply_diff("fruits", io.BytesIO(layer_tar([
            file_("apple", b"apple from the fruits branch\n"),
            file_("tomato", b"tomato from the fruits branch\n")])))

    def test_union_example(self, driver):
        d = driver
        self.fruits_and_vegetables(d)
        with Mounted(d, "fruits") as m:
            assert sorted(os.listdir(m)) == ["apple", "carrots", "tomato"]
            assert Path(m, "tomato").read_bytes() == b"tomato from the fruits branch\n"
            assert Path(m, "carrots").read_bytes() == b"carrots from the vegetables branch\n"
        d.create_rw("top", "fruits")
        with Mounted(d, "top") as m:
            with open(os.path.join(m, "carrots"), "ab") as f:
                f.write(b"and more carrots\n")
            os.unlink(os.path.join(m, "apple"))
            assert sorted(os.listdir(m)) == ["carrots", "tomato"]
        # the lower layers are untouched: carrots as it was, apple still on disk
        with Mounted(d, "vegetables") as m:
            assert Path(m, "carrots").read_bytes() == b"carrots from the vegetables branch\n"
        with Mounted(d, "fruits") as m:
            assert Path(m, "apple").read_bytes() == b"apple from the fruits branch\n"
            assert Path(m, "carrots").read_bytes() == b"carrots from the vegetables branch\n"
        with Mounted(d, "top") as m:
            assert Path(m, "carrots").read_bytes() == \
                b"carrots from the vegetables branch\nand more carrots\n"
            assert not os.path.lexists(os.path.join(m, "apple"))
        assert d.changes("top") == [("/apple", "deleted"), ("/carrots", "modified")]
        members = tar_members(io.BytesIO(diff_bytes(d, "top")))
        assert {n for n, m in members.items() if not m.info.isdir()} == {"carrots", ".wh.apple"}
        assert members["carrots"].data == b"carrots from the vegetables branch\nand more carrots\n"
        assert d.diff_size("top") == len(members["carrots"].data)

    # -- lifecycle ---------------------------------------------------------
    def test_create_exists_get_layers(self, driver):
        d = driver
        assert not d.exists("a")
        d.create("a")
        d.create("b", "a")
        d.create_rw("c", "b")
        assert d.exists("a") and d.exists("b") and d.exists("c")
        assert d.get("b").parent == "a" and not d.get("b").rw and d.get("c").rw
        assert [i.id for i in d.layers()] == ["a", "b", "c"]
        md = d.metadata("c")
        assert md["parent"] == "b" and md["rw"] is True
        st_ = d.status()
        assert st_["driver"] == d.name and st_["layers"] == 3

    def test_typed_errors(self, driver):
        d = driver
        d.create("a")
        with pytest.raises(AlreadyExists) as ei:
            d.create("a")
        assert isinstance(ei.value, FileExistsError) and ei.value.errno == errno.EEXIST
        with pytest.raises(NotFound) as ei:
            d.create("b", parent="missing")
        assert isinstance(ei.value, FileNotFoundError)
        for call in (lambda: d.mount("missing"), lambda: d.remove("missing"),
                     lambda: d.get("missing"), lambda: d.diff("missing"),
                     lambda: d.changes("missing"), lambda: d.metadata("missing")):
            with pytest.raises(FileNotFoundError):
                call()
        with pytest.raises(PreconditionFailed):
            d.unmount("a")  # not mounted
        with pytest.raises(ValueError):
            d.create("../escape")
        assert not d.exists("b")

    def test_remove_refused_with_children_and_while_mounted(self, driver):
        d = driver
        d.create("base")
        d.create_rw("ctr", "base")
        with pytest.raises(PreconditionFailed):
            d.remove("base")
        m = d.mount("ctr")
        try:
            Path(m, "f").write_text("x")
            with pytest.raises(PreconditionFailed):
                d.remove("ctr")
        finally:
            d.unmount("ctr")
        d.remove("ctr")
        assert not d.exists("ctr")
        d.remove("base")
        assert d.layers() == []

    def test_refcounted_mounts(self, driver):
        d = driver
        d.create("base")
        d.apply_diff("base", io.BytesIO(layer_tar([file_("f", b"hello")])))
        d.create_rw("ctr", "base")
        p1 = d.mount("ctr")
        try:
            p2 = d.mount("ctr")
            assert p1 == p2
            try:
                assert Path(p1, "f").read_bytes() == b"hello"
            finally:
                d.unmount("ctr")
            assert mounts_under(p1), "one unmount of two must leave the view mounted"
            assert Path(p1, "f").read_bytes() == b"hello"
        finally:
            d.unmount("ctr")
        assert not mounts_under(p1)
        with pytest.raises(PreconditionFailed):
            d.unmount("ctr")

    def test_writes_through_read_only_mount_refused(self, driver):
        d = driver
        d.create("base")
        d.apply_diff("base", io.BytesIO(layer_tar([file_("f", b"x")])))
        d.create("app", "base")
        d.apply_diff("app", io.BytesIO(layer_tar([file_("g", b"y")])))
        for id in ("base", "app"):
            with Mounted(d, id) as m:
                for attempt in (lambda: open(os.path.join(m, "new"), "w"),
                                lambda: open(os.path.join(m, "f"), "a"),
                                lambda: os.unlink(os.path.join(m, "f")),
                                lambda: os.mkdir(os.path.join(m, "dir")),
                                lambda: os.chmod(os.path.join(m, "f"), 0o600)):
                    with pytest.raises(OSError) as ei:
                        attempt()
                    assert ei.value.errno == errno.EROFS, (id, ei.value)

    def test_rw_layer_without_parent(self, driver):
        d = driver
        d.create_rw("scratch")
        with Mounted(d, "scratch") as m:
            Path(m, "hello").write_bytes(b"hi")
            os.mkdir(os.path.join(m, "dir"))
        assert d.changes("scratch") == [("/dir", "added"), ("/hello", "added")]
        members = tar_members(io.BytesIO(diff_bytes(d, "scratch")))
        assert set(members) == {"dir", "hello"}

    def test_apply_diff_preconditions(self, driver):
        d = driver
        d.create("base")
        d.create("child", "base")
        tar = layer_tar([file_("f")])
        with pytest.raises(PreconditionFailed):
            d.apply_diff("base", io.BytesIO(tar))  # has a child
        d.create_rw("ctr", "child")
        with pytest.raises(PreconditionFailed):
            d.apply_diff("ctr", io.BytesIO(tar))  # writable layer
        with Mounted(d, "child"):
            with pytest.raises(PreconditionFailed):
                d.apply_diff("child", io.BytesIO(tar))  # mounted
        with pytest.raises(FileNotFoundError):
            d.apply_diff("missing", io.BytesIO(tar))

    def test_apply_diff_compressed_with_digests(self, driver, tmp_path):
        d = driver
        tar = layer_tar([dir_("etc"), file_("etc/os-release", b"ID=test\n", mode=0o600,
                                             uid=1000, gid=1000, xattrs={"user.k": b"v"})])
        gz = tmp_path / "layer.tar.gz"
        gz.write_bytes(gzip.compress(tar))
        d.create("gz")
        r = d.apply_diff("gz", str(gz))
        import hashlib
        assert r.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        assert r.digest == "sha256:" + hashlib.sha256(gz.read_bytes()).hexdigest()
        assert r.compression == "gzip"
        assert d.metadata("gz")["diffs"][0]["diff_id"] == r.diff_id
        d.create("zst", "gz")
        r2 = d.apply_diff("zst", io.BytesIO(zstd_bytes(layer_tar([file_("z", b"zz")]))))
        assert r2.compression == "zstd"
        with Mounted(d, "zst") as m:
            assert Path(m, "z").read_bytes() == b"zz"
            st_ = os.lstat(os.path.join(m, "etc/os-release"))
            assert (stat.S_IMODE(st_.st_mode), st_.st_uid, st_.st_gid) == (0o600, 1000, 1000)
            assert os.getxattr(os.path.join(m, "etc/os-release"), "user.k") == b"v"
        d.create("bad", "zst")
        with pytest.raises(DigestMismatch) as ei:
            d.apply_diff("bad", io.BytesIO(tar), expected_diff_id="sha256:" + "0" * 64)
        assert isinstance(ei.value, ValueError)

    def test_stack_of_128_layers(self, driver):
        d = driver
        parent = None
        for i in range(128):
            id = f"layer{i:03d}"
            d.create(id, parent)
            d.apply_diff(id, io.BytesIO(layer_tar([file_(f"f{i:03d}", b"%d\n" % i)])))
            parent = id
        with Mounted(d, parent) as m:
            assert Path(m, "f000").read_bytes() == b"0\n"
            assert Path(m, "f127").read_bytes() == b"127\n"
            assert len(os.listdir(m)) == 128
        d.create_rw("ctr", parent)
        with Mounted(d, "ctr") as m:
            assert Path(m, "f000").read_bytes() == b"0\n"
            Path(m, "f000").write_bytes(b"changed\n")
            assert Path(m, "f127").read_bytes() == b"127\n"
        assert d.changes("ctr") == [("/f000", "modified")]
        with Mounted(d, "layer000") as m:
            assert Path(m, "f000").read_bytes() == b"0\n"

    def test_cleanup_after_crash(self, driver):
        d = driver
        d.create("base")
        d.apply_diff("base", io.BytesIO(layer_tar([file_("f", b"x")])))
        d.create_rw("ctr", "base")
        # a process that mounts and dies without unmounting
        code = textwrap.dedent(f"""
            import os, layerfs.drivers as D
            d = D.driver_class({d.name!r})({d.root!r}, **{dict(d.options)!r})
            d.mount("ctr")
            os._exit(0)
        """)
        subprocess.run([sys.executable, "-c", code], check=True, cwd=str(HERE.parent.parent))
        merged = d.metadata("ctr")["merged"]
        assert mounts_under(merged), "the dead process's mount is still there"
        # and one that died while staging a new layer
        leftover = os.path.join(d.root, "staging", "new-deadbeefdeadbeef")
        os.makedirs(os.path.join(leftover, "diff", "junk"))
        d.cleanup()
        assert not mounts_under(d.root)
        assert not os.path.exists(leftover)
        assert d.metadata("ctr")["mount_count"] == 0
        # a stale count without its mount: the next mount really mounts
        with open(os.path.join(d.layer_dir("ctr"), "mountcount"), "w") as f:
            f.write("2")
        with Mounted(d, "ctr") as m:
            assert Path(m, "f").read_bytes() == b"x"
            assert mounts_under(m)
        assert not mounts_under(d.root)
        # a new driver object sweeps staging leftovers on start
        os.makedirs(leftover)
        type(d)(d.root, **dict(d.options))
        assert not os.path.exists(leftover)

    def test_remove_then_recreate(self, driver):
        d = driver
        d.create("a")
        d.apply_diff("a", io.BytesIO(layer_tar([file_("old", b"1")])))
        d.remove("a")
        d.create("a")
        d.apply_diff("a", io.BytesIO(layer_tar([file_("new", b"2")])))
        with Mounted(d, "a") as m:
            assert os.listdir(m) == ["new"]

    def test_changes_and_diff_of_read_only_layers(self, driver, tmp_path):
        d = driver
        layers = [
            [dir_("etc"), file_("etc/a", b"a"), file_("etc/b", b"b"), dir_("var"),
             file_("var/x", b"x"), dir_("var/cache"), file_("var/cache/c", b"c")],
            [dir_("etc"), file_("etc/a", b"a2", mtime=1_700_000_000), whiteout("etc/b"),
             whiteout("var/cache"), dir_("usr"), file_("usr/new", b"n")],
        ]
        ids = build_stack(d, layers)
        assert d.changes(ids[1]) == [("/etc", "modified"), ("/etc/a", "modified"),
                                     ("/etc/b", "deleted"), ("/usr", "added"),
                                     ("/usr/new", "added"), ("/var", "modified"),
                                     ("/var/cache", "deleted")]
        names = set(tar_members(io.BytesIO(diff_bytes(d, ids[1]))))
        assert names >= {"etc/a", "etc/.wh.b", "var/.wh.cache", "usr", "usr/new"}
        assert not names & {"etc/b", "var/x", "var/cache", "var/cache/c"}
        self.check_diffs_reapply(d, ids, expected_view(model_apply(model_apply({}, layers[0]),
                                                                   layers[1])), tmp_path)

    # -- flat vs stacked ---------------------------------------------------
    def check_diffs_reapply(self, d, ids, expected, tmp_path, other=None):
        """The diffs of ids, applied in order by `layerfs unpack`'s engine and by
        another driver, give the expected tree."""
        tars = [diff_bytes(d, id) for id in ids]
        flat = tmp_path / f"flat-{len(os.listdir(tmp_path))}"
        unpack_layers([io.BytesIO(t) for t in tars], str(flat))
        assert_same_tree(expected, view_of(flat), f"{d.name} diffs unpacked")
        if other is not None:
            parent = None
            for i, t in enumerate(tars):
                other.create(f"re{i}", parent)
                other.apply_diff(f"re{i}", io.BytesIO(t))
                parent = f"re{i}"
            with Mounted(other, parent) as m:
                assert_same_tree(expected, view_of(m), f"{d.name} diffs applied by {other.name}")

    def other_driver(self, make_driver, name):
        """Another supported driver to re-apply diffs with (vfs, else overlay)."""
        for cand in ("vfs", "overlay"):
            if cand != name and drivers.driver_class(cand).supported(None).ok:
                return make_driver(cand)
        return None

    def test_flat_vs_stacked(self, make_driver, driver_name, tmp_path_factory):
        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(data=st.data())
        def run(data):
            layers, trees = draw_stack(data)
            d = make_driver()
            tmp = tmp_path_factory.mktemp("flat")
            try:
                ids = build_stack(d, layers)
                for id, tree in zip(ids, trees):
                    with Mounted(d, id) as m:
                        assert_same_tree(expected_view(tree), view_of(m), f"view of {id}")
                other = self.other_driver(make_driver, d.name) if \
                    data.draw(st.booleans(), label="cross-driver") else None
                self.check_diffs_reapply(d, ids, expected_view(trees[-1]), tmp, other)
            finally:
                d.cleanup()
        run()

    def test_writes_through_mount_vs_model(self, make_driver, tmp_path_factory):
        @settings(max_examples=self.examples, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture,
                                         HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(data=st.data())
        def run(data):
            layers, trees = draw_stack(data, max_layers=2)
            d = make_driver()
            tmp = tmp_path_factory.mktemp("rw")
            try:
                ids = build_stack(d, layers)
                d.create_rw("ctr", ids[-1])
                base = expected_view(trees[-1])
                with Mounted(d, "ctr") as m:
                    linked = {p for layer in layers for e in layer if e.kind == "hardlink"
                              for p in (e.path, e.target)}
                    gen = RwGen(data.draw, m, base, linked)
                    for k in data.draw(st.lists(st.sampled_from(RW_OPS), min_size=1,
                                                max_size=10), label="rw ops"):
                        gen.op(k)
                    assert_same_tree(gen.tree, view_of(m), "view after the writes")
                expected = gen.tree
                with Mounted(d, "ctr") as m:
                    assert_same_tree(expected, view_of(m), "view after a remount")
                added, deleted, modified = expected_changes(base, expected)
                got = d.changes("ctr")
                assert {c.path for c in got if c.kind == "added"} == added
                assert {c.path for c in got if c.kind == "deleted"} == deleted
                assert modified <= {c.path for c in got if c.kind == "modified"}
                self.check_diffs_reapply(d, ids + ["ctr"], expected, tmp)
            finally:
                d.cleanup()
        run()


# ----------------------------------------------------------------- built-ins without a file

def _runs_suite(name: str) -> bool:
    f = HERE / f"test_{name}.py"
    return f.exists() and "Conformance" in f.read_text()


BUILTIN_WITHOUT_OWN_FILE = [n for n in drivers.BUILTIN if not _runs_suite(n)]


if BUILTIN_WITHOUT_OWN_FILE:
    @pytest.mark.parametrize("driver_name", BUILTIN_WITHOUT_OWN_FILE, indirect=True)
    class TestBuiltin(Conformance):
        """The suite for each built-in driver whose test_<name>.py does not run it."""
