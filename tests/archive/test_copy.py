"""File and tree copies (csrc/copy.c) through _native.copy_file / copy_tree.

Every test builds a real tree (as root: owners, devices, trusted.* and
security.capability xattrs), copies it, and compares the copy with the source
through tests.archive.model.snapshot: type, mode, owner, content digest, link
target, device numbers, xattrs, mtimes, hardlink groups and data extents.
"""
from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from layerfs import _native
from layerfs.errors import LayerError

from .model import assert_same_tree, snapshot

# A file capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2).
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)
OLD = 1_000_000_000                     # 2001-09-09, before the relatime window
NS = 123_456_789


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("copy tests run as root (owners, devices, trusted xattrs)")


def dirfd(path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def copy_tree(src: Path, dst: Path, flags: int = 0) -> _native.CopyStats:
    s, d = dirfd(src.parent), dirfd(dst.parent)
    try:
        return _native.copy_tree(s, src.name, d, dst.name, flags)
    finally:
        os.close(s)
        os.close(d)


def copy_file(src: Path, dst: Path, flags: int = 0) -> _native.CopyStats:
    s, d = dirfd(src.parent), dirfd(dst.parent)
    try:
        return _native.copy_file(s, src.name, d, dst.name, flags)
    finally:
        os.close(s)
        os.close(d)


def settime(p: Path, sec: int = OLD, ns: int = NS, atime_sec: int = OLD - 1000) -> None:
    os.utime(p, ns=(atime_sec * 10**9 + 7, sec * 10**9 + ns), follow_symlinks=False)


def make_sparse(p: Path, size: int = 8 << 20, data_at=(1 << 20,), chunk=b"D" * 4096) -> None:
    with open(p, "wb") as f:
        f.truncate(size)
        for off in data_at:
            f.seek(off)
            f.write(chunk)


def make_socket(p: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(os.fspath(p))
    finally:
        s.close()


def build_every_type(root: Path) -> None:
    """One of everything, with owners, modes, xattrs and old ns mtimes."""
    root.mkdir()
    (root / "d").mkdir()
    f = root / "d" / "file"
    f.write_bytes(b"hello world\n" * 1000)
    os.chown(f, 1000, 2000)
    os.chmod(f, 0o4751)
    os.setxattr(f, "user.note", b"some \x00 bytes")
    os.setxattr(f, "trusted.t", b"T")
    os.setxattr(f, "security.capability", CAP_NET_BIND)
    (root / "d" / "empty").write_bytes(b"")
    big = root / "big"
    big.write_bytes(os.urandom(3 << 20) + b"tail")
    make_sparse(root / "sparse")
    make_sparse(root / "allhole", data_at=())
    make_sparse(root / "leadhole", size=3 << 20, data_at=(2 << 20,), chunk=b"x" * 8192)
    os.link(f, root / "hard1")
    os.link(f, root / "d" / "hard2")
    os.symlink("d/file", root / "sym")
    os.symlink("/etc/passwd", root / "d" / "abs")
    os.lchown(root / "sym", 33, 44)
    os.setxattr(root / "sym", "trusted.sym", b"on a symlink", follow_symlinks=False)
    os.mknod(root / "chr", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "blk", 0o640 | stat.S_IFBLK, os.makedev(8, 1))
    os.mkfifo(root / "fifo", 0o604)
    os.chown(root / "fifo", 5, 6)
    make_socket(root / "sock")
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    ro = root / "ro"
    ro.mkdir()
    (ro / "inner").write_bytes(b"x")
    os.setxattr(ro, "user.dir", b"dir xattr")
    os.chown(ro, 7, 8)
    os.chmod(ro, 0o555)
    long = root / ("L" * 255)
    long.mkdir()
    (long / ("n" * 255)).write_bytes(b"long")
    for p in [f, big, root / "sparse", root / "d" / "empty", root / "chr", root / "fifo",
              root / "sym", long / ("n" * 255), long, sticky, ro / "inner", ro, root / "d", root]:
        settime(p)


def test_copy_tree_every_type(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_every_type(src)
    before = snapshot(src, holes=True, include_root=True)
    st = copy_tree(src, dst)
    assert_same_tree(before, snapshot(dst, holes=True, include_root=True), "copy")
    # the source is untouched
    assert_same_tree(before, snapshot(src, holes=True, include_root=True), "source after copy")
    assert st.hardlinks == 2             # hard1, d/hard2
    assert st.dirs == 5                  # src itself, d, tmp, ro, LLL...
    assert st.files == 14                # the other non-directories
    assert st.bytes >= (3 << 20) + 12000


def test_copy_tree_counts(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "f").write_bytes(b"12345")
    (src / "a" / "b" / "g").write_bytes(b"678")
    os.link(src / "a" / "f", src / "h")
    os.symlink("x", src / "s")
    st = copy_tree(src, tmp_path / "dst")
    assert (st.files, st.dirs, st.bytes, st.hardlinks, st.reflinked) == (3, 3, 8, 1, 0)


def test_copy_keeps_metadata_order(tmp_path):
    """chown clears set-id bits and file capabilities: they must survive the copy."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "ping"
    f.write_bytes(b"\x7fELF")
    os.chown(f, 0, 0)
    os.chmod(f, 0o6755)
    os.setxattr(f, "security.capability", CAP_NET_BIND)
    g = src / "other"
    g.write_bytes(b"x")
    os.chown(g, 1234, 5678)
    os.chmod(g, 0o2755)
    os.setxattr(g, "security.capability", CAP_NET_BIND)
    copy_tree(src, tmp_path / "dst")
    for name, uid, gid, mode in [("ping", 0, 0, 0o6755), ("other", 1234, 5678, 0o2755)]:
        c = tmp_path / "dst" / name
        s = os.lstat(c)
        assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (uid, gid, mode)
        assert os.getxattr(c, "security.capability") == CAP_NET_BIND


def test_copy_times_ns_and_atime(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"x")
    os.symlink("f", src / "l")
    d = src / "d"
    d.mkdir()
    (d / "child").write_bytes(b"c")
    for p in (f, src / "l", d / "child", d):
        os.utime(p, ns=(1_500_000_000_111_111_111, 1_600_000_000_222_222_222),
                 follow_symlinks=False)
    copy_tree(src, tmp_path / "dst")
    for rel in ("f", "l", "d/child", "d"):
        s = os.lstat(tmp_path / "dst" / rel)
        assert (s.st_atime_ns, s.st_mtime_ns) == (1_500_000_000_111_111_111,
                                                   1_600_000_000_222_222_222), rel


def test_copy_holes_preserved(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    make_sparse(src / "s", size=64 << 20, data_at=(0, 32 << 20))
    make_sparse(src / "tail", size=16 << 20, data_at=(0,))     # trailing hole
    copy_tree(src, tmp_path / "dst")
    for name in ("s", "tail"):
        a, b = os.stat(src / name), os.stat(tmp_path / "dst" / name)
        assert b.st_size == a.st_size
        assert b.st_blocks <= a.st_blocks + 16, "holes were filled"
        assert b.st_blocks * 512 < a.st_size // 4
        assert (src / name).read_bytes() == (tmp_path / "dst" / name).read_bytes()


def test_copy_small_hole_with_xattr_block(tmp_path):
    """st_blocks also counts an external xattr block: it must not hide a hole."""
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    with open(f, "wb") as fh:
        fh.truncate(4096 + 100)
        fh.write(b"\1" * 4096)
    os.setxattr(f, "user.big", b"x" * 1500)          # does not fit in the inode
    before = snapshot(src, holes=True)
    assert before[b"f"]["data_map"] == [(0, 4096)]
    copy_tree(src, tmp_path / "dst")
    assert_same_tree(before, snapshot(tmp_path / "dst", holes=True))


def test_copy_hardlinks_kept(tmp_path):
    src = tmp_path / "src"
    (src / "x" / "y").mkdir(parents=True)
    (src / "a").write_bytes(b"A")
    for n in ("x/b", "x/y/c", "z"):
        os.link(src / "a", src / n)
    (src / "lonely").write_bytes(b"L")
    os.mkfifo(src / "fifo")
    os.link(src / "fifo", src / "x" / "fifo2")       # hardlinked non-regular files too
    copy_tree(src, tmp_path / "dst")
    d = tmp_path / "dst"
    inos = {os.lstat(d / n).st_ino for n in ("a", "x/b", "x/y/c", "z")}
    assert len(inos) == 1 and os.lstat(d / "a").st_nlink == 4
    assert os.lstat(d / "fifo").st_ino == os.lstat(d / "x" / "fifo2").st_ino
    assert os.lstat(d / "lonely").st_nlink == 1
    # links go only to copies inside the destination
    assert os.lstat(d / "a").st_ino != os.lstat(src / "a").st_ino


def test_copy_tree_deep(tmp_path):
    """Deeper than the directory fds kept open: parents are reopened on the way up."""
    src = tmp_path / "src"
    p = src
    for i in range(120):
        p = p / f"d{i:03d}"
    p.mkdir(parents=True)
    q = src
    for i in range(120):
        q = q / f"d{i:03d}"
        (q / "f").write_bytes(str(i).encode())
        (q.parent / f"sibling{i}").write_bytes(b"s")
    for d in sorted(src.rglob("*"), key=lambda x: -len(x.parts)):
        settime(d)
    before = snapshot(src, include_root=True)
    copy_tree(src, tmp_path / "dst")
    assert_same_tree(before, snapshot(tmp_path / "dst", include_root=True))


def test_copy_tree_many_files(tmp_path):
    """More files than the content thread's queue holds, of assorted sizes."""
    src = tmp_path / "src"
    for i in range(40):
        d = src / f"dir{i}"
        d.mkdir(parents=True)
        for j in range(60):
            (d / f"f{j}").write_bytes(os.urandom((i * 60 + j) % 9000))
    before = snapshot(src, include_root=True)
    st = copy_tree(src, tmp_path / "dst")
    assert st.files == 2400
    assert_same_tree(before, snapshot(tmp_path / "dst", include_root=True))


def test_copy_file_every_type(tmp_path):
    src = tmp_path / "src"
    build_every_type(src)
    out = tmp_path / "out"
    out.mkdir()
    for name in ["d/file", "big", "sparse", "allhole", "sym", "d/abs", "chr", "blk", "fifo",
                 "sock", "d/empty"]:
        target = out / name.replace("/", "_")
        copy_file(src / name, target)
        a = snapshot(src, holes=True)[name.encode()]
        b = snapshot(out, holes=True)[target.name.encode()]
        a["link"] = b["link"] = None
        assert a == b, name


def test_copy_file_symlink_not_followed(tmp_path):
    (tmp_path / "target").write_bytes(b"t")
    os.symlink("target", tmp_path / "link")
    copy_file(tmp_path / "link", tmp_path / "copy")
    assert os.readlink(tmp_path / "copy") == "target"
    os.symlink(tmp_path / "somedir", tmp_path / "dirlink")
    (tmp_path / "somedir").mkdir()
    copy_tree(tmp_path / "dirlink", tmp_path / "dircopy")      # a symlink, copied as one
    assert os.path.islink(tmp_path / "dircopy")


def test_copy_tree_symlinks_inside_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "escape")
    os.symlink("../outside/secret", src / "rel")
    copy_tree(src, tmp_path / "dst")
    assert sorted(os.listdir(tmp_path / "dst")) == ["escape", "rel"]
    assert os.path.islink(tmp_path / "dst" / "escape")


def test_copy_flags(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "f"
    f.write_bytes(b"data")
    os.chown(f, 4321, 4321)
    os.chmod(f, 0o640)
    os.setxattr(f, "user.x", b"1")
    st = copy_file(f, tmp_path / "no_owner", _native.COPY_NO_OWNER)
    s = os.lstat(tmp_path / "no_owner")
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (0, 0, 0o640)
    assert os.getxattr(tmp_path / "no_owner", "user.x") == b"1"
    copy_file(f, tmp_path / "no_xattrs", _native.COPY_NO_XATTRS)
    assert os.listxattr(tmp_path / "no_xattrs") == []
    assert os.lstat(tmp_path / "no_xattrs").st_uid == 4321
    st = copy_file(f, tmp_path / "no_reflink", _native.COPY_NO_REFLINK)
    assert st.reflinked == 0 and st.bytes == 4 and st.files == 1
    assert (tmp_path / "no_reflink").read_bytes() == b"data"
    copy_tree(src, tmp_path / "tree_no_owner", _native.COPY_NO_OWNER | _native.COPY_NO_XATTRS)
    s = os.lstat(tmp_path / "tree_no_owner" / "f")
    assert (s.st_uid, os.listxattr(tmp_path / "tree_no_owner" / "f")) == (0, [])


def test_errors(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "exists").write_bytes(b"y")
    (tmp_path / "dir").mkdir()
    with pytest.raises(LayerError) as ei:
        copy_file(tmp_path / "f", tmp_path / "exists")
    assert ei.value.errno == errno.EEXIST and "exists" in ei.value.filename
    assert (tmp_path / "exists").read_bytes() == b"y"
    with pytest.raises(LayerError) as ei:
        copy_tree(tmp_path / "dir", tmp_path / "exists")
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(LayerError) as ei:
        copy_file(tmp_path / "missing", tmp_path / "new")
    assert ei.value.errno == errno.ENOENT and ei.value.filename.endswith("missing")
    with pytest.raises(LayerError) as ei:
        copy_tree(tmp_path / "missing", tmp_path / "new")
    assert ei.value.errno == errno.ENOENT and ei.value.filename.endswith("missing")
    with pytest.raises(LayerError) as ei:
        copy_file(tmp_path / "dir", tmp_path / "new")
    assert ei.value.errno == errno.EISDIR
    assert not (tmp_path / "new").exists()


def test_copy_into_itself(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "f").write_bytes(b"x")
    for dst in (src / "sub" / "copy", src / "copy"):
        with pytest.raises(LayerError) as ei:
            copy_tree(src, dst)
        assert ei.value.errno == errno.EINVAL and ei.value.filename == "copy"
        assert not dst.exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mnt], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)


def test_error_from_content_copy_names_the_file(tmp_path, small_tmpfs):
    """ENOSPC while copying content (on the content thread) is reported with the path."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"small{i}").write_bytes(b"s" * 100)
    (src / "huge").write_bytes(os.urandom(4 << 20))
    with pytest.raises(LayerError) as ei:
        copy_tree(src, small_tmpfs / "dst")
    assert ei.value.errno == errno.ENOSPC
    assert ei.value.filename.endswith("src/huge")


def test_copy_across_filesystems(tmp_path):
    """tmpfs -> the test directory's filesystem: copy_file_range says EXDEV, the
    fallback copies; holes and metadata survive."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", mnt], check=True)
    try:
        src = mnt / "src"
        build_every_type(src)
        before = snapshot(src, holes=True, include_root=True)
        copy_tree(src, tmp_path / "dst")
        after = snapshot(tmp_path / "dst", holes=True, include_root=True)
        # extents are filesystem-specific (tmpfs pages vs ext4 blocks): compare them apart
        for t in (before, after):
            for n in t.values():
                n.pop("data_map", None)
        assert_same_tree(before, after)
        a, b = os.stat(src / "sparse"), os.stat(tmp_path / "dst" / "sparse")
        assert b.st_blocks * 512 < a.st_size // 4
    finally:
        subprocess.run(["umount", mnt], check=True)


def _acl(entries) -> bytes:
    """A POSIX ACL xattr value: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, 0xFFFFFFFF)
                                          for t, p in entries)


def test_copy_tree_ignores_default_acl_of_destination(tmp_path):
    """A default ACL where the copy is made does not leak into the copy."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"x")
    os.chmod(src / "sub" / "f", 0o666)
    os.chmod(src / "sub", 0o777)
    parent = tmp_path / "acl"
    parent.mkdir()
    # default ACL u::rwx g::--- o::--- : new children would lose group/other bits
    os.setxattr(parent, "system.posix_acl_default", _acl([(0x01, 7), (0x04, 0), (0x20, 0)]))
    before = snapshot(src, include_root=True)
    copy_tree(src, parent / "dst")
    assert_same_tree(before, snapshot(parent / "dst", include_root=True))


@pytest.fixture
def xfs_reflink(tmp_path):
    """A loop-mounted XFS made with reflink=1: FICLONE works there."""
    img, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(img, "wb") as f:
        f.truncate(512 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _shared_extents(p: Path) -> int:
    """Extents filefrag reports as shared (the FIEMAP_EXTENT_SHARED flag)."""
    out = subprocess.run(["filefrag", "-v", str(p)], capture_output=True, text=True,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if "shared" in line)


def test_reflink_on_a_filesystem_that_has_it(xfs_reflink):
    """On XFS with reflink the copy clones the data (FICLONE): the blocks are
    shared, not written again; holes, metadata and content are the same."""
    src = xfs_reflink / "src"
    build_every_type(src)
    big = src / "big"
    big.write_bytes(os.urandom(8 << 20))
    settime(big)
    before = snapshot(src, holes=True, include_root=True)
    st = copy_tree(src, xfs_reflink / "dst")
    assert st.reflinked >= 2                  # "big", and the plain files beside it
    after = snapshot(xfs_reflink / "dst", holes=True, include_root=True)
    assert_same_tree(before, after)
    assert (xfs_reflink / "dst" / "big").read_bytes() == big.read_bytes()
    assert _shared_extents(xfs_reflink / "dst" / "big") >= 1
    assert _shared_extents(big) >= 1
    # writing to the clone leaves the original alone
    with open(xfs_reflink / "dst" / "big", "r+b") as f:
        f.write(b"changed")
    assert big.read_bytes()[:7] != b"changed"

    # NO_REFLINK copies the bytes: nothing shared
    one = copy_file(big, xfs_reflink / "plain", _native.COPY_NO_REFLINK)
    assert one.reflinked == 0
    assert _shared_extents(xfs_reflink / "plain") == 0
