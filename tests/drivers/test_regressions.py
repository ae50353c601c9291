"""Regressions: each test names the bug it keeps fixed."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import layerfs.drivers as drivers

from .conformance import Mounted, build_stack, file_, tar_members
from .conftest import mounts_under

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=list(drivers.BUILTIN))
def driver_name(request):
    return request.param


def test_start_does_not_sweep_a_layer_another_process_is_staging(make_driver):
    """A new driver object swept staging/ without the store lock, deleting the
    half-made layer of a process that was creating one."""
    d = make_driver()
    stage = os.path.join(d.root, "staging", "new-0123456789abcdef")
    lock = os.path.join(d.root, "lock")
    done = os.path.join(d.root, "layers", "made")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({lock!r}, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.makedirs({stage!r} + "/diff")
        print("locked", flush=True)
        sys.stdin.readline()
        os.rename({stage!r}, {done!r})
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        made = []
        t = threading.Thread(target=lambda: made.append(type(d)(d.root, **d.options)))
        t.start()
        t.join(0.5)
        assert t.is_alive(), "the new driver object must wait for the store lock"
        assert os.path.isdir(stage)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        t.join(30)
        assert made and os.path.isdir(done)
    finally:
        holder.kill() if holder.poll() is None else None
        holder.wait()


@pytest.mark.parametrize("driver_name", ["overlay"])
def test_diff_closed_early_leaves_no_view_mounted(make_driver):
    """The exact-diff views stayed mounted when the reader closed the stream early."""
    d = make_driver("overlay", mount_options=["redirect_dir=on"])
    ids = build_stack(d, [[file_("a", os.urandom(1 << 20))]])
    d.create_rw("ctr", ids[0])
    with Mounted(d, "ctr") as m:
        os.mkdir(os.path.join(m, "dir"))
        os.rename(os.path.join(m, "dir"), os.path.join(m, "dir2"))
        Path(m, "big").write_bytes(os.urandom(8 << 20))
    s = d.diff("ctr")
    s.read(10)
    s.close()
    assert not [m for m in mounts_under(d.root) if "/staging/" in m]


@pytest.mark.parametrize("driver_name", ["overlay"])
def test_fuse_overlayfs_private_xattrs_stay_out_of_the_diff(make_driver):
    """fuse-overlayfs keeps user.fuseoverlayfs.* xattrs in the upper dir; the
    native diff copied them into the layer."""
    d = make_driver("overlay", mount_program="fuse-overlayfs")
    ids = build_stack(d, [[file_("a", b"a")]])
    d.create_rw("ctr", ids[0])
    with Mounted(d, "ctr") as m:
        with open(os.path.join(m, "a"), "ab") as f:
            f.write(b"more")
    members = tar_members(d.diff("ctr"))
    assert members["a"].data == b"amore"
    assert not [k for k in members["a"].info.pax_headers if "fuseoverlayfs" in k]


@pytest.mark.parametrize("driver_name", ["overlay"])
def test_remount_of_a_container_layer_after_a_crash(make_driver):
    """A work dir left as a crashed mount left it (work/work inside) must not stop
    the next mount."""
    d = make_driver("overlay")
    ids = build_stack(d, [[file_("a", b"a")], [file_("b", b"b")]])
    d.create_rw("ctr", ids[-1])
    with Mounted(d, "ctr") as m:
        Path(m, "c").write_bytes(b"c")
    work = os.path.join(d.layer_dir("ctr"), "work")
    os.makedirs(os.path.join(work, "work", "#1f"), exist_ok=True)
    with Mounted(d, "ctr") as m:
        assert sorted(os.listdir(m)) == ["a", "b", "c"]
