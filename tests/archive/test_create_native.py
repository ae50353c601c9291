"""The layer tar writer (csrc/tar_write.c) through _native.create.

Archives written from real trees are read back by Python tarfile and by the
real tools (GNU tar lists and extracts them as root, bsdtar extracts the sparse
ones); an extracted tree must equal the source (tests.archive.model.snapshot:
type, mode, owner, content, link targets, devices, xattrs, ns mtimes, hardlink
groups, data extents).  Raw header bytes are checked where the format is the
point (ustar vs PAX, end of archive, entry order, determinism).
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import socket
import stat
import struct
import subprocess
import tarfile
from pathlib import Path
from typing import List, Optional

import pytest

from layerfs import _native
from layerfs.errors import LayerError

from .model import assert_same_tree, snapshot

BLOCK = 512
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
T0 = 1_600_000_000                      # 2020-09-13
GNU_X = ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner"]


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("tar writer tests run as root (owners, devices, trusted xattrs)")


# ---------------------------------------------------------------- helpers

def create(root: Path, out: Optional[Path] = None, **kw) -> bytes:
    """Run _native.create on root; returns the bytes written (and keeps the result)."""
    out = out or root.parent / (root.name + ".tar")
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(out, "wb") as f:
            res = _native.create(rfd, f.fileno(), **kw)
    finally:
        os.close(rfd)
    data = out.read_bytes()
    create.last = res
    return data


def members(data: bytes) -> List[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        return t.getmembers()


def names(data: bytes) -> List[str]:
    return [m.name + ("/" if m.isdir() else "") for m in members(data)]


def raw_headers(data: bytes):
    """(typeflag, name field) of every header block, PAX headers included."""
    out = []
    pos = 0
    while pos + BLOCK <= len(data):
        h = data[pos:pos + BLOCK]
        if h == b"\0" * BLOCK:
            break
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        out.append((chr(h[156]), h[0:100].rstrip(b"\0"), h[345:500].rstrip(b"\0")))
        pos += BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK
    return out


def tar_order(root: Path) -> List[bytes]:
    """Docker/containerd order: depth-first, each directory sorted byte-wise."""
    out = []

    def walk(rel: bytes):
        full = os.path.join(os.fsencode(root), rel) if rel else os.fsencode(root)
        for n in sorted(os.listdir(full)):
            r = os.path.join(rel, n) if rel else n
            st = os.lstat(os.path.join(full, n))
            if stat.S_ISSOCK(st.st_mode):
                continue
            if stat.S_ISDIR(st.st_mode):
                out.append(r + b"/")
                walk(r)
            else:
                out.append(r)
    walk(b"")
    return out


def gnu_extract(archive: Path, dest: Path, *extra: str) -> None:
    dest.mkdir()
    subprocess.run(GNU_X + ["-xpf", archive, "-C", dest, *extra], check=True)


def settime(p: Path, sec: int = T0, ns: int = 0) -> None:
    os.utime(p, ns=(sec * 10**9 + ns, sec * 10**9 + ns), follow_symlinks=False)


def make_socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.fspath(p))
    finally:
        s.close()


def set_times_bottom_up(root: Path, sec: int = T0, ns: int = 0) -> None:
    paths = sorted(root.rglob("*"), key=lambda p: -len(p.parts))
    for p in paths:
        if not p.is_socket():
            settime(p, sec, ns)


def build_every_type(root: Path) -> None:
    root.mkdir()
    d = root / "dir"
    d.mkdir()
    f = d / "file"
    f.write_bytes(b"content\n" * 300)
    os.chown(f, 1000, 1001)
    os.chmod(f, 0o4755)
    os.setxattr(f, "user.b", b"second")
    os.setxattr(f, "user.a", b"first \x00\xff binary")
    os.setxattr(f, "security.capability", CAP_NET_BIND)
    os.setxattr(f, "trusted.overlay.origin", b"never exported")
    os.setxattr(f, "user.overlay.redirect", b"never exported")
    (d / "empty").write_bytes(b"")
    os.link(f, root / "hardlink")
    os.link(f, d / "zz-hardlink")
    os.symlink("dir/file", root / "symlink")
    os.symlink("/absolute/target", d / "abs")
    os.lchown(root / "symlink", 55, 66)
    os.mknod(root / "chr", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 1048575))
    os.mkfifo(root / "fifo", 0o600)
    make_socket(root / "sock")
    (root / "big").write_bytes(os.urandom((2 << 20) + 1))
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    ro = root / "ro"
    ro.mkdir()
    (ro / "x").write_bytes(b"x")
    os.chown(ro, 7, 8)
    os.setxattr(ro, "user.dir", b"d")
    os.chmod(ro, 0o555)
    set_times_bottom_up(root)
    settime(f, T0 + 5, 123_456_789)
    settime(root / "big", T0 - 10**9, 500_000_000)


# ---------------------------------------------------------------- whole trees

def test_every_type_roundtrip_gnu_tar(tmp_path):
    src = tmp_path / "src"
    build_every_type(src)
    data = create(src)
    assert create.last.entries == len(members(data)) == len(tar_order(src))
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    want = snapshot(src)
    del want[b"sock"]                                   # sockets are not archived
    for node in want.values():                          # overlay xattrs are never exported
        for k in [k for k in node["xattrs"] if ".overlay." in k]:
            del node["xattrs"][k]
    assert_same_tree(want, snapshot(out), "GNU tar extraction")


def test_every_type_tarfile_view(tmp_path):
    src = tmp_path / "src"
    build_every_type(src)
    ms = {m.name: m for m in members(create(src))}
    f = ms["dir/file"]
    assert f.isreg() and f.mode == 0o4755 and (f.uid, f.gid) == (1000, 1001)
    assert (f.uname, f.gname) == ("", "")
    assert f.pax_headers["mtime"] == f"{T0 + 5}.123456789"
    xattrs = [k for k in f.pax_headers if k.startswith("SCHILY.xattr.")]
    assert xattrs == sorted(xattrs) == ["SCHILY.xattr.security.capability",
                                        "SCHILY.xattr.user.a", "SCHILY.xattr.user.b"]
    assert f.pax_headers["SCHILY.xattr.user.a"].encode("utf-8", "surrogateescape") == \
        b"first \x00\xff binary"
    assert ms["hardlink"].islnk() and ms["hardlink"].linkname == "dir/file"
    assert ms["dir/zz-hardlink"].islnk() and ms["dir/zz-hardlink"].linkname == "dir/file"
    assert ms["symlink"].issym() and ms["symlink"].linkname == "dir/file"
    assert (ms["symlink"].uid, ms["symlink"].gid) == (55, 66)
    assert ms["dir/abs"].linkname == "/absolute/target"
    assert ms["chr"].ischr() and (ms["chr"].devmajor, ms["chr"].devminor) == (1, 3)
    assert ms["blk"].isblk() and (ms["blk"].devmajor, ms["blk"].devminor) == (259, 1048575)
    assert ms["fifo"].isfifo() and ms["fifo"].mode == 0o600
    assert "sock" not in ms
    assert ms["tmp"].isdir() and ms["tmp"].mode == 0o1777
    assert ms["ro"].mode == 0o555 and ms["ro"].pax_headers == {"SCHILY.xattr.user.dir": "d"}
    assert ms["big"].size == (2 << 20) + 1
    assert ms["big"].pax_headers["mtime"] == f"{T0 - 10**9}.5"
    # entries without anything special have no PAX header at all
    assert ms["dir/empty"].pax_headers == {} and ms["chr"].pax_headers == {}


def test_order_is_docker_order(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for n in ["a.txt", "a-b", "B", "a", "a/x", "a/x.y", "a/x/z", "_", "Z", "~", "a0", "\u00e9"]:
        p = src / n
        if n in ("a", "a/x"):
            p.mkdir()
        else:
            p.write_bytes(b"")
    data = create(src)
    assert [os.fsencode(n) for n in names(data)] == tar_order(src)
    assert names(data)[:5] == ["B", "Z", "_", "a/", "a/x/"]
    assert names(data).index("a/x.y") > names(data).index("a/x/z")
    listing = subprocess.run(["tar", "-tf", tmp_path / "src.tar"], capture_output=True,
                             check=True).stdout.decode().splitlines()
    assert listing == names(data)


def test_deterministic(tmp_path):
    """Same tree, different creation order (so different inodes and dirent order):
    byte-identical archives; and two runs over one tree are identical."""
    files = [f"d{i}/f{j}" for i in range(8) for j in range(30)]

    def build(root: Path, order):
        root.mkdir()
        for rel in order:
            p = root / rel
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(rel.encode() * 10)
        os.link(root / "d3/f7", root / "d0/link")
        os.symlink("d1/f1", root / "s")
        os.setxattr(root / "d2/f2", "user.k", b"v")
        set_times_bottom_up(root, T0, 42)

    build(tmp_path / "a", files)
    build(tmp_path / "b", list(reversed(files)))
    a1 = create(tmp_path / "a", tmp_path / "a1.tar")
    a2 = create(tmp_path / "a", tmp_path / "a2.tar")
    b = create(tmp_path / "b", tmp_path / "b.tar")
    assert a1 == a2 == b
    ms = {m.name: m for m in members(b)}
    # the first name in tar order carries the content, whatever inode order says
    assert ms["d0/link"].isreg() and ms["d3/f7"].islnk() and ms["d3/f7"].linkname == "d0/link"


def test_end_of_archive(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 700)
    settime(src / "f")                      # whole seconds: no PAX header
    data = create(src)
    # header, two data blocks, two zero blocks, nothing after (as Go's archive/tar)
    assert len(data) == 5 * BLOCK
    assert data[-2 * BLOCK:] == b"\0" * (2 * BLOCK)
    assert data[BLOCK + 700:3 * BLOCK] == b"\0" * (2 * BLOCK - 700)
    assert create.last.digests.tar_size == len(data)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert create(empty) == b"\0" * 1024 and create.last.entries == 0


def test_ustar_header_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"abc")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o640)
    settime(f, T0)
    h = create(src)[:BLOCK]
    assert h[0:100].rstrip(b"\0") == b"f"
    assert h[100:108] == b"0000640\0"
    assert h[108:116] == b"0002322\0" and h[116:124] == b"0013056\0"
    assert h[124:136] == b"00000000003\0"
    assert h[136:148] == b"%011o\0" % T0
    assert h[156:157] == b"0"
    assert h[257:265] == b"ustar\x0000"
    assert h[265:329] == b"\0" * 64                      # numeric owners only
    chk = sum(h[:148]) + 8 * 32 + sum(h[156:])
    assert h[148:156] == b"%06o\0 " % chk


def test_long_names_and_links(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    mid = src / ("p" * 120)                 # "ppp.../name" fits the ustar prefix split
    mid.mkdir()
    (mid / "n").write_bytes(b"split")
    deep = src
    for i in range(3):
        deep = deep / (chr(ord("a") + i) * 200)
    deep.mkdir(parents=True)                # 600+ bytes: needs PAX path
    (deep / ("f" * 250)).write_bytes(b"pax")
    exact = src / ("e" * 100)               # exactly 100 bytes: plain name field
    exact.write_bytes(b"")
    target = "t/" * 70
    os.symlink(target, src / "longlink")
    os.link(deep / ("f" * 250), src / "hl")  # hardlink whose target name is long
    set_times_bottom_up(src)
    data = create(src)
    ms = {m.name: m for m in members(data)}
    longname = os.path.relpath(deep / ("f" * 250), src)
    assert ms[longname].pax_headers.get("path") == longname
    assert ms["hl"].islnk() and ms["hl"].pax_headers["linkpath"] == longname
    assert ms["longlink"].linkname == target and ms["longlink"].pax_headers["linkpath"] == target
    assert ms["p" * 120 + "/n"].pax_headers == {}          # ustar prefix/name split
    hdrs = raw_headers(data)
    assert ("0", b"n", b"p" * 120) in hdrs
    assert ("0", b"e" * 100, b"") in hdrs
    assert create.last.entries == len(ms)
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(snapshot(src), snapshot(out))


def test_non_utf8_names(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src)
    short = os.fsencode(src) + b"/bad\xff\xfename"
    long = os.fsencode(src) + b"/" + b"\xe9" * 150
    with open(short, "wb") as f:
        f.write(b"1")
    with open(long, "wb") as f:
        f.write(b"2")
    data = create(src)
    hdrs = raw_headers(data)
    assert ("0", b"bad\xff\xfename", b"") in hdrs            # raw bytes in ustar
    ms = [m for m in members(data)]
    raw = sorted(m.name.encode("utf-8", "surrogateescape") for m in ms)
    assert raw == sorted([b"bad\xff\xfename", b"\xe9" * 150])
    lm = [m for m in ms if len(m.name) == 150][0]
    assert lm.pax_headers.get("hdrcharset") == "BINARY"
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert sorted(os.listdir(os.fsencode(out))) == sorted([b"bad\xff\xfename", b"\xe9" * 150])


def test_big_ids_and_sizes_fields(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name, uid, gid in (("max", 0o7777777, 0o7777777), ("over", 0o10000000, 0o10000001),
                           ("huge", 4_000_000_000, 7)):
        p = src / name
        p.write_bytes(b"")
        os.chown(p, uid, gid)
        settime(p)
    ms = {m.name: m for m in members(create(src))}
    assert ms["max"].pax_headers == {} and ms["max"].uid == 0o7777777
    assert ms["over"].pax_headers == {"uid": str(0o10000000), "gid": str(0o10000001)}
    assert (ms["huge"].uid, ms["huge"].gid) == (4_000_000_000, 7)
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(snapshot(src), snapshot(out))


def test_huge_sparse_file(tmp_path):
    """A file of more than 8 GiB that is one hole: a one-line sparse map."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.truncate((8 << 30) + 5)
    data = create(src, sparse=True)
    m = members(data)[0]
    assert m.size == (8 << 30) + 5 and m.sparse == [((8 << 30) + 5, 0)]
    assert "size" not in m.pax_headers       # sparse: the stored size is small


@pytest.mark.slow
def test_size_over_8gib_goes_to_pax(tmp_path):
    """A non-sparse entry bigger than the 11 octal digits of ustar: PAX size.
    (The file is one hole on disk; its 8 GiB of zeros stream through a pipe.)"""
    import threading
    src = tmp_path / "src"
    src.mkdir()
    size = (8 << 30) + 3
    with open(src / "huge", "wb") as f:
        f.truncate(size)
    settime(src / "huge")
    r, w = os.pipe()
    rfd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    out = {}

    def writer():
        try:
            out["res"] = _native.create(rfd, w)
        except Exception as e:          # reported below
            out["err"] = e
        finally:
            os.close(w)
    th = threading.Thread(target=writer)
    th.start()
    head = b""
    total = 0
    with os.fdopen(r, "rb") as pipe:
        while True:
            chunk = pipe.read(1 << 20)
            if not chunk:
                break
            if len(head) < 3 * BLOCK:
                head += chunk[:3 * BLOCK]
            total += len(chunk)
    th.join()
    os.close(rfd)
    assert "err" not in out, out.get("err")
    assert head[156:157] == b"x"                        # a PAX header first
    pax = head[BLOCK:2 * BLOCK].rstrip(b"\0")
    assert pax == b"%d size=%d\n" % (len(pax), size)
    assert head[2 * BLOCK + 124:2 * BLOCK + 136] == b"00000000000\0"
    assert total == 2 * BLOCK + BLOCK + (size + BLOCK - 1) // BLOCK * BLOCK + 2 * BLOCK
    assert out["res"].digests.tar_size == total


def test_ns_and_negative_mtimes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cases = {"whole": (T0, 0), "ns": (T0, 1), "tenth": (T0, 100_000_000),
             "neg": (-1, 250_000_000), "negwhole": (-86400, 0)}
    for n, (s, ns) in cases.items():
        (src / n).write_bytes(b"")
        settime(src / n, s, ns)
    ms = {m.name: m for m in members(create(src))}
    assert ms["whole"].pax_headers == {}
    assert ms["ns"].pax_headers["mtime"] == f"{T0}.000000001"
    assert ms["tenth"].pax_headers["mtime"] == f"{T0}.1"
    assert ms["neg"].pax_headers["mtime"] == "-0.75"
    assert ms["negwhole"].pax_headers["mtime"] == "-86400"
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    for n in cases:
        assert os.lstat(out / n).st_mtime_ns == os.lstat(src / n).st_mtime_ns, n


def test_xattrs_options(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"")
    os.setxattr(f, "trusted.t", b"1")
    os.setxattr(f, "trusted.overlay.opaque", b"y")
    os.setxattr(f, "user.overlay.opaque", b"y")
    os.setxattr(f, "user.big", b"v" * 3000)
    os.symlink("f", src / "l")
    os.setxattr(src / "l", "trusted.onlink", b"L", follow_symlinks=False)
    settime(f)
    settime(src / "l")
    m = {m.name: m for m in members(create(src))}
    assert sorted(m["f"].pax_headers) == ["SCHILY.xattr.trusted.t", "SCHILY.xattr.user.big"]
    assert m["f"].pax_headers["SCHILY.xattr.user.big"] == "v" * 3000
    assert m["l"].pax_headers == {"SCHILY.xattr.trusted.onlink": "L"}
    m = {m.name: m for m in members(create(src, no_xattrs=True))}
    assert m["f"].pax_headers == {} and m["l"].pax_headers == {}


def test_hardlinks_first_name_in_order(tmp_path):
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    (src / "b" / "orig").write_bytes(b"data")
    os.link(src / "b" / "orig", src / "a")
    os.link(src / "b" / "orig", src / "c")
    (src / "single").write_bytes(b"s")
    ms = members(create(src))
    by = {m.name: m for m in ms}
    assert by["a"].isreg() and by["a"].size == 4
    assert by["b/orig"].islnk() and by["b/orig"].linkname == "a" and by["b/orig"].size == 0
    assert by["c"].islnk() and by["c"].linkname == "a"
    assert by["single"].isreg()


def test_hardlinked_symlinks_devices_fifos(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("t", src / "s1")
    os.link(src / "s1", src / "s2", follow_symlinks=False)
    os.mkfifo(src / "p1")
    os.link(src / "p1", src / "p2")
    os.mknod(src / "c1", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.link(src / "c1", src / "c2")
    ms = {m.name: m for m in members(create(src))}
    assert ms["s1"].issym() and ms["p1"].isfifo() and ms["c1"].ischr()
    for a, b in (("s1", "s2"), ("p1", "p2"), ("c1", "c2")):
        assert ms[b].islnk() and ms[b].linkname == a
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(snapshot(src), snapshot(out))


def test_overlay_hardlinked_whiteouts_stay_whiteouts(tmp_path):
    """overlayfs may make whiteouts as links of one shared inode."""
    up = tmp_path / "upper"
    up.mkdir()
    os.mknod(up / "w1", stat.S_IFCHR, os.makedev(0, 0))
    os.link(up / "w1", up / "w2")
    ms = members(create(up, source="overlay"))
    assert [(m.name, m.type) for m in ms] == [(".wh.w1", tarfile.REGTYPE),
                                             (".wh.w2", tarfile.REGTYPE)]


# ---------------------------------------------------------------- sparse

def make_sparse(p: Path, size: int, data_at=(), chunk=b"D" * 4096) -> None:
    with open(p, "wb") as f:
        f.truncate(size)
        for off in data_at:
            f.seek(off)
            f.write(chunk)


def test_sparse_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_sparse(src / "middle", 16 << 20, [4 << 20, 8 << 20])
    make_sparse(src / "lead", 1 << 20, [0])                 # data then a trailing hole
    make_sparse(src / "hole", 5 << 20)                       # nothing but a hole
    make_sparse(src / "end", 3 << 20, [(3 << 20) - 4096])   # hole then data to the end
    (src / "dense").write_bytes(os.urandom(100_000))
    for p in src.iterdir():
        settime(p)
    data = create(src, sparse=True)
    assert len(data) < 200_000
    ms = {m.name: m for m in members(data)}
    assert ms["dense"].sparse is None
    assert ms["middle"].sparse == [(4 << 20, 4096), (8 << 20, 4096), (16 << 20, 0)]
    assert ms["lead"].sparse == [(0, 4096), (1 << 20, 0)]
    assert ms["hole"].sparse == [(5 << 20, 0)]
    assert ms["end"].sparse == [((3 << 20) - 4096, 4096)]
    assert ms["middle"].pax_headers["GNU.sparse.major"] == "1"
    assert ms["middle"].pax_headers["GNU.sparse.minor"] == "0"
    assert ms["middle"].pax_headers["GNU.sparse.realsize"] == str(16 << 20)
    assert (b"GNUSparseFile.0/middle", b"") in [(n, p) for _, n, p in raw_headers(data)]
    with tarfile.open(tmp_path / "src.tar") as t:
        for n in ms:
            assert t.extractfile(n).read() == (src / n).read_bytes(), n
    # GNU tar and bsdtar restore the holes
    want = snapshot(src, holes=True)
    out = tmp_path / "gnu"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(want, snapshot(out, holes=True), "GNU tar")
    bsd = tmp_path / "bsd"
    bsd.mkdir()
    subprocess.run(["bsdtar", "-xpf", tmp_path / "src.tar", "-C", bsd], check=True)
    for n in ms:
        assert (bsd / n).read_bytes() == (src / n).read_bytes(), n
        assert os.stat(bsd / n).st_blocks <= os.stat(src / n).st_blocks + 8, n


def test_sparse_small_hole_with_xattr_block(tmp_path):
    """st_blocks also counts an external xattr block: it must not hide a hole."""
    src = tmp_path / "src"
    src.mkdir()
    make_sparse(src / "f", 4096 + 100, [0])
    os.setxattr(src / "f", "user.big", b"x" * 1500)
    m = members(create(src, sparse=True))[0]
    assert m.sparse == [(0, 4096), (4196, 0)]
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(snapshot(src, holes=True), snapshot(out, holes=True))


def test_sparse_off_writes_zeros(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_sparse(src / "s", 1 << 20, [1 << 19])
    settime(src / "s")
    m = members(create(src))[0]
    assert m.sparse is None and m.size == 1 << 20 and m.pax_headers == {}


# ---------------------------------------------------------------- overlay upper dirs

def build_upper(root: Path, xattr: str = "trusted.overlay.opaque") -> None:
    root.mkdir()
    (root / "dir").mkdir()
    (root / "dir" / "kept").write_bytes(b"k")
    os.mknod(root / "dir" / "gone", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(root / "real-dev", stat.S_IFCHR | 0o600, os.makedev(1, 7))
    (root / "opq").mkdir()
    os.setxattr(root / "opq", xattr, b"y")
    (root / "opq" / "!first").write_bytes(b"")     # sorts before ".wh..wh..opq"
    (root / "opq" / "new").write_bytes(b"n")
    (root / "notopq").mkdir()
    os.setxattr(root / "notopq", xattr, b"n")
    (root / ".wh.aufs-file").write_bytes(b"")
    set_times_bottom_up(root, T0, 5)
    settime(root / "dir" / "gone", T0 + 1, 0)


def test_overlay_source(tmp_path):
    up = tmp_path / "upper"
    build_upper(up)
    data = create(up, source="overlay")
    assert names(data) == [".wh.aufs-file", "dir/", "dir/.wh.gone", "dir/kept", "notopq/",
                           "opq/", "opq/.wh..wh..opq", "opq/!first", "opq/new", "real-dev"]
    ms = {m.name: m for m in members(data)}
    for n in ("dir/.wh.gone", "opq/.wh..wh..opq"):
        w = ms[n]
        assert w.isreg() and w.size == 0 and w.mode == 0 and (w.uid, w.gid) == (0, 0)
    assert ms["dir/.wh.gone"].mtime == T0 + 1
    assert ms["opq"].pax_headers == {"mtime": f"{T0}.000000005"}   # opaque xattr not exported
    assert ms["real-dev"].ischr() and ms["real-dev"].devminor == 7
    assert create.last.entries == len(ms)


def test_overlay_user_xattr(tmp_path):
    up = tmp_path / "upper"
    build_upper(up, "user.overlay.opaque")
    assert "opq/.wh..wh..opq" not in names(create(up, source="overlay"))
    assert "opq/.wh..wh..opq" in names(create(up, source="overlay", overlay_user_xattr=True))


def test_plain_source_keeps_everything(tmp_path):
    up = tmp_path / "upper"
    build_upper(up)
    ms = {m.name: m for m in members(create(up))}
    assert ms["dir/gone"].ischr() and (ms["dir/gone"].devmajor, ms["dir/gone"].devminor) == (0, 0)
    assert ms[".wh.aufs-file"].isreg()
    assert not any(n.endswith(".wh..wh..opq") for n in ms)


# ---------------------------------------------------------------- change lists

def build_changed(root: Path) -> None:
    root.mkdir()
    (root / "etc" / "apt").mkdir(parents=True)
    (root / "etc" / "apt" / "sources.list").write_bytes(b"deb x")
    (root / "etc" / "hosts").write_bytes(b"127.0.0.1")
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "tool").write_bytes(b"#!")
    (root / "var" / "cache").mkdir(parents=True)
    os.mknod(root / "usr" / "whiteout", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(root / "var" / "cache", "trusted.overlay.opaque", b"y")
    set_times_bottom_up(root, T0)


def test_changes(tmp_path):
    root = tmp_path / "root"
    build_changed(root)
    changes = [("usr/bin/tool", "path"), ("etc/hosts", "path"), ("etc/removed", "delete"),
               ("etc/hosts", "path"), ("var/cache", "opaque"), ("etc/apt", "path"),
               ("/./usr/bin/tool", "path"), ("zz", "delete"), ("etc/apt", "opaque")]
    data = create(root, changes=changes)
    got = names(data)
    # parents first, each directory's entries sorted by name (a whiteout sorts by the
    # name it hides), an opaque marker right after its directory, duplicates once
    assert got == ["etc/", "etc/apt/", "etc/apt/.wh..wh..opq", "etc/hosts", "etc/.wh.removed",
                   "usr/", "usr/bin/", "usr/bin/tool", "var/", "var/cache/",
                   "var/cache/.wh..wh..opq", ".wh.zz"]
    ms = {m.name: m for m in members(data)}
    assert ms["etc/.wh.removed"].mtime == 0 and ms["etc/.wh.removed"].mode == 0
    assert ms["etc/hosts"].size == 9
    # the parents come from the filesystem, with their metadata
    assert ms["usr/bin"].mtime == T0 and ms["usr/bin"].isdir()
    assert create.last.entries == len(got)
    # a change list archive extracts on its own
    out = tmp_path / "out"
    gnu_extract(tmp_path / "root.tar", out)
    assert (out / "usr" / "bin" / "tool").read_bytes() == b"#!"


def test_changes_replaced_path(tmp_path):
    """A path both deleted and written (replaced in this layer): whiteout first."""
    root = tmp_path / "root"
    build_changed(root)
    data = create(root, changes=[("etc/hosts", "path"), ("etc/hosts", "delete")])
    assert names(data) == ["etc/", "etc/.wh.hosts", "etc/hosts"]


def test_changes_overlay_source(tmp_path):
    root = tmp_path / "root"
    build_changed(root)
    data = create(root, changes=[("usr/whiteout", "path"), ("var/cache", "path"),
                                 ("var/cache", "opaque")], source="overlay")
    assert names(data) == ["usr/", "usr/.wh.whiteout", "var/", "var/cache/",
                           "var/cache/.wh..wh..opq"]


def test_changes_errors(tmp_path):
    root = tmp_path / "root"
    build_changed(root)
    for bad in ["../etc", "etc/../../x", "..", "", "/"]:
        with pytest.raises(LayerError) as ei:
            create(root, changes=[(bad, "path")])
        assert ei.value.errno == errno.EINVAL, bad
    with pytest.raises(LayerError) as ei:
        create(root, changes=[("etc/missing", "path")])
    assert ei.value.errno == errno.ENOENT and ei.value.filename == "etc/missing"
    with pytest.raises(LayerError) as ei:
        create(root, changes=[("etc/hosts/x", "path")])
    assert ei.value.errno == errno.ENOTDIR and ei.value.filename == "etc/hosts"


def test_changes_do_not_follow_symlinks(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    os.symlink(outside, root / "link")
    with pytest.raises(LayerError) as ei:
        create(root, changes=[("link/secret", "path")])
    assert ei.value.errno in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV)


def test_empty_change_list(tmp_path):
    root = tmp_path / "root"
    build_changed(root)
    assert create(root, changes=[]) == b"\0" * 1024


# ---------------------------------------------------------------- clamp, compression

def test_clamp_mtime(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "new").write_bytes(b"")
    (src / "old").write_bytes(b"")
    (src / "edge").write_bytes(b"")
    os.mknod(src / "wh", stat.S_IFCHR, os.makedev(0, 0))
    settime(src / "new", T0 + 100, 999)
    settime(src / "old", T0 - 100, 999)
    settime(src / "edge", T0, 1)
    settime(src / "wh", T0 + 5, 0)
    settime(src, T0 + 50, 0)
    ms = {m.name: m for m in members(create(src, source="overlay", source_date_epoch=T0))}
    assert ms["new"].mtime == T0 and ms["new"].pax_headers == {}
    assert ms["edge"].mtime == T0 and ms["edge"].pax_headers == {}
    assert ms["old"].pax_headers["mtime"] == f"{T0 - 100}.000000999"
    assert ms[".wh.wh"].mtime == T0


@pytest.mark.parametrize("comp,cmd", [(_native.COMP_GZIP, ["gzip", "-dc"]),
                                      (_native.COMP_ZSTD, ["zstd", "-dc"])])
def test_compressed_output(tmp_path, comp, cmd):
    src = tmp_path / "src"
    build_every_type(src)
    plain = create(src, tmp_path / "plain.tar")
    plain_res = create.last
    blob = create(src, tmp_path / "blob", compression=comp)
    res = create.last
    tar = subprocess.run(cmd + [tmp_path / "blob"], capture_output=True, check=True).stdout
    assert tar == plain
    d = res.digests
    assert d.digest == "sha256:" + hashlib.sha256(blob).hexdigest()
    assert d.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest() == plain_res.digests.diff_id
    assert (d.compressed_size, d.tar_size) == (len(blob), len(tar))
    assert d.compression == {_native.COMP_GZIP: "gzip", _native.COMP_ZSTD: "zstd"}[comp]
    assert plain_res.digests.digest == plain_res.digests.diff_id
    assert res.entries == plain_res.entries


# ---------------------------------------------------------------- big and deep trees

def test_deep_tree(tmp_path):
    """Deeper than the directory fds kept open while walking."""
    src = tmp_path / "src"
    p = src
    for i in range(70):
        p = p / f"{i:02d}"
    p.mkdir(parents=True)
    q = src
    for i in range(70):
        q = q / f"{i:02d}"
        (q / "f").write_bytes(b"%d" % i)
        (q.parent / f"{i:02d}.after").write_bytes(b"a")
    set_times_bottom_up(src)
    data = create(src)
    assert [os.fsencode(n) for n in names(data)] == tar_order(src)
    out = tmp_path / "out"
    gnu_extract(tmp_path / "src.tar", out)
    assert_same_tree(snapshot(src), snapshot(out))
