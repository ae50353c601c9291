"""Layer streams (csrc/stream.c): detection, decompression and the two digests.

Seen through _native.digest_stream / _native.sha256_fd (and _native.apply for
the thread settings).  Every compressed input is made by the real tools
(gzip, pigz, zstd, xz, bzip2) or assembled from documented formats, and every
digest is checked against hashlib over the same bytes.
"""
from __future__ import annotations

import errno
import gzip as gzipmod
import hashlib
import os
import shutil
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest

from layerfs import _native
from layerfs.errors import LayerError

RING_BYTES = 8 << 20     # more than every buffer of the reader (4 x 1 MiB + 4 x 256 KiB) together


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def need(tool: str):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")


def run_tool(argv, data: bytes) -> bytes:
    return subprocess.run(argv, input=data, stdout=subprocess.PIPE, check=True).stdout


def gzip_cli(data: bytes, *args) -> bytes:
    return run_tool(["gzip", "-c", *args], data)


def zstd_cli(data: bytes, *args) -> bytes:
    return run_tool(["zstd", "-q", "-c", *args], data)


def digest_file(path: Path, compression=_native.COMP_AUTO) -> _native.Digests:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _native.digest_stream(fd, compression)
    finally:
        os.close(fd)


@pytest.fixture
def digest_bytes(tmp_path):
    counter = [0]

    def run(data: bytes, compression=_native.COMP_AUTO) -> _native.Digests:
        counter[0] += 1
        p = tmp_path / f"blob{counter[0]}"
        p.write_bytes(data)
        return digest_file(p, compression)
    return run


@pytest.fixture
def digest_error(digest_bytes):
    def run(data: bytes, compression=_native.COMP_AUTO) -> LayerError:
        with pytest.raises(LayerError) as ei:
            digest_bytes(data, compression)
        return ei.value
    return run


def digest_pipe(data: bytes, compression=_native.COMP_AUTO, piece: int = 65536) -> _native.Digests:
    """digest_stream reading from a pipe that a thread fills piece by piece."""
    r, w = os.pipe()

    def writer():
        try:
            for i in range(0, len(data), piece):
                os.write(w, data[i:i + piece])
        except BrokenPipeError:
            pass
        finally:
            os.close(w)
    t = threading.Thread(target=writer)
    t.start()
    try:
        return _native.digest_stream(r, compression)
    finally:
        os.close(r)
        t.join()


def check(d: _native.Digests, blob: bytes, tar: bytes, compression: str):
    assert d.compression == compression
    assert d.digest == sha(blob)
    assert d.diff_id == sha(tar)
    assert d.compressed_size == len(blob)
    assert d.tar_size == len(tar)


# ---------------------------------------------------------------- layer contents

def _make_tree(root: Path, total: int, seed: int) -> None:
    """Files of mixed compressibility: text-like, zeros and random bytes."""
    rnd = hashlib.sha256(str(seed).encode())
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    n, size = 0, 0
    while size < total:
        kind = n % 3
        length = 1 + (n * 7919) % (1 << 20)
        if kind == 0:
            body = (f"line {n} of a text-like file\n" * (length // 28 + 1)).encode()[:length]
        elif kind == 1:
            body = bytes(length)
        else:
            chunks = []
            while sum(map(len, chunks)) < length:
                rnd.update(b"x")
                chunks.append(rnd.digest() * 4)
            body = b"".join(chunks)[:length]
        (root / f"f{n:04d}").write_bytes(body)
        size += length
        n += 1


def _gnu_tar(src: Path) -> bytes:
    return subprocess.run(["tar", "--sort=name", "--numeric-owner", "-C", str(src), "-cf", "-", "."],
                          stdout=subprocess.PIPE, check=True).stdout


@pytest.fixture(scope="module")
def small_tar(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("small") / "tree"
    _make_tree(root, 200_000, 1)
    return _gnu_tar(root)


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory) -> bytes:
    """A layer larger than every buffer of the reader together."""
    root = tmp_path_factory.mktemp("big") / "tree"
    _make_tree(root, 3 * RING_BYTES, 2)
    data = _gnu_tar(root)
    assert len(data) > 3 * RING_BYTES
    return data


# ---------------------------------------------------------------- plain

def test_plain_tar(digest_bytes, small_tar):
    d = digest_bytes(small_tar)
    check(d, small_tar, small_tar, "none")
    assert d.digest == d.diff_id


def test_plain_tar_explicit(digest_bytes, small_tar):
    check(digest_bytes(small_tar, _native.COMP_NONE), small_tar, small_tar, "none")


def test_explicit_none_passes_compressed_bytes_through(digest_bytes, small_tar):
    blob = gzip_cli(small_tar)
    check(digest_bytes(blob, _native.COMP_NONE), blob, blob, "none")


def test_empty_input(digest_bytes):
    check(digest_bytes(b""), b"", b"", "none")
    assert digest_bytes(b"").digest == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_not_a_tar_is_still_hashed(digest_bytes):
    data = b"hello, not a tar\n" * 10
    check(digest_bytes(data), data, data, "none")


def test_trailing_bytes_after_tar_end_count(digest_bytes, small_tar):
    data = small_tar + bytes(10240) + b"junk after the end-of-archive blocks"
    check(digest_bytes(data), data, data, "none")


def test_tar_whose_first_name_looks_like_bzip2(digest_bytes, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "BZh91AY&SY").write_bytes(b"x" * 100)
    data = subprocess.run(["tar", "-C", str(tmp_path / "d"), "-cf", "-", "BZh91AY&SY"],
                          stdout=subprocess.PIPE, check=True).stdout
    assert data.startswith(b"BZh")
    check(digest_bytes(data), data, data, "none")


def test_big_plain(digest_bytes, big_tar):
    check(digest_bytes(big_tar), big_tar, big_tar, "none")


# ---------------------------------------------------------------- gzip

def test_gzip_cli(digest_bytes, small_tar):
    need("gzip")
    for args in ([], ["-1"], ["-9"], ["-n"]):
        blob = gzip_cli(small_tar, *args)
        check(digest_bytes(blob), blob, small_tar, "gzip")


def test_gzip_keeps_file_name_in_header(digest_bytes, small_tar, tmp_path):
    need("gzip")
    p = tmp_path / "layer.tar"
    p.write_bytes(small_tar)
    subprocess.run(["gzip", "-k", str(p)], check=True)    # FNAME set
    blob = (tmp_path / "layer.tar.gz").read_bytes()
    assert blob[3] & 0x08
    check(digest_bytes(blob), blob, small_tar, "gzip")


def test_pigz(digest_bytes, big_tar):
    need("pigz")
    blob = run_tool(["pigz", "-c", "-p", "2"], big_tar)
    check(digest_bytes(blob), blob, big_tar, "gzip")


def test_gzip_multi_member(digest_bytes, small_tar, tmp_path):
    need("gzip")
    half = len(small_tar) // 2
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(small_tar[:half])
    b.write_bytes(small_tar[half:])
    subprocess.run(["gzip", str(a), str(b)], check=True)
    blob = subprocess.run(["cat", f"{a}.gz", f"{b}.gz"], stdout=subprocess.PIPE, check=True).stdout
    assert subprocess.run(["gzip", "-dc"], input=blob, stdout=subprocess.PIPE).stdout == small_tar
    check(digest_bytes(blob), blob, small_tar, "gzip")


def test_gzip_many_members_and_empty_members(digest_bytes, small_tar):
    parts = [small_tar[i:i + 7000] for i in range(0, len(small_tar), 7000)]
    blob = b"".join(gzipmod.compress(p) + gzipmod.compress(b"") for p in parts)
    check(digest_bytes(blob), blob, small_tar, "gzip")


def _gzip_member(data: bytes, *, extra=b"", name=b"", comment=b"", hcrc=False) -> bytes:
    """A gzip member with the optional header fields of RFC 1952."""
    flags = (0x04 if extra else 0) | (0x08 if name else 0) | (0x10 if comment else 0) | \
        (0x02 if hcrc else 0)
    hdr = bytes([0x1f, 0x8b, 8, flags]) + struct.pack("<I", 0) + bytes([0, 3])
    if extra:
        hdr += struct.pack("<H", len(extra)) + extra
    if name:
        hdr += name + b"\0"
    if comment:
        hdr += comment + b"\0"
    if hcrc:
        hdr += struct.pack("<H", zlib.crc32(hdr) & 0xffff)
    co = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = co.compress(data) + co.flush()
    return hdr + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xffffffff)


def test_gzip_header_fields(digest_bytes, small_tar):
    blob = _gzip_member(small_tar, extra=b"AB\x04\x00data", name=b"layer.tar",
                        comment=b"a comment", hcrc=True)
    assert gzipmod.decompress(blob) == small_tar
    check(digest_bytes(blob), blob, small_tar, "gzip")


def test_gzip_bad_header_crc(digest_error, small_tar):
    blob = bytearray(_gzip_member(small_tar, name=b"x", hcrc=True))
    blob[12] ^= 0xff      # first byte of the header CRC16 (after the 10-byte header and "x\0")
    e = digest_error(bytes(blob))
    assert e.errno == errno.EINVAL
    assert "header" in e.strerror


def test_gzip_big_through_ring(digest_bytes, big_tar):
    need("gzip")
    blob = gzip_cli(big_tar, "-1")
    check(digest_bytes(blob), blob, big_tar, "gzip")


def test_gzip_explicit(digest_bytes, small_tar):
    blob = gzip_cli(small_tar)
    check(digest_bytes(blob, _native.COMP_GZIP), blob, small_tar, "gzip")


# ---------------------------------------------------------------- zstd

def test_zstd_cli(digest_bytes, small_tar):
    need("zstd")
    for args in ([], ["-1"], ["-19"], ["--no-check"], ["-T2"]):
        blob = zstd_cli(small_tar, *args)
        check(digest_bytes(blob), blob, small_tar, "zstd")


def test_zstd_multi_frame(digest_bytes, small_tar):
    need("zstd")
    third = len(small_tar) // 3
    blob = b"".join(zstd_cli(small_tar[i:i + third]) for i in range(0, len(small_tar), third))
    assert run_tool(["zstd", "-dc"], blob) == small_tar
    check(digest_bytes(blob), blob, small_tar, "zstd")


def _skippable(payload: bytes, nibble: int = 0) -> bytes:
    return struct.pack("<II", 0x184D2A50 + nibble, len(payload)) + payload


def test_zstd_skippable_frames(digest_bytes, small_tar):
    need("zstd")
    half = len(small_tar) // 2
    blob = (_skippable(b"leading metadata", 0xE) + zstd_cli(small_tar[:half]) +
            _skippable(b"", 3) + zstd_cli(small_tar[half:]) + _skippable(b"x" * 1000))
    assert run_tool(["zstd", "-dc"], blob) == small_tar
    check(digest_bytes(blob), blob, small_tar, "zstd")


def test_zstd_only_skippable_frame(digest_bytes):
    blob = _skippable(b"nothing else")
    check(digest_bytes(blob), blob, b"", "zstd")


def test_zstd_long_window(digest_bytes, big_tar):
    """A frame written through a pipe with --long=28 announces a 256 MiB window
    (above libzstd's default decoding limit of 128 MiB)."""
    need("zstd")
    blob = zstd_cli(big_tar, "--long=28")
    assert run_tool(["zstd", "-dc", "--long=28"], blob) == big_tar
    check(digest_bytes(blob), blob, big_tar, "zstd")


def test_zstd_big_through_ring(digest_bytes, big_tar):
    need("zstd")
    blob = zstd_cli(big_tar, "-T2")
    check(digest_bytes(blob), blob, big_tar, "zstd")


def test_zstd_explicit(digest_bytes, small_tar):
    need("zstd")
    blob = zstd_cli(small_tar)
    check(digest_bytes(blob, _native.COMP_ZSTD), blob, small_tar, "zstd")


# ---------------------------------------------------------------- pipes

@pytest.mark.parametrize("fmt", ["none", "gzip", "zstd"])
def test_pipe_input(big_tar, fmt):
    blob = {"none": lambda b: b, "gzip": lambda b: gzip_cli(b, "-1"),
            "zstd": lambda b: zstd_cli(b)}[fmt](big_tar)
    check(digest_pipe(blob), blob, big_tar, fmt)


@pytest.mark.parametrize("fmt", ["none", "gzip", "zstd"])
def test_pipe_input_tiny_writes(small_tar, fmt):
    """Reads that return a few bytes each (detection needs 512)."""
    blob = {"none": lambda b: b, "gzip": gzipmod.compress,
            "zstd": lambda b: zstd_cli(b)}[fmt](small_tar[:20000])
    check(digest_pipe(blob, piece=7), blob, small_tar[:20000], fmt)


def test_pipe_empty():
    check(digest_pipe(b""), b"", b"", "none")


def test_pipe_truncated_gzip_error(small_tar):
    blob = gzipmod.compress(small_tar)[:-100]
    with pytest.raises(LayerError) as ei:
        digest_pipe(blob)
    assert ei.value.errno == errno.EINVAL
    assert "truncated gzip" in ei.value.strerror


# ---------------------------------------------------------------- errors

def _gz(data: bytes) -> bytes:
    return gzipmod.compress(data, mtime=0)


@pytest.mark.parametrize("cut", [1, 5, 9, 200, -9, -4, -1])
def test_gzip_truncated(digest_error, small_tar, cut):
    blob = _gz(small_tar)
    part = blob[:cut] if cut > 0 else blob[:len(blob) + cut]
    e = digest_error(part, _native.COMP_GZIP)
    assert e.errno == errno.EINVAL
    assert "truncated gzip stream" in e.strerror
    assert "compressed offset" in e.strerror or "empty" in e.strerror


def test_gzip_truncated_second_member(digest_error, small_tar):
    blob = _gz(small_tar[:10000]) + _gz(small_tar[10000:])[:50]
    e = digest_error(blob)
    assert e.errno == errno.EINVAL
    assert "truncated gzip stream" in e.strerror
    assert e.offset is not None and e.offset >= 10000


def test_gzip_empty_explicit(digest_error):
    e = digest_error(b"", _native.COMP_GZIP)
    assert e.errno == errno.EINVAL and "truncated gzip" in e.strerror


def test_gzip_bad_crc(digest_error, small_tar):
    blob = bytearray(_gz(small_tar))
    blob[-8] ^= 0x55
    e = digest_error(bytes(blob))
    assert e.errno == errno.EINVAL
    assert "CRC32 mismatch" in e.strerror
    assert f"compressed offset {len(blob) - 8}" in e.strerror


def test_gzip_bad_isize(digest_error, small_tar):
    blob = bytearray(_gz(small_tar))
    blob[-1] ^= 0x01
    e = digest_error(bytes(blob))
    assert e.errno == errno.EINVAL
    assert "ISIZE mismatch" in e.strerror


def test_gzip_corrupt_deflate_data(digest_error, small_tar):
    blob = bytearray(_gz(small_tar))
    for i in range(20, 60):
        blob[i] ^= 0xa5
    e = digest_error(bytes(blob))
    assert e.errno == errno.EINVAL
    assert "gzip" in e.strerror


@pytest.mark.parametrize("tail", [b"garbage!", b"\0" * 1024, b"\x1f", b"\x1f\x00abc"])
def test_gzip_trailing_garbage(digest_error, small_tar, tail):
    blob = _gz(small_tar)
    e = digest_error(blob + tail)
    assert e.errno == errno.EINVAL
    if tail == b"\x1f":
        assert "truncated gzip" in e.strerror     # could be the start of a member
    else:
        assert f"trailing garbage after the last gzip member at compressed offset {len(blob)}" \
            in e.strerror
        assert e.offset == len(small_tar)


def test_gzip_second_member_bad_method(digest_error, small_tar):
    bad = bytearray(_gz(b"abc"))
    bad[2] = 7       # CM other than deflate
    e = digest_error(_gz(small_tar) + bytes(bad))
    assert e.errno == errno.EINVAL
    assert "invalid gzip header" in e.strerror


@pytest.mark.parametrize("cut", [3, 20, 1000, -5, -1])
def test_zstd_truncated(digest_error, small_tar, cut):
    need("zstd")
    blob = zstd_cli(small_tar)
    part = blob[:cut] if cut > 0 else blob[:len(blob) + cut]
    e = digest_error(part, _native.COMP_ZSTD)
    assert e.errno == errno.EINVAL
    assert "truncated zstd stream" in e.strerror
    assert "compressed offset" in e.strerror


def test_zstd_empty_explicit(digest_error):
    e = digest_error(b"", _native.COMP_ZSTD)
    assert e.errno == errno.EINVAL and "truncated zstd" in e.strerror


def test_zstd_corrupt(digest_error, small_tar):
    need("zstd")
    blob = bytearray(zstd_cli(small_tar))
    blob[len(blob) // 2] ^= 0xff
    blob[len(blob) // 2 + 1] ^= 0xff
    e = digest_error(bytes(blob))
    assert e.errno == errno.EINVAL
    assert "zstd" in e.strerror


def test_zstd_trailing_garbage(digest_error, small_tar):
    need("zstd")
    e = digest_error(zstd_cli(small_tar) + b"garbage after the frame")
    assert e.errno == errno.EINVAL
    assert "zstd" in e.strerror


@pytest.mark.parametrize("tool, name", [(["xz", "-c"], "xz"), (["bzip2", "-c"], "bzip2"),
                                        (["lz4", "-c"], "lz4"), (["lzip", "-c"], "lzip")])
def test_other_compression_rejected(digest_error, small_tar, tool, name):
    need(tool[0])
    e = digest_error(run_tool(tool, small_tar))
    assert e.errno == errno.ENOTSUP
    assert e.strerror == f"unsupported compression: {name}"


@pytest.mark.parametrize("magic, name", [(b"\xfd7zXZ\x00", "xz"), (b"BZh9", "bzip2"),
                                         (b"\x04\x22\x4d\x18", "lz4"), (b"\x1f\x9d\x90", "compress (.Z)")])
def test_other_magic_rejected(digest_error, magic, name):
    e = digest_error(magic + bytes(range(256)) * 4)
    assert e.errno == errno.ENOTSUP
    assert e.strerror == f"unsupported compression: {name}"


def test_error_through_pipe_then_free(small_tar):
    """An error in the middle of a long pipe: the reader stops and returns
    while the writer still has data (the writer sees EPIPE)."""
    blob = bytearray(_gz(small_tar * 50))
    blob[len(blob) // 3: len(blob) // 3 + 100] = bytes(100)
    with pytest.raises(LayerError) as ei:
        digest_pipe(bytes(blob))
    assert ei.value.errno == errno.EINVAL


# ---------------------------------------------------------------- threads

def _apply_digests(tmp_path: Path, blob: bytes, threads: int) -> _native.Digests:
    src = tmp_path / "layer"
    src.write_bytes(blob)
    dest = tmp_path / f"root-{threads}"
    dest.mkdir()
    in_fd = os.open(src, os.O_RDONLY)
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return _native.apply(in_fd, root_fd, threads=threads).digests
    finally:
        os.close(in_fd)
        os.close(root_fd)


@pytest.mark.parametrize("fmt", ["none", "gzip", "zstd"])
def test_threads_one_and_two_agree(tmp_path, big_tar, fmt):
    blob = {"none": lambda b: b, "gzip": lambda b: gzip_cli(b, "-1"),
            "zstd": lambda b: zstd_cli(b)}[fmt](big_tar)
    results = []
    for threads in (1, 2, 0):
        sub = tmp_path / f"t{threads}"
        sub.mkdir()
        d = _apply_digests(sub, blob, threads)
        check(d, blob, big_tar, fmt)
        results.append(d)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_error_same(tmp_path, small_tar, threads):
    blob = bytearray(_gz(small_tar))
    blob[-8] ^= 1
    with pytest.raises(LayerError) as ei:
        _apply_digests(tmp_path, bytes(blob), threads)
    assert ei.value.errno == errno.EINVAL
    assert "CRC32 mismatch" in ei.value.strerror


# ---------------------------------------------------------------- sha256_fd

def _sha_fd(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return _native.sha256_fd(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 55, 56, 64, 4095, 4096, 65537, (1 << 20) + 3, 40 << 20])
def test_sha256_fd(tmp_path, size):
    data = (hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1))[:size]
    p = tmp_path / "f"
    p.write_bytes(data)
    assert _sha_fd(p) == (sha(data), size)


def test_sha256_fd_reads_from_current_position(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    try:
        os.lseek(fd, 4, os.SEEK_SET)
        assert _native.sha256_fd(fd) == (sha(b"456789"), 6)
    finally:
        os.close(fd)


def test_sha256_fd_pipe(big_tar):
    r, w = os.pipe()

    def writer():
        try:
            for i in range(0, len(big_tar), 100_000):
                os.write(w, big_tar[i:i + 100_000])
        finally:
            os.close(w)
    t = threading.Thread(target=writer)
    t.start()
    try:
        assert _native.sha256_fd(r) == (sha(big_tar), len(big_tar))
    finally:
        os.close(r)
        t.join()


def test_sha256_fd_bad_fd(tmp_path):
    p = tmp_path / "d"
    p.mkdir()
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(LayerError) as ei:
            _native.sha256_fd(fd)
        assert ei.value.errno == errno.EISDIR
    finally:
        os.close(fd)


# ---------------------------------------------------------------- decompress, reader

@pytest.mark.parametrize("fmt", ["plain", "gzip", "zstd"])
def test_decompress_to_fd_and_reader(big_tar, fmt, tmp_path):
    blob = {"plain": lambda d: d, "gzip": gzip_cli, "zstd": zstd_cli}[fmt](big_tar)
    src = tmp_path / "blob"
    src.write_bytes(blob)
    out = tmp_path / "out"
    with open(src, "rb") as i, open(out, "wb") as o:
        d = _native.decompress(i.fileno(), o.fileno())
    assert out.read_bytes() == big_tar
    check(d, blob, big_tar, "none" if fmt == "plain" else fmt)

    with open(src, "rb") as i:
        r = _native.DecompressedReader(i.fileno())
        got = bytearray()
        for size in (1, 511, 70000, 1 << 20, 3 << 20):     # reads of every size
            piece = r.read(size)
            got += piece
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            got += piece
        assert bytes(got) == big_tar and r.read(10) == b""
        check(r.digests, blob, big_tar, "none" if fmt == "plain" else fmt)
        r.close()


def test_reader_without_hash_closed_early_and_on_close(big_tar, tmp_path):
    src = tmp_path / "blob.zst"
    src.write_bytes(zstd_cli(big_tar))
    closed = []
    f = open(src, "rb")
    r = _native.DecompressedReader(f.fileno(), hash=False, on_close=lambda: (closed.append(1), f.close()))
    assert r.read(1000) == big_tar[:1000]
    r.close()                     # mid-stream: the decompressing thread is stopped, no hang
    assert closed == [1] and f.closed
    with pytest.raises(ValueError):
        r.read(10)
    with open(src, "rb") as f2:
        r = _native.DecompressedReader(f2.fileno(), hash=False)
        while r.read(1 << 20):
            pass
        assert r.digests is None
        r.close()


@pytest.mark.parametrize("fmt", ["gzip", "zstd"])
def test_decompress_damaged_input_is_einval(small_tar, fmt, tmp_path):
    blob = (gzip_cli if fmt == "gzip" else zstd_cli)(small_tar)
    src = tmp_path / "blob"
    src.write_bytes(blob[:len(blob) // 2])
    with open(src, "rb") as i, open(tmp_path / "out", "wb") as o:
        with pytest.raises(LayerError) as ei:
            _native.decompress(i.fileno(), o.fileno(), name="blob")
    assert ei.value.errno == errno.EINVAL and ei.value.filename == "blob"
    with open(src, "rb") as i:
        r = _native.DecompressedReader(i.fileno(), name="blob")
        with pytest.raises(LayerError) as ei:
            while r.read(1 << 20):
                pass
        r.close()
    assert ei.value.errno == errno.EINVAL


def test_decompress_into_a_full_disk_names_the_byte(small_tar, tmp_path):
    src = tmp_path / "blob.gz"
    src.write_bytes(gzip_cli(small_tar))
    with open(src, "rb") as i, open("/dev/full", "wb") as o:
        with pytest.raises(LayerError) as ei:
            _native.decompress(i.fileno(), o.fileno())
    assert ei.value.errno == errno.ENOSPC and "decompressed stream at byte 0" in str(ei.value)
