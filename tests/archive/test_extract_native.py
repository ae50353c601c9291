"""Layer extraction in the C core (layerfs._native.apply) and tree removal.

Layers are built with Python's tarfile (PAX), or tarbuild where tarfile cannot
express the entry; each is applied to a fresh root directory and the outcome is
checked on the real filesystem: types, content, modes, owners, xattrs,
nanosecond times, replacement rules, whiteout modes, owner policies, the
openat2 fallback, and removal of trees with symlinks that point outside.
Tests run as root (chown, mknod, trusted.* xattrs).
"""
from __future__ import annotations

import errno
import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from layerfs import _native
from layerfs.errors import LayerError

from . import tarbuild as tb

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="extraction tests run as root")

NS_TIME = "1234567890.123456789"          # PAX mtime with nanoseconds
NS_SEC, NS_NSEC = 1234567890, 123456789


# ---------------------------------------------------------------- helpers --

def ti(name, kind=tarfile.REGTYPE, data=b"", *, mode=0o644, uid=0, gid=0, mtime=1_600_000_000,
       linkname="", pax=None, devmajor=0, devminor=0):
    """A (TarInfo, data) pair for layer()."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.mtime = mtime
    info.linkname = linkname
    info.devmajor, info.devminor = devmajor, devminor
    info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def xattr_pax(xattrs):
    """PAX records for xattrs (SCHILY.xattr.*); binary values via surrogateescape."""
    return {"SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}


def layer(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def apply(root: Path, data: bytes, **kw) -> _native.ApplyResult:
    """Apply layer bytes to root through the C core."""
    root.mkdir(exist_ok=True)
    blob = root.parent / f"{root.name}.layer"
    blob.write_bytes(data)
    fd = os.open(blob, os.O_RDONLY)
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _native.apply(fd, rfd, **kw)
    finally:
        os.close(fd)
        os.close(rfd)
        blob.unlink()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def names(root: Path):
    """Every path under root, relative, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "root"
    r.mkdir()
    return r


# ------------------------------------------------------------ entry types --

def test_each_entry_type(root):
    res = apply(root, layer(
        ti("d", tarfile.DIRTYPE, mode=0o755),
        ti("d/file", data=b"hello world\n", mode=0o640),
        ti("d/empty"),
        ti("d/sym", tarfile.SYMTYPE, linkname="../nowhere/../file"),
        ti("d/hard", tarfile.LNKTYPE, linkname="d/file"),
        ti("d/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        ti("d/loop", tarfile.BLKTYPE, mode=0o660, devmajor=7, devminor=200),
        ti("d/fifo", tarfile.FIFOTYPE, mode=0o600),
    ))
    assert res.entries == 8 and res.whiteouts == 0 and res.warnings == 0
    assert res.digests.diff_id.startswith("sha256:")
    d = root / "d"
    assert (d / "file").read_bytes() == b"hello world\n"
    assert stat.S_IMODE((d / "file").stat().st_mode) == 0o640
    assert (d / "empty").read_bytes() == b""
    assert os.readlink(d / "sym") == "../nowhere/../file"         # stored verbatim
    assert os.stat(d / "hard").st_ino == os.stat(d / "file").st_ino
    assert os.stat(d / "file").st_nlink == 2
    st = os.lstat(d / "null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(d / "loop")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 200)
    st = os.lstat(d / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


def test_large_file_and_compressed_layers(root, tmp_path):
    big = os.urandom(3 * 1024 * 1024 + 17)
    data = layer(ti("big", data=big), ti("small", data=b"x"))
    for i, blob in enumerate([data, tb.gzip_bytes(data), tb.zstd_bytes(data)]):
        r = tmp_path / f"r{i}"
        res = apply(r, blob)
        assert (r / "big").read_bytes() == big
        assert (r / "small").read_bytes() == b"x"
        assert res.digests.compression == ["none", "gzip", "zstd"][i]


def test_sparse_file_keeps_holes(root):
    t = tb.Tar()
    seg = b"A" * 4096
    t.sparse_file("sparse", [(0, seg), (1 << 20, b"tail")], realsize=(1 << 21))
    apply(root, t.bytes())
    p = root / "sparse"
    st = p.stat()
    assert st.st_size == 1 << 21
    content = p.read_bytes()
    assert content[:4096] == seg
    assert content[(1 << 20):(1 << 20) + 4] == b"tail"
    assert content.count(0) == len(content) - 4096 - 4
    assert st.st_blocks * 512 < 64 * 1024                  # the holes stayed holes


def test_names_are_normalised(root):
    apply(root, layer(
        ti("/abs/file", data=b"1"),
        ti("./dot/./x//y", data=b"2"),
        ti("a/b/../c", data=b"3"),
    ))
    assert (root / "abs/file").read_bytes() == b"1"
    assert (root / "dot/x/y").read_bytes() == b"2"
    assert (root / "a/c").read_bytes() == b"3"
    assert not (root / "a/b").exists()


def test_missing_parents_are_created_0755_root_owned(root):
    os.umask(0o077)
    try:
        apply(root, layer(ti("p/q/r/file", data=b"x", uid=5, gid=6)))
    finally:
        os.umask(0o022)
    for d in ("p", "p/q", "p/q/r"):
        st = os.stat(root / d)
        assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert os.stat(root / "p/q/r/file").st_uid == 5


def test_root_entry_sets_root_metadata(root):
    apply(root, layer(ti("./", tarfile.DIRTYPE, mode=0o750, uid=3, gid=4, pax={"mtime": NS_TIME}),
                      ti("f", data=b"x")))
    st = os.stat(root)
    assert stat.S_IMODE(st.st_mode) == 0o750 and (st.st_uid, st.st_gid) == (3, 4)
    assert st.st_mtime_ns == NS_SEC * 10**9 + NS_NSEC


def test_unsorted_and_deep_layer(root):
    """Entries hopping between directories, and a tree deeper than the fd cache."""
    deep = "/".join(f"l{i}" for i in range(120))
    entries = []
    for i in range(120):
        entries.append(ti("/".join(f"l{j}" for j in range(i + 1)) + f"/f{i}", data=b"%d" % i))
    entries += [ti("x/1", data=b"x1"), ti("y/1", data=b"y1"), ti("x/2", data=b"x2"),
                ti(deep + "/z", data=b"z"), ti("y/2", data=b"y2"), ti("l0/back", data=b"b")]
    before = open_fds()
    apply(root, layer(*entries))
    assert open_fds() == before
    for i in range(120):
        p = root / "/".join(f"l{j}" for j in range(i + 1)) / f"f{i}"
        assert p.read_bytes() == b"%d" % i
    for n, v in [("x/1", b"x1"), ("y/1", b"y1"), ("x/2", b"x2"), ("y/2", b"y2"),
                 (deep + "/z", b"z"), ("l0/back", b"b")]:
        assert (root / n).read_bytes() == v


# --------------------------------------------------------------- metadata --

def test_setuid_setgid_sticky_kept_after_chown(root):
    apply(root, layer(
        ti("suid", data=b"#!", mode=0o4755, uid=1234, gid=5678),
        ti("sgid", data=b"#!", mode=0o2711, uid=1234, gid=5678),
        ti("both", data=b"#!", mode=0o6755, uid=99, gid=99),
        ti("sgiddir", tarfile.DIRTYPE, mode=0o2775, uid=1234, gid=5678),
        ti("tmp", tarfile.DIRTYPE, mode=0o1777),
    ))
    assert stat.S_IMODE(os.stat(root / "suid").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(root / "sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.stat(root / "both").st_mode) == 0o6755
    assert stat.S_IMODE(os.stat(root / "sgiddir").st_mode) == 0o2775
    assert stat.S_IMODE(os.stat(root / "tmp").st_mode) == 0o1777


# A node that gets its owner and mode by being created skips fchown/fchmod; these
# are the cases where creation alone would give something else.

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o000, 0o777])
def test_modes_exact_whatever_the_umask(root, mask):
    modes = [0o644, 0o755, 0o600, 0o664, 0o666, 0o777, 0o000, 0o444, 0o4755, 0o1755]
    old = os.umask(mask)
    try:
        apply(root, layer(*[ti(f"f{m:04o}", data=b"x", mode=m) for m in modes]))
    finally:
        os.umask(old)
    assert {m: stat.S_IMODE(os.stat(root / f"f{m:04o}").st_mode) for m in modes} == \
        {m: m for m in modes}


def test_owner_exact_under_a_setgid_directory(root):
    """A new node takes a set-group-ID directory's group; a root:root entry must
    still end up root:root, and one with the directory's group keeps it."""
    apply(root, layer(
        ti("sg", tarfile.DIRTYPE, mode=0o2775, gid=4321),
        ti("sg/root", data=b"x", mode=0o644),
        ti("sg/same", data=b"x", mode=0o644, gid=4321),
        ti("sg/link", tarfile.SYMTYPE, linkname="root"),
        ti("sg/sub", tarfile.DIRTYPE, mode=0o755),
        ti("sg/sub/f", data=b"x", mode=0o644),
    ))
    own = lambda n: (os.lstat(root / n).st_uid, os.lstat(root / n).st_gid)
    assert own("sg/root") == (0, 0)
    assert own("sg/same") == (0, 4321)
    assert own("sg/link") == (0, 0)
    assert own("sg/sub") == (0, 0)
    assert own("sg/sub/f") == (0, 0)
    assert stat.S_IMODE(os.stat(root / "sg/root").st_mode) == 0o644


def test_setgid_gained_by_a_later_entry_of_the_same_directory(root):
    """The root directory's own entry coming after files were created in it."""
    apply(root, layer(
        ti("a", data=b"x"),
        ti("./", tarfile.DIRTYPE, mode=0o2755, gid=777),
        ti("b", data=b"x"),
    ))
    assert (os.stat(root / "a").st_gid, os.stat(root / "b").st_gid) == (0, 0)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o2755


def test_modes_exact_under_a_default_acl(root):
    """With a default ACL on the parent, the ACL and not the umask shapes a new
    file's mode: the entry's mode must still be what ends up on disk."""
    acl = _default_acl_xattr(user=0o7, group=0, mask=0, other=0)
    apply(root, layer(
        ti("d", tarfile.DIRTYPE, mode=0o755,
           pax=xattr_pax({"system.posix_acl_default": acl})),
        ti("d/f644", data=b"x", mode=0o644),
        ti("d/f600", data=b"x", mode=0o600),
        ti("d/sub", tarfile.DIRTYPE, mode=0o755),
        ti("d/sub/f640", data=b"x", mode=0o640),
    ))
    assert os.getxattr(root / "d", "system.posix_acl_default")
    for n, m in [("d/f644", 0o644), ("d/f600", 0o600), ("d/sub", 0o755), ("d/sub/f640", 0o640)]:
        assert stat.S_IMODE(os.stat(root / n).st_mode) == m, n


def test_modes_exact_under_an_existing_default_acl(root):
    """The same when the directory with the default ACL was there before the layer."""
    (root / "d").mkdir()
    os.setxattr(root / "d", "system.posix_acl_default",
                _default_acl_xattr(user=0o7, group=0, mask=0, other=0))
    apply(root, layer(ti("d/f", data=b"x", mode=0o644), ti("d/g", data=b"x", mode=0o750)))
    assert stat.S_IMODE(os.stat(root / "d/f").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(root / "d/g").st_mode) == 0o750


def _default_acl_xattr(*, user, group, mask, other) -> bytes:
    """A minimal POSIX ACL in the kernel's xattr format (version 2)."""
    tag = {"user": 0x01, "group": 0x04, "mask": 0x10, "other": 0x20}
    out = struct.pack("<I", 2)
    for name, perm in (("user", user), ("group", group), ("mask", mask), ("other", other)):
        out += struct.pack("<HHI", tag[name], perm, 0xFFFFFFFF)
    return out


def test_numeric_owners_kept(root):
    apply(root, layer(
        ti("d", tarfile.DIRTYPE, uid=1234, gid=5678, pax={"uname": "nobody", "gname": "nogroup"}),
        ti("d/f", data=b"x", uid=1234, gid=5678),
        ti("d/s", tarfile.SYMTYPE, linkname="f", uid=1234, gid=5678),
        ti("d/c", tarfile.CHRTYPE, devmajor=1, devminor=5, uid=1234, gid=5678),
        ti("d/p", tarfile.FIFOTYPE, uid=1234, gid=5678),
    ))
    for n in ("d", "d/f", "d/s", "d/c", "d/p"):
        st = os.lstat(root / n)
        assert (st.st_uid, st.st_gid) == (1234, 5678), n


def test_xattrs_including_capability_after_chown(root):
    cap = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)   # cap_net_bind_service+ep
    apply(root, layer(
        ti("d", tarfile.DIRTYPE, pax=xattr_pax({"user.dir": b"dv", "trusted.t": b"\x00\xff"})),
        ti("d/ping", data=b"\x7fELF", mode=0o755, uid=1234, gid=5678,
           pax=xattr_pax({"security.capability": cap, "user.bin": b"\x01\x02\x00"})),
        ti("d/sym", tarfile.SYMTYPE, linkname="ping", pax=xattr_pax({"trusted.sym": b"s"})),
        ti("d/fifo", tarfile.FIFOTYPE, pax=xattr_pax({"trusted.fifo": b"f"})),
    ))
    f = root / "d/ping"
    assert os.getxattr(f, "security.capability") == cap
    assert os.getxattr(f, "user.bin") == b"\x01\x02\x00"
    assert os.stat(f).st_uid == 1234
    assert os.getxattr(root / "d", "user.dir") == b"dv"
    assert os.getxattr(root / "d", "trusted.t") == b"\x00\xff"
    assert os.getxattr(root / "d/sym", "trusted.sym", follow_symlinks=False) == b"s"
    assert "trusted.sym" not in os.listxattr(f)
    assert os.getxattr(root / "d/fifo", "trusted.fifo", follow_symlinks=False) == b"f"


def test_overlay_xattrs_in_archive_are_dropped(root):
    res = apply(root, layer(
        ti("d", tarfile.DIRTYPE, pax=xattr_pax({"trusted.overlay.opaque": b"y", "user.keep": b"1"})),
        ti("f", data=b"", pax=xattr_pax({"user.overlay.redirect": b"/x"})),
    ), whiteouts="overlay")
    assert os.listxattr(root / "d") == ["user.keep"]
    assert os.listxattr(root / "f") == []
    assert res.warnings == 2
    assert "trusted.overlay.opaque" in res.first_warning


def test_no_xattrs_option(root):
    res = apply(root, layer(ti("f", data=b"", pax=xattr_pax({"user.a": b"1"}))), no_xattrs=True)
    assert os.listxattr(root / "f") == []
    assert res.warnings == 1 and "'f'" in res.first_warning


def test_unsupported_xattr_namespace(root, tmp_path):
    """The kernel refuses an unknown namespace (EOPNOTSUPP): an error when keeping
    owners, which says why; a warning under the unprivileged options."""
    data = layer(ti("f", data=b"", pax=xattr_pax({"user.ok": b"1", "bogus.ns": b"x"})))
    with pytest.raises(LayerError) as ei:
        apply(root, data)
    assert ei.value.errno == errno.EOPNOTSUPP and ei.value.entry == "f"
    assert "bogus.ns" in str(ei.value) and "namespace" in str(ei.value)
    other = tmp_path / "other"
    res = apply(other, data, owners="skip")
    assert os.getxattr(other / "f", "user.ok") == b"1"
    assert res.warnings == 1 and "bogus.ns" in res.first_warning


def test_nanosecond_times(root):
    apply(root, layer(
        ti("d", tarfile.DIRTYPE, pax={"mtime": NS_TIME}),
        ti("d/sub", tarfile.DIRTYPE, pax={"mtime": "1000000000.5"}),
        ti("d/sub/f", data=b"x", pax={"mtime": "1500000000.000000001"}),
        ti("d/f", data=b"x", pax={"mtime": NS_TIME, "atime": "1400000000.25"}),
        ti("d/s", tarfile.SYMTYPE, linkname="f", pax={"mtime": "1300000000.7"}),
        ti("d/later", data=b"written after the directory entry"),
    ))
    def ns(p):
        return os.lstat(root / p).st_mtime_ns
    assert ns("d") == NS_SEC * 10**9 + NS_NSEC        # survives its children being written
    assert ns("d/sub") == 1000000000_500000000
    assert ns("d/sub/f") == 1500000000_000000001
    assert ns("d/f") == NS_SEC * 10**9 + NS_NSEC
    assert os.stat(root / "d/f").st_atime_ns == 1400000000_250000000
    assert os.stat(root / "d/sub/f").st_atime_ns == 1500000000_000000001   # atime = mtime
    assert ns("d/s") == 1300000000_700000000


def test_directory_listed_twice_last_metadata_wins(root):
    apply(root, layer(
        ti("d", tarfile.DIRTYPE, mode=0o700, uid=1, pax={"mtime": "1000.5"}),
        ti("d/f", data=b"x"),
        ti("d", tarfile.DIRTYPE, mode=0o751, uid=2, pax={"mtime": "2000.25"}),
    ))
    st = os.stat(root / "d")
    assert stat.S_IMODE(st.st_mode) == 0o751 and st.st_uid == 2
    assert st.st_mtime_ns == 2000_250000000
    assert (root / "d/f").exists()


# ------------------------------------------------------------ replacement --

def test_replacement_rules(root, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep me")
    apply(root, layer(
        ti("f2d", data=b"file"),
        ti("d2f", tarfile.DIRTYPE), ti("d2f/inner", data=b"i"), ti("d2f/sub", tarfile.DIRTYPE),
        ti("d2s", tarfile.DIRTYPE), ti("d2s/inner", data=b"i"),
        ti("merge", tarfile.DIRTYPE, mode=0o700, uid=1), ti("merge/lower", data=b"l"),
        ti("s2f", tarfile.SYMTYPE, linkname=str(outside)),
        ti("f2f", data=b"old"),
        ti("s2d", tarfile.SYMTYPE, linkname=str(tmp_path)),
        ti("hl", data=b"shared"), ti("hl2", tarfile.LNKTYPE, linkname="hl"),
    ))
    apply(root, layer(
        ti("f2d", tarfile.DIRTYPE), ti("f2d/new", data=b"n"),
        ti("d2f", data=b"now a file"),
        ti("d2s", tarfile.SYMTYPE, linkname="/elsewhere"),
        ti("merge", tarfile.DIRTYPE, mode=0o750, uid=7), ti("merge/upper", data=b"u"),
        ti("s2f", data=b"regular now"),
        ti("f2f", data=b"new"),
        ti("s2d", tarfile.DIRTYPE), ti("s2d/x", data=b"x"),
        ti("hl2", data=b"split"),
    ))
    assert (root / "f2d/new").read_bytes() == b"n"
    assert (root / "d2f").read_bytes() == b"now a file"
    assert os.readlink(root / "d2s") == "/elsewhere"
    st = os.stat(root / "merge")
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_uid == 7
    assert sorted(os.listdir(root / "merge")) == ["lower", "upper"]
    assert not (root / "s2f").is_symlink() and (root / "s2f").read_bytes() == b"regular now"
    assert outside.read_bytes() == b"keep me"                   # not written through
    assert (root / "f2f").read_bytes() == b"new"
    assert (root / "s2d").is_dir() and not (root / "s2d").is_symlink()
    assert not (tmp_path / "x").exists()
    assert (root / "hl").read_bytes() == b"shared" and (root / "hl2").read_bytes() == b"split"
    assert os.stat(root / "hl").st_nlink == 1


def test_replace_directory_holding_outside_symlinks(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    apply(root, layer(
        ti("d", tarfile.DIRTYPE), ti("d/out", tarfile.SYMTYPE, linkname=str(outside)),
        ti("d/sub", tarfile.DIRTYPE), ti("d/sub/up", tarfile.SYMTYPE, linkname="../../../outside"),
    ))
    apply(root, layer(ti("d", data=b"file")))
    assert (root / "d").read_bytes() == b"file"
    assert (outside / "precious").read_bytes() == b"p"


def test_parent_through_symlink_stays_in_root(root, tmp_path):
    """Intermediate symlinks are followed inside the root only."""
    (tmp_path / "usr").mkdir()                                   # decoys outside the root
    apply(root, layer(
        ti("usr", tarfile.DIRTYPE), ti("usr/lib", tarfile.DIRTYPE),
        ti("lib", tarfile.SYMTYPE, linkname="usr/lib"),
        ti("lib64", tarfile.SYMTYPE, linkname="/usr/lib"),
        ti("up", tarfile.SYMTYPE, linkname="../../../.."),
        ti("lib/a", data=b"a"), ti("lib64/b", data=b"b"), ti("up/c", data=b"c"),
        ti("up/usr/lib/d", data=b"d"),
    ))
    assert sorted(os.listdir(root / "usr/lib")) == ["a", "b", "d"]
    assert (root / "c").read_bytes() == b"c"
    assert os.listdir(tmp_path / "usr") == []


def test_stale_parent_cache_after_replacing_through_a_symlink(root):
    """A directory on the cached parent chain is replaced through an aliased path."""
    apply(root, layer(
        ti("a", tarfile.DIRTYPE),
        ti("a/link", tarfile.SYMTYPE, linkname="/"),
        ti("b", tarfile.DIRTYPE),
        ti("a/link/a", tarfile.SYMTYPE, linkname="/b"),   # replaces directory a itself
        ti("a/z", data=b"z"),                              # now resolves through a -> /b
    ))
    assert os.readlink(root / "a") == "/b"
    assert (root / "b/z").read_bytes() == b"z"


# -------------------------------------------------------------- whiteouts --

def lower(root):
    apply(root, layer(
        ti("a", tarfile.DIRTYPE), ti("a/f", data=b"f"), ti("a/g", data=b"g"),
        ti("b", tarfile.DIRTYPE), ti("b/deep", tarfile.DIRTYPE), ti("b/deep/x", data=b"x"),
        ti("d", tarfile.DIRTYPE), ti("d/old1", data=b"1"), ti("d/sub", tarfile.DIRTYPE),
        ti("d/sub/old2", data=b"2"), ti("d/keepdir", tarfile.DIRTYPE), ti("d/keepdir/old3", data=b"3"),
    ))


def test_apply_whiteouts(root):
    lower(root)
    res = apply(root, layer(ti(".wh.b"), ti("a/.wh.f"), ti("a/.wh.missing"), ti("nodir/.wh.x")))
    assert res.whiteouts == 4
    assert names(root) == sorted(["a", "a/g", "d", "d/old1", "d/sub", "d/sub/old2", "d/keepdir",
                                  "d/keepdir/old3"])


def test_apply_whiteout_of_dir_with_outside_symlinks(root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    apply(root, layer(ti("w", tarfile.DIRTYPE), ti("w/o", tarfile.SYMTYPE, linkname=str(outside)),
                      ti("w/p", tarfile.SYMTYPE, linkname="../../outside/precious")))
    apply(root, layer(ti(".wh.w")))
    assert not (root / "w").exists()
    assert (outside / "precious").read_bytes() == b"p"


@pytest.mark.parametrize("position", ["first", "middle", "last"])
def test_apply_opaque_marker_anywhere(root, position):
    lower(root)
    content = [ti("d/new", data=b"n"), ti("d/keepdir", tarfile.DIRTYPE),
               ti("d/keepdir/new2", data=b"n2"), ti("d/sub/x/y", data=b"implied parents")]
    marker = ti("d/.wh..wh..opq")
    at = {"first": 0, "middle": 2, "last": len(content)}[position]
    entries = [ti("d", tarfile.DIRTYPE)] + content[:at] + [marker] + content[at:]
    res = apply(root, layer(*entries))
    assert res.whiteouts == 1
    assert names(root / "d") == sorted(["new", "keepdir", "keepdir/new2", "sub", "sub/x", "sub/x/y"])
    assert sorted(os.listdir(root / "a")) == ["f", "g"]              # other dirs untouched


def test_apply_opaque_root(root):
    lower(root)
    apply(root, layer(ti("a", tarfile.DIRTYPE), ti("a/new", data=b""), ti(".wh..wh..opq")))
    assert names(root) == ["a", "a/new"]


def test_apply_same_layer_whiteouts(root):
    lower(root)
    apply(root, layer(
        ti("a/new", data=b"mine"), ti("a/.wh.new"),          # whiteout after this layer's file
        ti("a/.wh.g"), ti("a/g", data=b"recreated"),          # whiteout before: lower g goes
        ti("b/deep/mine", data=b"m"), ti("b/.wh.deep"),       # holds this layer's content
    ))
    assert (root / "a/new").read_bytes() == b"mine"
    assert (root / "a/g").read_bytes() == b"recreated"
    assert sorted(os.listdir(root / "b/deep")) == ["mine"]


@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last"])
@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_whiteout_of_same_layer_dir_hides_only_lower_content(tmp_path, order, mode):
    """Same result whichever comes first: the layer's directory and its content,
    nothing from below (apply: lower entries removed; overlay: opaque)."""
    root = tmp_path / "root"
    apply(root, layer(ti("b", tarfile.DIRTYPE), ti("b/lower", data=b"l"), ti("f", data=b"old")))
    wh = [ti(".wh.b"), ti(".wh.f")]
    mine = [ti("b", tarfile.DIRTYPE), ti("b/y", data=b"y"), ti("f", data=b"new")]
    apply(root, layer(*(wh + mine if order == "whiteout-first" else mine + wh)), whiteouts=mode)
    assert (root / "f").read_bytes() == b"new"
    assert (root / "b/y").read_bytes() == b"y"
    if mode == "apply":
        assert sorted(os.listdir(root / "b")) == ["y"]
    else:
        assert os.getxattr(root / "b", "trusted.overlay.opaque") == b"y"


def test_whiteout_and_opaque_never_follow_a_lower_symlink(root):
    apply(root, layer(ti("usr/lib", tarfile.DIRTYPE), ti("usr/lib/keep", data=b"k"),
                      ti("lib", tarfile.SYMTYPE, linkname="usr/lib"),
                      ti("lib2", tarfile.SYMTYPE, linkname="/usr/lib")))
    apply(root, layer(
        ti("lib/.wh..wh..opq"), ti("lib", tarfile.DIRTYPE), ti("lib/new", data=b"n"),   # marker first
        ti("lib2/x", data=b"x"), ti(".wh.lib2"),           # wrote through it, then whited it out
    ))
    assert sorted(os.listdir(root / "usr/lib")) == ["keep", "x"]
    assert not (root / "lib").is_symlink() and os.listdir(root / "lib") == ["new"]
    assert not os.path.lexists(root / "lib2")


def test_aufs_metadata_skipped(root):
    res = apply(root, layer(
        ti(".wh..wh.plnk", tarfile.DIRTYPE), ti(".wh..wh.plnk/1234.5678", data=b"x"),
        ti(".wh..wh.aufs", data=b""), ti("a/.wh..wh.orph", tarfile.DIRTYPE), ti("kept", data=b"k"),
    ))
    assert names(root) == ["kept"]
    assert res.whiteouts == 0


@pytest.mark.parametrize("name", [".wh.", "a/.wh..", ".wh../x", ".wh.x/y", "a/.wh.b/c/d"])
def test_bad_whiteout_names_rejected(root, name):
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("a", tarfile.DIRTYPE), ti(name)))
    assert ei.value.errno == errno.EINVAL
    assert ei.value.entry == name


def test_whiteout_entries_of_other_types_act_by_name(root):
    lower(root)
    apply(root, layer(ti(".wh.a", tarfile.DIRTYPE), ti(".wh.b", tarfile.SYMTYPE, linkname="x"),
                      ti("d/.wh.old1", tarfile.LNKTYPE, linkname="d/sub/old2")))
    assert sorted(os.listdir(root)) == ["d"]
    assert not (root / "d/old1").exists()
    assert not any(n.startswith(".wh.") for n in names(root))


def test_overlay_whiteouts(root):
    res = apply(root, layer(
        ti("a", tarfile.DIRTYPE), ti("a/.wh.gone"),
        ti("mine", data=b"m"), ti(".wh.mine"),
        ti("o", tarfile.DIRTYPE), ti("o/.wh..wh..opq"), ti("o/f", data=b"f"),
        ti("implicit/.wh..wh..opq"),
    ), whiteouts="overlay")
    assert res.whiteouts == 4
    st = os.lstat(root / "a/gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
    assert (st.st_uid, st.st_gid) == (0, 0) and stat.S_IMODE(st.st_mode) == 0
    assert (root / "mine").read_bytes() == b"m"
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(root / "implicit", "trusted.overlay.opaque") == b"y"
    assert (root / "o/f").read_bytes() == b"f"
    assert not any(n.rpartition("/")[2].startswith(".wh.") for n in names(root))


def test_overlay_whiteout_replaces_lower_content_and_user_xattr(root):
    apply(root, layer(ti("x", tarfile.DIRTYPE), ti("x/y", data=b"")), whiteouts="overlay")
    apply(root, layer(ti(".wh.x"), ti("o/.wh..wh..opq")), whiteouts="overlay",
          overlay_user_xattr=True)
    assert stat.S_ISCHR(os.lstat(root / "x").st_mode)
    assert os.getxattr(root / "o", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "o")


def test_overlay_whiteout_owner_is_mapped_root(root):
    m = [(0, 100000, 65536)]
    apply(root, layer(ti(".wh.x")), whiteouts="overlay", owners="map", uid_map=m, gid_map=m)
    st = os.lstat(root / "x")
    assert (st.st_uid, st.st_gid) == (100000, 100000)


def test_keep_whiteouts(root):
    res = apply(root, layer(ti("a", tarfile.DIRTYPE), ti("a/.wh.x"), ti("d/.wh..wh..opq"),
                            ti(".wh..wh.plnk", tarfile.DIRTYPE)), whiteouts="keep")
    assert names(root) == sorted(["a", "a/.wh.x", "d", "d/.wh..wh..opq", ".wh..wh.plnk"])
    assert stat.S_ISREG(os.lstat(root / "a/.wh.x").st_mode)
    assert res.whiteouts == 2


# ------------------------------------------------------------------ owners --

def test_owners_skip(root):
    res = apply(root, layer(ti("mine", data=b"", uid=0, gid=0),
                            ti("theirs", data=b"", uid=1234, gid=5678),
                            ti("d", tarfile.DIRTYPE, uid=1, gid=1)), owners="skip")
    assert os.stat(root / "theirs").st_uid == os.geteuid()
    assert os.stat(root / "d").st_uid == os.geteuid()
    assert res.warnings == 2
    assert "theirs" in res.first_warning and "1234:5678" in res.first_warning


def test_owners_map(root):
    m = [(0, 100000, 1000), (1000, 200000, 65536)]
    apply(root, layer(ti("made/f", data=b"", uid=1234, gid=5),
                      ti("l", tarfile.SYMTYPE, linkname="x", uid=999, gid=1000)),
          owners="map", uid_map=m, gid_map=m)
    st = os.stat(root / "made/f")
    assert (st.st_uid, st.st_gid) == (200234, 100005)
    st = os.lstat(root / "l")
    assert (st.st_uid, st.st_gid) == (100999, 200000)
    st = os.stat(root / "made")                                # made on the way: mapped root
    assert (st.st_uid, st.st_gid) == (100000, 100000)


def test_owners_map_unmapped_id_is_an_error(root):
    m = [(0, 100000, 65536)]
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("ok", data=b""), ti("f", data=b"", uid=70000)),
              owners="map", uid_map=m, gid_map=m)
    assert ei.value.errno == errno.EINVAL and ei.value.entry == "f"
    assert "70000" in str(ei.value)


def test_skip_devices(root):
    res = apply(root, layer(ti("dev", tarfile.DIRTYPE), ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
                            ti("dev/sda", tarfile.BLKTYPE, devmajor=8), ti("dev/fifo", tarfile.FIFOTYPE)),
                skip_devices=True)
    assert sorted(os.listdir(root / "dev")) == ["fifo"]
    assert res.warnings == 2 and "dev/null" in res.first_warning


# ------------------------------------------------------------------ errors --

@pytest.mark.parametrize("name", ["../x", "a/../../x", "/../x"])
def test_escaping_names_rejected(root, name):
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("ok", data=b""), ti(name, data=b"evil")))
    assert ei.value.errno == errno.EINVAL
    assert ei.value.entry == name and ei.value.offset is not None and ei.value.offset > 0
    assert "escapes the root" in str(ei.value)
    assert not (root.parent / "x").exists()


def test_hardlink_errors(root):
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("h", tarfile.LNKTYPE, linkname="missing")))
    assert ei.value.errno == errno.ENOENT and "hardlink target 'missing' does not exist" in str(ei.value)
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("d", tarfile.DIRTYPE), ti("h", tarfile.LNKTYPE, linkname="d")))
    assert ei.value.errno in (errno.EPERM, errno.EINVAL) and "directory" in str(ei.value)
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("h", tarfile.LNKTYPE, linkname="../../etc/passwd")))
    assert ei.value.errno == errno.EINVAL


def test_hardlink_target_symlink_is_not_followed(root, tmp_path):
    outside = tmp_path / "outside"
    outside.write_bytes(b"o")
    apply(root, layer(ti("s", tarfile.SYMTYPE, linkname=str(outside)),
                      ti("h", tarfile.LNKTYPE, linkname="s")))
    assert os.readlink(root / "h") == str(outside)           # a link to the symlink itself
    assert os.stat(outside).st_nlink == 1


def test_name_too_long(root):
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("a/" * 2100 + "f", data=b"")))
    assert ei.value.errno == errno.ENAMETOOLONG


def test_non_directory_root_entry_rejected(root):
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("./", data=b"x")))
    assert ei.value.errno == errno.EINVAL


def test_no_fd_leak_on_error(root):
    before = open_fds()
    with pytest.raises(LayerError):
        apply(root, layer(*[ti(f"d{i}/e/f", data=b"") for i in range(5)], ti("../x", data=b"")))
    assert open_fds() == before


# ---------------------------------------------------------- openat2 fallback --

def test_openat2_probe_and_fallback_flag(monkeypatch):
    assert _native.has_openat2() is True          # the kernel here has it
    monkeypatch.setenv("LAYERFS_NO_OPENAT2", "1")
    assert _native.has_openat2() is False
    monkeypatch.setenv("LAYERFS_NO_OPENAT2", "0")
    assert _native.has_openat2() is True


@pytest.mark.parametrize("no_openat2", ["0", "1"])
def test_symlinked_parents_with_and_without_openat2(monkeypatch, tmp_path, no_openat2):
    monkeypatch.setenv("LAYERFS_NO_OPENAT2", no_openat2)
    root = tmp_path / "root"
    (tmp_path / "made").mkdir()                                  # decoy outside the root
    apply(root, layer(
        ti("usr/lib", tarfile.DIRTYPE),
        ti("lib", tarfile.SYMTYPE, linkname="usr/lib"),
        ti("abs", tarfile.SYMTYPE, linkname="/usr/lib"),
        ti("up", tarfile.SYMTYPE, linkname="../../../../.."),
        ti("chain", tarfile.SYMTYPE, linkname="lib/../../abs"),
        ti("dangling", tarfile.SYMTYPE, linkname="/made/here"),
        ti("loop1", tarfile.SYMTYPE, linkname="loop2"), ti("loop2", tarfile.SYMTYPE, linkname="loop1"),
    ))
    apply(root, layer(
        ti("lib/a", data=b"a"), ti("abs/b", data=b"b"), ti("up/c", data=b"c"),
        ti("chain/d", data=b"d"), ti("up/up/lib/e", data=b"e"), ti("dangling/f", data=b"f"),
        ti("lib/sub/g", data=b"g"),
    ))
    assert sorted(os.listdir(root / "usr/lib")) == ["a", "b", "d", "e", "sub"]
    assert (root / "usr/lib/sub/g").read_bytes() == b"g"
    assert (root / "c").read_bytes() == b"c"
    assert (root / "made/here/f").read_bytes() == b"f"
    assert os.listdir(tmp_path / "made") == []
    with pytest.raises(LayerError) as ei:
        apply(root, layer(ti("loop1/x", data=b"")))
    assert ei.value.errno == errno.ELOOP


def test_open_dir_in_root_fallback_does_not_escape(monkeypatch, tmp_path):
    """Whiteouts and hardlinks resolve in the root through the fallback walk too."""
    monkeypatch.setenv("LAYERFS_NO_OPENAT2", "1")
    root = tmp_path / "root"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "v").write_bytes(b"v")
    apply(root, layer(ti("esc", tarfile.SYMTYPE, linkname="../victim"), ti("v", data=b"inner"),
                      ti("victim", tarfile.DIRTYPE), ti("victim/v", data=b"inside")))
    apply(root, layer(ti("esc/.wh.v"), ti("h", tarfile.LNKTYPE, linkname="esc/../v")))
    assert (victim / "v").read_bytes() == b"v"
    assert not (root / "victim/v").exists()
    assert (root / "h").read_bytes() == b"inner"


# ------------------------------------------------------------- remove_tree --

def test_remove_tree_deep_with_outside_symlinks(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_bytes(b"keep")
    (outside / "dir").mkdir()
    (outside / "dir/inner").write_bytes(b"inner")
    hard_src = outside / "hard"
    hard_src.write_bytes(b"h")
    tree = tmp_path / "tree"
    tree.mkdir()
    # deeper than PATH_MAX and than the removal's fd window
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    depth = 500
    for i in range(depth):
        name = "d" * 20
        os.mkdir(name, dir_fd=fd)
        if i % 50 == 0:
            os.symlink(str(outside), "to_outside", dir_fd=fd)
            os.symlink("../" * (i + 2) + "outside/file", "rel_file", dir_fd=fd)
            os.link(hard_src, "hard", dst_dir_fd=fd)
            with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd), "wb") as f:
                f.write(b"x")
            os.mkfifo("fifo", dir_fd=fd)
        if i == 250:
            os.mkdir("ro", 0o500, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    os.symlink(str(outside / "dir"), tree / "top_link")
    before = open_fds()
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _native.remove_tree(dfd, "tree")
    finally:
        os.close(dfd)
    assert open_fds() == before
    assert not tree.exists()
    assert (outside / "file").read_bytes() == b"keep"
    assert (outside / "dir/inner").read_bytes() == b"inner"
    assert os.stat(hard_src).st_nlink == 1


def test_remove_tree_unprivileged_read_only_dirs(tmp_path):
    """Without root, read-only directories inside the tree are made writable to empty
    them; the directory holding the tree keeps its mode."""
    holder = tmp_path / "holder"
    (holder / "tree/ro/deeper").mkdir(parents=True)
    (holder / "tree/ro/deeper/f").write_bytes(b"")
    (holder / "tree/ro/g").write_bytes(b"")
    for p in [holder, *holder.rglob("*")]:
        os.lchown(p, 65534, 65534)
    os.chmod(holder / "tree/ro/deeper", 0o555)
    os.chmod(holder / "tree/ro", 0o500)

    def remove_as_nobody():
        dfd = os.open(holder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return tb.native_as_nobody(f"remove_tree({dfd}, 'tree')", [dfd])
        finally:
            os.close(dfd)

    os.chmod(holder, 0o555)                  # the caller's directory: never chmodded
    p = remove_as_nobody()
    assert p.returncode == errno.EACCES, p.stderr
    assert stat.S_IMODE(os.stat(holder).st_mode) == 0o555
    os.chmod(holder, 0o755)
    p = remove_as_nobody()
    assert p.returncode == 0, p.stderr
    assert os.listdir(holder) == []
    assert stat.S_IMODE(os.stat(holder).st_mode) == 0o755


def test_remove_tree_edge_cases(tmp_path):
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _native.remove_tree(dfd, "missing")                  # rm -rf: nothing to do
        (tmp_path / "file").write_bytes(b"")
        _native.remove_tree(dfd, "file")
        assert not (tmp_path / "file").exists()
        target = tmp_path / "target"
        target.mkdir()
        (target / "x").write_bytes(b"")
        os.symlink(target, tmp_path / "link")
        _native.remove_tree(dfd, "link/")                    # the symlink, not its target
        assert not os.path.lexists(tmp_path / "link") and (target / "x").exists()
        (tmp_path / "a/b/c").mkdir(parents=True)
        _native.remove_tree(dfd, "a/b")
        assert (tmp_path / "a").exists() and not (tmp_path / "a/b").exists()
        for bad in ("", ".", "..", "a/.."):
            with pytest.raises(LayerError) as ei:
                _native.remove_tree(dfd, bad)
            assert ei.value.errno == errno.EINVAL
    finally:
        os.close(dfd)
