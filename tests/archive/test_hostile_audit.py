"""Hostile layers, second pass: what test_hostile.py and test_extract_native.py
leave out.

Cases run through the Sandbox of test_hostile (a child process per apply, a
sentinel tree beside the root that must not change in any byte or attribute)
unless they need something it cannot give: a syscall count (strace) to show
that hostile repetition costs linear work, or an unprivileged caller (setpriv).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .model import snapshot
from .tarbuild import Tar
from .test_hostile import EVIL, REJECT, SAFE_ERRORS, Sandbox, _link_targets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sb(tmp_path):
    return Sandbox(tmp_path)


def read(p: Path) -> bytes:
    return p.read_bytes()


# ---------------------------------------------------------------- repetition costs

APPLY = "import sys; from layerfs.archive import apply_layer; apply_layer(sys.argv[1], sys.argv[2])"


def _getdents_calls(tmp: Path, data: bytes) -> int:
    """getdents64 calls made by a child process that applies data (directory reads)."""
    layer, trace, dest = tmp / "layer.tar", tmp / "trace", tmp / "dest"
    layer.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=getdents64", "-o", str(trace),
                    sys.executable, "-c", APPLY, str(layer), str(dest)],
                   check=True, env=env, cwd=REPO, timeout=300)
    calls = sum(1 for line in trace.read_text().splitlines() if "getdents64(" in line)
    shutil.rmtree(dest)
    return calls


@pytest.mark.parametrize("kind", ["opaque", "whiteout", "nested"])
def test_repeated_opaque_markers_do_not_rescan_the_directory(tmp_path, kind):
    # A few bytes of gzip per marker, a full directory scan per marker: a layer
    # of n files and n repeated markers would cost n*n.  Once a directory has
    # been pruned, nothing lower can reappear in it except through a symlink.
    n = 400
    base = Tar().dir("d/")
    for i in range(n):
        base.file(f"d/f{i}", b"")
    once, many = Tar(), Tar()
    once.parts, many.parts = list(base.parts), list(base.parts)
    if kind == "nested":
        # d/s/s/s/...: every marker also walks all the levels below it
        deep = "d"
        for _ in range(60):
            deep += "/s"
            for t in (once, many):
                t.dir(deep + "/").file(deep + "/x", b"x")
        many.opaque("d")
        levels = "d"
        for _ in range(60):
            levels += "/s"
            many.opaque(levels)
        once.opaque("d")
    else:
        mark = (lambda t: t.opaque("d")) if kind == "opaque" else (lambda t: t.whiteout("d"))
        mark(once)
        for _ in range(n):
            mark(many)
    one = _getdents_calls(tmp_path, once.bytes())
    repeated = _getdents_calls(tmp_path, many.bytes())
    assert repeated <= one + 20, (one, repeated)


def test_repeated_opaque_markers_still_prune_after_writes_through_a_symlink(sb):
    # the memo of pruned directories must not survive content that reached the
    # directory under another name
    sb.make_root(lambda r: ((r / "d").mkdir(), (r / "d" / "lower").write_bytes(b"lower"),
                            (r / "d" / "sub").mkdir(), (r / "d" / "sub" / "lower").write_bytes(b"l")))
    t = (Tar().dir("d/").dir("d/sub/").file("d/sub/mine", b"m").opaque("d")
         .symlink("l", "d").file("l/via-link", EVIL).dir("l/sub/").file("l/sub/via-link", EVIL)
         .opaque("d"))
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert sorted(os.listdir(sb.root / "d")) == ["sub"]
    assert sorted(os.listdir(sb.root / "d" / "sub")) == ["mine"]


# ---------------------------------------------------------------- unprivileged callers

def _apply_as_nobody(tmp_path: Path, data: bytes, **options):
    """Apply data onto tmp_path/root (made here, owned by nobody) in a child that
    runs as nobody; returns (errno or 0, stderr)."""
    root = tmp_path / "root"
    root.mkdir()
    os.chown(root, 65534, 65534)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(data)
    in_fd = os.open(layer, os.O_RDONLY)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    code = ("import os, sys; from layerfs import _native; os.setgroups([]); "
            "os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)\n"
            "try:\n"
            f"    _native.apply({in_fd}, {root_fd}, **{options!r})\n"
            "except OSError as e:\n"
            "    print(e, file=sys.stderr); sys.exit(e.errno)")
    try:
        p = subprocess.run([sys.executable, "-c", code], pass_fds=[in_fd, root_fd],
                           capture_output=True, text=True, cwd="/",
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        os.close(in_fd)
        os.close(root_fd)
    return p.returncode, p.stderr


def test_unprivileged_directory_listed_twice_with_mode_0000(tmp_path):
    # Without root, directory modes are set at the end; a directory listed twice
    # used to be chmodded 0000 by its first record and then could not be opened
    # for its second one.
    t = (Tar().dir("d/", mode=0).file("d/f", b"f").dir("d/", mode=0).file("d/g", b"g")
         .dir("e/", mode=0o500).dir("e/sub/", mode=0).dir("e/", mode=0o500).dir("e/sub/", mode=0))
    rc, err = _apply_as_nobody(tmp_path, t.bytes(), owners="skip")
    assert rc == 0, err
    root = tmp_path / "root"
    assert stat.S_IMODE(os.lstat(root / "d").st_mode) == 0
    assert stat.S_IMODE(os.lstat(root / "e").st_mode) == 0o500
    assert stat.S_IMODE(os.lstat(root / "e" / "sub").st_mode) == 0
    assert sorted(os.listdir(root / "d")) == ["f", "g"]
    assert read(root / "d" / "g") == b"g"
