"""The vfs driver: the conformance suite, and what is particular to full copies."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from layerfs.diff import compare_trees

from .conformance import Conformance, Mounted, build_stack, diff_bytes, dir_, file_, tar_members


class TestVfs(Conformance):
    DRIVER = "vfs"


@pytest.fixture
def driver_name():
    return "vfs"


def test_a_child_starts_as_an_exact_copy(make_driver):
    d = make_driver("vfs")
    ids = build_stack(d, [[dir_("etc", mode=0o750, uid=1000),
                           file_("etc/conf", b"c" * 5000, mode=0o600, uid=1000, gid=100,
                                 xattrs={"user.k": b"v"}),
                           file_("bin", b"#!", mode=0o755)]])
    base = d.diff_dir(ids[0])
    os.link(os.path.join(base, "bin"), os.path.join(base, "bin2"))  # a hardlink in the layer
    os.utime(os.path.join(base, "bin"), ns=(1_600_000_000_123_456_789,) * 2)
    d.create("child", ids[0])
    child = d.diff_dir("child")
    assert list(compare_trees(base, child, dir_mtime=True)) == []
    a, b = os.lstat(os.path.join(child, "bin")), os.lstat(os.path.join(child, "bin2"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2           # hardlinks kept
    assert a.st_ino != os.lstat(os.path.join(base, "bin")).st_ino  # but a copy
    copy = d.get("child").extra["copy"]
    assert copy["files"] >= 2 and copy["hardlinks"] == 1
    # nothing changed: the diff is empty
    assert d.changes("child") == []
    assert tar_members(io.BytesIO(diff_bytes(d, "child"))) == {}


def test_writes_never_reach_the_parent(make_driver):
    d = make_driver("vfs")
    ids = build_stack(d, [[file_("f", b"parent")]])
    d.create_rw("ctr", ids[0])
    with Mounted(d, "ctr") as m:
        with open(os.path.join(m, "f"), "r+b") as f:   # in place, no new inode
            f.write(b"CHILD!")
    assert Path(d.diff_dir(ids[0]), "f").read_bytes() == b"parent"
    assert Path(d.diff_dir("ctr"), "f").read_bytes() == b"CHILD!"
    assert d.changes("ctr") == [("/f", "modified")]


def test_mount_is_a_bind_of_the_layer_directory(make_driver):
    d = make_driver("vfs")
    ids = build_stack(d, [[file_("f", b"x")]])
    (m,) = d.mounts(ids[0])
    assert m.type == "bind" and m.source == d.diff_dir(ids[0]) and "ro" in m.options
    d.create_rw("ctr", ids[0])
    (m,) = d.mounts("ctr")
    assert "ro" not in m.options
    with Mounted(d, "ctr") as p:
        Path(p, "new").write_bytes(b"n")
    assert Path(d.diff_dir("ctr"), "new").read_bytes() == b"n"
