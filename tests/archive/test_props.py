"""Property tests of the layer archive API (hypothesis).

(a) create_layer -> apply_layer keeps random trees exactly: types, modes incl.
    setuid/sticky, numeric owners (large ones too), sizes and contents, symlink
    targets, device numbers, xattrs (user.*, security.capability), nanosecond
    mtimes, hardlink groups, odd names; with sparse=True the holes too.
    Applied as nobody (owners skipped), the same but for owners and
    security.* xattrs.
(b) random layer stacks (add/modify, mkdir, symlink, whiteout, opaque dir,
    replacements both ways) applied in order with whiteouts="apply" give the
    reference model's tree (model.py); the same stack applied with
    whiteouts="overlay" into one directory per layer and mounted with a real
    overlayfs shows the same tree.
    Applied as nobody (owners skipped), stacks whose layers may leave out the
    directories already there give the same tree but for owners and the times
    of directories written into without being listed.
(c) archives of random trees written by GNU tar (posix and gnu formats, with and
    without --sparse) and by Python's tarfile extract with apply_layer to the
    same tree as GNU tar's own extraction.

HYPOTHESIS_PROFILE=ci makes the runs derandomized (see tests/conftest.py).
"""
from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.archive import apply_layer, create_layer

from . import model
from .model import Entry, assert_same_tree, overlay_mount, snapshot
from .tarbuild import run_as_nobody

REPO = Path(__file__).resolve().parents[2]

EXAMPLES = int(os.environ.get("LAYERFS_PROP_EXAMPLES", "60"))
props = settings(max_examples=EXAMPLES, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("props")


@contextmanager
def scratch(base):
    d = tempfile.mkdtemp(dir=base)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------ random trees

ODD_NAMES = [
    b"a", b"b", b"file", b"with space", b" lead", b"trail ", b"-rf", b"--help", b"-",
    "ünïcødé".encode(), "日本語のファイル".encode(), "emoji-😀".encode(), b"\xff\xfe\xfd",
    b"latin1-\xe9t\xe9", b"a.wh.b", b".wh", b".whx", b"wh..wh..opq", b"x.wh..wh..opq", b"..wh.x",
    b"...", b".hidden", b"tab\tname", b"new\nline", b"back\\slash", b"star*?[x]", b"quote'\"",
    b"colon:comma,", b"x" * 99, b"y" * 100, b"z" * 101, b"w" * 200, b"v" * 255,
]


def _fix_name(n: bytes) -> bytes:
    """Any byte string made a valid, non-whiteout file name."""
    n = n.replace(b"/", b"_").replace(b"\0", b"_")[:255]
    if n in (b".", b"..") or n.startswith(b".wh."):
        n = b"x" + n[:254]
    return n


names = st.one_of(
    st.sampled_from(ODD_NAMES),
    st.binary(min_size=1, max_size=40).map(_fix_name),
    st.text(min_size=1, max_size=30).map(lambda s: _fix_name(s.encode("utf-8"))),
)

ids = st.one_of(st.sampled_from([0, 1, 100, 1000, 65534, 65535, 65536, 2097151, 2097152,
                                 2**31 - 1, 2**31, 2**32 - 2]),
                st.integers(0, 2**32 - 2))
# ext4 keeps 1901..2446 with nanoseconds; tar needs PAX or base-256 past 2242 and before 1970
mtimes = st.one_of(
    st.integers(0, 2**33 - 1).map(lambda s: s * 10**9),
    st.integers(-(2**31), 15_000_000_000).flatmap(
        lambda s: st.integers(0, 10**9 - 1).map(lambda ns: s * 10**9 + ns)),
)
file_modes = st.one_of(st.sampled_from([0o644, 0o755, 0o600, 0o4755, 0o2755, 0o6755, 0o1755,
                                        0o000, 0o777, 0o7777, 0o4711]),
                       st.integers(0, 0o7777))
dir_modes = st.one_of(st.sampled_from([0o755, 0o700, 0o1777, 0o2775, 0o555, 0o7777]),
                      st.integers(0, 0o7777))
user_xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.mime_type", "user.long." + "k" * 100, "user.ü", "user.x.y"]),
    st.binary(max_size=300), max_size=3)


def capability(permitted: int, inheritable: int, effective: bool) -> bytes:
    # struct vfs_cap_data, revision 2
    magic = 0x02000000 | (1 if effective else 0)
    return struct.pack("<IIIII", magic, permitted & 0xffffffff, inheritable & 0xffffffff,
                       permitted >> 32, inheritable >> 32)


caps = st.builds(capability, st.integers(0, 2**41 - 1), st.integers(0, 2**41 - 1), st.booleans())


@st.composite
def contents(draw, allow_holes=True):
    kind = draw(st.sampled_from(["empty", "small", "small", "block", "holes"] if allow_holes
                                else ["empty", "small", "block"]))
    if kind == "empty":
        return ("data", b"")
    if kind == "small":
        return ("data", draw(st.binary(min_size=1, max_size=2000)))
    if kind == "block":
        return ("data", draw(st.binary(min_size=1, max_size=64)) * draw(st.integers(100, 3000)))
    # holes: 4 KiB-aligned data blocks of non-zero bytes, possibly ending in a hole
    nblocks = draw(st.integers(1, 40))
    data_blocks = draw(st.sets(st.integers(0, nblocks - 1), max_size=6))
    tail = draw(st.integers(0, 4095))
    return ("holes", nblocks, sorted(data_blocks), tail, draw(st.integers(1, 255)))


@st.composite
def trees(draw, max_nodes=30, xattrs=True, holes=True, devices=True, link_any=True):
    """A list of node specs (path, kind, attrs) in creation order.  link_any:
    hardlinks may join symlinks, fifos and devices too (else regular files only)."""
    n = draw(st.integers(1, max_nodes))
    dirs = [b""]
    nondirs = []
    nodes = []
    used = set()
    kinds = ["file", "file", "file", "dir", "dir", "symlink", "hardlink", "fifo"]
    if devices:
        kinds += ["char", "block"]
    for _ in range(n):
        parent = draw(st.sampled_from(dirs))
        name = draw(names)
        path = parent + b"/" + name if parent else name
        if path in used or len(path) > 3000:
            continue
        kind = draw(st.sampled_from(kinds))
        if kind == "hardlink" and not nondirs:
            kind = "file"
        used.add(path)
        a = {"uid": draw(ids), "gid": draw(ids), "mtime_ns": draw(mtimes), "xattrs": {}}
        if kind == "file":
            a["content"] = draw(contents(allow_holes=holes))
            a["mode"] = draw(file_modes)
            if xattrs:
                a["xattrs"] = draw(user_xattrs)
                if draw(st.integers(0, 4)) == 0:
                    a["xattrs"]["security.capability"] = draw(caps)
        elif kind == "dir":
            a["mode"] = draw(dir_modes)
            if xattrs:
                a["xattrs"] = draw(user_xattrs)
            dirs.append(path)
        elif kind == "symlink":
            a["target"] = draw(st.one_of(
                st.sampled_from([b"a", b"../b", b"/etc/passwd", b"/", b"..", b"x" * 150,
                                 b"./.wh.x", "ü/日".encode(), b"\xff", b"dangling/" * 30]),
                st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\0", b"0"))))
        elif kind == "hardlink":
            a["to"] = draw(st.sampled_from(nondirs))
        elif kind in ("char", "block"):
            a["rdev"] = (draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1)))
            a["mode"] = draw(file_modes)
        elif kind == "fifo":
            a["mode"] = draw(file_modes)
        nodes.append((path, kind, a))
        if kind not in ("hardlink", "dir") and (link_any or kind == "file"):
            nondirs.append(path)
    return nodes


def write_content(path: bytes, content) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if content[0] == "data":
            os.write(fd, content[1])
        else:
            _, nblocks, blocks, tail, byte = content
            size = nblocks * 4096 + tail
            os.ftruncate(fd, size)
            for blk in blocks:
                os.pwrite(fd, bytes([byte]) * min(4096, size - blk * 4096), blk * 4096)
    finally:
        os.close(fd)


def materialize(root: str, nodes) -> None:
    """Create the tree; metadata in the order that keeps it (content, chown,
    chmod, xattrs - chown clears setuid and capabilities), dir mtimes last."""
    r = os.fsencode(root)
    dirs = []
    for path, kind, a in nodes:
        p = os.path.join(r, path)
        if kind == "file":
            write_content(p, a["content"])
        elif kind == "dir":
            os.mkdir(p)
            dirs.append((p, a))
            continue
        elif kind == "symlink":
            os.symlink(a["target"], p)
        elif kind == "hardlink":
            os.link(os.path.join(r, a["to"]), p, follow_symlinks=False)
            continue
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind in ("char", "block"):
            os.mknod(p, (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o600,
                     os.makedev(*a["rdev"]))
        os.chown(p, a["uid"], a["gid"], follow_symlinks=False)
        if kind != "symlink":
            os.chmod(p, a["mode"])
        for k, v in a["xattrs"].items():
            os.setxattr(p, k, v, follow_symlinks=False)
        os.utime(p, ns=(a["mtime_ns"], a["mtime_ns"]), follow_symlinks=False)
    for p, a in dirs:
        os.chown(p, a["uid"], a["gid"])
        os.chmod(p, a["mode"])
        for k, v in a["xattrs"].items():
            os.setxattr(p, k, v)
    for p, a in reversed(dirs):
        os.utime(p, ns=(a["mtime_ns"], a["mtime_ns"]))


# ------------------------------------------------------------------ (a) round trip

@props
# hardlinked symlinks/fifos/devices are checked on their own in
# test_apply.py::test_create_keeps_hardlinked_symlinks_fifos_devices
@given(nodes=trees(link_any=False), compression=st.sampled_from(["none", "gzip", "zstd"]),
       sparse=st.booleans())
def test_create_then_apply_keeps_the_tree(workdir, nodes, compression, sparse):
    with scratch(workdir) as d:
        src, dst, blob = os.path.join(d, "src"), os.path.join(d, "dst"), os.path.join(d, "layer")
        os.mkdir(src)
        materialize(src, nodes)
        before = snapshot(src, holes=sparse)
        c = create_layer(src, blob, compression=compression, sparse=sparse)
        a = apply_layer(blob, dst)
        assert (a.digest, a.diff_id, a.size, a.tar_size) == (c.digest, c.diff_id, c.size, c.tar_size)
        assert a.compression == compression
        assert_same_tree(before, snapshot(dst, holes=sparse), "applied tree")
        assert_same_tree(before, snapshot(src, holes=sparse), "source tree after create_layer")


def _as_nobody_sees(tree: model.Tree) -> model.Tree:
    """What applying without root can keep: no owners, no security.* xattrs."""
    return {p: dict(n, uid=None, gid=None,
                    xattrs={k: v for k, v in n["xattrs"].items() if not k.startswith("security.")})
            for p, n in tree.items()}


@props
@given(nodes=trees(devices=False, link_any=False), compression=st.sampled_from(["none", "zstd"]))
def test_create_then_apply_without_root_keeps_the_tree(workdir, nodes, compression):
    """As nobody (owners skipped): every mode (0000 directories, read-only files
    with xattrs, setuid), content, xattr, time and hardlink, owners aside."""
    with scratch(workdir) as d:
        src, dst, blob = os.path.join(d, "src"), os.path.join(d, "dst"), os.path.join(d, "layer")
        os.mkdir(src)
        materialize(src, nodes)
        os.chmod(src, 0o755)
        os.utime(src, ns=(0, 0))
        before = _as_nobody_sees(snapshot(src))
        create_layer(src, blob, compression=compression)
        os.mkdir(dst)
        os.chown(dst, 65534, 65534)
        in_fd = os.open(blob, os.O_RDONLY)
        root_fd = os.open(dst, os.O_RDONLY | os.O_DIRECTORY)
        try:
            p = run_as_nobody(f"_native.apply({in_fd}, {root_fd}, owners='skip')",
                              [in_fd, root_fd], env=dict(os.environ, PYTHONPATH=str(REPO)))
        finally:
            os.close(in_fd)
            os.close(root_fd)
        assert p.returncode == 0, p.stderr
        assert_same_tree(before, _as_nobody_sees(snapshot(dst)), "tree applied without root")


@props
@given(nodes=trees(max_nodes=12, holes=True, link_any=False))
def test_create_is_deterministic(workdir, nodes):
    with scratch(workdir) as d:
        src = os.path.join(d, "src")
        os.mkdir(src)
        materialize(src, nodes)
        one = create_layer(src, os.path.join(d, "one"), sparse=True)
        two = create_layer(src, os.path.join(d, "two"), sparse=True)
        assert one.diff_id == two.diff_id
        with open(os.path.join(d, "one"), "rb") as f1, open(os.path.join(d, "two"), "rb") as f2:
            assert f1.read() == f2.read()


# ------------------------------------------------------------------ (b) layer stacks

STACK_NAMES = [b"a", b"b", b"c", b"d"]
stack_file_modes = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2711, 0o444])
stack_dir_modes = st.sampled_from([0o755, 0o700, 0o1777, 0o2755, 0o555, 0o500, 0o000])
stack_ids = st.sampled_from([0, 1, 1000, 65534, 2**31 + 5])
stack_mtimes = st.integers(0, 2**33).flatmap(
    lambda s: st.sampled_from([0, 1, 999_999_999, 123_456_789]).map(lambda ns: s * 10**9 + ns))
stack_targets = st.sampled_from([b"a", b"../b", b"/c/d", b"c/../a", b"t" * 150, b".wh.a"])


def _ancestors(p: bytes) -> List[bytes]:
    parts = p.split(b"/")
    return [b"/".join(parts[:i]) for i in range(1, len(parts))]


def _under(p: bytes, top: bytes) -> bool:
    return p == top or p.startswith(top + b"/")


class LayerBuilder:
    """Draws one well-formed layer against the tree below it.

    Well-formed as real layer generators write them: every entry's parent
    directories appear earlier in the layer; a whiteout or opaque marker
    comes after its directory's entry; nothing is written under a whited-out
    path until the path itself is written again (after its whiteout); an
    opaque directory (and its ancestors) stays a directory for the rest of
    the layer."""

    def __init__(self, draw, lower: model.Tree, relist: bool = True):
        self.draw = draw
        self.lower = lower
        self.relist = relist       # False: directories already there are not listed again
        self.entries: List[Entry] = []
        self.dirs = set()          # paths written as directories in this layer, still dirs
        self.whiteouts = {}        # path -> written again after its whiteout
        self.locked = set()        # opaque dirs and their ancestors
        self.opaques = []          # dirs that get a marker

    def meta(self, kind):
        d = self.draw
        m = dict(uid=d(stack_ids), gid=d(stack_ids), mtime_ns=d(stack_mtimes))
        m["mode"] = d(stack_dir_modes) if kind == "dir" else d(stack_file_modes)
        return m

    def pick(self, existing_kind=None) -> bytes:
        cur = model.apply_layer(self.lower, self.entries)
        pool = sorted(p for p, n in cur.items()
                      if existing_kind is None or (n["type"] == "d") == (existing_kind == "dir"))
        if pool and self.draw(st.integers(0, 2)) > 0:
            return self.draw(st.sampled_from(pool))
        depth = self.draw(st.integers(1, 3))
        return b"/".join(self.draw(st.sampled_from(STACK_NAMES)) for _ in range(depth))

    def _blocked(self, p: bytes) -> bool:
        return any(_under(p, w) and p != w and not again for w, again in self.whiteouts.items())

    def parents(self, p: bytes) -> bool:
        cur = None
        for a in _ancestors(p):
            if a in self.dirs:
                continue
            if self._blocked(a):
                return False
            if not self.relist:
                cur = cur if cur is not None else model.apply_layer(self.lower, self.entries)
                if cur.get(a, {}).get("type") == "d":
                    continue
            self.emit(Entry(a, "dir", **self.meta("dir")))
        return True

    def emit(self, e: Entry):
        self.entries.append(e)
        if e.path in self.whiteouts:
            self.whiteouts[e.path] = True
        if e.kind == "dir":
            self.dirs.add(e.path)
        else:
            self.dirs = {d for d in self.dirs if not _under(d, e.path)}

    def put(self, kind: str, p: bytes):
        if self._blocked(p) or (kind != "dir" and any(_under(l, p) for l in self.locked)):
            return
        if not self.parents(p):
            return
        m = self.meta(kind)
        if kind == "file":
            e = Entry(p, "file", data=self.draw(st.binary(max_size=200)),
                      xattrs=self.draw(st.dictionaries(st.sampled_from(["user.a", "user.b"]),
                                                       st.binary(max_size=20), max_size=2)), **m)
        elif kind == "symlink":
            m["mode"] = 0o777
            e = Entry(p, "symlink", target=self.draw(stack_targets), **m)
        else:
            e = Entry(p, "dir", **m)
        self.emit(e)

    def delete(self, p: bytes):
        if (any(_under(e.path, p) for e in self.entries if e.kind not in ("whiteout", "opaque"))
                or any(_under(l, p) for l in self.locked)
                or any(_under(p, w) for w in self.whiteouts)):
            return
        if not self.parents(p):
            return
        self.whiteouts[p] = False
        self.entries.append(Entry(p, "whiteout"))

    def opaque(self, p: bytes):
        if p in self.opaques or self._blocked(p):
            return
        if not self.parents(p):
            return
        if p not in self.dirs:
            self.emit(Entry(p, "dir", **self.meta("dir")))
        self.opaques.append(p)
        self.locked.update([p] + _ancestors(p))

    def step(self):
        op = self.draw(st.sampled_from(["file", "file", "modify", "mkdir", "symlink", "delete",
                                        "delete", "opaque", "dir2file", "file2dir"]))
        if op == "file":
            self.put("file", self.pick())
        elif op == "modify":
            self.put("file", self.pick("file"))
        elif op == "mkdir":
            self.put("dir", self.pick())
        elif op == "symlink":
            self.put("symlink", self.pick())
        elif op == "delete":
            self.delete(self.pick())
        elif op == "opaque" and self.relist:   # (its lower parents would go with it)
            self.opaque(self.pick("dir"))
        elif op == "dir2file":
            self.put(self.draw(st.sampled_from(["file", "symlink"])), self.pick("dir"))
        elif op == "file2dir":
            self.put("dir", self.pick("file"))

    def finish(self) -> List[Entry]:
        out = list(self.entries)
        # each marker goes anywhere after the last entry of its directory
        for d in self.opaques:
            last = max(i for i, e in enumerate(out) if e.path == d and e.kind == "dir")
            pos = self.draw(st.integers(last + 1, len(out)))
            out.insert(pos, Entry(d, "opaque"))
        return out


@st.composite
def stacks(draw, max_layers=4, max_ops=8, vary_relist=False):
    """Layer stacks; with vary_relist, a layer may leave out the directories
    that are already there (as layers that list only what changed do)."""
    tree: model.Tree = {}
    layers = []
    for _ in range(draw(st.integers(1, max_layers))):
        b = LayerBuilder(draw, tree, relist=not vary_relist or draw(st.booleans()))
        for _ in range(draw(st.integers(1, max_ops))):
            b.step()
        layer = b.finish()
        if not layer:
            continue
        layers.append(layer)
        tree = model.apply_layer(tree, layer)
    if not layers:
        layers.append([Entry(b"a", "file", data=b"a")])
    return layers


def _describe(layers) -> str:
    lines = []
    for i, layer in enumerate(layers):
        lines.append(f"layer {i}:")
        for e in layer:
            extra = {"file": f" {len(e.data)}B", "symlink": f" -> {e.target!r}"}.get(e.kind, "")
            lines.append(f"  {e.tar_name()!r} {e.kind} {oct(e.mode)}{extra}")
    return "\n".join(lines)


def _write_layers(d: str, layers) -> List[str]:
    paths = []
    for i, layer in enumerate(layers):
        p = os.path.join(d, f"layer{i}.tar")
        with open(p, "wb") as f:
            f.write(model.layer_tar(layer))
        paths.append(p)
    return paths


@props
@given(layers=stacks())
def test_stack_applied_equals_model(workdir, layers):
    expected = model.apply_stack(layers)
    with scratch(workdir) as d:
        blobs = _write_layers(d, layers)
        dest = os.path.join(d, "rootfs")
        for b in blobs:
            apply_layer(b, dest, whiteouts="apply")
        actual = snapshot(dest)
        d_ = model.diff_trees(expected, actual)
        assert not d_, "applied stack differs from the model:\n" + "\n".join(d_) + \
            "\n" + _describe(layers)


@props
@given(layers=stacks())
def test_stack_as_overlay_layers_equals_model(workdir, layers):
    expected = model.apply_stack(layers)
    with scratch(workdir) as d:
        blobs = _write_layers(d, layers)
        dirs = []
        for i, b in enumerate(blobs):
            ld = os.path.join(d, f"l{i}")
            apply_layer(b, ld, whiteouts="overlay")
            dirs.append(ld)
        with overlay_mount(dirs, os.path.join(d, "mnt")) as mnt:
            actual = snapshot(mnt, ghosts=[])
        d_ = model.diff_trees(expected, actual)
        assert not d_, "overlay of the layers differs from the model:\n" + "\n".join(d_) + \
            "\n" + _describe(layers)


@settings(max_examples=max(5, EXAMPLES // 3), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(layers=stacks(max_layers=3))
def test_stack_as_overlay_userxattr_layers_equals_model(workdir, layers):
    expected = model.apply_stack(layers)
    with scratch(workdir) as d:
        blobs = _write_layers(d, layers)
        dirs = []
        for i, b in enumerate(blobs):
            ld = os.path.join(d, f"l{i}")
            apply_layer(b, ld, whiteouts="overlay", overlay_user_xattr=True)
            dirs.append(ld)
        with overlay_mount(dirs, os.path.join(d, "mnt"), "userxattr") as mnt:
            actual = snapshot(mnt, ghosts=[])
        # with userxattr the overlay's own user.overlay.* names are hidden, not ours
        d_ = model.diff_trees(expected, actual)
        assert not d_, "userxattr overlay differs from the model:\n" + "\n".join(d_) + \
            "\n" + _describe(layers)


def _owners_and_dir_times_dropped(tree: model.Tree) -> model.Tree:
    return {p: {k: v for k, v in n.items()
                if k not in ("uid", "gid") and not (k == "mtime_ns" and n["type"] == "d")}
            for p, n in tree.items()}


@props
@given(layers=stacks(vary_relist=True))
def test_stack_applied_without_root_equals_model(workdir, layers):
    """As nobody, owners skipped: the model's tree but for owners, and for the
    times of directories that a layer wrote into without listing them (the
    kernel's, as with any extractor).  Lower directories closed to their owner
    (0555, 0500, 0000) take what later layers put in or remove."""
    expected = _owners_and_dir_times_dropped(model.apply_stack(layers))
    with scratch(workdir) as d:
        blobs = _write_layers(d, layers)
        dest = os.path.join(d, "rootfs")
        os.mkdir(dest)
        os.chmod(dest, 0o755)
        os.chown(dest, 65534, 65534)
        fds = [os.open(b, os.O_RDONLY) for b in blobs]
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
        try:
            p = run_as_nobody(f"for fd in {fds!r}: _native.apply(fd, {root_fd}, owners='skip')",
                              fds + [root_fd], env=dict(os.environ, PYTHONPATH=str(REPO)))
        finally:
            for fd in fds + [root_fd]:
                os.close(fd)
        assert p.returncode == 0, p.stderr + "\n" + _describe(layers)
        actual = _owners_and_dir_times_dropped(snapshot(dest))
        d_ = model.diff_trees(expected, actual)
        assert not d_, "stack applied without root differs from the model:\n" + \
            "\n".join(d_) + "\n" + _describe(layers)


# ------------------------------------------------------------------ (c) other writers

TAR_EXTRACT = ["tar", "-xpf", None, "--xattrs", "--xattrs-include=*", "--numeric-owner",
               "--same-owner", "-C", None]


def gnu_tar_create(src: str, out: str, fmt: str, sparse: Optional[str]) -> None:
    cmd = ["tar", "-cf", out, f"--format={fmt}", "--numeric-owner", "-C", src]
    if fmt == "posix":
        cmd[1:1] = ["--xattrs", "--xattrs-include=*"]
    if sparse:
        cmd[1:1] = ["--sparse"] + ([f"--sparse-version={sparse}"] if fmt == "posix" else [])
    subprocess.run(cmd + ["."], check=True, capture_output=True, env=dict(os.environ, LC_ALL="C"))


def gnu_tar_extract(archive: str, dest: str) -> None:
    os.mkdir(dest)
    cmd = list(TAR_EXTRACT)
    cmd[2], cmd[-1] = archive, dest
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, LC_ALL="C"))


def tarfile_create(src: str, out: str, fmt: int) -> None:
    with tarfile.open(out, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as tf:
        tf.add(src, arcname=".")


WRITERS = ["gnu-posix", "gnu-posix-sparse-1.0", "gnu-posix-sparse-0.1", "gnu-posix-sparse-0.0",
           "gnu-gnu", "gnu-gnu-sparse", "tarfile-pax", "tarfile-gnu"]


@props
@given(nodes=trees(max_nodes=18), writer=st.sampled_from(WRITERS))
def test_other_writers_extract_like_gnu_tar(workdir, nodes, writer):
    with scratch(workdir) as d:
        src, archive = os.path.join(d, "src"), os.path.join(d, "a.tar")
        os.mkdir(src)
        materialize(src, nodes)
        sparse = None
        if writer.startswith("gnu-"):
            fmt = "posix" if writer.startswith("gnu-posix") else "gnu"
            if "sparse" in writer:
                sparse = writer.rsplit("-", 1)[1] if fmt == "posix" else "old"
            gnu_tar_create(src, archive, fmt, sparse)
        else:
            tarfile_create(src, archive, tarfile.PAX_FORMAT if writer == "tarfile-pax"
                           else tarfile.GNU_FORMAT)
        gnu_tar_extract(archive, os.path.join(d, "by-tar"))
        apply_layer(archive, os.path.join(d, "by-layerfs"))
        expected = snapshot(os.path.join(d, "by-tar"), holes=bool(sparse))
        actual = snapshot(os.path.join(d, "by-layerfs"), holes=bool(sparse))
        assert_same_tree(expected, actual, f"{writer} archive extracted by layerfs vs GNU tar")
