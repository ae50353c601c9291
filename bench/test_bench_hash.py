"""Hashing and layer-digest throughput against the standard tools.

Run with:  pytest bench/test_bench_hash.py --benchmark-enable

* sha256 of a 1 GiB file: ``_native.sha256_fd`` against ``openssl dgst -sha256``.
* digest + DiffID of a ~512 MiB layer (tar of /usr files), zstd and gzip:
  ``_native.digest_stream`` (read, hash, decompress, hash) against
  ``zstd -dc >/dev/null`` / ``gzip -dc >/dev/null`` (decompress only).

Each round runs the peer tool first (in pedantic's setup), then ours, so both
see the same machine state.  extra_info follows bench/conftest.py (``peers``
with each peer's times and median, ``ratio`` = our median / the peer's median,
so <= 1 means at least as fast, and ``goal`` where there is one) and adds the
throughputs.  --bench-rounds, --bench-warmup and --bench-peers-only apply.
Inputs are generated once under /var/tmp/layerfs-bench (LAYERFS_BENCH_CACHE)
and reused.
"""
from __future__ import annotations

import hashlib
import os
import resource
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


def _option(request, name: str, default):
    """A bench/conftest.py option, or its default when run without that conftest."""
    try:
        return request.config.getoption(name)
    except ValueError:
        return default


class Peer:
    """Times one run of an external command per round (from pedantic's setup)."""

    def __init__(self, name: str, argv, stdin: Path | None = None, goal: float | None = None):
        self.name, self.argv, self.stdin, self.goal = name, argv, stdin, goal
        self.times, self.cpu = [], []
        self.command = " ".join(str(a) for a in argv) + (f" <{stdin} >/dev/null" if stdin else "")

    def run(self):
        with open(self.stdin, "rb") if self.stdin else open(os.devnull, "rb") as fin, \
                open(os.devnull, "wb") as fout:
            r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(self.argv, stdin=fin, stdout=fout, check=True)
            self.times.append(time.perf_counter() - t0)
            self.cpu.append(_cpu(resource.getrusage(resource.RUSAGE_CHILDREN), r0))


def _cpu(r1, r0) -> float:
    return (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def side_by_side(request, benchmark, ours, ours_command: str, peer: Peer, size: int, **info):
    """Time ours (benchmark.pedantic) and the peer in the same rounds: each
    round runs the peer first (in setup), then ours.  extra_info follows
    bench/conftest.py: peers[] with times, median and ratio = ours / peer."""
    rounds = _option(request, "bench_rounds", ROUNDS)
    warmup = _option(request, "bench_warmup", 1)
    peers_only = _option(request, "bench_peers_only", False)
    calls = [0]
    our_cpu = []

    def setup():
        calls[0] += 1
        if not peers_only:
            peer.run()
            if calls[0] <= warmup:
                peer.times.pop()
                peer.cpu.pop()

    def ours_timed():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        res = ours()
        our_cpu.append(_cpu(resource.getrusage(resource.RUSAGE_SELF), r0))
        return res

    if peers_only:
        def timed():
            peer.run()
        result = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    else:
        result = benchmark.pedantic(ours_timed, setup=setup, rounds=rounds, iterations=1,
                                    warmup_rounds=warmup)
        del our_cpu[:warmup]
    data = list(benchmark.stats.stats.data)
    med = statistics.median(data)
    info_ = benchmark.extra_info
    info_.update(info)
    info_["rounds"] = rounds
    info_["bytes"] = size
    if peers_only:
        info_.update(timed="peer", contender=peer.name, command=peer.command,
                     peers=[{"name": peer.name, "command": peer.command, "times": data,
                             "median": med, "ratio": None, "goal": peer.goal}])
        return None
    pm = statistics.median(peer.times)
    ratio = med / pm
    info_.update(timed="layerfs", contender="layerfs", command=ours_command,
                 peers=[{"name": peer.name, "command": peer.command, "times": peer.times,
                         "median": pm, "ratio": ratio, "goal": peer.goal}],
                 peer=peer.name, peer_median=pm, ratio=ratio,
                 layerfs_MBps=round(size / med / 1e6, 1),
                 peer_MBps=round(size / pm / 1e6, 1),
                 speedup_vs_peer=round(pm / med, 3),
                 # CPU seconds (user + sys, all threads): what each side costs,
                 # whatever else the machine is doing
                 layerfs_cpu_median=round(statistics.median(our_cpu), 3),
                 peer_cpu_median=round(statistics.median(peer.cpu), 3),
                 load_average=os.getloadavg()[0])
    print(f"\n{benchmark.name}: layerfs median {med:.3f} s ({size / med / 1e6:.0f} MB/s, "
          f"cpu {statistics.median(our_cpu):.3f} s), {peer.name} median {pm:.3f} s "
          f"({size / pm / 1e6:.0f} MB/s, cpu {statistics.median(peer.cpu):.3f} s), "
          f"time ratio layerfs/{peer.name} {ratio:.3f} (min/min {min(data) / min(peer.times):.3f}), "
          f"load average {os.getloadavg()[0]:.1f}")
    return result


def _need(tool: str):
    if not shutil.which(tool):
        pytest.skip(f"{tool} not installed")


def test_sha256_fd_vs_openssl(benchmark, request):
    _need("openssl")
    path = random_file()
    _warm(path)
    # goal: at least 0.95x openssl's throughput, i.e. time ratio <= 1/0.95
    peer = Peer("openssl", ["openssl", "dgst", "-sha256", str(path)], goal=round(1 / 0.95, 3))

    def ours():
        with open(path, "rb") as f:
            return _native.sha256_fd(f.fileno())

    res = side_by_side(request, benchmark, ours, f"_native.sha256_fd(open({path}))", peer,
                       RAND_SIZE, layer=path.name, layer_bytes=RAND_SIZE)
    if res is not None:
        digest, size = res
        assert size == RAND_SIZE
        assert digest == _sha256_file(path)


@pytest.mark.parametrize("fmt, make, tool", [
    ("zstd", layer_zst, ["zstd", "-dc"]),
    ("gzip", layer_gz, ["gzip", "-dc"]),
], ids=["zstd", "gzip"])
def test_digest_stream_vs_decompressor(benchmark, request, fmt, make, tool):
    _need(tool[0])
    path = make()
    tar = layer_tar()
    _warm(path)
    peer = Peer(tool[0], tool, stdin=path)

    def ours():
        with open(path, "rb") as f:
            return _native.digest_stream(f.fileno())

    d = side_by_side(request, benchmark, ours, f"_native.digest_stream(open({path}))", peer,
                     tar.stat().st_size, layer=path.name, layer_bytes=path.stat().st_size)
    if d is not None:
        assert d.compression == fmt
        assert d.tar_size == tar.stat().st_size
        assert d.compressed_size == path.stat().st_size
        assert d.digest == _sha256_file(path)
        assert d.diff_id == _sha256_file(tar)
