"""The aufs driver's FUSE union (csrc/union.c) against fuse-overlayfs, over the
same layer directories, side by side in the same rounds.

The layers: a synthetic tree of ~7.2k files in ~1.3k directories spread over
three layers (directories merge across layers, some files are overridden by
a higher layer), and one 1 GiB file in the bottom layer.  They are an aufs
store built once under ``$LAYERFS_BENCH_CACHE/union`` (no whiteouts, so both
filesystems show the same tree); fuse-overlayfs mounts the same directories
with ``-o lowerdir=L3:L2:L1``.  Every round mounts each contender afresh
(untimed), times the job, and unmounts (untimed): the FUSE caches start cold,
the backing files are in the page cache for everyone.

    read-1g        read the 1 GiB file sequentially, 1 MiB reads      goal: ratio <= 1
    read-1g-fuse   the same with passthrough off (every read served
                   by the union server)                               goal: ratio <= 1
    walk           os.walk of the whole tree, lstat of every entry    goal: ratio <= 1

extra_info: each peer's times and median, the ratio layerfs/peer (what
``python -m bench.report`` prints), throughput, entry counts.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from bench import corpora as C

STORE = C.CACHE / "union"
BIG = 1 << 30
CHUNK = 1 << 20
DIRS, SUBDIRS, FILES = 60, 6, 20            # 7,200 files
LAYERS = ("L1", "L2", "L3")                 # bottom first
SIZES = (100, 1000, 4000, 20000)


# ---------------------------------------------------------------- the layers

def _driver(**options):
    from layerfs.drivers import driver_class
    cls = driver_class("aufs")
    s = cls.supported(str(STORE))
    if not s.ok:
        pytest.skip(f"aufs is not supported here: {s.reason}")
    return cls(str(STORE), **options)


def build_store() -> Dict[str, Any]:
    """The three layers in an aufs store (built once; corpus.json marks it done)."""
    marker = STORE / "corpus.json"
    if marker.exists():
        return json.loads(marker.read_text())
    if STORE.exists():
        d = _driver()
        d.cleanup()
        shutil.rmtree(STORE)
    d = _driver()
    rnd = random.Random(20240601)
    parent = None
    for name in LAYERS:
        d.create(name, parent)
        parent = name
    diff = {name: Path(d.diff_dir(name)) for name in LAYERS}
    files = overridden = 0
    for i in range(DIRS):
        for j in range(SUBDIRS):
            for k in range(FILES):
                layer = LAYERS[(i + j + k) % 3]
                rel = Path("usr/share") / f"d{i:02d}" / f"s{j}" / f"f{k:02d}.txt"
                p = diff[layer] / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(rnd.randbytes(rnd.choice(SIZES)))
                files += 1
                if k % 10 == 0 and layer != "L3":      # the top layer overrides some
                    q = diff["L3"] / rel
                    q.parent.mkdir(parents=True, exist_ok=True)
                    q.write_bytes(rnd.randbytes(100))
                    overridden += 1
    block = rnd.randbytes(CHUNK)
    with open(diff["L1"] / "big.bin", "wb") as f:
        for n in range(BIG // CHUNK):
            f.write(n.to_bytes(8, "little") + block[8:])
    info = {"files": files, "overridden": overridden, "big_bytes": BIG,
            "layers": [str(diff[n]) for n in LAYERS]}
    tmp = STORE / "corpus.json.partial"
    tmp.write_text(json.dumps(info, indent=2))
    os.rename(tmp, marker)
    return info


@pytest.fixture(scope="module")
def union_store():
    if os.geteuid() != 0:
        pytest.skip("FUSE mounts with allow_other need root")
    if not shutil.which("fuse-overlayfs"):
        pytest.skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
    return build_store()


# ---------------------------------------------------------------- contenders

@dataclass
class Case:
    """A way of doing the job: mount() -> path (untimed), run(path) (timed),
    unmount() (untimed)."""
    name: str
    command: str
    mount: Callable[[], str]
    unmount: Callable[[], None]
    goal: Optional[float] = None


def aufs_case(name: str = "layerfs aufs", **options) -> Case:
    d = _driver(**options)

    def mount() -> str:
        return d.mount("L3")

    def unmount() -> None:
        d.unmount("L3")

    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    return Case(name, f"AufsDriver({opts}).mount('L3')  # layerfs.drivers._union_server",
                mount, unmount)


def fuse_overlayfs_case(info: Dict[str, Any], mnt: Path, goal: float = 1.0) -> Case:
    lower = ":".join(reversed(info["layers"]))           # top first
    argv = ["fuse-overlayfs", "-o", f"lowerdir={lower}", str(mnt)]

    def mount() -> str:
        mnt.mkdir(exist_ok=True)
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return str(mnt)

    def unmount() -> None:
        subprocess.run(["umount", str(mnt)], check=True)

    return Case("fuse-overlayfs", "fuse-overlayfs -o lowerdir=L3:L2:L1 MNT", mount, unmount, goal)


def read_file(path: str) -> int:
    n = 0
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def walk_tree(root: str) -> int:
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return n


def side_by_side(benchmark, request, ours: Case, peers: List[Case],
                 job: Callable[[str], Any], **extra):
    """Each round: every peer (mount, timed job, unmount), then ours under
    benchmark.pedantic with mount and unmount as its untimed setup/teardown."""
    rounds = request.config.getoption("bench_rounds")
    warmup = request.config.getoption("bench_warmup")
    times: Dict[str, List[float]] = {p.name: [] for p in peers}
    results: Dict[str, Any] = {}
    calls = [0]
    mounted: List[Case] = []

    def setup():
        i = calls[0]
        calls[0] += 1
        for p in peers:
            path = p.mount()
            mounted.append(p)
            try:
                t0 = time.perf_counter()
                results[p.name] = job(path)
                dt = time.perf_counter() - t0
            finally:
                p.unmount()
                mounted.remove(p)
            if i >= warmup:
                times[p.name].append(dt)
        path = ours.mount()
        mounted.append(ours)
        return (path,), {}

    def teardown(*args, **kwargs):
        ours.unmount()
        mounted.remove(ours)

    def timed(path):
        results[ours.name] = job(path)
        return results[ours.name]

    load_before = os.getloadavg()[0]
    try:
        benchmark.pedantic(timed, setup=setup, teardown=teardown, rounds=rounds,
                           warmup_rounds=warmup)
    finally:
        for c in list(mounted):
            c.unmount()
    load_after = os.getloadavg()[0]
    st = getattr(benchmark, "stats", None)
    data = list(st.stats.data) if st is not None else []
    med = statistics.median(data) if data else None
    info = benchmark.extra_info
    info.update(extra)
    info.update({"timed": "layerfs", "contender": ours.name, "command": ours.command,
                 "fs": "FUSE mounts of layer directories on " + C.CACHE.as_posix(),
                 "rounds": rounds, "loadavg": [round(load_before, 2), round(load_after, 2)],
                 "peers": []})
    for p in peers:
        pm = statistics.median(times[p.name]) if times[p.name] else None
        ratio = med / pm if med and pm else None
        info["peers"].append({"name": p.name, "command": p.command, "times": times[p.name],
                              "median": pm, "ratio": ratio, "goal": p.goal})
    first = next((p for p in info["peers"] if p["ratio"] is not None), None)
    if first:
        info["peer"], info["peer_median"], info["ratio"] = \
            first["name"], first["median"], first["ratio"]
    return results, med, info


# ---------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("passthrough", [True, False], ids=["read-1g", "read-1g-fuse"])
def test_union_sequential_read(benchmark, request, union_store, tmp_path, passthrough):
    benchmark.group = "union read-1g" + ("" if passthrough else " (no passthrough)")
    ours = aufs_case("layerfs aufs" + ("" if passthrough else " (no passthrough)"),
                     passthrough=passthrough)
    peer = fuse_overlayfs_case(union_store, tmp_path / "fuse-overlayfs")

    def job(root: str) -> int:
        return read_file(os.path.join(root, "big.bin"))

    results, med, info = side_by_side(benchmark, request, ours, [peer], job,
                                      bytes=BIG, chunk=CHUNK)
    assert results[ours.name] == results[peer.name] == BIG
    if med:
        info["layerfs_gb_s"] = round(BIG / med / 1e9, 2)
    if info["peers"][0]["median"]:
        info["peer_gb_s"] = round(BIG / info["peers"][0]["median"] / 1e9, 2)


def test_union_tree_walk(benchmark, request, union_store, tmp_path):
    benchmark.group = "union walk+lstat"
    ours = aufs_case()
    peer = fuse_overlayfs_case(union_store, tmp_path / "fuse-overlayfs")
    results, med, info = side_by_side(benchmark, request, ours, [peer], walk_tree,
                                      files=union_store["files"])
    assert results[ours.name] == results[peer.name]
    # every file, its directories, and big.bin; no entry twice
    assert results[ours.name] == union_store["files"] + 1 + 1 + DIRS * (1 + SUBDIRS) + 1
    info["entries"] = results[ours.name]
