"""Unpacking a layer: layerfs against the tools people use today.

Every benchmark times layerfs with pytest-benchmark and its peers in the same
rounds (peer, layerfs, peer, layerfs, ...), each run extracting into a fresh
directory on a filesystem made for that benchmark; extra_info carries each
peer's times and median and the ratio layerfs/peer.  After the rounds, the
trees written are checked against the corpus (entry counts by type, content
bytes) and the digests layerfs reported against the ones computed when the
corpus was built.

    cli-zstd     layerfs unpack X.tar.zst   vs  tar -I zstd -xf          goal: ratio <= 1
    cli-gzip     layerfs unpack X.tar.gz    vs  tar -xzf, tar -I pigz -xf  goal: ratio <= 1
    api          apply_layer (in-process)   vs  tarfile extractall       goal: ratio <= 1/3
    umoci        layerfs unpack             vs  umoci unpack             goal: ratio <= 0.2
    skopeo       layerfs unpack X.tar.zst   vs  skopeo copy into containers-storage  goal: ratio <= 0.2

The tar peers run as root with --numeric-owner --xattrs --xattrs-include='*',
so they write the same owners and xattrs that layerfs does; they compute no
digest.
"""
from __future__ import annotations

import os
import stat
import statistics
import subprocess
import tarfile
from pathlib import Path
from typing import Dict, Optional

import pytest

from bench import corpora as C
from bench.conftest import (Contender, CommandFailed, children_cpu, cpu_bound, median_wall,
                            run_command)

TAR_X = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
SIZE_FIELDS = ("files", "dirs", "symlinks", "other", "hardlinks", "bytes")

_probe: Dict[str, object] = {}        # session-wide answers of the tool probes


# ---------------------------------------------------------------- helpers

def _need_layerfs_cli(cli, peers_only: bool) -> None:
    if peers_only:
        return
    if "cli" not in _probe:
        p = subprocess.run(cli + ["unpack", "--help"], capture_output=True)
        _probe["cli"] = p.returncode == 0
    if not _probe["cli"]:
        pytest.skip("`layerfs unpack` is not available yet (use --bench-peers-only to time the peers)")


def _need_apply_layer(peers_only: bool):
    if peers_only:
        return None
    try:
        from layerfs.archive import apply_layer
    except ImportError as e:
        pytest.skip(f"layerfs.archive.apply_layer is not available yet ({e}); "
                    "use --bench-peers-only to time the peers")
    return apply_layer


def cli_startup(cli) -> float:
    """Median wall time of ``layerfs unpack --json`` of an empty layer (1 KiB of
    zeros): the interpreter, imports and argument handling that every CLI run
    pays before the C core starts, all on one core."""
    if "cli_startup" not in _probe:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="layerfs-bench-startup-") as tmp:
            empty = Path(tmp) / "empty.tar"
            empty.write_bytes(bytes(1024))
            _probe["cli_startup"] = median_wall(
                lambda i: cli + ["unpack", "--json", empty, Path(tmp) / f"d{i}"])
    return float(_probe["cli_startup"])


_CLI_CPU: list = []                    # user+sys seconds of each `layerfs unpack` run of a test


def _layerfs_cli(cli, layer: C.Layer) -> Contender:
    _CLI_CPU.clear()

    def run(dest: Path):
        c0 = children_cpu()
        p = run_command(cli + ["unpack", "--json", layer.path, dest], stdout=subprocess.PIPE)
        _CLI_CPU.append(children_cpu() - c0)
        return p
    return Contender("layerfs unpack", run, f"layerfs unpack --json {layer.path.name} DEST")


def _cli_info(cli, peers_only: bool) -> dict:
    return {} if peers_only else {"cli_startup_s": cli_startup(cli)}


def _cli_cpu_info(sbs, peers_only: bool) -> None:
    """CPU (user+sys) of the CLI runs, and what it allows on this machine: the
    start-up runs on one core, the rest at best on every core at once, so no
    run can take less than start-up + (CPU - start-up) / cores."""
    if peers_only or not _CLI_CPU:
        return
    x = sbs.benchmark.extra_info
    x["cpu_s"] = round(statistics.median(_CLI_CPU), 4)
    x["cpu_bound_s"] = cpu_bound(x["cpu_s"], x.get("cli_startup_s") or 0.0)


def _tar(layer: C.Layer, decompress: list, label: str, goal: float) -> Contender:
    def run(dest: Path):
        return run_command(TAR_X + decompress + ["-f", layer.path, "-C", dest])
    shown = " ".join(TAR_X + decompress) + f" -f {layer.path.name} -C DEST"
    return Contender(label, run, shown, goal=goal)


def _check_tree(root: Path, corpus: C.Corpus, who: str) -> None:
    got = C.tree_stats(root)
    want = corpus.stats
    diff = {f: (getattr(got, f), getattr(want, f)) for f in SIZE_FIELDS
            if getattr(got, f) != getattr(want, f)}
    assert not diff, f"{who}: tree at {root} differs from the corpus (got, want): {diff}"


def _tree_meta(root: Path) -> Dict[str, tuple]:
    """relative path -> (type, mode, uid, gid, size, mtime, link target, rdev) for every entry."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            fmt = stat.S_IFMT(st.st_mode)
            out[os.path.relpath(p, root)] = (
                fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if fmt == stat.S_IFREG else None,
                st.st_mtime_ns // 10**9 if fmt == stat.S_IFREG else None,
                os.readlink(p) if fmt == stat.S_IFLNK else None,
                st.st_rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else None)
    return out


def _check_tree_exact(root: Path, corpus: C.Corpus, who: str) -> None:
    """Every entry of the corpus tree is there with the same type, mode, owner,
    size, mtime (regular files), link target and device numbers; and nothing else."""
    got, want = _tree_meta(root), _tree_meta(corpus.tree)
    bad = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not bad, f"{who}: {len(bad)} entries differ from the corpus, e.g. " + "; ".join(
        f"{k}: got {got.get(k)} want {want.get(k)}" for k in bad[:5])


def _check_digests(proc: Optional[subprocess.CompletedProcess], layer: C.Layer) -> None:
    if proc is None:
        return
    out = proc.stdout.decode()
    for what, value in (("digest", layer.digest), ("diff_id", layer.diff_id)):
        assert value in out, f"layerfs unpack --json did not report the {what} {value}:\n{out[:2000]}"


def _verify(sbs, corpus: C.Corpus, layer: C.Layer, roots: Dict[str, Path]) -> None:
    """Check every contender's last tree, and the digests layerfs printed."""
    for name, root in roots.items():
        _check_tree(root, corpus, name)
        if name.startswith("layerfs"):
            _check_tree_exact(root, corpus, name)
    if "layerfs unpack" in sbs.last_result:
        _check_digests(sbs.last_result["layerfs unpack"], layer)


# ---------------------------------------------------------------- layerfs vs tar

@pytest.mark.benchmark(group="unpack zstd (CLI)")
def test_cli_zstd_vs_tar(side_by_side, corpus, layerfs_cli, peers_only):
    _need_layerfs_cli(layerfs_cli, peers_only)
    layer = corpus.layer("zst")
    side_by_side.run(
        _layerfs_cli(layerfs_cli, layer),
        [_tar(layer, ["-I", "zstd", "-x"], "tar -I zstd -xf", goal=1.0)],
        corpus=corpus.name, layer=layer.path.name, layer_bytes=layer.size,
        **_cli_info(layerfs_cli, peers_only))
    _cli_cpu_info(side_by_side, peers_only)
    _verify(side_by_side, corpus, layer, dict(side_by_side.last))


@pytest.mark.benchmark(group="unpack gzip (CLI)")
def test_cli_gzip_vs_tar(side_by_side, corpus, layerfs_cli, peers_only):
    _need_layerfs_cli(layerfs_cli, peers_only)
    layer = corpus.layer("gz")
    side_by_side.run(
        _layerfs_cli(layerfs_cli, layer),
        [_tar(layer, ["-xz"], "tar -xzf", goal=1.0),
         _tar(layer, ["-I", "pigz", "-x"], "tar -I pigz -xf", goal=1.0)],
        corpus=corpus.name, layer=layer.path.name, layer_bytes=layer.size,
        **_cli_info(layerfs_cli, peers_only))
    _cli_cpu_info(side_by_side, peers_only)
    _verify(side_by_side, corpus, layer, dict(side_by_side.last))


# ---------------------------------------------------------------- in-process: apply_layer vs tarfile

def _tarfile_extract(path: Path, dest: Path) -> None:
    with tarfile.open(path) as tf:
        if hasattr(tarfile, "tar_filter"):
            tf.extractall(dest, numeric_owner=True, filter="tar")
        else:
            tf.extractall(dest, numeric_owner=True)


@pytest.mark.benchmark(group="apply_layer in-process")
@pytest.mark.parametrize("corpus", ["site-packages"], indirect=True)
@pytest.mark.parametrize("ext", ["tar", "gz"])
def test_apply_layer_vs_tarfile(side_by_side, corpus, ext, peers_only):
    apply_layer = _need_apply_layer(peers_only)
    layer = corpus.layer(ext)
    flt = ", filter='tar'" if hasattr(tarfile, "tar_filter") else ""
    peer = Contender("tarfile extractall", lambda d: _tarfile_extract(layer.path, d),
                     f"tarfile.open({layer.path.name}).extractall(DEST, numeric_owner=True{flt})",
                     goal=1 / 3)
    me = None
    if apply_layer is not None:
        me = Contender("layerfs apply_layer", lambda d: apply_layer(str(layer.path), str(d)),
                       f"layerfs.archive.apply_layer({layer.path.name!r}, DEST)")
    side_by_side.run(me, [peer], corpus=corpus.name, layer=layer.path.name,
                     layer_bytes=layer.size)
    _verify(side_by_side, corpus, layer, dict(side_by_side.last))
    res = side_by_side.last_result.get("layerfs apply_layer")
    if res is not None:
        text = repr(res)
        assert layer.diff_id.split(":", 1)[1] in text, \
            f"apply_layer result does not carry the DiffID {layer.diff_id}: {text[:500]}"


# ---------------------------------------------------------------- layerfs vs umoci

def _umoci_ext(corpus: C.Corpus, fs) -> str:
    """The layer umoci can unpack: zstd if it handles it, else gzip (umoci 0.4.7 has no zstd)."""
    if "umoci_ext" not in _probe:
        bundle = fs.new("path", "umoci-probe")
        try:
            run_command(["umoci", "unpack", "--image", corpus.oci_ref("zst"), bundle])
            _probe["umoci_ext"] = "zst"
        except CommandFailed as e:
            if "mediatype" not in str(e).lower():
                raise
            _probe["umoci_ext"] = "gz"
        _probe["umoci_version"] = run_command(["umoci", "--version"], stdout=subprocess.PIPE) \
            .stdout.decode().strip()
    return str(_probe["umoci_ext"])


@pytest.mark.benchmark(group="unpack vs umoci")
def test_cli_vs_umoci(side_by_side, fresh_fs, corpus, layerfs_cli, peers_only):
    _need_layerfs_cli(layerfs_cli, peers_only)
    ext = _umoci_ext(corpus, fresh_fs)
    layer = corpus.layer(ext)
    ref = corpus.oci_ref(ext)
    peer = Contender("umoci unpack",
                     lambda b: run_command(["umoci", "unpack", "--image", ref, b]),
                     f"umoci unpack --image {Path(ref).name} BUNDLE", fresh="path", goal=0.2)
    side_by_side.run(
        _layerfs_cli(layerfs_cli, layer), [peer],
        corpus=corpus.name, layer=layer.path.name, layer_bytes=layer.size,
        umoci=f"{_probe['umoci_version']}; "
              + ("zstd layer" if ext == "zst" else "gzip layer: this umoci cannot unpack zstd"),
        **_cli_info(layerfs_cli, peers_only))
    _cli_cpu_info(side_by_side, peers_only)
    roots = dict(side_by_side.last)
    roots["umoci unpack"] = roots["umoci unpack"] / "rootfs"
    _verify(side_by_side, corpus, layer, roots)


# ---------------------------------------------------------------- layerfs vs skopeo + containers-storage

def _skopeo_argv(ref: str, store: Path, driver: str) -> list:
    return ["skopeo", "--insecure-policy", "copy", "-q", f"oci:{ref}",
            f"containers-storage:[{driver}@{store}/root+{store}/run]bench:latest"]


def _skopeo_env(store: Path) -> dict:
    tmp = store / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)
    return env


def _skopeo_driver(ref: str, fs) -> str:
    """overlay when containers-storage can use it on the fresh filesystem, else vfs."""
    if "skopeo_driver" not in _probe:
        _probe["skopeo_version"] = run_command(["skopeo", "--version"], stdout=subprocess.PIPE) \
            .stdout.decode().strip()
        for driver in ("overlay", "vfs"):
            store = fs.new_dir(f"skopeo-probe-{driver}")
            try:
                run_command(_skopeo_argv(ref, store, driver), env=_skopeo_env(store))
            except CommandFailed as e:
                _probe[f"skopeo_{driver}_error"] = str(e)[-500:]
                continue
            _probe["skopeo_driver"] = driver
            break
        else:
            pytest.fail("skopeo could not copy into containers-storage with overlay or vfs: "
                        + str(_probe.get("skopeo_vfs_error")))
    return str(_probe["skopeo_driver"])


def _storage_layer_dir(store: Path, driver: str, diff_id: str) -> Path:
    """Where containers-storage put the extracted layer (its id is the DiffID for a base layer)."""
    hexid = diff_id.split(":", 1)[1]
    if driver == "overlay":
        return store / "root" / "overlay" / hexid / "diff"
    return store / "root" / "vfs" / "dir" / hexid


@pytest.mark.benchmark(group="unpack vs skopeo")
def test_cli_vs_skopeo(side_by_side, fresh_fs, corpus, layerfs_cli, peers_only):
    _need_layerfs_cli(layerfs_cli, peers_only)
    layer = corpus.layer("zst")
    ref = corpus.oci_ref("zst")
    driver = _skopeo_driver(ref, fresh_fs)
    peer = Contender(
        "skopeo copy",
        lambda s: run_command(_skopeo_argv(ref, s, driver), env=_skopeo_env(s)),
        f"skopeo copy oci:{Path(ref).name} containers-storage:[{driver}@STORE+RUN]bench:latest",
        goal=0.2)
    side_by_side.run(
        _layerfs_cli(layerfs_cli, layer), [peer],
        corpus=corpus.name, layer=layer.path.name, layer_bytes=layer.size,
        skopeo=f"{_probe['skopeo_version']}; containers-storage driver {driver}",
        **_cli_info(layerfs_cli, peers_only))
    _cli_cpu_info(side_by_side, peers_only)
    roots = dict(side_by_side.last)
    roots["skopeo copy"] = _storage_layer_dir(roots["skopeo copy"], driver, layer.diff_id)
    _verify(side_by_side, corpus, layer, roots)
