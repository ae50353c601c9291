"""The C tar parser (csrc/tar_read.c), seen through lfs_scan / _native.scan.

Archives come from the real writers (Python tarfile, GNU tar, bsdtar) and are
checked against what tarfile reports and against the files they were made
from; malformed archives are made by patching header bytes, and each error's
errno, entry name and header offset is checked.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import stat
import subprocess
import tarfile
import urllib.parse
from decimal import Decimal

import pytest

from layerfs import _native
from layerfs.errors import LayerError

BLOCK = 512
REG_TYPES = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE}
TYPE_CODES = {tarfile.LNKTYPE: "1", tarfile.SYMTYPE: "2", tarfile.CHRTYPE: "3",
              tarfile.BLKTYPE: "4", tarfile.DIRTYPE: "5", tarfile.FIFOTYPE: "6"}


# ---------------------------------------------------------------- helpers

def scan_path(path, hash=True):
    fd = os.open(path, os.O_RDONLY)
    try:
        return _native.scan(fd, hash=hash, name=os.fspath(path))
    finally:
        os.close(fd)


@pytest.fixture
def scan_bytes(tmp_path):
    counter = [0]

    def run(data: bytes, hash=True):
        counter[0] += 1
        p = tmp_path / f"archive{counter[0]}.tar"
        p.write_bytes(data)
        return scan_path(p, hash=hash)
    return run


@pytest.fixture
def scan_error(scan_bytes):
    def run(data: bytes) -> LayerError:
        with pytest.raises(LayerError) as ei:
            scan_bytes(data)
        return ei.value
    return run


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_sha(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def pax_time(value: str):
    d = Decimal(value)
    sec = int(d.to_integral_value(rounding="ROUND_FLOOR"))
    return sec, int((d - sec) * 1_000_000_000)


def tarfile_view(path):
    """What Python's tarfile reports, in the shape of ScanEntry fields."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf:
            typ = "0" if m.type in REG_TYPES else TYPE_CODES[m.type]
            if "mtime" in m.pax_headers:
                mtime = pax_time(m.pax_headers["mtime"])
            else:
                mtime = (int(m.mtime), 0)
            # libarchive writes each xattr as LIBARCHIVE.xattr.NAME and again as
            # SCHILY.xattr.NAME with the same URL-encoded NAME: that copy is not an xattr
            lib_names = {k[17:] for k in m.pax_headers if k.startswith("LIBARCHIVE.xattr.")}
            xattrs = {}
            for k, v in m.pax_headers.items():
                if k.startswith("SCHILY.xattr.") and k[13:] not in lib_names:
                    xattrs[k[13:]] = v.encode("utf-8", "surrogateescape")
                elif k.startswith("LIBARCHIVE.xattr."):
                    name = urllib.parse.unquote_to_bytes(k[17:]).decode("utf-8", "surrogateescape")
                    xattrs[name] = base64.b64decode(v + "=" * (-len(v) % 4))
            digest = sha(tf.extractfile(m).read()) if typ == "0" else None
            out.append(dict(
                path=m.name.rstrip("/"), type=typ, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
                size=m.size if typ == "0" else 0, mtime=mtime,
                linkname=m.linkname if typ in ("1", "2") else "",
                dev=(m.devmajor, m.devminor) if typ in ("3", "4") else (0, 0),
                xattrs=xattrs, digest=digest))
    return out


def scan_view(entries):
    return [dict(path=e.path.rstrip("/"), type=e.type, mode=e.mode, uid=e.uid, gid=e.gid,
                 size=e.size, mtime=(e.mtime_sec, e.mtime_nsec), linkname=e.linkname,
                 dev=(e.devmajor, e.devminor), xattrs=e.xattrs, digest=e.digest)
            for e in entries]


def assert_same_as_tarfile(path):
    entries, digests = scan_path(path)
    assert scan_view(entries) == tarfile_view(path)
    size = os.path.getsize(path)
    assert digests.tar_size == size and digests.diff_id == file_sha(path)
    return entries


def header_offsets(data: bytes):
    """Offsets of the headers tarfile walks through (incl. PAX/GNU extension headers)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return [(m.name, m.offset, m.offset_data) for m in tf]


def checksum(block: bytes, signed=False) -> int:
    b = block[:148] + b" " * 8 + block[156:BLOCK]
    if signed:
        return sum(c - 256 if c >= 128 else c for c in b)
    return sum(b)


def patch(data: bytes, hdr: int, field_off: int, value: bytes, fix=True, signed=False) -> bytes:
    buf = bytearray(data)
    buf[hdr + field_off:hdr + field_off + len(value)] = value
    if fix:
        s = checksum(bytes(buf[hdr:hdr + BLOCK]), signed)
        if s < 0:
            raise ValueError("negative checksum")
        buf[hdr + 148:hdr + 156] = b"%06o\0 " % s
    return bytes(buf)


def base256(value: int, length: int) -> bytes:
    raw = (value % (1 << (8 * length))).to_bytes(length, "big")
    return (b"\x80" + raw[1:]) if value >= 0 else raw


def make_tar(members, fmt=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    """members: (TarInfo, data or None)."""
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt, pax_headers=pax_headers) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return bio.getvalue()


def ti(name, type=tarfile.REGTYPE, **kw):
    info = tarfile.TarInfo(name)
    info.type = type
    info.mtime = kw.pop("mtime", 1_600_000_000)
    info.mode = kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def raw_pax_entry(records: bytes, name="f", data=b"hello", typeflag=b"0") -> bytes:
    """A ustar 'x' header with exactly these record bytes, then a file entry."""
    x = ti("PaxHeaders/" + name)
    x.type = tarfile.XHDTYPE
    x.size = len(records)
    xh = x.tobuf(tarfile.USTAR_FORMAT)
    f = ti(name)
    f.size = len(data)
    fh = f.tobuf(tarfile.USTAR_FORMAT)
    fh = patch(fh, 0, 156, typeflag)
    pad = lambda b: b + b"\0" * (-len(b) % BLOCK)  # noqa: E731
    return xh + pad(records) + fh + pad(data) + b"\0" * 1024


# --------------------------------------------------------------- Python tarfile

@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT],
                         ids=["ustar", "gnu", "pax"])
def test_tarfile_archives(tmp_path, fmt):
    content = os.urandom(3000)
    long_dir = "d" * 60 + "/" + "e" * 60
    members = [
        (ti("dir/", tarfile.DIRTYPE, mode=0o750), None),
        (ti("dir/file", uid=1000, gid=1001, mode=0o4755), content),
        (ti("dir/empty", mode=0o600), b""),
        (ti(long_dir + "/" + "f" * 90), b"x" * 513),              # > 100: ustar prefix/name
        (ti("dir/hard", tarfile.LNKTYPE, linkname="dir/file"), None),
        (ti("dir/sym", tarfile.SYMTYPE, linkname="../target", mode=0o777), None),
        (ti("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (ti("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), None),
        (ti("dev/big", tarfile.CHRTYPE, devmajor=4095, devminor=1048575), None),
        (ti("fifo", tarfile.FIFOTYPE, mode=0o1777), None),
    ]
    if fmt != tarfile.USTAR_FORMAT:
        members += [
            (ti("L" * 120 + "/" + "n" * 200), b"long"),                 # > 255 characters
            (ti("longlink", tarfile.SYMTYPE, linkname="t" * 300), None),
            (ti("hardlong", tarfile.LNKTYPE, linkname="L" * 120 + "/" + "n" * 200), None),
            (ti("biguid", uid=3_000_000_000, gid=2_500_000), b"ids"),
            (ti("oldtime", mtime=-1_000_000), b"past"),
        ]
    if fmt == tarfile.PAX_FORMAT:
        pax = {"SCHILY.xattr.user.text": "value",
               "SCHILY.xattr.user.bin": "\x00\x01\x00",
               "SCHILY.xattr.security.capability": "\x01\x00\x00\x02" + "\x00" * 16,
               "SCHILY.xattr.user.empty": ""}
        members += [
            (ti("xattrs", pax_headers=pax), b"x"),
            (ti("frac", mtime=1_600_000_000.25), b"f"),
            (ti("negfrac", mtime=-1.5), b"n"),
            (ti("caf\u00e9/\u00fcml\u00e4ut"), b"utf8"),
        ]
    path = tmp_path / "t.tar"
    path.write_bytes(make_tar(members, fmt))
    entries = assert_same_as_tarfile(path)
    by_path = {e.path: e for e in entries}

    assert [e.path for e in entries] == [m[0].name for m in members]
    f = by_path["dir/file"]
    assert (f.type, f.mode, f.uid, f.gid, f.size, f.digest) == ("0", 0o4755, 1000, 1001, 3000, sha(content))
    assert by_path["dir/"].type == "5" and by_path["dir/"].mode == 0o750
    assert by_path["dir/hard"].linkname == "dir/file" and by_path["dir/hard"].digest is None
    assert (by_path["dev/big"].devmajor, by_path["dev/big"].devminor) == (4095, 1048575)
    offsets = header_offsets(path.read_bytes())
    assert [e.header_offset for e in entries] == [off for _, off, _ in offsets]
    if fmt != tarfile.USTAR_FORMAT:
        assert by_path["longlink"].linkname == "t" * 300
        assert (by_path["biguid"].uid, by_path["biguid"].gid) == (3_000_000_000, 2_500_000)
        assert by_path["oldtime"].mtime_sec == -1_000_000
    if fmt == tarfile.PAX_FORMAT:
        x = by_path["xattrs"].xattrs
        assert x["user.bin"] == b"\x00\x01\x00" and x["user.empty"] == b""
        assert (by_path["frac"].mtime_sec, by_path["frac"].mtime_nsec) == (1_600_000_000, 250_000_000)
        assert (by_path["negfrac"].mtime_sec, by_path["negfrac"].mtime_nsec) == (-2, 500_000_000)


def test_pax_global_header_ignored_and_later_x_wins_over_gnu_long_name(scan_bytes):
    data = make_tar([(ti("a"), b"1"), (ti("b"), b"2")], tarfile.PAX_FORMAT,
                    pax_headers={"path": "global-name", "uid": "77"})
    entries, _ = scan_bytes(data)
    assert [(e.path, e.uid) for e in entries] == [("a", 0), ("b", 0)]

    # GNU 'L' long name followed by a PAX 'x' path: PAX wins, whatever the order.
    gnu = make_tar([(ti("G" * 150), b"data")], tarfile.GNU_FORMAT)
    pax = raw_pax_entry(pax_record(b"path", b"from-pax"), name="short")
    combined = gnu[:BLOCK * 2] + pax                      # 'L' + its name, then 'x' + entry
    entries, _ = scan_bytes(combined)
    assert [e.path for e in entries] == ["from-pax"]
    assert entries[0].header_offset == 0


def test_pax_empty_value_removes_key_and_size_overrides(scan_bytes):
    data = raw_pax_entry(pax_record(b"path", b"") + pax_record(b"mtime", b"") +
                         pax_record(b"uid", b"5"), name="header-name")
    (e,), _ = scan_bytes(data)
    assert (e.path, e.mtime_sec, e.uid) == ("header-name", 1_600_000_000, 5)

    # PAX size overrides a header size of 0
    payload = b"z" * 700
    recs = pax_record(b"size", b"700")
    x = ti("PaxHeaders/s", tarfile.XHDTYPE)
    x.size = len(recs)
    f = ti("s")
    f.size = 0
    blob = (x.tobuf(tarfile.USTAR_FORMAT) + recs + b"\0" * (BLOCK - len(recs)) +
            f.tobuf(tarfile.USTAR_FORMAT) + payload + b"\0" * (-len(payload) % BLOCK) + b"\0" * 1024)
    (e,), _ = scan_bytes(blob)
    assert (e.size, e.digest) == (700, sha(payload))


def test_libarchive_xattr_records(scan_bytes):
    value = bytes(range(256))
    name = "user.caf\u00e9 a=b%"
    key = "LIBARCHIVE.xattr." + urllib.parse.quote(name.encode(), safe="")
    recs = pax_record(key.encode(), base64.b64encode(value)) + \
        pax_record(b"LIBARCHIVE.xattr.user.nopad", base64.b64encode(b"ab").rstrip(b"="))
    (e,), _ = scan_bytes(raw_pax_entry(recs))
    assert e.xattrs == {name: value, "user.nopad": b"ab"}


def test_second_pax_header_replaces_the_first(scan_bytes):
    first = pax_record(b"path", b"one") + pax_record(b"uid", b"9")
    x = ti("PaxHeaders/1", tarfile.XHDTYPE)
    x.size = len(first)
    data = raw_pax_entry(pax_record(b"gid", b"4"), name="plain")
    data = x.tobuf(tarfile.USTAR_FORMAT) + first + b"\0" * (BLOCK - len(first)) + data
    (e,), _ = scan_bytes(data)
    assert (e.path, e.uid, e.gid, e.header_offset) == ("plain", 0, 4, 0)


def test_empty_archives_and_no_hash(scan_bytes):
    assert scan_bytes(b"")[0] == []
    assert scan_bytes(b"\0" * 10240)[0] == []
    entries, _ = scan_bytes(two_files(), hash=False)
    assert [(e.path, e.digest) for e in entries] == [("first", None), ("second", None)]


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_streams(tmp_path, compression):
    data = make_tar([(ti(f"f{i}"), os.urandom(i * 100)) for i in range(20)])
    raw = tmp_path / "t.tar"
    raw.write_bytes(data)
    comp = tmp_path / f"t.tar.{compression}"
    with open(comp, "wb") as out:
        subprocess.run([compression, "-c", raw], stdout=out, check=True)
    entries, digests = scan_path(comp)
    assert scan_view(entries) == tarfile_view(raw)
    assert (digests.compression, digests.diff_id, digests.digest) == \
        (compression, file_sha(raw), file_sha(comp))


def test_many_entries(tmp_path):
    n = 30000
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(n):
            info = ti(f"dir{i % 100}/file{i}", uid=i)
            data = b"%d" % i
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path = tmp_path / "many.tar"
    path.write_bytes(bio.getvalue())
    entries, _ = scan_path(path)
    assert len(entries) == n
    assert all(e.uid == i and e.digest == sha(b"%d" % i) for i, e in enumerate(entries))


def test_v7_regular_with_trailing_slash_is_directory(scan_bytes):
    data = make_tar([(ti("olddir/"), b"")], tarfile.USTAR_FORMAT)
    data = patch(data, 0, 156, b"\0")
    data = patch(data, 0, 257, b"\0" * 8)            # no magic: v7
    (e,), _ = scan_bytes(data)
    assert (e.path, e.type) == ("olddir/", "5")


# --------------------------------------------------------------------- GNU tar

def make_tree(root, fmt):
    os.makedirs(root / "d" / "sub")
    (root / "d" / "file").write_bytes(os.urandom(5000))
    (root / "d" / "empty").write_bytes(b"")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid", 0o4755)
    os.chmod(root / "d" / "sub", 0o1777)
    os.chown(root / "d" / "file", 1000, 1001)
    os.link(root / "d" / "file", root / "hardlink")
    os.symlink("d/file", root / "symlink")
    if fmt == "v7":
        deep = root / ("a" * 40) / ("b" * 40)
    elif fmt == "ustar":
        deep = root / ("a" * 90) / ("b" * 40)               # > 100, splits into prefix/name
    else:
        deep = root / ("a" * 150) / ("b" * 150) / ("c" * 100)
        os.symlink("t" * 200, root / "longtarget")
        (root / "biguid").write_bytes(b"big")
        os.chown(root / "biguid", 3_000_000, 4_000_000)
    os.makedirs(deep)
    (deep / "leaf").write_bytes(b"leaf")
    if fmt != "v7":
        os.mkfifo(root / "fifo")
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.utime(os.path.join(dirpath, n), ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321),
                     follow_symlinks=False)


def check_against_disk(entries, root, fmt):
    seen_inodes = {}
    for e in entries:
        p = os.path.normpath(os.path.join(root, e.path))
        st = os.lstat(p)
        assert e.mode == stat.S_IMODE(st.st_mode), e.path
        assert (e.uid, e.gid) == (st.st_uid, st.st_gid), e.path
        if fmt == "posix":
            assert e.mtime_sec * 10**9 + e.mtime_nsec == st.st_mtime_ns, e.path
        else:
            assert (e.mtime_sec, e.mtime_nsec) == (st.st_mtime_ns // 10**9, 0), e.path
        kind = {"0": stat.S_ISREG, "1": stat.S_ISREG, "2": stat.S_ISLNK, "3": stat.S_ISCHR,
                "4": stat.S_ISBLK, "5": stat.S_ISDIR, "6": stat.S_ISFIFO}[e.type]
        assert kind(st.st_mode), e.path
        if e.type == "0":
            assert (e.size, e.digest) == (st.st_size, file_sha(p)), e.path
            seen_inodes[st.st_ino] = p
        elif e.type == "1":
            assert os.lstat(os.path.join(root, e.linkname)).st_ino == st.st_ino
        elif e.type == "2":
            assert e.linkname == os.readlink(p)
        elif e.type in "34":
            assert (e.devmajor, e.devminor) == (os.major(st.st_rdev), os.minor(st.st_rdev))


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_gnu_tar_formats(tmp_path, fmt):
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root, fmt)
    archive = tmp_path / "t.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-C", root, "-cf", archive, "."],
                   check=True)
    entries = assert_same_as_tarfile(archive)
    check_against_disk(entries, root, fmt)
    types = {e.type for e in entries}
    assert {"0", "1", "2", "5"} <= types
    if fmt != "v7":
        assert {"3", "4", "6"} <= types
    if fmt not in ("v7", "ustar"):
        by_name = {os.path.normpath(e.path): e for e in entries}
        assert by_name["biguid"].uid == 3_000_000 and by_name["biguid"].gid == 4_000_000
        assert by_name["longtarget"].linkname == "t" * 200
        assert any(len(e.path) > 400 for e in entries)


def test_gnu_incremental_dumpdir_and_volume_label(tmp_path):
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"data")
    archive = tmp_path / "inc.tar"
    subprocess.run(["tar", "--format=gnu", "-g", tmp_path / "snap", "-V", "label", "-C", root,
                    "-cf", archive, "."], check=True)
    entries, _ = scan_path(archive)
    listing = subprocess.run(["tar", "-tf", archive], check=True, capture_output=True,
                             text=True).stdout.split("\n")
    # GNU tar lists the label first; every other name is an entry of ours
    assert [e.path for e in entries] == [n for n in listing if n][1:]
    dirs = [e for e in entries if e.path.endswith("/")]
    assert dirs and all(e.type == "5" and e.size == 0 for e in dirs)
    f = [e for e in entries if e.path == "./d/f"][0]
    assert f.digest == sha(b"data")


# ---------------------------------------------------------------------- sparse

def make_sparse(path, size, islands):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in islands:
            f.seek(off)
            f.write(data)


def data_extents(path):
    """[(offset, length)] of the data regions, by SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return out


SPARSE_MODES = [("posix", "0.0"), ("posix", "0.1"), ("posix", "1.0"), ("gnu", None)]


@pytest.mark.parametrize("fmt,version", SPARSE_MODES, ids=["0.0", "0.1", "1.0", "oldgnu"])
def test_gnu_tar_sparse(tmp_path, fmt, version):
    root = tmp_path / "tree"
    root.mkdir()
    make_sparse(root / "two", 10 << 20, [(1_000_000, b"hello"), (5_000_000, os.urandom(9000))])
    # 40 islands: more than the 4 + 21 descriptors of an old GNU header and its first extension
    make_sparse(root / "many", 40 * 65536, [(i * 65536 + 4096, os.urandom(100 + i)) for i in range(40)])
    make_sparse(root / "tail", 1 << 20, [((1 << 20) - 10, b"0123456789")])
    make_sparse(root / "hole", 3 << 20, [])
    extents = {n: data_extents(root / n) for n in ("two", "many", "tail", "hole")}
    assert len(extents["many"]) == 40, "the filesystem does not keep holes"
    archive = tmp_path / "s.tar"
    cmd = ["tar", f"--format={fmt}", "--sparse", "--sort=name", "-C", root, "-cf", archive, "."]
    if version:
        cmd.insert(3, f"--sparse-version={version}")
    subprocess.run(cmd, check=True)
    dense = tmp_path / "dense.tar"
    subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-C", root, "-cf", dense, "."], check=True)

    entries = assert_same_as_tarfile(archive)
    dense_entries, _ = scan_path(dense)
    with tarfile.open(archive) as tf:
        tf_sparse = {os.path.normpath(m.name): m.sparse for m in tf}
    by_name = {os.path.normpath(e.path): e for e in entries if e.type == "0"}
    dense_by_name = {os.path.normpath(e.path): e for e in dense_entries if e.type == "0"}
    for name, ext in extents.items():
        e = by_name[name]
        assert e.path.endswith(name)                      # not the ./GNUSparseFile.N/ name
        assert e.size == os.path.getsize(root / name)
        assert e.digest == file_sha(root / name) == dense_by_name[name].digest
        segs = [s for s in e.sparse if s[1]]
        assert segs == ext
        assert segs == [tuple(s) for s in tf_sparse[name] or () if s[1]]
        assert all(a[0] + a[1] <= b[0] for a, b in zip(e.sparse, e.sparse[1:]))
    check_against_disk(entries, root, "posix" if fmt == "posix" else fmt)


# ---------------------------------------------------------------------- bsdtar

def test_bsdtar_xattrs(tmp_path):
    root = tmp_path / "tree"
    (root / "d").mkdir(parents=True)
    f = root / "d" / "f"
    f.write_bytes(b"content")
    # "user.with%20space" is also a real name: libarchive encodes its '%' as %25
    attrs = {"user.plain": b"value", "user.bin": b"\x00\xff\x00", "user.with space": b"x",
             "user.with%20space": b"y", "user.caf\u00e9": "\u00e9".encode()}
    for k, v in attrs.items():
        os.setxattr(f, k, v)
    os.setxattr(root / "d", "user.dir", b"on a directory")
    archive = tmp_path / "x.tar"
    subprocess.run(["bsdtar", "--xattrs", "--format", "pax", "-C", root, "-cf", archive, "d"],
                   check=True)
    assert b"LIBARCHIVE.xattr.user.with%20space" in archive.read_bytes()
    entries = assert_same_as_tarfile(archive)
    for e in entries:
        p = root / e.path
        on_disk = {n: os.getxattr(p, n) for n in os.listxattr(p) if n.startswith("user.")}
        assert e.xattrs == on_disk
    assert {e.path.rstrip("/"): e.xattrs for e in entries}["d/f"] == attrs


# ------------------------------------------------------------------- malformed

def two_files():
    return make_tar([(ti("first"), b"0123456789"), (ti("second"), b"abc")], tarfile.USTAR_FORMAT)


def test_bad_checksum(scan_error):
    data = bytearray(two_files())
    data[1024:1030] = b"broken"                                   # second header, no checksum fix
    e = scan_error(bytes(data))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "broken", 1024)
    assert "bad header checksum" in e.strerror


def test_signed_checksum_accepted(scan_bytes):
    name = "caf\u00e9-\u00e8\u00ea"
    data = make_tar([(ti(name), b"x")], tarfile.USTAR_FORMAT)
    header = data[:BLOCK]
    assert checksum(header, signed=True) != checksum(header)
    data = patch(data, 0, 0, b"", signed=True)
    assert int(data[148:154], 8) == checksum(header, signed=True)
    (e,), _ = scan_bytes(data)
    assert e.path == name
    data = patch(data, 0, 0, b"")                                 # back to the unsigned sum
    (e,), _ = scan_bytes(data)
    assert e.path == name


def test_negative_and_overflowing_base256_size(scan_error):
    data = make_tar([(ti("neg"), b"abc")], tarfile.GNU_FORMAT)
    e = scan_error(patch(data, 0, 124, base256(-5, 12)))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "neg", 0)
    assert "negative size -5" in e.strerror
    e = scan_error(patch(data, 0, 124, b"\x80" + b"\xff" * 11))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "neg", 0)
    assert "out of range" in e.strerror and "size" in e.strerror


def test_base256_ids_and_devices(scan_bytes, scan_error):
    data = make_tar([(ti("g"), b"")], tarfile.GNU_FORMAT)
    (e,), _ = scan_bytes(patch(data, 0, 108, base256(4_000_000_000, 8)))
    assert e.uid == 4_000_000_000
    for uid in (1 << 32, 4294967295, -1):
        e = scan_error(patch(data, 0, 108, base256(uid, 8)))
        assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "g", 0)
        assert f"uid {uid} out of range" in e.strerror
    dev = make_tar([(ti("pad"), b"x" * 600), (ti("dev", tarfile.CHRTYPE, devmajor=1, devminor=1), None)],
                   tarfile.GNU_FORMAT)
    e = scan_error(patch(dev, 1536, 329, base256(1 << 32, 8)))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "dev", 1536)
    assert "devmajor 4294967296" in e.strerror


def test_malformed_octal_field(scan_error, scan_bytes):
    data = two_files()
    e = scan_error(patch(data, 1024, 100, b"07x4\0\0\0\0"))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "second", 1024)
    assert "malformed header field 'mode'" in e.strerror
    # space/NUL padding and termination are fine
    for field, mode in ((b"    644\0", 0o644), (b"644 \0\0\0\0", 0o644), (b"0000755 ", 0o755),
                        (b"\0\0\0\0\0\0\0\0", 0), (b"0100600\0", 0o600)):
        entries, _ = scan_bytes(patch(data, 1024, 100, field))
        assert entries[1].mode == mode


@pytest.mark.parametrize("uid", ["4294967296", "4294967295", "99999999999999999999999"])
def test_pax_uid_out_of_range(scan_error, uid):
    data = make_tar([(ti("before"), b"12"), (ti("victim", pax_headers={"uid": uid}), b"x")])
    xoff = [off for name, off, _ in header_offsets(data) if name == "victim"][0]
    e = scan_error(data)
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "victim", xoff)
    assert uid in e.strerror


def test_pax_uid_largest_valid(scan_bytes):
    (e,), _ = scan_bytes(make_tar([(ti("ok", pax_headers={"uid": "4294967294", "gid": "7"}), b"")]))
    assert (e.uid, e.gid) == (4294967294, 7)


@pytest.mark.parametrize("records,reason,entry", [
    (b"99 path=x\n", "malformed PAX record length", "PaxHeaders/entry"),
    (b"abc path=x\n", "malformed PAX record length", "PaxHeaders/entry"),
    (b"3 path=x\n", "malformed PAX record length", "PaxHeaders/entry"),
    (b"10 pathxy\n", "has no '='", "PaxHeaders/entry"),
    (b"11 path=xy\0", "does not end with a newline", "PaxHeaders/entry"),
    (b"9 =value\n", "invalid key", "PaxHeaders/entry"),
    (pax_record(b"path", b"a\0b"), "NUL byte in PAX path", "PaxHeaders/entry"),
    (pax_record(b"path", b"p") + b"junk", "malformed PAX record length", "p"),
    (pax_record(b"mtime", b"1.5e3"), "malformed PAX mtime", "entry"),
    (pax_record(b"size", b"-1"), "malformed PAX value size", "entry"),
    (pax_record(b"size", b"9223372036854775807"), "PAX size 9223372036854775807 out of range", "entry"),
    (pax_record(b"size", b"9223372036854775808"), "out of range PAX value size", "entry"),
    (pax_record(b"GNU.sparse.offset", b"1"), "GNU.sparse.offset without", "entry"),
    (pax_record(b"SCHILY.xattr.", b"v"), "empty xattr name", "entry"),
    (pax_record(b"LIBARCHIVE.xattr.user.x", b"@@@@"), "malformed base64", "entry"),
    (pax_record(b"LIBARCHIVE.xattr.user.%zz", b"AA"), "malformed URL-encoded name", "entry"),
])
def test_malformed_pax_records(scan_error, records, reason, entry):
    # framing errors are found while reading the 'x' header (the entry's name is
    # the header's own name, or the PAX path seen so far); value errors name the entry
    e = scan_error(raw_pax_entry(records, name="entry"))
    assert (e.errno, e.offset, e.entry) == (errno.EINVAL, 0, entry)
    assert reason in e.strerror


def test_unknown_gnu_sparse_version(scan_error):
    recs = pax_record(b"GNU.sparse.major", b"2") + pax_record(b"GNU.sparse.minor", b"0")
    e = scan_error(raw_pax_entry(recs, name="entry"))
    assert (e.errno, e.offset, e.entry) == (errno.ENOTSUP, 0, "entry")
    assert "unsupported GNU sparse format version 2.0" in e.strerror


def test_oversized_pax_header_and_long_name(scan_error, scan_bytes):
    big = "c" * ((1 << 20) + 10)
    data = make_tar([(ti("small"), b"1"), (ti("big", pax_headers={"comment": big}), b"x")])
    xoff = [off for name, off, _ in header_offsets(data) if name == "big"][0]
    e = scan_error(data)
    assert (e.errno, e.offset) == (errno.E2BIG, xoff)
    assert "exceeds the limit" in e.strerror
    # just under the limit is fine
    ok = make_tar([(ti("fits", pax_headers={"comment": "c" * ((1 << 20) - 100)}), b"x")])
    (e,), _ = scan_bytes(ok)
    assert e.path == "fits"
    # a GNU long name over the limit
    gnu = make_tar([(ti("n" * ((1 << 20) + 1)), b"")], tarfile.GNU_FORMAT)
    e = scan_error(gnu)
    assert (e.errno, e.offset) == (errno.E2BIG, 0)
    assert "GNU long name" in e.strerror


def test_truncated_archives(scan_error, scan_bytes):
    data = two_files()
    # inside the second header
    e = scan_error(data[:1024 + 300])
    assert (e.errno, e.offset) == (errno.EINVAL, 1024)
    assert "truncated archive" in e.strerror and "212 more bytes" in e.strerror
    # inside the first entry's data: 10 bytes of data + 502 of padding are due
    e = scan_error(data[:512 + 4])
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "first", 0)
    assert "truncated archive: entry 'first' needs 508 more bytes" in e.strerror
    # inside the padding, without hashing (the data is skipped)
    with pytest.raises(LayerError) as ei:
        scan_bytes(data[:512 + 100], hash=False)
    assert (ei.value.entry, ei.value.offset) == ("first", 0)
    assert "needs 412 more bytes" in ei.value.strerror
    # inside a PAX header's records
    pax = make_tar([(ti("p" * 300), b"x")])
    e = scan_error(pax[:BLOCK + 20])
    assert (e.errno, e.offset) == (errno.EINVAL, 0) and "truncated archive" in e.strerror


def test_repeated_gnu_long_name_truncated(scan_error):
    first = make_tar([(ti("A" * 150), b"")], tarfile.GNU_FORMAT)[:1024]     # 'L' + its name
    second = make_tar([(ti("B" * 600), b"")], tarfile.GNU_FORMAT)[:BLOCK + 300]
    e = scan_error(first + second)
    assert (e.errno, e.offset, e.entry) == (errno.EINVAL, 1024, "././@LongLink")
    assert "truncated archive: entry '././@LongLink' needs 724 more bytes" in e.strerror


def test_end_of_archive_variants(scan_bytes, scan_error):
    data = two_files()
    end = 2048                                        # after the second entry's data
    for cut in (end, end + 512, end + 1024, len(data)):
        entries, digests = scan_bytes(data[:cut])
        assert [e.path for e in entries] == ["first", "second"]
        assert digests.tar_size == cut
    # a zero block followed by a header is not an end
    e = scan_error(data[:end] + b"\0" * 512 + data[:512] + data[512:1024])
    assert (e.errno, e.offset) == (errno.EINVAL, end)
    # extension header with no entry after it
    pax = make_tar([(ti("p" * 300), b"x")])
    e = scan_error(pax[:1024] + b"\0" * 1024)
    assert e.errno == errno.EINVAL and "without its entry" in e.strerror


@pytest.mark.parametrize("typeflag", [b"Q", b"M", b"N"])
def test_unsupported_types(scan_error, typeflag):
    data = patch(two_files(), 1024, 156, typeflag)
    e = scan_error(data)
    assert (e.errno, e.entry, e.offset) == (errno.ENOTSUP, "second", 1024)
    assert f"unsupported entry type '{typeflag.decode()}'" in e.strerror


def sparse_pax(map_value: str, realsize: int, stored: bytes) -> bytes:
    recs = (pax_record(b"GNU.sparse.size", str(realsize).encode()) +
            pax_record(b"GNU.sparse.map", map_value.encode()) +
            pax_record(b"GNU.sparse.name", b"sparse"))
    return raw_pax_entry(recs, name="GNUSparseFile.0/sparse", data=stored)


def test_sparse_pax_map_valid(scan_bytes):
    (e,), _ = scan_bytes(sparse_pax("10,5,100,5,200,0", 200, b"aaaaabbbbb"))
    assert (e.path, e.size, e.sparse) == ("sparse", 200, ((10, 5), (100, 5), (200, 0)))
    expect = b"\0" * 10 + b"aaaaa" + b"\0" * 85 + b"bbbbb" + b"\0" * 95
    assert e.digest == sha(expect)


@pytest.mark.parametrize("map_value,realsize,stored,reason", [
    ("0,10,5,10", 100, 20, "overlaps"),
    ("50,10,0,10", 100, 20, "overlaps or precedes"),
    ("95,10", 100, 10, "beyond the real size"),
    ("0,10", 100, 20, "covers 10 bytes but the entry stores 20"),
    ("0,10,20,10", 100, 10, "covers 20 bytes"),
    ("9223372036854775807,10", 100, 10, "beyond the real size"),
    ("99999999999999999999,1", 100, 1, "malformed GNU.sparse.map"),
    ("0,10,20", 100, 10, "odd number"),
])
def test_bad_sparse_maps(scan_error, map_value, realsize, stored, reason):
    e = scan_error(sparse_pax(map_value, realsize, b"s" * stored))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "sparse", 0)
    assert reason in e.strerror


def test_bad_old_gnu_sparse_map(tmp_path, scan_error):
    root = tmp_path / "t"
    root.mkdir()
    make_sparse(root / "sp", 1 << 20, [(4096, b"a" * 10), (65536, b"b" * 10)])
    archive = tmp_path / "s.tar"
    subprocess.run(["tar", "--format=gnu", "--sparse", "-C", root, "-cf", archive, "sp"], check=True)
    data = archive.read_bytes()
    assert data[156:157] == b"S"
    # second descriptor moved before the end of the first: overlapping segments
    e = scan_error(patch(data, 0, 386 + 24, b"%011o\0" % 4097))
    assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "sp", 0)
    assert "overlaps" in e.strerror
    # real size smaller than the data
    e = scan_error(patch(data, 0, 483, b"%011o\0" % 5000))
    assert "beyond the real size" in e.strerror


def test_sparse_1_0_map_in_data(scan_bytes, scan_error):
    def entry(map_text: bytes, data: bytes, realsize=1000):
        stored = map_text + b"\0" * (-len(map_text) % BLOCK) + data
        recs = (pax_record(b"GNU.sparse.major", b"1") + pax_record(b"GNU.sparse.minor", b"0") +
                pax_record(b"GNU.sparse.name", b"real") +
                pax_record(b"GNU.sparse.realsize", str(realsize).encode()))
        return raw_pax_entry(recs, name="GNUSparseFile.1/real", data=stored)
    (e,), _ = scan_bytes(entry(b"2\n100\n3\n900\n2\n", b"abcde"))
    assert (e.path, e.size, e.sparse) == ("real", 1000, ((100, 3), (900, 2)))
    assert e.digest == sha(b"\0" * 100 + b"abc" + b"\0" * 797 + b"de" + b"\0" * 98)
    for text, reason in [(b"2\n100\n3\n50\n2\n", "overlaps"), (b"1\n1x\n3\n", "malformed"),
                         (b"1\n0\n6\n", "covers 6 bytes but the entry stores 5"),
                         (b"3\n0\n1\n", "malformed")]:
        e = scan_error(entry(text, b"abcde"))
        assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "real", 0)
        assert reason in e.strerror
    # a map that never ends within the entry's data
    endless = b"1000\n" + b"1\n" * 253 + b"1"
    assert len(endless) == BLOCK
    for text in (endless, endless + b"2\n" * 256):
        e = scan_error(entry(text, b""))
        assert (e.errno, e.entry, e.offset) == (errno.EINVAL, "real", 0)
        assert "runs past the entry's data" in e.strerror


def test_sparse_holes_claiming_exabytes_are_refused_quickly(scan_bytes, scan_error):
    """A sparse entry is hashed as its expanded content; an entry that claims an
    enormous real size must not keep the scanner hashing zeros for hours: past
    the scan's hole budget it is an error naming the entry."""
    huge = 1 << 62
    e = scan_error(sparse_pax("0,5", huge, b"hello"))
    assert (e.errno, e.entry) == (errno.E2BIG, "sparse")
    assert "hole bytes" in e.strerror
    # listing without content digests does not hash holes, so it is fine
    (entry,), _ = scan_bytes(sparse_pax("0,5", huge, b"hello"), hash=False)
    assert entry.size == huge


# ------------------------------------------- seeking over data (no stream hash)

def _scan_file(path, **kw):
    fd = os.open(path, os.O_RDONLY)
    try:
        return _native.scan(fd, hash=False, offsets=True, name=os.fspath(path), **kw)
    finally:
        os.close(fd)


@pytest.mark.parametrize("fmt", ["gnu", "posix", "ustar", "oldgnu"])
def test_seeking_scan_lists_what_the_reading_scan_lists(tmp_path, fmt):
    """Without the stream hash an uncompressed layer file is seeked over: the
    same entries, data offsets and sizes as the scan that reads every byte,
    and the same errors at every cut."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i, size in enumerate([0, 1, 511, 512, 513, 65535, 65536, 65537, 300_000, 2 << 20]):
        (src / "d" / f"f{i}").write_bytes(os.urandom(size))
    (src / "d" / "link").symlink_to("f1")
    os.link(src / "d" / "f3", src / "d" / "hard")
    with open(src / "sparse", "wb") as f:
        f.seek(5 << 20)
        f.write(b"end")
    out = tmp_path / "l.tar"
    sparse = [] if fmt == "ustar" else ["--sparse"]      # ustar has no sparse files
    subprocess.run(["tar", f"--format={fmt}", *sparse, "-C", str(src), "-cf", str(out), "."],
                   check=True)
    read_e, read_d = _scan_file(out)
    seek_e, seek_d = _scan_file(out, stream_hash=False)
    assert seek_e == read_e
    assert (seek_d.digest, seek_d.diff_id) == (None, None)
    assert read_d.diff_id == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    assert (seek_d.tar_size, seek_d.compressed_size) == (read_d.tar_size, read_d.compressed_size)
    data = out.read_bytes()
    for cut in sorted({len(data) // 7, len(data) // 3, len(data) // 2, len(data) - 3 * BLOCK,
                       len(data) - 10}):
        p = tmp_path / f"cut{cut}.tar"
        p.write_bytes(data[:cut])
        errs = []
        for kw in ({}, {"stream_hash": False}):
            try:
                _scan_file(p, **kw)
                errs.append(None)
            except LayerError as e:
                errs.append((e.errno, str(e)))
        assert errs[0] == errs[1], cut


def test_seeking_scan_of_a_stream_reads_it(tmp_path):
    """A pipe cannot be seeked: the same scan reads it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(1 << 20))
    out = tmp_path / "l.tar"
    subprocess.run(["tar", "-C", str(src), "-cf", str(out), "."], check=True)
    r, w = os.pipe()
    import threading
    t = threading.Thread(target=lambda: (os.write(w, out.read_bytes()), os.close(w)))
    t.start()
    try:
        entries, d = _native.scan(r, hash=False, offsets=True, stream_hash=False)
    finally:
        t.join()
        os.close(r)
    assert [e.path for e in entries] == ["./", "./big"]
    assert d.tar_size == out.stat().st_size and d.digest is None
