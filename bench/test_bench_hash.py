"""Hashing and layer-digest throughput against the standard tools.

Run with:  pytest bench/test_bench_hash.py --benchmark-enable

* sha256 of a 1 GiB file: ``_native.sha256_fd`` against ``openssl dgst -sha256``.
* digest + DiffID of a ~512 MiB layer (tar of /usr files), zstd and gzip:
  ``_native.digest_stream`` (read, hash, decompress, hash) against
  ``zstd -dc >/dev/null`` / ``gzip -dc >/dev/null`` (decompress only).

Each round of our function is preceded (in pedantic's setup) by one run of the
peer tool, so both see the same machine state; the peer's times go to
``extra_info`` together with ``ratio`` = peer time / our time (> 1: we are
faster).  Inputs are generated once under /var/tmp/layerfs-bench and reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from layerfs import _native

CACHE = Path(os.environ.get("LAYERFS_BENCH_CACHE", "/var/tmp/layerfs-bench"))
RAND_SIZE = 1 << 30
LAYER_TAR_SIZE = 512 << 20
ROUNDS = 5


def _atomic_make(path: Path, make) -> Path:
    """Create path through make(tmp_path) once; later runs reuse it."""
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        make(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _make_random(tmp: Path) -> None:
    with open(tmp, "wb") as f:
        left = RAND_SIZE
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def _make_layer_tar(tmp: Path) -> None:
    """A tar of regular files from /usr, in sorted order, of about LAYER_TAR_SIZE bytes."""
    names, total = [], 0
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                p = os.path.join(dirpath, name)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if not os.path.isfile(p) or os.path.islink(p):
                    continue
                names.append(p)
                total += st.st_size + 512
                if total >= LAYER_TAR_SIZE:
                    break
            if total >= LAYER_TAR_SIZE:
                break
        if total >= LAYER_TAR_SIZE:
            break
    listing = tmp.with_name(tmp.name + ".list")
    listing.write_bytes(b"\0".join(os.fsencode(n) for n in names) + b"\0")
    try:
        subprocess.run(["tar", "--no-recursion", "--null", "-T", str(listing), "-cf", str(tmp)],
                       check=True, stderr=subprocess.DEVNULL)
    finally:
        listing.unlink()


def _compress(cmd):
    def make(tmp: Path) -> None:
        with open(layer_tar(), "rb") as src, open(tmp, "wb") as dst:
            subprocess.run(cmd, stdin=src, stdout=dst, check=True)
    return make


def random_file() -> Path:
    return _atomic_make(CACHE / "rand-1g.bin", _make_random)


def layer_tar() -> Path:
    return _atomic_make(CACHE / "layer-512m.tar", _make_layer_tar)


def layer_gz() -> Path:
    return _atomic_make(CACHE / "layer-512m.tar.gz", _compress(["pigz", "-6", "-c"]))


def layer_zst() -> Path:
    return _atomic_make(CACHE / "layer-512m.tar.zst", _compress(["zstd", "-3", "-T0", "-q", "-c"]))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


def _warm(path: Path) -> None:
    """Read the file once so that every timed run sees it in the page cache."""
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass


class Peer:
    """Times one run of an external command per round (called from pedantic's setup)."""

    def __init__(self, argv, stdin: Path | None = None):
        self.argv, self.stdin, self.times = argv, stdin, []

    def run(self):
        with open(self.stdin, "rb") if self.stdin else open(os.devnull, "rb") as fin, \
                open(os.devnull, "wb") as fout:
            t0 = time.perf_counter()
            subprocess.run(self.argv, stdin=fin, stdout=fout, check=True)
            self.times.append(time.perf_counter() - t0)

    def report(self, benchmark, name: str, size: int):
        ours = benchmark.stats.stats
        peer_min, peer_med = min(self.times), statistics.median(self.times)
        benchmark.extra_info.update({
            f"{name}_min_s": round(peer_min, 4),
            f"{name}_median_s": round(peer_med, 4),
            "ours_min_s": round(ours.min, 4),
            "ours_median_s": round(ours.median, 4),
            "ratio_min": round(peer_min / ours.min, 3),
            "ratio_median": round(peer_med / ours.median, 3),
            "ours_MBps_median": round(size / ours.median / 1e6, 1),
            f"{name}_MBps_median": round(size / peer_med / 1e6, 1),
        })
        print(f"\n{benchmark.name}: " + ", ".join(f"{k}={v}" for k, v in benchmark.extra_info.items()))


def _need(tool: str):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")


def test_sha256_fd_vs_openssl(benchmark):
    _need("openssl")
    path = random_file()
    _warm(path)
    peer = Peer(["openssl", "dgst", "-sha256", str(path)])

    def ours():
        with open(path, "rb") as f:
            return _native.sha256_fd(f.fileno())

    digest, size = benchmark.pedantic(ours, setup=peer.run, rounds=ROUNDS, iterations=1,
                                      warmup_rounds=1)
    assert size == RAND_SIZE
    assert digest == _sha256_file(path)
    peer.report(benchmark, "openssl", size)


@pytest.mark.parametrize("fmt, make, tool", [
    ("zstd", layer_zst, ["zstd", "-dc"]),
    ("gzip", layer_gz, ["gzip", "-dc"]),
])
def test_digest_stream_vs_decompressor(benchmark, fmt, make, tool):
    _need(tool[0])
    path = make()
    tar = layer_tar()
    _warm(path)
    peer = Peer(tool, stdin=path)

    def ours():
        with open(path, "rb") as f:
            return _native.digest_stream(f.fileno())

    d = benchmark.pedantic(ours, setup=peer.run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert d.compression == fmt
    assert d.tar_size == tar.stat().st_size
    assert d.compressed_size == path.stat().st_size
    assert d.digest == _sha256_file(path)
    assert d.diff_id == _sha256_file(tar)
    peer.report(benchmark, tool[0], d.tar_size)
