"""Shared fixtures for the layerfs benchmarks (pytest-benchmark).

Run with ``pytest bench --benchmark-enable``; a plain ``pytest`` never collects
bench/ (testpaths = tests), and under ``--benchmark-disable`` (the project
default) every benchmark here is skipped rather than run once untimed.

Fixtures
    corpus        a built :class:`bench.corpora.Corpus`, parametrized over every
                  corpus (``debian-minbase``, ``site-packages``); narrow it with
                  ``@pytest.mark.parametrize("corpus", ["site-packages"], indirect=True)``.
    corpora       session loader: ``corpora("debian-minbase") -> Corpus``.
    fresh_fs      a new filesystem for this benchmark (a loop-mounted ext4 image
                  without a journal, or a tmpfs with ``--bench-fs=tmpfs``);
                  ``fresh_fs.new_dir(label)`` gives a new empty directory,
                  ``fresh_fs.new_path(label)`` a new path that does not exist yet.
                  Unmounted and discarded after the benchmark.
    side_by_side  ``side_by_side.run(layerfs, peers, ...)``: times the layerfs
                  contender with ``benchmark.pedantic`` and each peer in the same
                  rounds (peer, layerfs, peer, layerfs, ...), every run into a fresh
                  target; peers' times, medians and the ratios go to extra_info.
    layerfs_cli   argv prefix that runs the ``layerfs`` CLI.
    run_cmd       ``run_cmd(argv, **kw)``: subprocess.run that raises with stderr.

Options: ``--bench-rounds N`` (default 5, env LAYERFS_BENCH_ROUNDS),
``--bench-fs ext4|tmpfs`` (env LAYERFS_BENCH_FS), ``--bench-peers-only`` (time the
peers alone, for when layerfs itself is not available).
"""
from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import pytest

from bench import corpora as _corpora

BENCH_DIR = Path(__file__).resolve().parent
SCRATCH = _corpora.CACHE / "scratch"


# ---------------------------------------------------------------- options and collection

def pytest_addoption(parser):
    g = parser.getgroup("layerfs-bench")
    g.addoption("--bench-rounds", type=int,
                default=int(os.environ.get("LAYERFS_BENCH_ROUNDS", "5")),
                help="timed rounds per benchmark (each peer runs as many)")
    g.addoption("--bench-warmup", type=int,
                default=int(os.environ.get("LAYERFS_BENCH_WARMUP", "1")),
                help="untimed warm-up rounds per benchmark")
    g.addoption("--bench-fs", choices=("ext4", "tmpfs"),
                default=os.environ.get("LAYERFS_BENCH_FS", "ext4"),
                help="filesystem of the fresh extraction targets")
    g.addoption("--bench-image-gb", type=int,
                default=int(os.environ.get("LAYERFS_BENCH_IMAGE_GB", "32")),
                help="size of the sparse ext4 image (or tmpfs limit) per benchmark")
    g.addoption("--bench-peers-only", action="store_true",
                default=os.environ.get("LAYERFS_BENCH_PEERS_ONLY", "") not in ("", "0"),
                help="time only the peer tools (proves the set-up while layerfs is not ready)")


def _benchmarks_disabled(config) -> bool:
    try:
        return bool(config.getoption("benchmark_disable")) and \
            not config.getoption("benchmark_enable")
    except ValueError:          # pytest-benchmark not installed
        return True


def pytest_collection_modifyitems(config, items):
    if not _benchmarks_disabled(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark-enable")
    for item in items:
        if BENCH_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fs_type(path: Path) -> str:
    try:
        return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    SCRATCH.mkdir(parents=True, exist_ok=True)
    kind = config.getoption("bench_fs")
    host = fs_type(SCRATCH)
    machine_info["layerfs_bench"] = {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "target_fs": ("ext4 without journal, loop-mounted sparse image on " + host
                      if kind == "ext4" else "tmpfs"),
        "input_fs": fs_type(_corpora.CACHE),
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------- commands

class CommandFailed(AssertionError):
    pass


def run_command(argv: Sequence[Any], *, stdout=subprocess.DEVNULL, env=None,
                cwd=None) -> subprocess.CompletedProcess:
    """Run argv; on a non-zero exit raise with the command and its stderr."""
    argv = [str(a) for a in argv]
    p = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, env=env, cwd=cwd)
    if p.returncode != 0:
        err = p.stderr.decode(errors="replace").strip()[-4000:]
        raise CommandFailed(f"{shlex.join(argv)} exited {p.returncode}:\n{err}")
    return p


def children_cpu() -> float:
    """User+sys CPU seconds of the finished child processes so far."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def median_wall(argv_for: Callable[[int], Sequence[Any]], runs: int = 7) -> float:
    """Median wall time (s) of running argv_for(i), i = 0 .. runs-1."""
    ts = []
    for i in range(runs):
        t0 = time.perf_counter()
        run_command(argv_for(i))
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts), 4)


def cpu_bound(cpu_s: float, startup_s: float) -> float:
    """The shortest wall time a run with cpu_s of CPU can take on this machine:
    its start-up on one core, the rest spread over every core."""
    return round(startup_s + max(cpu_s - startup_s, 0.0) / len(os.sched_getaffinity(0)), 4)


@pytest.fixture(scope="session")
def run_cmd():
    return run_command


def layerfs_argv() -> List[str]:
    """How to start the CLI: $LAYERFS_BENCH_CLI, else the console script next to
    this interpreter (no pyenv shim in the way), else ``python -m layerfs.cli``."""
    env = os.environ.get("LAYERFS_BENCH_CLI")
    if env:
        return shlex.split(env)
    script = Path(sysconfig.get_path("scripts")) / "layerfs"
    if script.exists():
        return [str(script)]
    found = shutil.which("layerfs")
    if found:
        return [found]
    return [sys.executable, "-m", "layerfs.cli"]


@pytest.fixture(scope="session")
def layerfs_cli() -> List[str]:
    return layerfs_argv()


@pytest.fixture(scope="session")
def peers_only(request) -> bool:
    return request.config.getoption("bench_peers_only")


# ---------------------------------------------------------------- corpora

@pytest.fixture(scope="session")
def corpora():
    cache: Dict[str, _corpora.Corpus] = {}

    def load(name: str) -> _corpora.Corpus:
        if name not in cache:
            cache[name] = _corpora.build(name)
        return cache[name]
    return load


@pytest.fixture(scope="session", params=_corpora.NAMES)
def corpus(request, corpora) -> _corpora.Corpus:
    return corpora(request.param)


# ---------------------------------------------------------------- fresh filesystems

def _mounts_under(root: Path) -> List[str]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo)."""
    out = []
    prefix = str(root)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == prefix or mp.startswith(prefix + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


class FreshFS:
    """A filesystem made for one benchmark, mounted at ``root``.

    ext4: a sparse image under the scratch directory, ``mkfs.ext4 -O ^has_journal``,
    mounted with ``-o loop,noinit_itable`` (no background inode-table zeroing during
    the rounds).  tmpfs: a size-limited tmpfs.  Every round gets new
    subdirectories; nothing is deleted until close(), which unmounts (nested
    mounts first, e.g. the private bind mounts containers-storage makes) and
    discards the image.
    """

    def __init__(self, label: str, kind: str = "ext4", size_gb: int = 32,
                 scratch: Path = SCRATCH):
        self.kind = kind
        self.size_gb = size_gb
        scratch.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
        self.base = scratch / f"{safe}.{os.getpid()}.{time.monotonic_ns()}"
        self.image = self.base.with_suffix(".img")
        self.root = self.base.with_suffix(".mnt")
        self._n = 0
        self.mounted = False

    @property
    def description(self) -> str:
        if self.kind == "ext4":
            return f"ext4 without journal, loop-mounted sparse image on {fs_type(self.image.parent)}"
        return "tmpfs"

    def mount(self) -> "FreshFS":
        self.root.mkdir()
        if self.kind == "ext4":
            with open(self.image, "wb") as f:
                f.truncate(self.size_gb << 30)
            run_command(["mkfs.ext4", "-F", "-q", "-O", "^has_journal",
                         "-E", "lazy_itable_init=1,nodiscard", self.image])
            run_command(["mount", "-o", "loop,noinit_itable", self.image, self.root])
        else:
            run_command(["mount", "-t", "tmpfs", "-o", f"size={self.size_gb}g,mode=0755",
                         "tmpfs", self.root])
        self.mounted = True
        return self

    def _next(self, label: str) -> Path:
        self._n += 1
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "t"
        return self.root / f"{self._n:04d}-{safe}"

    def new_dir(self, label: str = "t") -> Path:
        """A new, empty directory on this filesystem."""
        p = self._next(label)
        p.mkdir()
        return p

    def new_path(self, label: str = "t") -> Path:
        """A new path on this filesystem that does not exist yet (its parent does)."""
        return self._next(label) / "target"

    def new(self, kind: str, label: str) -> Path:
        if kind == "path":
            d = self.new_dir(label)
            return d / "target"
        return self.new_dir(label)

    def close(self) -> None:
        if self.mounted:
            for mp in _mounts_under(self.root):
                r = subprocess.run(["umount", mp], stderr=subprocess.PIPE)
                if r.returncode != 0:
                    subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
            self.mounted = False
        if self.image.exists():
            self.image.unlink()          # its dirty pages are dropped, not written back
        if self.root.exists():
            try:
                self.root.rmdir()
            except OSError:
                pass


def sweep_scratch(scratch: Path = SCRATCH) -> None:
    """Discard images and mount points left by benchmark processes that died."""
    if not scratch.is_dir():
        return
    for p in scratch.iterdir():
        parts = p.name.rsplit(".", 3)
        if len(parts) != 4 or parts[3] not in ("img", "mnt") or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue                                  # its process is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        if parts[3] == "mnt":
            for mp in _mounts_under(p):
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
            try:
                p.rmdir()
            except OSError:
                pass
        else:
            busy = subprocess.run(["losetup", "-j", str(p)], capture_output=True, text=True)
            if busy.returncode == 0 and not busy.stdout.strip():
                p.unlink()


@pytest.fixture
def fresh_fs(request):
    sweep_scratch()
    fs = FreshFS(request.node.name, request.config.getoption("bench_fs"),
                 request.config.getoption("bench_image_gb"))
    try:
        fs.mount()
        yield fs
    finally:
        fs.close()


# ---------------------------------------------------------------- side-by-side timing

@dataclass
class Contender:
    """One way of doing the job: ``run(target)`` does it into a fresh target.

    target is a new empty directory (fresh="dir") or a new path that does not
    exist yet (fresh="path").  goal: the ratio layerfs/this peer that layerfs
    aims at (e.g. 1.0 "no slower", 0.2 "at most a fifth")."""
    name: str
    run: Callable[[Path], Any]
    command: str = ""
    fresh: str = "dir"
    goal: Optional[float] = None


def _median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


class SideBySide:
    def __init__(self, benchmark, fs: FreshFS, rounds: int, warmup: int, peers_only: bool):
        self.benchmark = benchmark
        self.fs = fs
        self.rounds = rounds
        self.warmup = warmup
        self.peers_only = peers_only
        self.last: Dict[str, Path] = {}      # contender name -> target of its last run
        self.last_result: Dict[str, Any] = {}

    def run(self, layerfs: Optional[Contender], peers: Sequence[Contender],
            rounds: Optional[int] = None, warmup: Optional[int] = None,
            **extra_info) -> Any:
        """Time layerfs (benchmark.pedantic) against peers, interleaved.

        Each round: every peer once, then layerfs, each into a fresh target on
        the benchmark's own filesystem, each after a sync(2) (untimed), so that
        no run pays for the writeback of the one before it.  With --bench-peers-only (or layerfs
        None) the first peer is the timed target instead.  Returns the result of
        the timed contender's last run.
        """
        rounds = rounds or self.rounds
        warmup = self.warmup if warmup is None else warmup
        peers = list(peers)
        timed = layerfs
        if self.peers_only or layerfs is None:
            timed, peers = peers[0], peers[1:]
        times: Dict[str, List[float]] = {p.name: [] for p in peers}
        calls = [0]

        def setup():
            i = calls[0]
            calls[0] += 1
            for p in peers:
                target = self.fs.new(p.fresh, p.name)
                os.sync()           # no writeback of an earlier run left to slow this one
                t0 = time.perf_counter()
                self.last_result[p.name] = p.run(target)
                dt = time.perf_counter() - t0
                self.last[p.name] = target
                if i >= warmup:
                    times[p.name].append(dt)
            target = self.fs.new(timed.fresh, timed.name)
            self.last[timed.name] = target
            os.sync()
            return (target,), {}

        load_before = os.getloadavg()[0]
        result = self.benchmark.pedantic(timed.run, setup=setup, rounds=rounds,
                                         warmup_rounds=warmup)
        load_after = os.getloadavg()[0]
        self.last_result[timed.name] = result
        st = getattr(self.benchmark, "stats", None)     # None when benchmarks are disabled
        data = list(st.stats.data) if st is not None else []
        med = _median(data)
        info = self.benchmark.extra_info
        info.update(extra_info)
        info["timed"] = "peer" if timed is not layerfs else "layerfs"
        info["contender"] = timed.name
        info["command"] = timed.command
        info["fs"] = self.fs.description
        info["rounds"] = rounds
        info["loadavg"] = [round(load_before, 2), round(load_after, 2)]   # 1-min, before/after
        info["peers"] = []
        if timed is not layerfs:            # the timed peer, for the report
            info["peers"].append({"name": timed.name, "command": timed.command,
                                  "times": data, "median": med, "ratio": None,
                                  "goal": timed.goal})
        for p in peers:
            pm = _median(times[p.name])
            ratio = (med / pm) if (timed is layerfs and med and pm) else None
            mins = (min(data) / min(times[p.name])) \
                if (timed is layerfs and data and times[p.name]) else None
            info["peers"].append({"name": p.name, "command": p.command, "times": times[p.name],
                                  "median": pm, "ratio": ratio, "ratio_min": mins,
                                  "goal": p.goal})
        first = next((p for p in info["peers"] if p["ratio"] is not None), None)
        if first:
            info["peer"], info["peer_median"], info["ratio"] = \
                first["name"], first["median"], first["ratio"]
        return result


@pytest.fixture
def side_by_side(benchmark, fresh_fs, request, peers_only) -> SideBySide:
    return SideBySide(benchmark, fresh_fs, request.config.getoption("bench_rounds"),
                      request.config.getoption("bench_warmup"), peers_only)
