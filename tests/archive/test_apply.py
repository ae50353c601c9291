"""apply_layer / create_layer / chain_id / the CLI, at the Python level.

Sources of every kind (path, file object with and without fileno, pipe),
compression detection, digests against hashlib, expected-digest checks that
leave nothing visible, destinations (missing, empty, existing tree), OCI
changeset semantics case by case (whiteouts, opaque directories wherever the
marker sits, replacement, hardlinks, owners, setuid, xattrs, nanosecond
mtimes, sparse files), whiteout modes, ChainIDs by hand, and the
``layerfs unpack`` / ``layerfs digest`` commands.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import threading

import pytest

from layerfs.archive import apply_layer, create_layer
from layerfs.digest import chain_id
from layerfs.errors import DigestMismatch, LayerError

from . import tarbuild as tb
from .model import assert_same_tree, data_map, overlay_mount, snapshot
from .tarbuild import Tar


def sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


def compress(data: bytes, kind: str) -> bytes:
    return {"none": lambda d: d, "gzip": tb.gzip_bytes, "zstd": tb.zstd_bytes}[kind](data)


def sample_layer() -> tuple:
    """A small layer and the number of entries in it."""
    t = (Tar().dir("etc/", mode=0o755, mtime=1_600_000_000)
         .file("etc/hostname", b"box\n", mtime=1_600_000_001)
         .file("etc/big", os.urandom(200_000), mode=0o600)
         .symlink("etc/link", "hostname")
         .hardlink("etc/hard", "etc/hostname")
         .dir("var/", mode=0o1777)
         .fifo("var/pipe"))
    return t.bytes(), 7


def listing(d) -> list:
    return sorted(os.listdir(d))


# ------------------------------------------------------------------ sources

class ReadOnlyStream(io.RawIOBase):
    """A stream with read() only: no fileno, no seek, short reads."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), 777, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def _pipe_source(blob: bytes):
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(blob)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return os.fdopen(r, "rb"), t


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("kind", ["str", "pathlike", "bytes-path", "file", "bytesio", "stream",
                                  "pipe", "offset-file"])
def test_sources_and_digests(tmp_path, kind, compression):
    tar, n = sample_layer()
    blob = compress(tar, compression)
    path = tmp_path / "layer"
    path.write_bytes(blob)
    reference = tmp_path / "reference"
    apply_layer(str(path), reference)
    dest = tmp_path / "dest"
    closer = None
    if kind == "str":
        src = str(path)
    elif kind == "pathlike":
        src = path
    elif kind == "bytes-path":
        src = os.fsencode(path)
    elif kind == "file":
        src = closer = open(path, "rb")
    elif kind == "bytesio":
        src = io.BytesIO(blob)
    elif kind == "stream":
        src = ReadOnlyStream(blob)
    elif kind == "pipe":
        src, feeder = _pipe_source(blob)
        closer = src
    else:  # a file object positioned after a prefix, with some bytes already buffered
        p2 = tmp_path / "prefixed"
        p2.write_bytes(b"JUNK" * 100 + blob)
        src = closer = open(p2, "rb")
        src.read(10)
        src.seek(400)
    try:
        r = apply_layer(src, dest)
    finally:
        if closer:
            closer.close()
    assert r.digest == sha(blob)
    assert r.diff_id == sha(tar)
    assert r.size == len(blob)
    assert r.tar_size == len(tar)
    assert r.compression == compression
    assert r.entries == n
    assert r.whiteouts == 0 and r.warnings == 0
    assert_same_tree(snapshot(reference), snapshot(dest))
    assert read(dest / "etc" / "hostname") == b"box\n"


def read(p) -> bytes:
    with open(p, "rb") as f:
        return f.read()


def test_tool_written_compression(tmp_path):
    tar, _ = sample_layer()
    (tmp_path / "l.tar").write_bytes(tar)
    subprocess.run(["pigz", "-k", "-p", "2", str(tmp_path / "l.tar")], check=True)
    subprocess.run(["zstd", "-q", "-19", "--long=27", str(tmp_path / "l.tar")], check=True)
    for name, comp in (("l.tar.gz", "gzip"), ("l.tar.zst", "zstd")):
        blob = read(tmp_path / name)
        r = apply_layer(tmp_path / name, tmp_path / ("d-" + comp))
        assert (r.compression, r.digest, r.diff_id) == (comp, sha(blob), sha(tar))


def test_multi_member_gzip_and_multi_frame_zstd(tmp_path):
    tar, _ = sample_layer()
    half = len(tar) // 2
    for comp, parts in (("gzip", tb.gzip_bytes(tar[:half]) + tb.gzip_bytes(tar[half:])),
                        ("zstd", tb.zstd_bytes(tar[:half]) + tb.zstd_bytes(tar[half:]))):
        r = apply_layer(io.BytesIO(parts), tmp_path / comp)
        assert (r.compression, r.digest, r.diff_id, r.tar_size) == (comp, sha(parts), sha(tar), len(tar))
        assert read(tmp_path / comp / "etc" / "hostname") == b"box\n"


def test_gnu_tar_record_padding_counts_in_diff_id(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    subprocess.run(["tar", "-cf", str(tmp_path / "l.tar"), "-C", str(src), "."], check=True)
    blob = read(tmp_path / "l.tar")
    assert len(blob) == 10240          # GNU tar's default record size
    r = apply_layer(tmp_path / "l.tar", tmp_path / "d")
    assert (r.diff_id, r.tar_size) == (sha(blob), len(blob))


@pytest.mark.parametrize("forced,actual", [("gzip", "zstd"), ("zstd", "gzip"), ("gzip", "none"),
                                           ("none", "gzip"), ("zstd", "none")])
def test_forced_compression_mismatch_is_an_error(tmp_path, forced, actual):
    blob = compress(sample_layer()[0], actual)
    with pytest.raises(LayerError):
        apply_layer(io.BytesIO(blob), tmp_path / "d", compression=forced)
    assert not (tmp_path / "d").exists()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
def test_forced_compression_matching(tmp_path, comp):
    tar, _ = sample_layer()
    r = apply_layer(io.BytesIO(compress(tar, comp)), tmp_path / "d", compression=comp)
    assert r.diff_id == sha(tar) and r.compression == comp


def test_unknown_compression_name(tmp_path):
    with pytest.raises(ValueError):
        apply_layer(io.BytesIO(sample_layer()[0]), tmp_path / "d", compression="bzip2")


# ------------------------------------------------------------------ expected digests

@pytest.mark.parametrize("comp", ["none", "gzip"])
@pytest.mark.parametrize("kind", ["path", "bytesio"])
def test_expected_digests_match(tmp_path, comp, kind):
    tar, _ = sample_layer()
    blob = compress(tar, comp)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "l").write_bytes(blob)
    src = tmp_path / "in" / "l" if kind == "path" else io.BytesIO(blob)
    r = apply_layer(src, tmp_path / "out" / "d", expected_digest=sha(blob),
                    expected_diff_id=sha(tar))
    assert r.digest == sha(blob)


@pytest.mark.parametrize("which", ["digest", "diff_id"])
@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("kind", ["path", "bytesio", "pipe"])
def test_expected_digest_mismatch_leaves_nothing(tmp_path, which, comp, kind):
    tar, _ = sample_layer()
    blob = compress(tar, comp)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "l").write_bytes(blob)
    out = tmp_path / "out"
    out.mkdir()
    (out / "neighbour").write_bytes(b"n")
    closer = None
    if kind == "path":
        src = tmp_path / "in" / "l"
    elif kind == "bytesio":
        src = io.BytesIO(blob)
    else:
        src, _ = _pipe_source(blob)
        closer = src
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    kw = {"expected_digest": wrong} if which == "digest" else {"expected_diff_id": wrong}
    try:
        with pytest.raises(DigestMismatch) as ei:
            apply_layer(src, out / "dest", **kw)
    finally:
        if closer:
            closer.close()
    assert isinstance(ei.value, LayerError) and isinstance(ei.value, ValueError)
    assert listing(out) == ["neighbour"]       # no dest, no staging directory left


def test_expected_digest_mismatch_existing_tree_unchanged(tmp_path):
    dest = tmp_path / "dest"
    apply_layer(io.BytesIO(sample_layer()[0]), dest)
    before = snapshot(dest)
    layer = Tar().whiteout("etc").file("new", b"new").opaque("var").bytes()
    with pytest.raises(DigestMismatch):
        apply_layer(io.BytesIO(layer), dest, expected_diff_id=sha(b"nope"))
    assert_same_tree(before, snapshot(dest))


def test_unpack_layers_onto_a_populated_dest_reads_them_through_first(tmp_path):
    """A dest that already holds files is written in place: a layer cut short
    after a good one is found before either is applied (paths to regular files)."""
    from layerfs.archive import unpack_layers
    dest = tmp_path / "dest"
    apply_layer(io.BytesIO(sample_layer()[0]), dest)
    before = snapshot(dest)
    good = tmp_path / "0.tar"
    good.write_bytes(Tar().dir("etc2").file("etc2/a", b"a" * 3000).bytes())
    cut = tmp_path / "1.tar"
    cut.write_bytes(Tar().dir("usr2").file("usr2/b", b"b" * 5000).bytes()[:1600])
    with pytest.raises(LayerError) as ei:
        unpack_layers([good, cut], dest)
    assert ei.value.filename == str(cut)
    assert_same_tree(before, snapshot(dest))


def test_expected_digest_accepts_bare_hex(tmp_path):
    tar, _ = sample_layer()
    r = apply_layer(io.BytesIO(tar), tmp_path / "d", expected_diff_id=hashlib.sha256(tar).hexdigest())
    assert r.diff_id == sha(tar)


# ------------------------------------------------------------------ destinations

def test_dest_created_with_missing_parents(tmp_path):
    dest = tmp_path / "a" / "b" / "dest"
    apply_layer(io.BytesIO(sample_layer()[0]), dest)
    assert read(dest / "etc" / "hostname") == b"box\n"
    assert listing(tmp_path / "a" / "b") == ["dest"]


def test_existing_empty_dest(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    apply_layer(io.BytesIO(sample_layer()[0]), dest)
    assert read(dest / "etc" / "hostname") == b"box\n"
    assert listing(tmp_path) == ["dest"]


def test_dest_is_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"f")
    with pytest.raises(OSError):
        apply_layer(io.BytesIO(sample_layer()[0]), tmp_path / "f")
    assert read(tmp_path / "f") == b"f"


def test_failure_leaves_no_dest_and_no_staging(tmp_path):
    bad = Tar().file("ok", b"ok").file("../escape", b"x").bytes()
    with pytest.raises(LayerError) as ei:
        apply_layer(io.BytesIO(bad), tmp_path / "dest")
    assert ei.value.entry == "../escape"
    assert listing(tmp_path) == []


@pytest.mark.parametrize("comp", ["none", "gzip"])
def test_error_names_layer_file_entry_and_offset(tmp_path, comp):
    good = Tar().file("ok", b"ok" * 1000).bytes(trailer=False)
    bad = good + Tar().file("../escape", b"x").bytes()
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "layer"
    src.write_bytes(compress(bad, comp))
    with pytest.raises(LayerError) as ei:
        apply_layer(src, tmp_path / "dest")
    e = ei.value
    assert e.filename == str(src)
    assert e.entry == "../escape"
    assert e.offset == len(good)
    assert str(src) in str(e) and "../escape" in str(e)


def test_second_layer_onto_existing_tree(tmp_path):
    dest = tmp_path / "dest"
    apply_layer(io.BytesIO(sample_layer()[0]), dest)
    l2 = (Tar().dir("etc/").whiteout("etc/big").file("etc/hostname", b"new\n")
          .dir("var/").opaque("var").file("var/new", b"v").bytes())
    r = apply_layer(io.BytesIO(l2), dest)
    assert r.whiteouts == 2
    assert not os.path.lexists(dest / "etc" / "big")
    assert read(dest / "etc" / "hostname") == b"new\n"
    assert read(dest / "etc" / "hard") == b"box\n"       # the old inode, still linked there
    assert listing(dest / "var") == ["new"]
    assert os.readlink(dest / "etc" / "link") == "hostname"


def test_concurrent_applies(tmp_path):
    layers = [Tar().file(f"f{i}", os.urandom(100_000)).dir("d/").file("d/x", bytes([i]) * 10).bytes()
              for i in range(6)]
    errors, results = [], {}

    def work(i):
        try:
            results[i] = apply_layer(io.BytesIO(tb.gzip_bytes(layers[i])), tmp_path / f"d{i}")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(6):
        assert results[i].diff_id == sha(layers[i])
        assert read(tmp_path / f"d{i}" / "d" / "x") == bytes([i]) * 10


# ------------------------------------------------------------------ changeset semantics

def lower_tree(dest):
    t = (Tar().dir("a/").file("a/keep", b"k").file("a/gone", b"g").dir("a/sub/")
         .file("a/sub/deep", b"d").dir("b/").file("b/x", b"x").file("f", b"f").symlink("s", "a"))
    apply_layer(io.BytesIO(t.bytes()), dest)


def test_whiteout_file_and_dir(tmp_path):
    d = tmp_path / "d"
    lower_tree(d)
    r = apply_layer(io.BytesIO(Tar().dir("a/").whiteout("a/gone").whiteout("a/sub").whiteout("b")
                               .whiteout("s").bytes()), d)
    assert r.whiteouts == 4
    assert listing(d) == ["a", "f"]
    assert listing(d / "a") == ["keep"]


def test_whiteout_of_missing_path_is_harmless(tmp_path):
    d = tmp_path / "d"
    lower_tree(d)
    apply_layer(io.BytesIO(Tar().whiteout("nothing").dir("zz/").whiteout("zz/nothing").bytes()), d)
    assert listing(d) == ["a", "b", "f", "s", "zz"]


def test_whiteout_of_name_with_dots(tmp_path):
    d = tmp_path / "d"
    apply_layer(io.BytesIO(Tar().file("...", b"3").file("..x", b"x").file(".x", b"y").bytes()), d)
    apply_layer(io.BytesIO(Tar().whiteout("...").whiteout("..x").whiteout(".x").bytes()), d)
    assert listing(d) == []


@pytest.mark.parametrize("position", ["before-dir", "after-dir", "last", "middle"])
def test_opaque_marker_anywhere(tmp_path, position):
    d = tmp_path / "d"
    lower_tree(d)
    entries = [("dir", "a/"), ("file", "a/new"), ("dir", "a/sub/"), ("file", "a/sub/n2"),
               ("file", "other")]
    idx = {"before-dir": 0, "after-dir": 1, "middle": 3, "last": len(entries)}[position]
    entries.insert(idx, ("opaque", "a"))
    t = Tar()
    for kind, name in entries:
        {"dir": t.dir, "file": lambda n: t.file(n, b"n"), "opaque": t.opaque}[kind](name)
    r = apply_layer(io.BytesIO(t.bytes()), d)
    assert r.whiteouts == 1
    assert listing(d / "a") == ["new", "sub"]
    assert listing(d / "a" / "sub") == ["n2"]
    assert listing(d) == ["a", "b", "f", "other", "s"]


def test_opaque_on_new_dir_and_root(tmp_path):
    d = tmp_path / "d"
    lower_tree(d)
    apply_layer(io.BytesIO(Tar().dir("n/").opaque("n").file("n/x", b"x").bytes()), d)
    assert listing(d / "n") == ["x"]
    apply_layer(io.BytesIO(Tar().file("top", b"t").opaque("").bytes()), d)
    assert listing(d) == ["top"]


@pytest.mark.parametrize("order", ["whiteout-first", "whiteout-last"])
def test_whiteout_does_not_hide_same_layer_file(tmp_path, order):
    # image-spec: whiteouts apply to lower layers only; what this layer adds stays
    d = tmp_path / "d"
    lower_tree(d)
    t = Tar()
    if order == "whiteout-first":
        t.whiteout("f").file("f", b"new").whiteout("b").dir("b/").file("b/y", b"y")
    else:
        t.file("f", b"new").dir("b/").file("b/y", b"y").whiteout("f").whiteout("b")
    apply_layer(io.BytesIO(t.bytes()), d)
    assert read(d / "f") == b"new"
    assert listing(d / "b") == ["y"]


def test_replacements(tmp_path):
    d = tmp_path / "d"
    lower_tree(d)
    t = (Tar().file("a", b"file over dir")             # dir -> file: the subtree goes
         .dir("f/", mode=0o700).file("f/in", b"i")     # file -> dir
         .dir("b/", mode=0o711, uid=7, mtime=12345)     # dir over dir: merged, attrs replaced
         .symlink("b/x", "elsewhere")                   # file -> symlink
         .file("s", b"was a symlink"))                  # symlink -> file (not written through)
    apply_layer(io.BytesIO(t.bytes()), d)
    assert read(d / "a") == b"file over dir"
    assert listing(d / "f") == ["in"] and stat.S_IMODE(os.lstat(d / "f").st_mode) == 0o700
    st = os.lstat(d / "b")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o711, 7, 12345 * 10**9)
    assert os.readlink(d / "b" / "x") == "elsewhere"
    assert read(d / "s") == b"was a symlink"


def test_hardlinks(tmp_path):
    d = tmp_path / "d"
    lower_tree(d)
    t = (Tar().file("n", b"n", mode=0o640).hardlink("n2", "n").hardlink("./n3", "./n")
         .hardlink("lower-link", "a/keep")               # target from a lower layer
         .symlink("sl", "target").hardlink("sl2", "sl")
         .fifo("p").hardlink("p2", "p").char("c", 1, 3).hardlink("c2", "c"))
    apply_layer(io.BytesIO(t.bytes()), d)
    ino = lambda p: os.lstat(d / p).st_ino  # noqa: E731
    assert ino("n") == ino("n2") == ino("n3") and os.lstat(d / "n").st_nlink == 3
    assert ino("lower-link") == ino("a/keep")
    assert ino("sl") == ino("sl2") and os.path.islink(d / "sl2")
    assert ino("p") == ino("p2") and ino("c") == ino("c2")


def test_hardlink_to_file_replaced_later_in_layer(tmp_path):
    d = tmp_path / "d"
    t = Tar().file("f", b"one").hardlink("h", "f").file("f", b"two").hardlink("h2", "f")
    apply_layer(io.BytesIO(t.bytes()), d)
    assert read(d / "h") == b"one" and read(d / "f") == b"two" and read(d / "h2") == b"two"


def test_numeric_owners_not_names(tmp_path):
    t = Tar().file("f", b"x", uid=1234, gid=4321, uname="root", gname="root")
    t.file("big", b"y", uid=2**31 + 7, gid=2**32 - 2).symlink("l", "f", uid=55, gid=66)
    t.dir("d/", uid=77, gid=88)
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "d")
    own = lambda p: (os.lstat(tmp_path / "d" / p).st_uid, os.lstat(tmp_path / "d" / p).st_gid)  # noqa
    assert own("f") == (1234, 4321)
    assert own("big") == (2**31 + 7, 2**32 - 2)
    assert own("l") == (55, 66)
    assert own("d") == (77, 88)


def test_owners_skip(tmp_path):
    t = Tar().file("f", b"x", uid=1234, gid=4321, mode=0o4755).file("mine", b"m")
    r = apply_layer(io.BytesIO(t.bytes()), tmp_path / "d", owners="skip")
    st = os.lstat(tmp_path / "d" / "f")
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert r.warnings >= 1


def test_owners_map(tmp_path):
    t = Tar().file("f", b"x", uid=1234, gid=0).dir("d/", uid=0, gid=65535).symlink("l", "f", uid=5, gid=5)
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "d", owners="map",
                uid_map=[(0, 100000, 65536)], gid_map=[(0, 200000, 1000), (1000, 300000, 65536)])
    st = lambda p: os.lstat(tmp_path / "d" / p)  # noqa: E731
    assert (st("f").st_uid, st("f").st_gid) == (101234, 200000)
    assert (st("d").st_uid, st("d").st_gid) == (100000, 300000 + 65535 - 1000)
    assert (st("l").st_uid, st("l").st_gid) == (100005, 200005)


def test_owners_map_unmapped_id_is_an_error(tmp_path):
    t = Tar().file("f", b"x", uid=70000)
    with pytest.raises(LayerError) as ei:
        apply_layer(io.BytesIO(t.bytes()), tmp_path / "d", owners="map", uid_map=[(0, 100000, 65536)],
                    gid_map=[(0, 100000, 65536)])
    assert ei.value.entry == "f"
    assert not (tmp_path / "d").exists()


def test_setuid_setgid_sticky_kept_after_chown(tmp_path):
    t = (Tar().file("su", b"x", mode=0o4755, uid=1000).file("sg", b"x", mode=0o2755, gid=1000)
         .dir("tmp/", mode=0o1777).dir("sgdir/", mode=0o2775, gid=50))
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "d")
    m = lambda p: stat.S_IMODE(os.lstat(tmp_path / "d" / p).st_mode)  # noqa: E731
    assert (m("su"), m("sg"), m("tmp"), m("sgdir")) == (0o4755, 0o2755, 0o1777, 0o2775)


CAP = b"\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # cap_net_bind_service+ep


def test_xattrs(tmp_path):
    t = (Tar().file("f", b"x", uid=1000, mode=0o4755,
                    pax={"SCHILY.xattr.user.mime": "text/plain", "SCHILY.xattr.security.capability": CAP,
                         "SCHILY.xattr.trusted.t": b"\x00\xff", "SCHILY.xattr.user.empty": b""})
         .dir("d/", pax={"SCHILY.xattr.user.d": "dir"})
         .file("lib", b"y", pax={"LIBARCHIVE.xattr.user.la": "bGlidg=="}))
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "d")
    f = os.fsencode(tmp_path / "d" / "f")
    assert os.getxattr(f, "user.mime") == b"text/plain"
    assert os.getxattr(f, "security.capability") == CAP      # survived the chown
    assert os.getxattr(f, "trusted.t") == b"\x00\xff"
    assert os.getxattr(f, "user.empty") == b""
    assert stat.S_IMODE(os.lstat(f).st_mode) == 0o4755
    assert os.getxattr(tmp_path / "d" / "d", "user.d") == b"dir"
    assert os.getxattr(tmp_path / "d" / "lib", "user.la") == b"libv"   # base64 in LIBARCHIVE.xattr


def test_no_xattrs(tmp_path):
    t = Tar().file("f", b"x", pax={"SCHILY.xattr.user.mime": "text/plain"})
    r = apply_layer(io.BytesIO(t.bytes()), tmp_path / "d", no_xattrs=True)
    assert os.listxattr(tmp_path / "d" / "f") == []
    assert r.warnings >= 1


def test_nanosecond_mtimes_and_dir_times_after_children(tmp_path):
    t = (Tar().dir("d/", pax={"mtime": "1234567890.123456789"})
         .file("d/f", b"x", pax={"mtime": "1700000000.000000001"})
         .dir("d/e/", pax={"mtime": "1.5"}).file("d/e/g", b"g", mtime=42)
         .symlink("d/l", "f").fifo("d/p", pax={"mtime": "99.000000999"}))
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "r")
    m = lambda p: os.lstat(tmp_path / "r" / p).st_mtime_ns  # noqa: E731
    assert m("d") == 1234567890_123456789
    assert m("d/f") == 1700000000_000000001
    assert m("d/e") == 1_500_000_000
    assert m("d/e/g") == 42 * 10**9
    assert m("d/p") == 99_000000999


def test_dir_mtime_kept_when_a_later_layer_changes_children(tmp_path):
    d = tmp_path / "r"
    lower_tree(d)
    t = Tar().dir("a/", mtime=777).whiteout("a/gone").file("a/new", b"n").opaque("b").dir("b/", mtime=888)
    apply_layer(io.BytesIO(t.bytes()), d)
    assert os.lstat(d / "a").st_mtime_ns == 777 * 10**9
    assert os.lstat(d / "b").st_mtime_ns == 888 * 10**9


def test_sparse_file_pax_1_0(tmp_path):
    segs = [(8192, b"A" * 4096), (65536, b"B" * 8192), (200704, b"C" * 100)]
    t = Tar().sparse_file("dir/sparse", segs, 300000, mode=0o640).file("after", b"ok")
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "r")
    p = tmp_path / "r" / "dir" / "sparse"
    data = read(p)
    expect = bytearray(300000)
    for off, seg in segs:
        expect[off:off + len(seg)] = seg
    assert data == bytes(expect)
    assert data_map(os.fsencode(p)) == [(8192, 12288), (65536, 73728), (200704, 204800)]
    assert read(tmp_path / "r" / "after") == b"ok"


@pytest.mark.parametrize("long", ["pax", "gnu", "ustar"])
def test_long_names(tmp_path, long):
    deep = "d" * 90 + "/" + "e" * 60 + "/"
    name = deep + ("f" * 90 if long == "ustar" else "f" * 150)   # ustar: prefix 151 + name 90
    t = Tar(long=long).dir("d" * 90 + "/").dir(deep).file(name, b"long")
    if long != "ustar":
        t.symlink("sl", "t" * 300).hardlink("hl", name)
    apply_layer(io.BytesIO(t.bytes()), tmp_path / "r")
    assert read(tmp_path / "r" / name) == b"long"
    if long != "ustar":
        assert os.readlink(tmp_path / "r" / "sl") == "t" * 300
        assert os.lstat(tmp_path / "r" / "hl").st_ino == os.lstat(tmp_path / "r" / name).st_ino


def test_empty_layer(tmp_path):
    r = apply_layer(io.BytesIO(tb.end()), tmp_path / "r")
    assert r.entries == 0 and listing(tmp_path / "r") == []


# ------------------------------------------------------------------ whiteout modes

def _marker_layer():
    return (Tar().dir("a/").whiteout("a/gone").dir("o/").opaque("o").file("o/new", b"n")
            .whiteout("top").bytes())


def test_whiteouts_overlay_mode(tmp_path):
    d = tmp_path / "layer"
    r = apply_layer(io.BytesIO(_marker_layer()), d, whiteouts="overlay")
    assert r.whiteouts == 3
    for p in ("a/gone", "top"):
        st = os.lstat(d / p)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(d / "o", "trusted.overlay.opaque") == b"y"
    assert listing(d / "o") == ["new"]
    assert not any(n.startswith(".wh.") for _, _, fs in os.walk(d) for n in fs)


def test_whiteouts_overlay_user_xattr(tmp_path):
    d = tmp_path / "layer"
    apply_layer(io.BytesIO(_marker_layer()), d, whiteouts="overlay", overlay_user_xattr=True)
    assert os.getxattr(d / "o", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in os.listxattr(d / "o")


def test_whiteouts_overlay_mode_over_existing_entries(tmp_path):
    d = tmp_path / "layer"
    apply_layer(io.BytesIO(Tar().file("top", b"t").dir("o/").file("o/old", b"o").bytes()), d)
    apply_layer(io.BytesIO(_marker_layer()), d, whiteouts="overlay")
    assert stat.S_ISCHR(os.lstat(d / "top").st_mode)


@pytest.mark.parametrize("replaced_by", ["file", "symlink", "whiteout"])
def test_overlay_mode_dir_replacing_same_layer_nondir(tmp_path, replaced_by):
    # Layer 1 replaces directory d (from layer 0) by a non-directory, then
    # writes a directory d again: the lower d/old is gone, so in overlay form
    # the new d must hide the lower one (opaque).  Checked on a real overlayfs
    # against the same layers applied with whiteouts="apply".
    l0 = Tar().dir("d/").file("d/old", b"o").bytes()
    t = Tar()
    {"file": lambda: t.file("d", b"f"), "symlink": lambda: t.symlink("d", "x"),
     "whiteout": lambda: t.whiteout("d")}[replaced_by]()
    l1 = t.dir("d/").file("d/new", b"n").bytes()
    flat = tmp_path / "flat"
    for layer in (l0, l1):
        apply_layer(io.BytesIO(layer), flat)
    assert listing(flat / "d") == ["new"]
    apply_layer(io.BytesIO(l0), tmp_path / "l0", whiteouts="overlay")
    apply_layer(io.BytesIO(l1), tmp_path / "l1", whiteouts="overlay")
    with overlay_mount([tmp_path / "l0", tmp_path / "l1"], tmp_path / "mnt") as mnt:
        assert_same_tree(snapshot(flat), snapshot(mnt), "overlay view")


def test_whiteouts_keep_mode(tmp_path):
    d = tmp_path / "layer"
    apply_layer(io.BytesIO(_marker_layer()), d, whiteouts="keep")
    assert os.path.isfile(d / "a" / ".wh.gone") and os.path.isfile(d / ".wh.top")
    assert os.path.isfile(d / "o" / ".wh..wh..opq")
    assert listing(d / "o") == [".wh..wh..opq", "new"]


# ------------------------------------------------------------------ create_layer

def zstd_decompress(blob: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()


def make_src(root):
    os.makedirs(root / "d" / "e")
    (root / "d" / "f").write_bytes(b"f" * 5000)
    (root / "d" / "e" / "g").write_bytes(b"")
    os.symlink("f", root / "d" / "l")
    os.link(root / "d" / "f", root / "hard")
    os.mkfifo(root / "p")
    os.chown(root / "d" / "f", 1000, 1001)
    os.chmod(root / "d" / "f", 0o4750)
    os.setxattr(root / "d" / "f", "user.k", b"v")
    os.utime(root / "d" / "f", ns=(1, 1_600_000_000_123456789))


@pytest.mark.parametrize("comp", ["none", "gzip", "zstd"])
@pytest.mark.parametrize("kind", ["path", "file", "bytesio"])
def test_create_outputs_and_digests(tmp_path, comp, kind):
    src = tmp_path / "src"
    make_src(src)
    out = tmp_path / "out.layer"
    if kind == "path":
        r = create_layer(src, out, compression=comp)
        blob = read(out)
    elif kind == "file":
        with open(out, "wb") as f:
            r = create_layer(src, f, compression=comp)
        blob = read(out)
    else:
        buf = io.BytesIO()
        r = create_layer(src, buf, compression=comp)
        blob = buf.getvalue()
    tar = {"none": lambda b: b, "gzip": gzip.decompress, "zstd": zstd_decompress}[comp](blob)
    assert (r.digest, r.diff_id, r.size, r.tar_size) == (sha(blob), sha(tar), len(blob), len(tar))
    assert r.compression == comp
    a = apply_layer(io.BytesIO(blob), tmp_path / "applied")
    assert a.entries == r.entries
    assert_same_tree(snapshot(src), snapshot(tmp_path / "applied"))


def test_create_extracts_identically_with_gnu_tar(tmp_path):
    src = tmp_path / "src"
    make_src(src)
    create_layer(src, tmp_path / "l.tar")
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-xpf", str(tmp_path / "l.tar"), "--xattrs", "--xattrs-include=*",
                    "--numeric-owner", "-C", str(tmp_path / "x")], check=True)
    assert_same_tree(snapshot(src), snapshot(tmp_path / "x"))


def tar_list(path) -> list:
    return subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True,
                          text=True).stdout.splitlines()


def tar_name(n: str) -> str:
    """Archive name without a leading "./" or a trailing "/" ("." for the root)."""
    while n.startswith("./"):
        n = n[2:]
    return n.rstrip("/") or "."


def test_create_changes_list(tmp_path):
    src = tmp_path / "src"
    make_src(src)
    r = create_layer(src, tmp_path / "l.tar",
                     changes=[("d/f", "modified"), ("gone", "deleted"), ("d/e", "opaque"), ("d", "path")])
    names = {tar_name(n) for n in tar_list(tmp_path / "l.tar")}
    # the opaque directory's own entry may come along with its marker
    assert names - {"d/e"} == {"d", "d/f", ".wh.gone", "d/e/.wh..wh..opq"}
    assert r.entries == len(names)
    d = tmp_path / "d"
    os.makedirs(d / "d" / "e")
    (d / "gone").write_bytes(b"g")
    (d / "d" / "e" / "lower").write_bytes(b"l")
    apply_layer(tmp_path / "l.tar", d)
    assert listing(d) == ["d"] and listing(d / "d" / "e") == []


def test_create_from_overlay_upper(tmp_path):
    up = tmp_path / "upper"
    (up / "o").mkdir(parents=True)
    os.setxattr(up / "o", "trusted.overlay.opaque", b"y")
    (up / "o" / "n").write_bytes(b"n")
    os.mknod(up / "gone", stat.S_IFCHR | 0o000, 0)
    create_layer(up, tmp_path / "l.tar", source_format="overlay")
    names = {tar_name(n) for n in tar_list(tmp_path / "l.tar")} - {"."}
    assert names == {".wh.gone", "o", "o/.wh..wh..opq", "o/n"}


def test_create_source_date_epoch(tmp_path):
    src = tmp_path / "src"
    make_src(src)
    create_layer(src, tmp_path / "l.tar", source_date_epoch=1_000_000_000)
    apply_layer(tmp_path / "l.tar", tmp_path / "d")
    for p, n in snapshot(tmp_path / "d").items():
        if n["mtime_ns"] is not None:
            assert n["mtime_ns"] <= 1_000_000_000 * 10**9, p


def test_create_keeps_hardlinked_symlinks_fifos_devices(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    os.symlink("t", src / "s1")
    os.link(src / "s1", src / "s2", follow_symlinks=False)
    os.mkfifo(src / "p1")
    os.link(src / "p1", src / "p2")
    os.mknod(src / "c1", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.link(src / "c1", src / "c2")
    create_layer(src, tmp_path / "l.tar")
    apply_layer(tmp_path / "l.tar", tmp_path / "d")
    assert_same_tree(snapshot(src), snapshot(tmp_path / "d"))


def test_create_sparse(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "s", "wb") as f:
        f.truncate(1 << 20)
        f.seek(4096 * 10)
        f.write(b"x" * 4096)
        f.seek(4096 * 100)
        f.write(b"y" * 8192)
    r_plain = create_layer(src, tmp_path / "plain.tar")
    r_sparse = create_layer(src, tmp_path / "sparse.tar", sparse=True)
    assert r_sparse.tar_size < r_plain.tar_size
    apply_layer(tmp_path / "sparse.tar", tmp_path / "d")
    assert read(tmp_path / "d" / "s") == read(src / "s")
    assert data_map(os.fsencode(tmp_path / "d" / "s")) == data_map(os.fsencode(src / "s"))
    (tmp_path / "x").mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "sparse.tar"), "-C", str(tmp_path / "x")], check=True)
    assert read(tmp_path / "x" / "s") == read(src / "s")


def test_create_sparse_small_holes_with_xattr_block(tmp_path):
    # ext4 counts an out-of-inode xattr block in st_blocks: a file whose holes
    # are smaller than that block still has holes to keep
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src / "s", os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, 4096 + 2000)
    os.pwrite(fd, b"d" * 4096, 0)
    os.close(fd)
    os.setxattr(src / "s", "user." + "k" * 200, b"v" * 1000)
    assert data_map(os.fsencode(src / "s")) == [(0, 4096)]
    create_layer(src, tmp_path / "l.tar", sparse=True)
    apply_layer(tmp_path / "l.tar", tmp_path / "d")
    assert read(tmp_path / "d" / "s") == read(src / "s")
    assert data_map(os.fsencode(tmp_path / "d" / "s")) == [(0, 4096)]


# ------------------------------------------------------------------ ChainID

def test_chain_id_by_hand():
    d = ["sha256:" + hashlib.sha256(bytes([i])).hexdigest() for i in range(3)]
    c1 = d[0]
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[1]}".encode()).hexdigest()
    c3 = "sha256:" + hashlib.sha256(f"{c2} {d[2]}".encode()).hexdigest()
    assert chain_id(d[:1]) == c1
    assert chain_id(d[:2]) == c2
    assert chain_id(d) == c3


def test_chain_id_of_applied_layers(tmp_path):
    tars = [Tar().file(f"f{i}", bytes([i])).bytes() for i in range(3)]
    diff_ids = [apply_layer(io.BytesIO(tb.gzip_bytes(t)), tmp_path / "d").diff_id for t in tars]
    assert diff_ids == [sha(t) for t in tars]
    expect = sha(tars[0])
    for t in tars[1:]:
        expect = "sha256:" + hashlib.sha256(f"{expect} {sha(t)}".encode()).hexdigest()
    assert chain_id(diff_ids) == expect


def test_chain_id_rejects_bad_input():
    with pytest.raises(ValueError):
        chain_id([])
    with pytest.raises(ValueError):
        chain_id(["md5:abc"])


# ------------------------------------------------------------------ CLI

def _cli_layers(tmp_path):
    tars = [sample_layer()[0],
            Tar().dir("etc/").whiteout("etc/big").file("etc/hostname", b"two\n").bytes(),
            Tar().dir("var/").opaque("var").file("var/three", b"3").bytes()]
    paths = []
    for i, (t, comp) in enumerate(zip(tars, ["gzip", "zstd", "none"])):
        p = tmp_path / f"layer{i}"
        p.write_bytes(compress(t, comp))
        paths.append(p)
    return tars, paths


def test_cli_unpack_equals_one_by_one(tmp_path, layerfs_cli):
    tars, paths = _cli_layers(tmp_path)
    for p in paths:
        apply_layer(p, tmp_path / "by-api")
    proc = layerfs_cli("unpack", *paths, tmp_path / "by-cli")
    assert proc.returncode == 0, proc.stderr
    assert_same_tree(snapshot(tmp_path / "by-api"), snapshot(tmp_path / "by-cli"))
    chain = chain_id([sha(t) for t in tars])
    assert chain in proc.stdout
    for p, t in zip(paths, tars):
        assert sha(read(p)) in proc.stdout and sha(t) in proc.stdout


def test_cli_unpack_json(tmp_path, layerfs_cli):
    tars, paths = _cli_layers(tmp_path)
    proc = layerfs_cli("unpack", "--json", *paths, tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["chain_id"] == chain_id([sha(t) for t in tars])
    assert [l["diff_id"] for l in doc["layers"]] == [sha(t) for t in tars]
    assert [l["digest"] for l in doc["layers"]] == [sha(read(p)) for p in paths]


def test_cli_unpack_corrupt_layer(tmp_path, layerfs_cli):
    tars, paths = _cli_layers(tmp_path)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(Tar().file("fine", b"f").file("../evil", b"e").bytes())
    proc = layerfs_cli("unpack", paths[0], bad, tmp_path / "d")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(bad) in lines[0] and "../evil" in lines[0] and "escapes" in lines[0]
    assert not (tmp_path / "d").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["bad.tar"] + [p.name for p in paths])


def test_cli_unpack_truncated_gzip(tmp_path, layerfs_cli):
    blob = tb.gzip_bytes(sample_layer()[0])
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(blob[: len(blob) // 2])
    proc = layerfs_cli("unpack", bad, tmp_path / "d")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr
    assert not (tmp_path / "d").exists()


def test_cli_unpack_missing_file(tmp_path, layerfs_cli):
    proc = layerfs_cli("unpack", tmp_path / "nope.tar", tmp_path / "d")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_digest(tmp_path, layerfs_cli):
    tars, paths = _cli_layers(tmp_path)
    proc = layerfs_cli("digest", *paths)
    assert proc.returncode == 0, proc.stderr
    for p, t in zip(paths, tars):
        line = next(l for l in proc.stdout.splitlines() if str(p) in l)
        assert sha(read(p)) in line and sha(t) in line
    proc = layerfs_cli("digest", "--json", paths[0])
    doc = json.loads(proc.stdout)
    assert doc["files"][0]["digest"] == sha(read(paths[0]))
    assert doc["files"][0]["diff_id"] == sha(tars[0])


def _dir_layer(path, xattrs):
    import tarfile
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("d")
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
        tf.addfile(ti)


@pytest.mark.parametrize("whiteouts", ["apply", "keep"])
def test_directory_over_directory_takes_the_entrys_xattrs(tmp_path, whiteouts):
    """Last metadata wins for a directory merged into a directory: xattrs the
    new entry does not carry are removed, the ones it carries are set."""
    _dir_layer(tmp_path / "l1.tar", {"user.a": "1", "user.b": "2"})
    _dir_layer(tmp_path / "l2.tar", {"user.b": "3"})
    dest = tmp_path / "root"
    apply_layer(tmp_path / "l1.tar", dest, whiteouts=whiteouts)
    assert sorted(os.listxattr(dest / "d")) == ["user.a", "user.b"]
    apply_layer(tmp_path / "l2.tar", dest, whiteouts=whiteouts)
    assert os.listxattr(dest / "d") == ["user.b"]
    assert os.getxattr(dest / "d", "user.b") == b"3"


def test_create_layer_accepts_change_records(tmp_path):
    """Change lists may hold records with .path and .kind (the drivers' Change,
    the diff engine's TreeChange), not only pairs."""
    from layerfs.drivers.base import Change
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    out = tmp_path / "c.tar"
    create_layer(src, out, changes=[Change("/etc/hosts", "modified"), Change("/gone", "deleted")])
    import tarfile
    with tarfile.open(out) as tf:
        names = tf.getnames()
    assert "etc/hosts" in names and ".wh.gone" in names


@pytest.mark.parametrize("whiteouts", ["apply", "overlay", "keep"])
def test_directory_times_stay_with_their_directory(tmp_path, whiteouts):
    """Directory times are set at the end; a directory recorded under d/a whose
    parent d was later replaced by a symlink to a must not lend its times to a/a
    (regression: found by the stacked-layers property)."""
    t = Tar()
    t.dir(b"d/", mode=0o755, mtime=0)
    t.dir(b"d/a/", mode=0o755, mtime=1)
    t.dir(b"d/a/a/", mode=0o755, mtime=0)
    t.file(b"a", b"", mode=0o644, mtime=0)
    t.file(b"a", b"", mode=0o644, mtime=0)
    t.dir(b"a/", mode=0o755, mtime=0)
    t.dir(b"a/a/", mode=0o755, mtime=0)
    t.symlink(b"d", b"a", mtime=0)
    src = tmp_path / "l.tar"
    src.write_bytes(t.bytes())
    dest = tmp_path / "root"
    apply_layer(src, dest, whiteouts=whiteouts)
    assert os.path.islink(dest / "d")
    assert os.lstat(dest / "a" / "a").st_mtime_ns == 0
    assert os.lstat(dest / "a").st_mtime_ns == 0


# ------------------------------------------------- file objects without an fd

class _Failing(io.RawIOBase):
    """A stream whose read or write fails after some bytes."""

    def __init__(self, data: bytes = b"", after: int = 0):
        self.data, self.after, self.done = data, after, 0

    def readable(self):
        return True

    def writable(self):
        return True

    def readinto(self, b):
        if self.done >= self.after:
            raise OSError(5, "source went away")
        n = min(len(b), self.after - self.done, len(self.data) - self.done)
        b[:n] = self.data[self.done:self.done + n]
        self.done += n
        return n

    def write(self, b):
        if self.done >= self.after:
            raise OSError(28, "sink is full")
        self.done += len(b)
        return len(b)


def test_create_into_a_file_object_matches_a_file(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(50):
        (src / f"f{i}").write_bytes(os.urandom(3000 + i))
    for comp in ("none", "gzip", "zstd"):
        buf = io.BytesIO()
        a = create_layer(src, buf, compression=comp, source_date_epoch=0)
        b = create_layer(src, tmp_path / f"l.{comp}", compression=comp, source_date_epoch=0)
        assert buf.getvalue() == (tmp_path / f"l.{comp}").read_bytes()
        assert a.digest == b.digest == "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()


def test_error_of_a_source_object_is_raised_and_nothing_is_left(tmp_path):
    blob = sample_layer()[0]
    dest = tmp_path / "d"
    with pytest.raises(OSError) as ei:
        apply_layer(io.BufferedReader(_Failing(blob, after=len(blob) // 2)), dest)
    assert "source went away" in str(ei.value)       # the cause, not the truncation it made
    assert not dest.exists()
    assert os.listdir(tmp_path) == []


def test_error_of_an_output_object_is_raised(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(4 << 20))
    with pytest.raises(OSError) as ei:
        create_layer(src, _Failing(after=1 << 20))
    assert "sink is full" in str(ei.value)
