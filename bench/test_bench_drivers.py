"""Storage drivers: each built-in driver timed next to a peer in the same rounds.

Every benchmark runs once per driver in ``layerfs.drivers.BUILTIN``, on a fresh
ext4 filesystem (``fresh_fs``), interleaving the timed layerfs call with its
peer's; extra_info carries the peer's times, medians and the ratio.

    create+apply   driver.create + apply_diff of the debian-minbase layer (.tar.zst)
                   vs  tar -I zstd -xf of the same layer (GNU tar, owners, xattrs)
    mount-128      mount of the top of a 128-layer stack (then unmounted, untimed)
                   vs  mount(8) with the options the driver describes (overlay,
                       bind); the fuse-based aufs has no kernel peer
    diff-1pct      diff() of a container layer in which 1% of the base's files
                   (52 files of debian-minbase) were rewritten, read to the end
                   vs  the same diff() with the same 52 files changed over a base
                       ten times smaller: a native diff scales with the change
                       (ratio ~1), the exact diff with the image (ratio ~10)
    vfs-child      vfs create of a child layer (full copy of debian-minbase)
                   vs  cp -a of the parent directory           goal: ratio <= 1
"""
from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from bench import corpora as C
from bench.conftest import run_command

DRIVERS = ["overlay", "aufs", "vfs"]
TAR_X = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]


def _builtin() -> List[str]:
    try:
        from layerfs.drivers import BUILTIN
        return list(BUILTIN)
    except ImportError:
        return DRIVERS


_checked: Dict[str, object] = {}


def _driver(name: str, root: Path, **options):
    """A driver with its store at root; skips when the driver cannot run here
    (checked once per driver, outside the timed calls)."""
    if name not in _checked:
        try:
            from layerfs import drivers
            cls = drivers.driver_class(name)
        except (ImportError, OSError) as e:
            pytest.skip(f"driver {name} cannot be loaded: {e}")
        s = cls.supported(str(root))
        if not s.ok:
            pytest.skip(f"driver {name} not supported here: {s.reason}")
        _checked[name] = cls
    return _checked[name](str(root), **options)


def interleave(benchmark, timed: Callable[[], object], peers: Dict[str, Callable[[], object]],
               rounds: int, warmup: int = 1, before: Optional[Callable[[], None]] = None,
               commands: Optional[Dict[str, str]] = None, goal: Optional[float] = None,
               **extra_info) -> None:
    """benchmark.pedantic(timed) with each peer run (and timed) just before each round.
    before() runs first in every round, untimed."""
    times: Dict[str, List[float]] = {p: [] for p in peers}
    calls = [0]

    def setup():
        i = calls[0]
        calls[0] += 1
        if before:
            before()
        for name, fn in peers.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)
        if before:
            before()
        return (), {}

    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup)
    st = getattr(benchmark, "stats", None)
    data = list(st.stats.data) if st is not None else []
    med = statistics.median(data) if data else None
    info = benchmark.extra_info
    info.update(extra_info)
    info["timed"] = "layerfs"
    info["rounds"] = rounds
    info["peers"] = []
    for name in peers:
        pm = statistics.median(times[name]) if times[name] else None
        info["peers"].append({"name": name, "command": (commands or {}).get(name, ""),
                              "times": times[name], "median": pm,
                              "ratio": (med / pm) if med and pm else None, "goal": goal})
    if info["peers"] and info["peers"][0]["ratio"] is not None:
        first = info["peers"][0]
        info["peer"], info["peer_median"], info["ratio"] = \
            first["name"], first["median"], first["ratio"]


@pytest.fixture(scope="module")
def debian(corpora):
    return corpora("debian-minbase")


def small_base(corpus) -> Path:
    """A base ten times smaller than the corpus: every 10th regular file (and the
    files changed by the diff benchmark), as a tar made by GNU tar; cached."""
    out = C.CACHE / "drivers-small" / "layer.tar"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    files = _regular_files(corpus.tree)
    keep = set(files[::10]) | set(changed_files(corpus))
    names = set()
    for f in keep:
        parts = f.split("/")
        for i in range(1, len(parts) + 1):
            names.add("/".join(parts[:i]))
    lst = out.parent / "names"
    lst.write_text("".join(f"./{n}\n" for n in sorted(names)))
    part = out.with_suffix(".partial")
    run_command(TAR_X + ["--no-recursion", "-C", corpus.tree, "-cf", part, "-T", lst])
    os.rename(part, out)
    return out


def _regular_files(tree: Path) -> List[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            if os.path.isfile(p) and not os.path.islink(p):
                out.append(os.path.relpath(p, tree))
    return out


def changed_files(corpus) -> List[str]:
    """1% of the corpus's regular files, spread over the tree."""
    files = _regular_files(corpus.tree)
    return files[::100]


# ----------------------------------------------------------------- create + apply

@pytest.mark.parametrize("driver_name", _builtin())
def test_create_apply_base_layer(benchmark, side_by_side, debian, driver_name):
    from bench.conftest import Contender
    layer = debian.layers["zst"]

    _driver(driver_name, side_by_side.fs.new_dir("check"))

    def ours(target: Path):
        d = _driver(driver_name, target)
        d.create("base")
        return d.apply_diff("base", str(layer.path))

    peer = Contender("tar -I zstd -xf", lambda t: run_command(
        TAR_X + ["-I", "zstd", "-xf", layer.path, "-C", t]),
        command="tar --numeric-owner --xattrs --xattrs-include='*' -I zstd -xf LAYER -C DIR")
    r = side_by_side.run(Contender(f"{driver_name}: create+apply_diff", ours,
                                   command=f"create + apply_diff (driver {driver_name})"),
                         [peer], corpus=debian.name, driver=driver_name,
                         layer=str(layer.path))
    assert r.diff_id == layer.diff_id


# ----------------------------------------------------------------- mount of 128 layers

@pytest.mark.parametrize("driver_name", _builtin())
def test_mount_128_layer_stack(benchmark, fresh_fs, request, driver_name, tmp_path):
    from layerfs.archive import create_layer
    d = _driver(driver_name, fresh_fs.new_dir("store"))
    src = tmp_path / "src"
    parent = None
    for i in range(128):
        src.mkdir()
        (src / f"file{i:03d}").write_bytes(b"%d\n" % i)
        tar = tmp_path / f"l{i}.tar"
        create_layer(str(src), str(tar))
        shutil.rmtree(src)
        d.create(f"l{i:03d}", parent)
        d.apply_diff(f"l{i:03d}", str(tar))
        parent = f"l{i:03d}"
    top = parent
    (m,) = d.mounts(top)
    peer_target = fresh_fs.new_dir("peer-mnt")
    peers, commands = {}, {}
    if m.type == "overlay":
        argv = ["mount", "-t", "overlay", "overlay", "-o", ",".join(m.options), str(peer_target)]
        peers["mount(8) overlay"] = lambda: run_command(argv, cwd=m.cwd)
        commands["mount(8) overlay"] = "mount -t overlay overlay -o lowerdir=l/..:l/.. DIR " \
                                       "(cwd = driver root)"
    elif m.type == "bind":
        def bind():
            run_command(["mount", "--bind", m.source, str(peer_target)])
            if "ro" in m.options:
                run_command(["mount", "-o", "remount,bind,ro", str(peer_target)])
        peers["mount(8) --bind"] = bind
        commands["mount(8) --bind"] = "mount --bind SRC DIR; mount -o remount,bind,ro DIR"

    def unmount_all():
        if d._mount_count(top) > 0:
            d.unmount(top)
        if os.path.ismount(peer_target):
            run_command(["umount", str(peer_target)])

    try:
        interleave(benchmark, lambda: d.mount(top), peers,
                   request.config.getoption("bench_rounds") * 4, before=unmount_all,
                   commands=commands, driver=driver_name, layers=128,
                   mount_type=m.type, mount_options_bytes=len(",".join(m.options)),
                   fs=fresh_fs.description)
        path = d.mount(top)
        assert (Path(path) / "file000").read_bytes() == b"0\n"
        assert len(os.listdir(path)) == 128
        d.unmount(top)
    finally:
        unmount_all()
        d.cleanup()


# ----------------------------------------------------------------- diff after 1% changes

def _container_with_changes(d, base_tar: Path, files: List[str]) -> str:
    d.create("base")
    d.apply_diff("base", str(base_tar))
    d.create_rw("ctr", "base")
    m = d.mount("ctr")
    try:
        for f in files:
            with open(os.path.join(m, f), "ab") as fh:
                fh.write(b"\n# changed\n")
    finally:
        d.unmount("ctr")
    return "ctr"


def _read_diff(d, id: str) -> int:
    n = 0
    with d.diff(id) as s:
        while True:
            b = s.read(1 << 20)
            if not b:
                return n
            n += len(b)


@pytest.mark.parametrize("driver_name", _builtin())
def test_diff_after_changing_1pct(benchmark, fresh_fs, request, debian, driver_name):
    files = changed_files(debian)
    small = small_base(debian)
    big_d = _driver(driver_name, fresh_fs.new_dir("big"))
    small_d = _driver(driver_name, fresh_fs.new_dir("small"))
    try:
        _container_with_changes(big_d, debian.layers["tar"].path, files)
        _container_with_changes(small_d, small, files)
        sizes = {}
        interleave(benchmark, lambda: sizes.setdefault("big", _read_diff(big_d, "ctr")),
                   {"same change, base 10x smaller": lambda: sizes.setdefault(
                       "small", _read_diff(small_d, "ctr"))},
                   request.config.getoption("bench_rounds"),
                   commands={"same change, base 10x smaller":
                             f"diff() of the same {len(files)} changed files over a base of "
                             f"{len(_regular_files(debian.tree)) // 10} files"},
                   driver=driver_name, corpus=debian.name, changed_files=len(files),
                   native_diff=big_d.metadata("ctr").get("native_diff"),
                   fs=fresh_fs.description)
        changes = big_d.changes("ctr")
        assert {c.path for c in changes if c.kind == "modified" and c.path.lstrip("/") in
                set(files)} == {"/" + f for f in files}
        assert sizes["big"] == sizes["small"]  # the same changes: the same layer
        benchmark.extra_info["diff_bytes"] = sizes.get("big")
    finally:
        big_d.cleanup()
        small_d.cleanup()


# ----------------------------------------------------------------- vfs child vs cp -a

def test_vfs_child_layer_vs_cp_a(benchmark, fresh_fs, request, debian):
    d = _driver("vfs", fresh_fs.new_dir("store"))
    d.create("base")
    d.apply_diff("base", str(debian.layers["tar"].path))
    parent = d.diff_dir("base")
    n = [0]
    targets = []

    def ours():
        n[0] += 1
        d.create(f"child{n[0]}", "base")

    def cp():
        t = fresh_fs.new_path("cp-a")
        t.parent.mkdir(exist_ok=True)
        run_command(["cp", "-a", parent, str(t)])
        targets.append(t)

    interleave(benchmark, ours, {"cp -a": cp}, request.config.getoption("bench_rounds"),
               commands={"cp -a": "cp -a PARENT_DIR DIR"}, goal=1.0, corpus=debian.name,
               fs=fresh_fs.description)
    benchmark.extra_info["copy"] = d.get(f"child{n[0]}").extra.get("copy")
    from layerfs.diff import compare_trees
    assert list(compare_trees(parent, d.diff_dir(f"child{n[0]}"))) == []
    assert list(compare_trees(parent, str(targets[-1]))) == []
