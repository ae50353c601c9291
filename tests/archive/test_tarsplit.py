"""tar-split records (csrc/tarsplit.c, layerfs.archive.tarsplit).

A layer applied with a record must come back byte for byte: for archives
written by GNU tar, bsdtar, Python tarfile and our own writer, plain or
compressed, applied as the three drivers keep layers (vfs: the full tree with
whiteouts applied; overlay: an upper dir with char 0:0 whiteouts; aufs: .wh.
files kept), reassemble(record, root) must give the very stream whose sha256
apply reported as the DiffID.  Layers that defeat the tree -- a path written
twice, content deleted or replaced later in the same layer, data that went
nowhere, files reached through symlinks -- must still come back.  A tree
changed afterwards, or a damaged record, is an error that says what is wrong.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest
from hypothesis import given, settings, strategies as st

from layerfs import _native
from layerfs.archive import apply_layer, create_layer
from layerfs.archive.tarsplit import reassemble, record_info
from layerfs.errors import LayerError

from .tarbuild import Tar, end, gzip_bytes, header, zstd_bytes

T0 = 1_600_000_000
BLOCK = 512


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("tar-split tests run as root (owners, devices, trusted xattrs)")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ trees

def make_tree(root: Path, *, long_names: bool = True, devices: bool = True,
              xattrs: bool = True, sparse: bool = True, fifo: bool = True) -> Path:
    """A small rootfs-like tree with every kind of entry the formats carry."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc/hostname").write_bytes(b"layer\n")
    (root / "etc/empty").write_bytes(b"")
    for n in (1, 511, 512, 513, 1024, 4097):
        (root / f"etc/size{n}").write_bytes(bytes((i * 7 + n) & 0xff for i in range(n)))
    (root / "usr/bin").mkdir(parents=True)
    big = os.urandom(1 << 20) + b"tail" * 1000
    (root / "usr/bin/big").write_bytes(big)
    os.chmod(root / "usr/bin/big", 0o4755)
    os.link(root / "usr/bin/big", root / "usr/bin/big-link")
    os.symlink("big", root / "usr/bin/link-to-big")
    os.symlink("/nonexistent/target", root / "usr/dangling")
    (root / "usr/secret").write_bytes(b"no permissions at all")
    os.chmod(root / "usr/secret", 0)
    (root / "usr/utf8-é-名前").write_bytes("unicode name".encode())
    if fifo:
        os.mkfifo(root / "usr/fifo")
    os.chown(root / "etc/hostname", 1000, 1001)
    if long_names:
        deep = root / "usr/share" / ("d" * 90) / ("e" * 90)
        deep.mkdir(parents=True)
        (deep / ("f" * 120)).write_bytes(b"long name content\n" * 100)
        os.symlink("x" * 150, deep / "long-symlink")
        os.link(deep / ("f" * 120), root / "usr/share/hardlink-to-long")
    if devices:
        (root / "dev").mkdir()
        os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "dev/loop0", 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    if xattrs:
        os.setxattr(root / "usr/bin/big", "user.comment", b"hello xattr")
        os.setxattr(root / "etc", "user.dir", b"\x00\x01binary")
        os.setxattr(root / "etc/hostname", "trusted.t", b"v" * 300)
    if sparse:
        with open(root / "usr/sparse", "wb") as f:
            f.truncate(8 << 20)
            f.seek(1 << 20)
            f.write(b"data in the middle" * 300)
            f.seek((8 << 20) - 4096)
            f.write(b"e" * 4096)
        with open(root / "usr/sparse-hole-end", "wb") as f:
            f.write(b"start" * 1000)
            f.truncate(3 << 20)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), (T0, T0), follow_symlinks=False)
    os.utime(root, (T0, T0))
    return root


def run(cmd, **kw) -> bytes:
    p = subprocess.run(cmd, capture_output=True, check=False, **kw)
    assert p.returncode == 0, (cmd, p.stderr.decode(errors="replace"))
    return p.stdout


def gnu_tar(*flags: str, xattrs: bool = False) -> Callable[[Path], bytes]:
    def make(src: Path) -> bytes:
        x = ["--xattrs", "--xattrs-include=*"] if xattrs else []
        return run(["tar", *flags, *x, "--numeric-owner", "-C", str(src), "-cf", "-", "."])
    return make


def bsd_tar(*flags: str) -> Callable[[Path], bytes]:
    def make(src: Path) -> bytes:
        return run(["bsdtar", *flags, "--numeric-owner", "-C", str(src), "-cf", "-", "."])
    return make


def py_tar(fmt: int) -> Callable[[Path], bytes]:
    def make(src: Path) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            t.add(str(src), arcname=".")
        return buf.getvalue()
    return make


def ours(**kw) -> Callable[[Path], bytes]:
    def make(src: Path) -> bytes:
        out = src.parent / (src.name + ".ours.tar")
        create_layer(src, out, **kw)
        return out.read_bytes()
    return make


# name -> (producer, tree options)
PRODUCERS: Dict[str, tuple] = {
    "gnutar-gnu": (gnu_tar("--format=gnu"), {"xattrs": False, "sparse": False}),
    "gnutar-gnu-sparse": (gnu_tar("--format=gnu", "--sparse"), {"xattrs": False}),
    "gnutar-oldgnu-sparse": (gnu_tar("--format=oldgnu", "--sparse"), {"xattrs": False}),
    "gnutar-posix-xattrs": (gnu_tar("--format=posix", xattrs=True), {"sparse": False}),
    "gnutar-posix-sparse-0.0": (gnu_tar("--format=posix", "--sparse", "--sparse-version=0.0"), {}),
    "gnutar-posix-sparse-0.1": (gnu_tar("--format=posix", "--sparse", "--sparse-version=0.1"), {}),
    "gnutar-posix-sparse-1.0": (gnu_tar("--format=posix", "--sparse", "--sparse-version=1.0",
                                        xattrs=True), {}),
    "gnutar-ustar": (gnu_tar("--format=ustar"), {"long_names": False, "xattrs": False}),
    "gnutar-v7": (gnu_tar("--format=v7"), {"long_names": False, "xattrs": False,
                                           "devices": False, "fifo": False}),
    "tarfile-gnu": (py_tar(tarfile.GNU_FORMAT), {"xattrs": False}),
    "tarfile-pax": (py_tar(tarfile.PAX_FORMAT), {"xattrs": False}),
    "tarfile-ustar": (py_tar(tarfile.USTAR_FORMAT), {"long_names": False, "xattrs": False}),
    "bsdtar-default": (bsd_tar(), {}),
    "bsdtar-pax": (bsd_tar("--format=pax"), {}),
    "bsdtar-gnutar": (bsd_tar("--format=gnutar"), {"xattrs": False}),
    "bsdtar-ustar": (bsd_tar("--format=ustar"), {"long_names": False, "xattrs": False}),
    "create_layer": (ours(), {}),
    "create_layer-sparse": (ours(sparse=True), {}),
}

# layout -> (whiteout mode, lower tree under the layer)
LAYOUTS = {"vfs": ("apply", True), "overlay": ("overlay", False), "aufs": ("keep", False)}


def lower_tree(root: Path) -> None:
    """What a parent layer left in a vfs directory: overlapping and separate paths."""
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_bytes(b"old hostname, longer than the new one\n")
    (root / "etc/lower-only").write_bytes(b"from below")
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/big").write_bytes(b"old big")
    (root / "var/lib/x").mkdir(parents=True)
    (root / "var/lib/x/file").write_bytes(b"lower file")


def roundtrip(tmp: Path, data: bytes, *, mode: str = "overlay", lower: bool = False,
              layer_bytes: Optional[bytes] = None, name: str = "layer", **options):
    """Apply (layer_bytes or data) with a record; reassemble; check byte for byte.
    Returns (apply result, root, record path)."""
    root = tmp / f"{name}-root"
    root.mkdir()
    if lower:
        lower_tree(root)
    blob = tmp / f"{name}.blob"
    blob.write_bytes(layer_bytes if layer_bytes is not None else data)
    rec = tmp / f"{name}.tsr"
    res = apply_layer(blob, root, whiteouts=mode, record=rec, **options)
    assert res.diff_id == sha(data)
    out = tmp / f"{name}.out.tar"
    d = reassemble(rec, root, out)
    rebuilt = out.read_bytes()
    assert len(rebuilt) == len(data)
    assert rebuilt == data
    assert d.diff_id == res.diff_id == d.digest
    assert d.tar_size == len(data)
    info = record_info(rec)
    assert info.diff_id == res.diff_id and info.tar_size == len(data)
    assert info.record_size == rec.stat().st_size
    return res, root, rec


# ------------------------------------------------------------ producers

@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_roundtrip_producers(tmp_path, producer, layout):
    make, tree_opts = PRODUCERS[producer]
    src = make_tree(tmp_path / "src", **tree_opts)
    data = make(src)
    mode, lower = LAYOUTS[layout]
    res, root, rec = roundtrip(tmp_path, data, mode=mode, lower=lower)
    info = record_info(rec)
    assert info.files > 5
    # the record holds headers, not content: far smaller than the stream
    assert info.record_size < len(data) // 20
    # and it reads the content from the tree: take the tree away and it fails
    shutil.rmtree(root / "usr/bin")
    with pytest.raises(LayerError) as ei:
        reassemble(rec, root)
    assert ei.value.errno == errno.ESTALE


@pytest.mark.parametrize("compression", ["gzip", "zstd", "pigz", "zstd-cli"])
def test_compressed_layers(tmp_path, compression):
    src = make_tree(tmp_path / "src")
    data = gnu_tar("--format=posix", "--sparse", xattrs=True)(src)
    if compression == "gzip":
        blob = gzip_bytes(data)
    elif compression == "zstd":
        blob = zstd_bytes(data)
    elif compression == "pigz":
        blob = run(["pigz", "-c"], input=data)
    else:
        blob = run(["zstd", "-c", "-q"], input=data)
    for mode in ("apply", "overlay", "keep"):
        res, _, _ = roundtrip(tmp_path, data, mode=mode, layer_bytes=blob, name=mode)
        assert res.compression == ("gzip" if compression in ("gzip", "pigz") else "zstd")
        assert res.digest == sha(blob)


@pytest.mark.parametrize("threads", [1, 2])
def test_create_layer_compressed_and_threads(tmp_path, threads):
    src = make_tree(tmp_path / "src")
    for comp in ("none", "gzip", "zstd"):
        out = tmp_path / f"l.{comp}"
        c = create_layer(src, out, compression=comp, sparse=True)
        plain = tmp_path / f"l.{comp}.tar"
        plain.write_bytes(gzip.decompress(out.read_bytes()) if comp == "gzip"
                          else zstd_decompress(out.read_bytes()) if comp == "zstd"
                          else out.read_bytes())
        assert sha(plain.read_bytes()) == c.diff_id
        roundtrip(tmp_path, plain.read_bytes(), layer_bytes=out.read_bytes(), name=comp,
                  threads=threads)


def zstd_decompress(b: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().decompressobj().decompress(b)


# ------------------------------------------------- end of archive and after

END_VARIANTS = {
    "two-blocks": lambda body: body + end(),
    "one-block": lambda body: body + b"\0" * BLOCK,
    "no-end": lambda body: body,
    "blocking-factor-20": lambda body: body + b"\0" * (-len(body) % (20 * BLOCK) or 20 * BLOCK),
    "garbage-after-end": lambda body: body + end() + b"trailing garbage \xff\x00 after the end",
    "zeros-and-garbage": lambda body: body + end() + b"\0" * 5000 + os.urandom(3000),
    "partial-second-block": lambda body: body + b"\0" * (BLOCK + 100),
}


@pytest.mark.parametrize("variant", sorted(END_VARIANTS))
@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_end_of_archive_variants(tmp_path, variant, mode):
    t = Tar().dir("a/").file("a/f", b"x" * 1000).file("a/g", b"y" * 512).symlink("a/l", "f")
    data = END_VARIANTS[variant](t.bytes(trailer=False))
    roundtrip(tmp_path, data, mode=mode)


def test_empty_archives(tmp_path):
    for i, data in enumerate([b"", end(), b"\0" * BLOCK, end() + b"junk"]):
        roundtrip(tmp_path, data, name=f"e{i}")


# --------------------------------------- content the tree cannot give back

def tricky_layer() -> bytes:
    t = Tar()
    t.dir("a/").file("a/f", b"first version " * 100).file("a/f", b"second version")
    t.dir("a/d/").file("a/d/x", b"x" * 5000).dir("a/d/sub/").file("a/d/sub/y", b"y" * 700)
    t.file("a/d", b"a/d is now a file")                       # directory with content replaced
    t.file("a/g", b"g content").hardlink("a/h", "a/g").file("a/g", b"new g")   # a/h keeps old g
    t.file("z", b"z content").symlink("z", "a")                # file replaced by a symlink
    t.file("q", b"q content").dir("q/")                        # file replaced by a directory
    t.file("q/inside", b"inside q")
    t.file("r", b"r1").file("r", b"r2").file("r", b"r3")        # three times
    t.file("s/t", b"t content").char("s/t", 1, 3)               # file replaced by a device
    t.file("u", b"u content").fifo("u")
    return t.bytes()


@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_paths_written_twice(tmp_path, mode):
    data = tricky_layer()
    res, root, rec = roundtrip(tmp_path, data, mode=mode)
    info = record_info(rec)
    # a/f, a/d/x, a/d/sub/y, a/g, z, q, r (twice), s/t, u: content gone from the tree
    assert info.captured == 10
    assert (root / "a/f").read_bytes() == b"second version"
    assert (root / "a/h").read_bytes() == b"g content"


def test_paths_written_twice_over_lower(tmp_path):
    roundtrip(tmp_path, tricky_layer(), mode="apply", lower=True)


def test_symlinked_parents(tmp_path):
    """Content written through a symlinked directory is kept in the record: the
    symlink is replaced later, so the path would lead elsewhere."""
    t = Tar().dir("real/").symlink("link", "real").file("link/f", b"through the link" * 50)
    t.symlink("abs", "/real").file("abs/g", b"absolute link" * 10)
    t.file("link", b"link is now a file").dir("abs/")
    for mode in ("apply", "overlay", "keep"):
        res, root, rec = roundtrip(tmp_path, t.bytes(), mode=mode, name=mode)
        assert (root / "real/f").read_bytes() == b"through the link" * 50
        assert record_info(rec).kept_bytes > 800


def test_whiteouts_of_the_same_layer(tmp_path):
    """Whiteouts and opaque markers next to content of their own layer (OCI says
    they should not be there; nothing of the stream may be lost if they are)."""
    t = Tar().dir("a/").file("a/f", b"f" * 3000).whiteout("a/f")
    t.dir("b/").file("b/keep", b"keep").opaque("b").file("b/after", b"after")
    t.dir("c/").file("c/x", b"x" * 100).whiteout("c").file("c2", b"c2")
    t.file(".wh.top", b"").dir("d/").opaque("d")
    for mode in ("apply", "overlay", "keep"):
        roundtrip(tmp_path, t.bytes(), mode=mode, name=mode)
        roundtrip(tmp_path, t.bytes(), mode=mode, lower=True, name=mode + "-lower")


def test_whiteouts_over_a_lower_tree(tmp_path):
    """vfs: whiteouts remove lower content, an opaque directory is emptied."""
    t = Tar().dir("etc/").file("etc/new", b"new file").whiteout("etc/lower-only")
    t.dir("var/").whiteout("var/lib").dir("usr/").opaque("usr").file("usr/fresh", b"fresh")
    res, root, rec = roundtrip(tmp_path, t.bytes(), mode="apply", lower=True)
    assert not (root / "etc/lower-only").exists() and not (root / "var/lib").exists()
    assert sorted(os.listdir(root / "usr")) == ["fresh"]
    assert record_info(rec).captured == 0


def test_data_that_goes_nowhere(tmp_path):
    """Whiteout entries with data, devices not made, AUFS metadata, hardlinks and
    symlinks with data: all kept in the record."""
    t = Tar().dir("a/").entry("a/.wh.gone", b"0", b"whiteout with data" * 40)
    t.entry(".wh..wh..opq", b"0", b"opaque marker with data")
    t.dir(".wh..wh.plnk/").file(".wh..wh.plnk/123.456", b"aufs hardlink store" * 20)
    t.file(".wh..wh.aufs", b"aufs meta")
    t.char("dev-null", 1, 3).block("dev-loop", 7, 0)
    t.file("plain", b"plain")
    data = t.bytes()
    for mode in ("apply", "overlay", "keep"):
        roundtrip(tmp_path, data, mode=mode, name=mode)
        roundtrip(tmp_path, data, mode=mode, name=mode + "-nodev", skip_devices=True)


def test_layer_with_whiteouts_from_create_layer(tmp_path):
    """An overlay upper dir written as a layer by our writer (whiteouts, opaque dir),
    applied in each layout."""
    upper = tmp_path / "upper"
    make_tree(upper, devices=False, long_names=False)
    os.mknod(upper / "etc/removed", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.setxattr(upper / "usr", "trusted.overlay.opaque", b"y")
    out = tmp_path / "wh.tar"
    create_layer(upper, out, source_format="overlay")
    data = out.read_bytes()
    assert b".wh.removed" in data and b".wh..wh..opq" in data
    for layout, (mode, lower) in LAYOUTS.items():
        roundtrip(tmp_path, data, mode=mode, lower=lower, name=layout)


def test_long_names_gnu_and_pax_records(tmp_path):
    """GNU 'L'/'K' records (also repeated), PAX path/linkpath, global headers."""
    name = "n" * 150 + "/" + "m" * 120
    t = Tar(long="gnu").dir("n" * 150 + "/").file(name, b"gnu long").symlink("s" * 120, "t" * 200)
    t.raw(header("pax_global_header", typeflag=b"g", size=20)).raw(b"17 comment=hello\n".ljust(512, b"\0"))
    t2 = Tar(long="pax").file("p" * 200, b"pax long", pax={"mtime": "1600000000.123456789"})
    t2.hardlink("h" * 130, "p" * 200)
    data = t.bytes(trailer=False) + t2.bytes()
    for mode in ("apply", "overlay", "keep"):
        roundtrip(tmp_path, data, mode=mode, name=mode)


# ------------------------------------------------------------ errors

@pytest.fixture
def applied(tmp_path):
    src = make_tree(tmp_path / "src", devices=False)
    data = gnu_tar("--format=posix", "--sparse")(src)
    _, root, rec = roundtrip(tmp_path, data, mode="overlay")
    return root, rec, data


@pytest.mark.parametrize("change", ["same-size", "longer", "shorter", "removed", "symlink",
                                    "directory", "sparse-same-size"])
def test_changed_tree_names_the_file(tmp_path, applied, change):
    root, rec, _ = applied
    target = "usr/sparse" if change == "sparse-same-size" else "usr/utf8-é-名前"
    p = root / target
    if change in ("same-size", "sparse-same-size"):
        st0 = p.stat()
        with open(p, "r+b") as f:
            f.seek(1 << 20 if change == "sparse-same-size" else 3)
            f.write(b"X")
        os.utime(p, ns=(st0.st_atime_ns, st0.st_mtime_ns))   # even with the old mtime
    elif change == "longer":
        with open(p, "ab") as f:
            f.write(b"more")
    elif change == "shorter":
        os.truncate(p, 2)
    elif change == "removed":
        p.unlink()
    elif change == "symlink":
        p.unlink()
        os.symlink("etc/hostname", p)
    else:
        p.unlink()
        p.mkdir()
    out = tmp_path / "out.tar"
    with pytest.raises(LayerError) as ei:
        reassemble(rec, root, out)
    assert ei.value.errno == errno.ESTALE
    assert ei.value.filename == target
    assert target in str(ei.value)
    assert not out.exists()                 # a path output only appears on success
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tar")]


def test_symlinked_parent_in_tree_stays_in_root(tmp_path, applied):
    """A directory replaced by a symlink to outside: resolution stays in the root."""
    root, rec, _ = applied
    outside = tmp_path / "outside"
    run(["cp", "-a", str(root / "usr"), str(outside)])
    shutil.rmtree(root / "usr")
    os.symlink(str(outside), root / "usr")
    with pytest.raises(LayerError) as ei:
        reassemble(rec, root)
    assert ei.value.errno == errno.ESTALE


def test_truncated_record(tmp_path, applied):
    root, rec, _ = applied
    full = rec.read_bytes()
    for n in sorted({0, 1, 15, 16, 17, 100, len(full) // 2, len(full) - 129, len(full) - 128,
                     len(full) - 1}):
        bad = tmp_path / f"trunc{n}"
        bad.write_bytes(full[:n])
        with pytest.raises(LayerError) as ei:
            reassemble(bad, root)
        assert ei.value.errno == errno.EBADMSG, n
        assert ei.value.filename == str(bad)


def test_corrupted_record(tmp_path, applied):
    root, rec, _ = applied
    full = bytearray(rec.read_bytes())
    for pos in sorted({0, 8, 16, 20, len(full) // 3, len(full) // 2, len(full) - 140,
                       len(full) - 100, len(full) - 60, len(full) - 3}):
        bad = bytearray(full)
        bad[pos] ^= 0x41
        p = tmp_path / f"flip{pos}"
        p.write_bytes(bad)
        with pytest.raises(LayerError) as ei:
            reassemble(p, root, tmp_path / "out.tar")
        assert ei.value.errno in (errno.EBADMSG, errno.ENOTSUP, errno.EILSEQ), pos
        assert not (tmp_path / "out.tar").exists()
    p = tmp_path / "not-a-record"
    p.write_bytes(b"\0" * 4096)
    with pytest.raises(LayerError) as ei:
        record_info(p)
    assert ei.value.errno == errno.EBADMSG


def test_record_for_another_tree(tmp_path, applied):
    """A record applied to a tree whose files have the right sizes but other
    content: caught per file."""
    root, rec, data = applied
    other = tmp_path / "other"
    run(["cp", "-a", str(root), str(other)])
    p = other / "etc/size4097"
    b = bytearray(p.read_bytes())
    b[-1] ^= 1
    p.write_bytes(b)
    with pytest.raises(LayerError) as ei:
        reassemble(rec, other)
    assert ei.value.errno == errno.ESTALE and ei.value.filename == "etc/size4097"


def test_apply_failure_leaves_no_record(tmp_path):
    t = Tar().file("ok", b"fine").hardlink("bad", "missing-target")
    blob = tmp_path / "bad.tar"
    blob.write_bytes(t.bytes())
    rec = tmp_path / "rec"
    with pytest.raises(LayerError):
        apply_layer(blob, tmp_path / "root", record=rec)
    assert not rec.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".rec")]


def test_digest_mismatch_leaves_no_record(tmp_path):
    blob = tmp_path / "l.tar"
    blob.write_bytes(Tar().file("f", b"x").bytes())
    rec = tmp_path / "rec"
    with pytest.raises(LayerError):
        apply_layer(blob, tmp_path / "root", record=rec, expected_diff_id="sha256:" + "0" * 64)
    assert not rec.exists()


# ------------------------------------------------------------ API shapes

def test_file_objects_and_check_only(tmp_path):
    src = make_tree(tmp_path / "src", devices=False)
    data = gnu_tar("--format=gnu", "--sparse")(src)
    blob = tmp_path / "l.tar"
    blob.write_bytes(data)
    root = tmp_path / "root"
    with open(tmp_path / "rec", "wb") as rf:
        rf.write(b"prefix before the record")
        rf.flush()
        res = apply_layer(blob, root, record=rf)
    # a record that starts inside a file: read from the file object's position
    with open(tmp_path / "rec", "rb") as rf:
        rf.seek(len(b"prefix before the record"))
        out = io.BytesIO()
        d = reassemble(rf, root, out)
        assert rf.tell() == len(b"prefix before the record")
    assert out.getvalue() == data and d.diff_id == res.diff_id
    # a record given as a stream without a file descriptor (spooled)
    raw = (tmp_path / "rec").read_bytes()[len(b"prefix before the record"):]
    assert reassemble(io.BytesIO(raw), root).diff_id == res.diff_id
    # record written to a stream without a file descriptor
    sink = io.BytesIO()
    root2 = tmp_path / "root2"
    apply_layer(blob, root2, record=sink)
    assert reassemble(io.BytesIO(sink.getvalue()), root2).diff_id == res.diff_id
    # output into a pipe (as a push would stream it)
    r, w = os.pipe()
    chunks = []
    import threading

    def reader():
        while True:
            b = os.read(r, 1 << 20)
            if not b:
                break
            chunks.append(b)
    th = threading.Thread(target=reader)
    th.start()
    with os.fdopen(w, "wb") as wf:
        reassemble(io.BytesIO(raw), root, wf)
    th.join()
    os.close(r)
    assert b"".join(chunks) == data


def test_native_apply_without_record_is_unchanged(tmp_path):
    """record_fd unset: no record, record_size 0 (existing callers)."""
    blob = tmp_path / "l.tar"
    blob.write_bytes(Tar().file("f", b"x").bytes())
    root = tmp_path / "root"
    root.mkdir()
    fd = os.open(blob, os.O_RDONLY)
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        r = _native.apply(fd, rfd)
    finally:
        os.close(fd)
        os.close(rfd)
    assert r.record_size == 0


def test_record_needs_a_regular_file(tmp_path, applied):
    root, rec, _ = applied
    r, w = os.pipe()
    rfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(LayerError) as ei:
            _native.reassemble(r, rfd, -1)
        assert ei.value.errno == errno.EINVAL
    finally:
        for fd in (r, w, rfd):
            os.close(fd)


# ------------------------------------------------------------ property

NAMES = st.sampled_from(["a", "b", "a/x", "a/y", "b/x", "a/x/deep", "c", "l", "l/x"])


@st.composite
def layers(draw):
    """Random entry sequences over a small name space: rewrites, type changes,
    hardlinks, symlinks over directories, whiteouts and opaque markers.  A small
    model keeps most of them valid: parents are made directories first (unless
    they are symlinks, to write through them) and hardlinks point at files."""
    t = Tar()
    kinds: Dict[str, str] = {}

    def forget(name):
        for k in [k for k in kinds if k == name or k.startswith(name + "/")]:
            del kinds[k]

    def parents(name):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if kinds.get(p) == "symlink":
                return
            if kinds.get(p) != "dir":
                forget(p)
                t.dir(p + "/")
                kinds[p] = "dir"

    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink",
                                     "whiteout", "opaque", "fifo"]))
        name = draw(NAMES)
        parents(name)
        if kind == "file":
            size = draw(st.sampled_from([0, 1, 100, 512, 513, 3000]))
            t.file(name, bytes([draw(st.integers(0, 255))]) * size)
            forget(name)
            kinds[name] = "file"
        elif kind == "dir":
            t.dir(name + "/")
            if kinds.get(name) != "dir":
                forget(name)
            kinds[name] = "dir"
        elif kind == "symlink":
            t.symlink(name, draw(st.sampled_from(["a", "b", "/a", "../b", "nowhere"])))
            forget(name)
            kinds[name] = "symlink"
        elif kind == "hardlink":
            files = sorted(k for k, v in kinds.items() if v == "file" and k != name)
            if not files:
                continue
            t.hardlink(name, draw(st.sampled_from(files)))
            forget(name)
            kinds[name] = "file"
        elif kind == "whiteout":
            t.whiteout(name)
            forget(name)
        elif kind == "opaque":
            t.opaque(name)
        else:
            t.fifo(name)
            forget(name)
            kinds[name] = "fifo"
    return t.bytes() + draw(st.sampled_from([b"", b"\0" * 3000, b"junk"]))


@settings(max_examples=150, deadline=None)
@given(data=layers(), mode=st.sampled_from(["apply", "overlay", "keep"]),
       lower=st.booleans())
def test_property_any_layer_comes_back(tmp_path_factory, data, mode, lower):
    tmp = tmp_path_factory.mktemp("prop")
    root = tmp / "root"
    root.mkdir()
    if lower:
        lower_tree(root)
        (root / "a").mkdir()
        (root / "a/lower").write_bytes(b"lower content")
    blob = tmp / "l.tar"
    blob.write_bytes(data)
    rec = tmp / "rec"
    try:
        res = apply_layer(blob, root, whiteouts=mode, record=rec)
    except LayerError:
        assert not rec.exists()
        return                               # a layer lfs_apply refuses (e.g. dangling hardlink)
    out = tmp / "out.tar"
    reassemble(rec, root, out)
    assert out.read_bytes() == data
    assert res.diff_id == sha(data)


# ------------------------------------------------------------ drivers

@pytest.mark.parametrize("driver", ["vfs", "overlay", "aufs"])
def test_driver_layer_directories(tmp_path, driver):
    """Records taken by the drivers' apply_diff rebuild each layer from the layer
    directory the driver keeps (vfs: the full tree; overlay: the upper dir with
    char 0:0 whiteouts; aufs: .wh. files kept)."""
    from layerfs import drivers
    cls = drivers.driver_class(driver)
    store = tmp_path / "store"
    store.mkdir()
    support = cls.supported(str(store))
    if not support.ok:
        pytest.skip(support.reason)
    base = tmp_path / "base-src"
    make_tree(base)
    base_tar = gnu_tar("--format=posix", "--sparse", xattrs=True)(base)
    child = Tar().dir("etc/").file("etc/hostname", b"child\n").whiteout("usr/bin/big-link")
    child.dir("usr/").opaque("usr/share").file("usr/share/new", b"new in child")
    child.file("etc/hostname", b"child, rewritten\n").whiteout("usr/fifo")
    child_tar = child.bytes()
    with cls(str(store)) as d:
        d.create("base")
        (tmp_path / "base.tar").write_bytes(base_tar)
        d.apply_diff("base", str(tmp_path / "base.tar"), record=str(tmp_path / "base.tsr"))
        d.create("child", parent="base")
        (tmp_path / "child.tar").write_bytes(child_tar)
        d.apply_diff("child", str(tmp_path / "child.tar"), record=str(tmp_path / "child.tsr"))
        for name, data in (("base", base_tar), ("child", child_tar)):
            out = tmp_path / f"{name}.out"
            rd = reassemble(tmp_path / f"{name}.tsr", d.diff_dir(name), out)
            assert out.read_bytes() == data and rd.diff_id == sha(data)
