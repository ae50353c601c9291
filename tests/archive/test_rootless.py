"""Layers stacked without root: a lower layer's directory that is closed to its
owner (0555 as Fedora ships /usr/bin, 0500, 0000) still takes what a later layer
puts in it or removes from it, and keeps its mode afterwards.

Every apply runs in a child process as uid/gid 65534 (nobody) onto a root that
nobody owns; the test process (root) then checks the tree."""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from tests.cli.test_contract_audit import as_nobody

from . import tarbuild
from .tarbuild import Tar

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.fixture
def root(tmp_path):
    os.chmod(tmp_path, 0o755)
    r = tmp_path / "root"
    r.mkdir()
    os.chown(r, NOBODY, NOBODY)
    return r


def apply_as_nobody(root: Path, layer, **options):
    """Apply layer (a Tar or its bytes) onto root as nobody; (errno or 0, stderr)."""
    options.setdefault("owners", "skip")
    data = layer.bytes() if isinstance(layer, Tar) else layer
    return tarbuild.apply_as_nobody(root, data, env=dict(os.environ, PYTHONPATH=str(REPO)), **options)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


LOWER = (Tar().dir("usr/", mode=0o755).dir("usr/bin/", mode=0o555).file("usr/bin/sh", b"sh", mode=0o555)
         .file("usr/bin/old", b"old").dir("usr/bin/sub/", mode=0o555).file("usr/bin/sub/x", b"x")
         .dir("locked/", mode=0o500).dir("locked/inner/", mode=0o755).file("locked/inner/keep", b"k")
         .file("locked/inner/drop", b"d")
         .dir("shut/", mode=0o000).dir("shut/deep/", mode=0o700).file("shut/deep/f", b"f")
         .dir("listed/", mode=0o555))


def test_later_layer_writes_into_closed_lower_directories(root):
    rc, err = apply_as_nobody(root, LOWER)
    assert rc == 0, err
    upper = (Tar().file("usr/bin/tool", b"tool", mode=0o755)       # a new file
             .file("usr/bin/sh", b"new sh", mode=0o555)             # a file over a file
             .whiteout("usr/bin/old")                               # a whiteout
             .symlink("usr/bin/link", "tool").fifo("usr/bin/pipe")
             .dir("usr/bin/newdir/", mode=0o750).file("usr/bin/newdir/f", b"nf")
             .hardlink("locked/inner/hl", "usr/bin/tool")          # link across closed dirs
             .opaque("locked/inner").file("locked/inner/mine", b"m")
             .file("shut/deep/g", b"g")                             # through a 0000 directory
             .file("usr/bin/sub/y", b"y")
             .dir("listed/", mode=0o750).file("listed/z", b"z"))   # the layer's own mode wins
    rc, err = apply_as_nobody(root, upper)
    assert rc == 0, err

    # the closed directories got what the layer put there and keep their modes
    assert (mode(root / "usr/bin"), mode(root / "usr/bin/sub")) == (0o555, 0o555)
    assert (mode(root / "locked"), mode(root / "shut")) == (0o500, 0o000)
    assert mode(root / "listed") == 0o750
    assert mode(root / "usr/bin/newdir") == 0o750
    os.chmod(root / "shut", 0o700)               # root reads through 0000 anyway; be plain
    bin_ = root / "usr/bin"
    assert sorted(os.listdir(bin_)) == ["link", "newdir", "pipe", "sh", "sub", "tool"]
    assert (bin_ / "tool").read_bytes() == b"tool" and (bin_ / "sh").read_bytes() == b"new sh"
    assert os.readlink(bin_ / "link") == "tool"
    assert stat.S_ISFIFO(os.lstat(bin_ / "pipe").st_mode)
    assert sorted(os.listdir(bin_ / "sub")) == ["x", "y"]
    assert sorted(os.listdir(root / "locked/inner")) == ["hl", "mine"]
    assert os.path.samefile(root / "locked/inner/hl", bin_ / "tool")
    assert sorted(os.listdir(root / "shut/deep")) == ["f", "g"]
    assert (root / "listed/z").read_bytes() == b"z"


def test_whiteout_and_opaque_in_closed_directories(root):
    rc, err = apply_as_nobody(root, LOWER)
    assert rc == 0, err
    rc, err = apply_as_nobody(root, Tar().whiteout("usr/bin/sub").opaque("locked").whiteout("shut/deep"))
    assert rc == 0, err
    assert sorted(os.listdir(root / "usr/bin")) == ["old", "sh"]
    assert os.listdir(root / "locked") == []
    assert os.listdir(root / "shut") == []
    assert (mode(root / "usr/bin"), mode(root / "locked"), mode(root / "shut")) == (0o555, 0o500, 0)


def test_failed_layer_puts_modes_back(root):
    rc, err = apply_as_nobody(root, LOWER)
    assert rc == 0, err
    # locked/x is made (locked opened up for it), then its data ends early
    broken = Tar().file("usr/bin/tool", b"tool").file("locked/x", b"x" * 600).bytes()[:2048 + 100]
    rc, err = apply_as_nobody(root, broken)
    assert rc != 0 and "locked/x" in err, err
    assert (mode(root / "usr/bin"), mode(root / "locked")) == (0o555, 0o500)


def test_directory_owned_by_another_user_is_left_alone(root):
    (root / "theirs").mkdir()
    os.chmod(root / "theirs", 0o555)             # root's, not nobody's
    rc, err = apply_as_nobody(root, Tar().file("theirs/f", b"f"))
    assert rc == errno.EACCES and "theirs/f" in err, err
    assert mode(root / "theirs") == 0o555 and os.listdir(root / "theirs") == []


@pytest.fixture
def nobodys_dir():
    """A directory of nobody's whose parents nobody can search (/var/tmp)."""
    work = Path(tempfile.mkdtemp(prefix="layerfs-rootless-", dir="/var/tmp"))
    os.chown(work, NOBODY, NOBODY)
    yield work
    shutil.rmtree(work)


def test_cli_unpack_of_stacked_layers_as_nobody(nobodys_dir):
    work = nobodys_dir
    (work / "1.tar").write_bytes(LOWER.bytes())
    (work / "2.tar").write_bytes(Tar().file("usr/bin/tool", b"tool").whiteout("usr/bin/old").bytes())
    p = as_nobody("unpack", "--owners", "skip", "1.tar", "2.tar", "rootfs", cwd=work)
    assert p.returncode == 0, p.stderr
    bin_ = work / "rootfs/usr/bin"
    assert sorted(os.listdir(bin_)) == ["sh", "sub", "tool"]
    assert mode(bin_) == 0o555


def test_read_only_file_with_user_xattr(root):
    # user.* xattrs need write permission on the file: without root they go on
    # before a read-only mode does
    t = (Tar().file("ro", b"r", mode=0o444, pax={"SCHILY.xattr.user.tag": "v"})
         .file("rx", b"x", mode=0o4555, pax={"SCHILY.xattr.user.tag": "w"}))
    rc, err = apply_as_nobody(root, t)
    assert rc == 0, err
    assert (mode(root / "ro"), mode(root / "rx")) == (0o444, 0o4555)
    assert os.getxattr(root / "ro", "user.tag") == b"v"
    assert os.getxattr(root / "rx", "user.tag") == b"w"


def test_tar_split_record_of_unreadable_files(root):
    # a tar-split record keeps the content of a file the layer replaces, and
    # rebuilds the stream from the files left; without root, files of mode
    # 0000 (as Fedora's /etc/shadow) are read through a moment of u+r
    t = (Tar().file("shadow", b"s" * 700, mode=0).file("h", b"h" * 900, mode=0)
         .file("h", b"H" * 50, mode=0o644).dir("etc/", mode=0o755).file("etc/gshadow", b"g", mode=0))
    layer = root.parent / "split.tar"
    layer.write_bytes(t.bytes())
    record = root.parent / "record"
    record.touch()
    os.chown(record, NOBODY, NOBODY)
    in_fd = os.open(layer, os.O_RDONLY)
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    rec_fd = os.open(record, os.O_RDWR)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        p = tarbuild.run_as_nobody(
            f"r = _native.apply({in_fd}, {root_fd}, owners='skip', record_fd={rec_fd})\n"
            f"os.lseek({rec_fd}, 0, 0)\n"
            f"d = _native.reassemble({rec_fd}, {root_fd})\n"
            "assert d.diff_id == r.digests.diff_id, (d, r)", [in_fd, root_fd, rec_fd], env=env)
    finally:
        for fd in (in_fd, root_fd, rec_fd):
            os.close(fd)
    assert p.returncode == 0, p.stderr
    assert (mode(root / "shadow"), mode(root / "etc/gshadow"), mode(root / "h")) == (0, 0, 0o644)


def test_without_root_owner_and_device_errors_say_what_can_be_skipped(root):
    rc, err = apply_as_nobody(root, Tar().file("f", b"f", uid=1000, gid=1000), owners="keep")
    assert rc == errno.EPERM and "entry 'f'" in err and "owners can be skipped" in err, err
    rc, err = apply_as_nobody(root, Tar().char("null", 1, 3))
    assert rc == errno.EPERM and "entry 'null'" in err and "devices can be skipped" in err, err
    rc, err = apply_as_nobody(root, Tar().char("null", 1, 3), skip_devices=True)
    assert rc == 0, err
