"""Copying a tree: layerfs copy_tree against ``cp -a``.

Run with:  pytest bench/test_bench_copy.py --benchmark-enable

Trees: the ``debian-minbase`` and ``site-packages`` corpora, and ``small-files``,
a synthetic tree of 30,000 small files (100 B .. 8 KiB, 750 directories), built
once under ``$LAYERFS_BENCH_CACHE/small-files`` and reused.

    same-fs   the tree is first copied (untimed) onto the benchmark's fresh
              filesystem and both contenders copy it within that filesystem:
              what a storage driver does when it snapshots a layer directory.
    cross-fs  both copy from the cache (host ext4) onto the fresh filesystem.

Each round runs ``cp -a SRC DEST`` and then ``_native.copy_tree`` into new
destinations on the fresh filesystem (nothing is deleted between rounds); the
ratio layerfs/cp (goal <= 1) goes to extra_info.  After the rounds both copies
are checked entry by entry (type, mode, owner, size, mtime, link count, link
target) against the source.
"""
from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest

from bench import corpora as C
from bench.conftest import Contender, run_command

SMALL_FILES = 30_000
SMALL_DIRS = (30, 25)                     # 30 packages x 25 modules x 40 files


def _build_small_files(dest: Path) -> None:
    rnd = random.Random(20261128)
    per_dir = SMALL_FILES // (SMALL_DIRS[0] * SMALL_DIRS[1])
    for a in range(SMALL_DIRS[0]):
        for b in range(SMALL_DIRS[1]):
            d = dest / f"pkg{a:02d}" / f"mod{b:02d}"
            d.mkdir(parents=True)
            for c in range(per_dir):
                (d / f"f{c:03d}.py").write_bytes(rnd.randbytes(rnd.randint(100, 8192)))


def small_files_tree() -> Path:
    """The synthetic small-files tree (built once, renamed into place when complete)."""
    top = C.CACHE / "small-files"
    tree = top / "tree"
    if tree.is_dir():
        return tree
    top.mkdir(parents=True, exist_ok=True)
    part = top / f"tree.partial.{os.getpid()}"
    if part.exists():
        shutil.rmtree(part)
    part.mkdir()
    _build_small_files(part)
    try:
        os.rename(part, tree)
    except OSError:                       # built meanwhile by another process
        shutil.rmtree(part)
    return tree


def _source_tree(name: str, corpora) -> Path:
    if name == "small-files":
        return small_files_tree()
    return corpora(name).tree


def _entries(root: Path) -> Dict[str, Tuple]:
    """lstat view of every entry below root (content not read)."""
    out: Dict[str, Tuple] = {}
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        rel = stack.pop()
        full = os.path.join(base, rel) if rel else base
        with os.scandir(full) as it:
            for e in it:
                r = os.path.join(rel, e.name) if rel else e.name
                st = e.stat(follow_symlinks=False)
                key = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(r)
                    out[r] = key + (st.st_mtime_ns,)
                elif stat.S_ISLNK(st.st_mode):
                    out[r] = key + (os.readlink(e.path),)
                else:
                    out[r] = key + (st.st_size, st.st_mtime_ns, st.st_nlink, st.st_rdev)
    return out


def _check_copy(src: Path, dst: Path, who: str) -> None:
    want, got = _entries(src), _entries(dst)
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    differ = [p for p in want if p in got and want[p] != got[p]][:5]
    assert not (missing or extra or differ), \
        f"{who}: copy {dst} differs from {src}: missing {missing}, extra {extra}, " \
        f"differ {[(p, want[p], got[p]) for p in differ]}"


def _layerfs_copy(src: Path) -> Contender:
    from layerfs import _native

    def run(dest: Path):
        s = os.open(src.parent, os.O_RDONLY | os.O_DIRECTORY)
        d = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return _native.copy_tree(s, src.name, d, dest.name)
        finally:
            os.close(s)
            os.close(d)
    return Contender("layerfs copy_tree", run, "_native.copy_tree(SRC, DEST)", fresh="path")


def _cp(src: Path) -> Contender:
    return Contender("cp -a", lambda dest: run_command(["cp", "-a", src, dest]),
                     "cp -a SRC DEST", fresh="path", goal=1.0)


@pytest.mark.benchmark(group="copy tree")
@pytest.mark.parametrize("where", ["same-fs", "cross-fs"])
@pytest.mark.parametrize("tree", ["debian-minbase", "site-packages", "small-files"])
def test_copy_tree_vs_cp(side_by_side, fresh_fs, corpora, tree, where, peers_only):
    cached = _source_tree(tree, corpora)
    if where == "same-fs":
        src = fresh_fs.new_dir("source") / "tree"
        run_command(["cp", "-a", cached, src])
        os.sync()                         # the staging copy's writeback is not timed
    else:
        src = cached
    me = None if peers_only else _layerfs_copy(src)
    side_by_side.run(me, [_cp(src)], tree=tree, where=where, source=str(src),
                     entries=len(_entries(src)))
    for who, dest in side_by_side.last.items():
        _check_copy(src, dest, who)
    stats = side_by_side.last_result.get("layerfs copy_tree")
    if stats is not None:
        side_by_side.benchmark.extra_info["copy_stats"] = {
            "files": stats.files, "dirs": stats.dirs, "bytes": stats.bytes,
            "hardlinks": stats.hardlinks, "reflinked": stats.reflinked}
