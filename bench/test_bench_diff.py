"""Comparing two trees: layerfs diff against `diff -r`, side by side.

Two Debian-minbase-like trees that differ in a few hundred files: A is the
debian-minbase corpus, B a copy of it with content edits, mode changes,
deletions, renames and new files (built once, cached beside the corpus as
``diff-minbase/``).  Each is also a layer tarball (GNU tar, the corpus
command; plain and gzip).

    dirs-api   layerfs.diff.compare(dir A, dir B), in-process   vs  diff -r A B
    dirs-cli   layerfs diff A B (python -m layerfs)              vs  diff -r A B
    tar-api    compare(A.tar, B.tar): listed and hashed by the C core, nothing extracted
    gz-api     compare(A.tar.gz, B.tar.gz)
    tar-cli    layerfs diff A.tar B.tar

For the tarballs a second peer does what one does today without layerfs:
extract both (GNU tar, into the benchmark's fresh filesystem), then diff -r.

``diff -r --no-dereference`` reads both extracted trees and compares bytes; it
sees no mode, owner, mtime or xattr change, and needs the trees extracted.
After the rounds the changes layerfs found are checked against the edits
made.  extra_info: each peer's times and the ratio, the number of changes,
and the peak RSS (``resource.getrusage``, KiB) of a child process running the
same comparison, next to a child that only imports layerfs, and a comparison
of two trees with the same entries but one byte per file (memory follows the
entry count, not the data size).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from bench import corpora as C
from bench.conftest import Contender, children_cpu, cpu_bound, median_wall

GOAL = 1.0                     # at most as long as diff -r


def _edit_plan(files: List[str]) -> Dict[str, List[str]]:
    plan: Dict[str, List[str]] = {"content": [], "mode": [], "delete": [], "rename": []}
    for i, f in enumerate(files):
        if i % 211 == 11:
            plan["rename"].append(f)
        elif i % 101 == 7:
            plan["delete"].append(f)
        elif i % 97 == 5:
            plan["mode"].append(f)
        elif i % 23 == 0:
            plan["content"].append(f)
    plan["add"] = [f"usr/share/layerfs-bench/new-{i:03d}" for i in range(60)]
    return plan


def _regular_files(tree: Path) -> List[str]:
    out = []
    for dirpath, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                out.append(os.path.relpath(p, tree))
    return sorted(out)


def _apply_plan(tree: Path, plan: Dict[str, List[str]], tiny: bool) -> None:
    for f in plan["content"]:
        with open(tree / f, "ab") as fh:
            fh.write(b"+" if tiny else b"\n# changed by the layerfs diff benchmark\n")
    for f in plan["mode"]:
        os.chmod(tree / f, 0o600)
    for f in plan["delete"]:
        os.unlink(tree / f)
    for f in plan["rename"]:
        os.rename(tree / f, tree / (f + ".moved"))
    (tree / plan["add"][0]).parent.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(plan["add"]):
        (tree / f).write_bytes(b"n" if tiny else bytes([i % 251]) * 4096)


def _tiny_copy(src: Path, dst: Path) -> None:
    """The same entries as src, every regular file one byte long."""
    subprocess.run(["cp", "-a", "--attributes-only", str(src), str(dst)], check=True)
    for f in _regular_files(dst):
        p = dst / f
        st = os.lstat(p)
        with open(p, "r+b") as fh:
            fh.truncate(0)
            fh.write(b"x")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


def _tar(tree: Path, out: Path, gzip: bool = False) -> Path:
    if out.exists():
        return out
    part = out.with_name(out.name + ".partial")
    with open(part, "wb") as fh:
        tar = subprocess.Popen(["tar", "--sort=name", "--numeric-owner", "--xattrs", "-C",
                                str(tree), "-cf", "-", "."], stdout=subprocess.PIPE)
        if gzip:
            subprocess.run(["gzip", "-6", "-n", "-c"], stdin=tar.stdout, stdout=fh, check=True)
        else:
            shutil.copyfileobj(tar.stdout, fh, 1 << 20)
        tar.stdout.close()
        assert tar.wait() == 0
    os.rename(part, out)
    return out


def build_pair(corpus: C.Corpus) -> Dict[str, object]:
    """Trees A (the corpus), B (edited copy), their tiny twins, and the tarballs."""
    d = C.CACHE / "diff-minbase"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = _regular_files(corpus.tree)
        plan = _edit_plan(files)
        for name, src, tiny in (("tree-b", corpus.tree, False), ("tiny-a", None, True),
                                ("tiny-b", None, True)):
            dest = d / name
            if dest.is_dir():
                continue
            part = d / (name + ".partial")
            if part.exists():
                subprocess.run(["rm", "-rf", "--", str(part)], check=True)
            if name == "tree-b":
                subprocess.run(["cp", "-a", str(corpus.tree), str(part)], check=True)
            else:
                _tiny_copy(corpus.tree, part)
            if name != "tiny-a":
                _apply_plan(part, plan, tiny)
            os.rename(part, dest)
        out = {"a": corpus.tree, "b": d / "tree-b", "tiny_a": d / "tiny-a",
               "tiny_b": d / "tiny-b", "a_tar": corpus.layer("tar").path,
               "a_gz": corpus.layer("gz").path, "b_tar": _tar(d / "tree-b", d / "b.tar"),
               "b_gz": _tar(d / "tree-b", d / "b.tar.gz", gzip=True),
               "tiny_a_tar": _tar(d / "tiny-a", d / "tiny-a.tar"),
               "tiny_b_tar": _tar(d / "tiny-b", d / "tiny-b.tar"), "plan": plan}
    return out


@pytest.fixture(scope="module")
def pair(corpora):
    return build_pair(corpora("debian-minbase"))


# CPU seconds (user + system, every thread) of each run, by contender: wall
# times on a shared machine depend on its load, CPU time much less.
CPU: Dict[str, List[float]] = {}


def _diff_r(a: Path, b: Path) -> Contender:
    argv = ["diff", "-r", "--no-dereference", str(a), str(b)]

    def run(_target):
        c0 = children_cpu()
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        CPU.setdefault("diff -r", []).append(children_cpu() - c0)
        assert p.returncode in (0, 1), p.stderr.decode(errors="replace")[-2000:]
        return p.returncode
    return Contender("diff -r", run, "diff -r --no-dereference A B", goal=GOAL)


def _extract_and_diff(ta: Path, tb: Path, gz: bool) -> Contender:
    """What one does today with two layer tarballs: extract both, then diff -r."""
    x = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*"] + (["-z"] if gz else [])

    def run(target: Path):
        c0 = children_cpu()
        for tb_, name in ((ta, "a"), (tb, "b")):
            d = target / name
            d.mkdir()
            subprocess.run(x + ["-xf", str(tb_), "-C", str(d)], check=True)
        p = subprocess.run(["diff", "-r", "--no-dereference", str(target / "a"),
                            str(target / "b")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        CPU.setdefault("tar -x + diff -r", []).append(children_cpu() - c0)
        assert p.returncode in (0, 1), p.stderr.decode(errors="replace")[-2000:]
        return p.returncode
    return Contender("tar -x both + diff -r", run,
                     f"tar -x{'z' if gz else ''}f A -C a; tar -x{'z' if gz else ''}f B -C b; "
                     "diff -r --no-dereference a b", goal=GOAL)


def _api(a, b) -> Contender:
    from layerfs.diff import compare

    def run(_target):
        c0 = time.process_time()
        d = compare(str(a), str(b), renames=True)
        changes = list(d)
        CPU.setdefault("layerfs", []).append(time.process_time() - c0)
        return changes, d.summary
    return Contender("layerfs.diff.compare", run, f"compare({Path(a).name}, {Path(b).name})")


def _cli(cli, a, b) -> Contender:
    argv = cli + ["diff", "--json", str(a), str(b)]

    def run(_target):
        c0 = children_cpu()
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        CPU.setdefault("layerfs", []).append(children_cpu() - c0)
        assert p.returncode == 1, p.stderr.decode(errors="replace")[-2000:]
        doc = json.loads(p.stdout)
        return doc["changes"], doc["summary"]
    return Contender("layerfs diff", run, f"layerfs diff --json {Path(a).name} {Path(b).name}")


_RSS_CODE = r"""
import json, resource, sys
from layerfs.diff import compare
n = 0
if sys.argv[1] != "-":
    d = compare(sys.argv[1], sys.argv[2], renames=True)
    n = sum(1 for _ in d)
hwm = next((int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")), None)
print(json.dumps({"changes": n, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "vmhwm_kib": hwm}))
"""

# Linux carries a process's peak RSS across fork and exec (ru_maxrss starts at
# the parent's high-water mark): the worker is started from a small launcher so
# that its ru_maxrss measures the comparison, not the benchmark process.
_LAUNCH = r"""
import subprocess, sys
sys.stdout.write(subprocess.run(sys.argv[1:], capture_output=True, text=True,
                                check=True).stdout)
"""


def peak_rss(a, b) -> Dict[str, int]:
    p = subprocess.run([sys.executable, "-c", _LAUNCH, sys.executable, "-c", _RSS_CODE,
                        str(a), str(b)], capture_output=True, text=True, check=True)
    return json.loads(p.stdout)


def _check(result, plan) -> int:
    """The changes layerfs found are the edits made (plus the directories written into)."""
    changes, summary = result
    if isinstance(summary, dict):
        by = {c["path"]: (c["code"], set(c["fields"])) for c in changes}
        renamed = {c["path"]: c.get("old_path") for c in changes if c["code"] == "R"}
    else:
        by = {c.path: (c.code, set(c.fields)) for c in changes}
        renamed = {c.path: c.old_path for c in changes if c.code == "R"}
    for f in plan["content"]:
        code, fields = by["/" + f]
        assert code == "M" and {"content", "size"} <= fields, (f, by["/" + f])
    for f in plan["mode"]:
        assert by["/" + f] == ("M", {"mode"}), (f, by["/" + f])
    for f in plan["delete"]:
        assert by["/" + f][0] == "D", f
    for f in plan["rename"]:
        assert renamed["/" + f + ".moved"] == "/" + f
    for f in plan["add"]:
        assert by["/" + f][0] == "A", f
    expected = sum(len(v) for v in plan.values()) + 1       # + the new directory
    assert len(by) == expected, (len(by), expected)
    return len(by)


_STARTUP: Dict[str, float] = {}


def cli_startup(cli) -> float:
    """Median wall time of ``layerfs diff --json`` of two empty directories: the
    interpreter, imports and argument handling, on one core."""
    if "diff" not in _STARTUP:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="layerfs-bench-startup-") as tmp:
            for d in ("a", "b"):
                os.mkdir(os.path.join(tmp, d))
            argv = cli + ["diff", "--json", os.path.join(tmp, "a"), os.path.join(tmp, "b")]
            _STARTUP["diff"] = median_wall(lambda i: argv)
    return _STARTUP["diff"]


def _run(side_by_side, me, peer_a, peer_b, plan, rss_pair, extra_peers=(), **info):
    CPU.clear()
    result = side_by_side.run(me, [_diff_r(peer_a, peer_b), *extra_peers], **info)
    x = side_by_side.benchmark.extra_info
    for who, key in (("layerfs", "cpu_s"), ("diff -r", "peer_cpu_s"),
                     ("tar -x + diff -r", "extract_diff_cpu_s")):
        if CPU.get(who):
            x[key] = round(statistics.median(CPU[who]), 4)
    if x.get("cpu_s") and x.get("peer_cpu_s"):
        x["cpu_ratio"] = round(x["cpu_s"] / x["peer_cpu_s"], 3)
    if x.get("cpu_s"):
        # no run with that much CPU can be shorter here (start-up on one core)
        x["cpu_bound_s"] = cpu_bound(x["cpu_s"], x.get("cli_startup_s") or 0.0)
    if result is not None and not isinstance(result, int):
        info_n = _check(result, plan)
        side_by_side.benchmark.extra_info["changes"] = info_n
    rss = peak_rss(*rss_pair)
    base = peak_rss("-", "-")
    x["peak_rss_kib"] = rss["maxrss_kib"]
    x["import_rss_kib"] = base["maxrss_kib"]


@pytest.mark.benchmark(group="diff two directories")
def test_dirs_api_vs_diff_r(side_by_side, pair):
    a, b = pair["a"], pair["b"]
    _run(side_by_side, _api(a, b), a, b, pair["plan"], (a, b), inputs="directories")
    tiny = peak_rss(pair["tiny_a"], pair["tiny_b"])
    side_by_side.benchmark.extra_info["tiny_peak_rss_kib"] = tiny["maxrss_kib"]


@pytest.mark.benchmark(group="diff two directories (CLI)")
def test_dirs_cli_vs_diff_r(side_by_side, pair, layerfs_cli):
    a, b = pair["a"], pair["b"]
    _run(side_by_side, _cli(layerfs_cli, a, b), a, b, pair["plan"], (a, b),
         inputs="directories (CLI)", cli_startup_s=cli_startup(layerfs_cli))


@pytest.mark.benchmark(group="diff two layer tarballs")
@pytest.mark.parametrize("ext", ["tar", "gz"])
def test_tarballs_api_vs_diff_r(side_by_side, pair, ext):
    ta, tb = pair[f"a_{ext}"], pair[f"b_{ext}"]
    _run(side_by_side, _api(ta, tb), pair["a"], pair["b"], pair["plan"], (ta, tb),
         extra_peers=[_extract_and_diff(ta, tb, ext == "gz")],
         inputs=f"layer tarballs ({ext}) vs extracted directories")
    if ext == "tar":
        tiny = peak_rss(pair["tiny_a_tar"], pair["tiny_b_tar"])
        side_by_side.benchmark.extra_info["tiny_peak_rss_kib"] = tiny["maxrss_kib"]


@pytest.mark.benchmark(group="diff two layer tarballs (CLI, --json)")
def test_tarballs_cli_vs_diff_r(side_by_side, pair, layerfs_cli):
    ta, tb = pair["a_tar"], pair["b_tar"]
    _run(side_by_side, _cli(layerfs_cli, ta, tb), pair["a"], pair["b"], pair["plan"],
         (ta, tb), inputs="layer tarballs (CLI) vs extracted directories",
         cli_startup_s=cli_startup(layerfs_cli))
