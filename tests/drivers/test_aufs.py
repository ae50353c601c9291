"""The aufs driver: the conformance suite, and what is particular to AUFS
layer directories served by layerfs's FUSE union (csrc/union.c).

Everything runs on real FUSE mounts as root; every mount is undone in finally
(Mounted) and the store fixture checks that nothing stays mounted.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from layerfs.drivers.aufs import UnionView
from layerfs.errors import LayerError
from tests.archive.model import data_map

from .conformance import (Conformance, Mounted, diff_bytes, dir_, file_, layer_tar, tar_members,
                          whiteout)
from .conftest import mounts_under


class TestAufs(Conformance):
    DRIVER = "aufs"


class TestAufsNoPassthrough(Conformance):
    """The same suite with every read and write served by the union server."""
    DRIVER = "aufs"
    OPTIONS = {"passthrough": False}
    MAX_EXAMPLES = 8


# ----------------------------------------------------------------- helpers

def opaque(path):
    from tests.archive.model import Entry
    return Entry(path.encode(), "opaque")


def stack(d, *layers, rw="ctr"):
    """Read-only layers L0.. from entry lists, and a writable layer on top."""
    parent = None
    for i, layer in enumerate(layers):
        d.create(f"L{i}", parent)
        d.apply_diff(f"L{i}", io.BytesIO(layer_tar(layer)))
        parent = f"L{i}"
    if rw:
        d.create_rw(rw, parent)
    return parent


def meta(path):
    st = os.lstat(path)
    xs = {n: os.getxattr(path, n, follow_symlinks=False)
          for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")}
    return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_mtime_ns, xs)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def server_pid(d, id):
    return d.metadata(id)["server_pid"]


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


# ----------------------------------------------------------------- the tests

class TestAufsUnion:
    DRIVER = "aufs"

    def test_copy_up_keeps_metadata_xattrs_and_holes(self, driver):
        d = driver
        d.create("base")
        base = Path(d.diff_dir("base"))
        # a sparse file with owner, mode, xattrs and times, two directories deep
        (base / "a" / "b").mkdir(parents=True)
        for p, mode in ((base / "a", 0o750), (base / "a" / "b", 0o2770)):
            os.chown(p, 1000, 1001)
            os.chmod(p, mode)
            os.setxattr(p, "user.dir", p.name.encode())
        f = base / "a" / "b" / "sparse"
        with open(f, "wb") as fh:
            fh.truncate(8 << 20)
            fh.seek(1 << 20)
            fh.write(b"data in the middle" * 100)
            fh.seek((8 << 20) - 5)
            fh.write(b"tail!")
        os.chown(f, 1000, 1001)
        os.chmod(f, 0o4750)
        os.setxattr(f, "user.k", b"value")
        t = 1_600_000_000_123_456_789
        for p in (f, base / "a" / "b", base / "a"):
            os.utime(p, ns=(t, t))
        before = {p: meta(base / p) for p in ("a", "a/b", "a/b/sparse")}
        holes = data_map(os.fsencode(f))
        assert len(holes) >= 2, "the backing filesystem keeps no holes"
        d.create_rw("ctr", "base")
        top = Path(d.diff_dir("ctr"))
        with Mounted(d, "ctr") as m:
            # a metadata-only change copies the file up whole
            os.setxattr(os.path.join(m, "a/b/sparse"), "user.new", b"1")
            assert (top / "a/b/sparse").exists()
            after = meta(top / "a/b/sparse")
            assert after[:5] == before["a/b/sparse"][:5]
            assert after[5] == {**before["a/b/sparse"][5], "user.new": b"1"}
            assert data_map(os.fsencode(top / "a/b/sparse")) == holes
            assert sha(top / "a/b/sparse") == sha(f)
            # parent directories came up with their metadata (times too)
            assert meta(top / "a") == before["a"]
            assert meta(top / "a/b") == before["a/b"]
            # through the mount: the same, with the new xattr
            assert meta(os.path.join(m, "a/b/sparse"))[:5] == before["a/b/sparse"][:5]
            assert data_map(os.fsencode(os.path.join(m, "a/b/sparse"))) == holes
            # a write copies nothing more and lands in the top layer only
            with open(os.path.join(m, "a/b/sparse"), "r+b") as fh:
                fh.seek(4 << 20)
                fh.write(b"new")
            with open(top / "a/b/sparse", "rb") as fh:
                fh.seek(4 << 20)
                assert fh.read(3) == b"new"
            assert sha(f) == sha(base / "a/b/sparse")  # the lower layer is untouched
        assert meta(f)[:5] == before["a/b/sparse"][:5]
        assert not os.listdir(d.layer_dir("ctr") + "/work"), "copy-up temporaries left"

    def test_rename(self, driver):
        d = driver
        stack(d, [dir_("dir"), file_("dir/f", b"f"), file_("file", b"lower"),
                  dir_("empty"), dir_("full"), file_("full/x", b"x")])
        top = Path(d.diff_dir("ctr"))
        with Mounted(d, "ctr") as m:
            # a lower file: copied up, renamed, the old name whited out
            os.rename(os.path.join(m, "file"), os.path.join(m, "moved"))
            assert Path(m, "moved").read_bytes() == b"lower"
            assert not os.path.lexists(os.path.join(m, "file"))
            assert (top / ".wh.file").exists() and (top / "moved").exists()
            # a lower directory: EXDEV (as overlayfs without redirect_dir)
            with pytest.raises(OSError) as ei:
                os.rename(os.path.join(m, "dir"), os.path.join(m, "dir2"))
            assert ei.value.errno == errno.EXDEV
            # ... and mv falls back to copying
            subprocess.run(["mv", os.path.join(m, "dir"), os.path.join(m, "dir2")], check=True)
            assert Path(m, "dir2/f").read_bytes() == b"f"
            assert not os.path.lexists(os.path.join(m, "dir"))
            # a directory made in the top layer moves, contents and all
            os.makedirs(os.path.join(m, "new/sub"))
            Path(m, "new/sub/g").write_bytes(b"g")
            os.rename(os.path.join(m, "new"), os.path.join(m, "newer"))
            assert Path(m, "newer/sub/g").read_bytes() == b"g"
            assert not os.path.lexists(os.path.join(m, "new"))
            assert not (top / ".wh.new").exists()  # nothing below to hide
            # over an empty lower directory: the moved one is opaque
            os.rename(os.path.join(m, "newer"), os.path.join(m, "empty"))
            assert (top / "empty" / ".wh..wh..opq").exists()
            assert sorted(os.listdir(os.path.join(m, "empty"))) == ["sub"]
            # over a non-empty one: ENOTEMPTY; a file over a directory: EISDIR
            with pytest.raises(OSError) as ei:
                os.rename(os.path.join(m, "empty"), os.path.join(m, "full"))
            assert ei.value.errno == errno.ENOTEMPTY
            with pytest.raises(OSError) as ei:
                os.rename(os.path.join(m, "moved"), os.path.join(m, "full"))
            assert ei.value.errno == errno.EISDIR
            # over a lower file: replaced
            os.rename(os.path.join(m, "moved"), os.path.join(m, "full/x"))
            assert Path(m, "full/x").read_bytes() == b"lower"
            assert sorted(os.listdir(m)) == ["dir2", "empty", "full"]
        with Mounted(d, "ctr") as m:  # the same after a remount
            assert sorted(os.listdir(m)) == ["dir2", "empty", "full"]
            assert Path(m, "full/x").read_bytes() == b"lower"
            assert sorted(os.listdir(os.path.join(m, "empty/sub"))) == ["g"]
        got = {(c.path, c.kind) for c in d.changes("ctr")}
        assert {("/dir", "deleted"), ("/file", "deleted"), ("/dir2", "added"),
                ("/full/x", "modified"), ("/empty/sub", "added")} <= got

    def test_rmdir_not_empty_and_opaque_after_rmdir_mkdir(self, driver):
        d = driver
        stack(d, [dir_("d"), file_("d/a", b"a"), dir_("d/sub"), file_("d/sub/b", b"b")],
              [dir_("d"), file_("d/c", b"c")])
        top = Path(d.diff_dir("ctr"))
        with Mounted(d, "ctr") as m:
            dp = os.path.join(m, "d")
            for p in (dp, os.path.join(dp, "sub")):  # children only in lower layers
                with pytest.raises(OSError) as ei:
                    os.rmdir(p)
                assert ei.value.errno == errno.ENOTEMPTY
            shutil.rmtree(dp)
            assert not os.path.lexists(dp)
            assert (top / ".wh.d").exists()
            os.mkdir(dp)
            assert os.listdir(dp) == []
            assert (top / "d" / ".wh..wh..opq").exists()
            assert not (top / ".wh.d").exists()
            Path(dp, "new").write_bytes(b"n")
            assert os.listdir(dp) == ["new"]
            # rmdir of a directory empty in the union (its top copy holds whiteouts)
            os.unlink(os.path.join(dp, "new"))
            os.rmdir(dp)
            assert not os.path.lexists(dp)
        with Mounted(d, "ctr") as m:
            assert os.listdir(m) == []
        assert ("/d", "deleted") in d.changes("ctr")
        names = set(tar_members(io.BytesIO(diff_bytes(d, "ctr"))))
        assert ".wh.d" in names

    def test_opaque_changes_and_diff(self, driver, tmp_path):
        d = driver
        stack(d, [dir_("d"), file_("d/a", b"a"), dir_("d/sub"), file_("d/sub/b", b"b"),
                  file_("keep", b"k")])
        with Mounted(d, "ctr") as m:
            shutil.rmtree(os.path.join(m, "d"))
            os.mkdir(os.path.join(m, "d"))
            os.mkdir(os.path.join(m, "d/sub"))
            Path(m, "d/sub/c").write_bytes(b"c")
        assert d.changes("ctr") == [("/d", "modified"), ("/d/a", "deleted"),
                                    ("/d/sub", "modified"), ("/d/sub/b", "deleted"),
                                    ("/d/sub/c", "added")]
        members = tar_members(io.BytesIO(diff_bytes(d, "ctr")))
        assert "d/.wh..wh..opq" in members and "d/sub/c" in members
        # the diff applied elsewhere gives the same view
        from layerfs.archive import unpack_layers
        flat = tmp_path / "flat"
        unpack_layers([io.BytesIO(diff_bytes(d, "L0")), io.BytesIO(diff_bytes(d, "ctr"))],
                      str(flat))
        assert sorted(str(p.relative_to(flat)) for p in flat.rglob("*")) == \
            ["d", "d/sub", "d/sub/c", "keep"]

    def test_whiteout_names_never_visible(self, driver):
        d = driver
        d.create("base")
        base = Path(d.diff_dir("base"))
        (base / "d").mkdir()
        for name in (".wh.gone", ".wh..wh..opq", ".wh..wh.aufs", "d/.wh.x", "real"):
            (base / name).write_bytes(b"")
        (base / ".wh..wh.plnk").mkdir()
        d.create_rw("ctr", "base")
        with Mounted(d, "ctr") as m:
            assert sorted(os.listdir(m)) == ["d", "real"]
            assert os.listdir(os.path.join(m, "d")) == []
            for name in (".wh.gone", ".wh..wh..opq", ".wh..wh.plnk", "d/.wh.x"):
                assert not os.path.lexists(os.path.join(m, name))
            for make in (lambda p: open(p, "w"), os.mkdir, lambda p: os.symlink("x", p)):
                with pytest.raises(OSError) as ei:
                    make(os.path.join(m, ".wh.new"))
                assert ei.value.errno == errno.EPERM
            with pytest.raises(OSError) as ei:
                os.rename(os.path.join(m, "real"), os.path.join(m, ".wh.real"))
            assert ei.value.errno == errno.EPERM
            os.unlink(os.path.join(m, "real"))
            assert sorted(os.listdir(m)) == ["d"]
        with Mounted(d, "base") as m:
            assert sorted(os.listdir(m)) == ["d", "real"]

    def test_every_write_refused_on_read_only_mount(self, driver):
        d = driver
        stack(d, [dir_("d"), file_("f", b"x")], rw=None)
        with Mounted(d, "L0") as m:
            f, dd = os.path.join(m, "f"), os.path.join(m, "d")
            attempts = [
                lambda: open(f, "r+b"), lambda: open(f, "wb"), lambda: os.truncate(f, 0),
                lambda: os.chmod(f, 0o600), lambda: os.chown(f, 1, 1),
                lambda: os.utime(f, (1, 1)), lambda: os.setxattr(f, "user.k", b"v"),
                lambda: os.removexattr(f, "user.k"), lambda: os.unlink(f),
                lambda: os.rename(f, f + "2"), lambda: os.link(f, f + "2"),
                lambda: os.symlink("x", f + "2"), lambda: os.mkfifo(f + "2"),
                lambda: os.mkdir(dd + "/x"), lambda: os.rmdir(dd),
                lambda: open(dd + "/new", "x"),
            ]
            for i, attempt in enumerate(attempts):
                with pytest.raises(OSError) as ei:
                    attempt()
                assert ei.value.errno == errno.EROFS, (i, ei.value)
            assert Path(f).read_bytes() == b"x"

    def test_inodes_links_and_directory_counts(self, driver):
        d = driver
        d.create("base")
        base = Path(d.diff_dir("base"))
        (base / "d").mkdir()
        (base / "d" / "f").write_bytes(b"f")
        os.link(base / "d" / "f", base / "d" / "g")
        (base / "only").mkdir()
        (base / "only" / "sub").mkdir()
        d.create("app", "base")
        (Path(d.diff_dir("app")) / "d").mkdir()
        (Path(d.diff_dir("app")) / "d" / "h").write_bytes(b"h")
        with Mounted(d, "app") as m:
            a, b = os.lstat(os.path.join(m, "d/f")), os.lstat(os.path.join(m, "d/g"))
            assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2
            with os.scandir(os.path.join(m, "d")) as it:
                for e in it:
                    assert e.inode() == os.lstat(e.path).st_ino
            # a directory of one layer: its own link count; a merged one: 1
            assert os.lstat(os.path.join(m, "only")).st_nlink == 3
            assert os.lstat(os.path.join(m, "d")).st_nlink == 1
            out = subprocess.run(["find", m, "-type", "d"], capture_output=True, text=True,
                                 check=True).stdout.split()
            assert sorted(os.path.relpath(p, m) for p in out) == [".", "d", "only", "only/sub"]

    def test_directory_inodes_survive_copy_up(self, driver):
        d = driver
        stack(d, [dir_("a"), dir_("a/b"), file_("a/b/f", b"f")], [dir_("a"), file_("a/g", b"g")])

        def inos(m):
            out = {p: os.lstat(os.path.join(m, p)).st_ino for p in (".", "a", "a/b")}
            with os.scandir(m) as it:
                assert {e.name: e.inode() for e in it}["a"] == out["a"]
            return out

        with Mounted(d, "ctr") as m:
            before = inos(m)
            Path(m, "a/b/new").write_bytes(b"n")          # copies a and a/b up
            Path(m, "a/b/f").write_bytes(b"changed")      # copies a file up
            assert (Path(d.diff_dir("ctr")) / "a/b/new").exists()
            assert inos(m) == before
        with Mounted(d, "ctr") as m:
            assert inos(m) == before

    def test_new_entries_owned_by_the_caller(self, driver_name):
        import tempfile
        from layerfs.drivers import driver_class
        from layerfs.drivers.base import remove_tree
        # a store other users can reach (pytest's temporary directories are 0700)
        root = tempfile.mkdtemp(prefix="layerfs-aufs-", dir="/var/tmp")
        os.chmod(root, 0o711)
        d = driver_class(driver_name)(root)
        try:
            os.chmod(os.path.join(root, "layers"), 0o711)
            self._owned_by_caller(d)
        finally:
            d.cleanup()
            left = mounts_under(root)
            for mp in left:
                subprocess.run(["umount", "-l", mp])
            if not left:
                remove_tree(root)
        assert not left

    def _owned_by_caller(self, d):
        stack(d, [dir_("shared", mode=0o1777), dir_("sgid", mode=0o2777, gid=1234),
                  dir_("private", mode=0o755)])
        os.chmod(d.layer_dir("ctr"), 0o711)
        with Mounted(d, "ctr") as m:
            nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            subprocess.run(nobody + ["touch", os.path.join(m, "shared/n")], check=True)
            subprocess.run(nobody + ["mkdir", os.path.join(m, "sgid/dir")], check=True)
            st_ = os.lstat(os.path.join(m, "shared/n"))
            assert (st_.st_uid, st_.st_gid) == (65534, 65534)
            st_ = os.lstat(os.path.join(m, "sgid/dir"))
            assert (st_.st_uid, st_.st_gid) == (65534, 1234) and st_.st_mode & stat.S_ISGID
            # default_permissions: the kernel checks as for any filesystem
            p = subprocess.run(nobody + ["touch", os.path.join(m, "private/n")],
                               capture_output=True, text=True)
            assert p.returncode != 0 and "Permission denied" in p.stderr

    def test_concurrent_readers(self, driver):
        d = driver
        files = {f"d{i % 4}/f{i}": os.urandom(200_000 + i * 1000) for i in range(24)}
        layers = [[dir_(f"d{k}") for k in range(4)] + [file_(p, data) for p, data in files.items()
                                                       if int(p.split("f")[-1]) % 2 == j]
                  for j in range(2)]
        stack(d, *layers)
        want = {p: hashlib.sha256(v).hexdigest() for p, v in files.items()}
        for id in ("L1", "ctr"):
            with Mounted(d, id) as m:
                errors = []

                def reader(seed):
                    try:
                        names = sorted(want)
                        for k in range(60):
                            p = names[(seed * 7 + k) % len(names)]
                            with open(os.path.join(m, p), "rb") as f:
                                got = hashlib.sha256(f.read()).hexdigest()
                            if got != want[p]:
                                errors.append((p, "content"))
                            if k % 10 == 0:
                                n = sum(len(fs) for _, _, fs in os.walk(m))
                                if n != len(want):
                                    errors.append((p, n))
                    except Exception as e:  # noqa: BLE001 - collected for the assert
                        errors.append(repr(e))

                threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert errors == []

    def test_deep_stack_with_whiteouts(self, driver):
        d = driver
        layers = []
        for i in range(128):
            layer = [dir_("d"), file_(f"d/f{i:03d}", b"%d" % i)]
            if i:
                layer.append(whiteout(f"d/f{i - 1:03d}"))
            if i == 64:
                layer += [dir_("o"), opaque("o"), file_("o/new", b"n")]
            elif i < 64:
                layer += [dir_("o"), file_(f"o/old{i}", b"o")]
            layers.append(layer)
        top = stack(d, *layers)
        with Mounted(d, top) as m:
            assert os.listdir(os.path.join(m, "d")) == ["f127"]
            assert os.listdir(os.path.join(m, "o")) == ["new"]
        with Mounted(d, "ctr") as m:
            os.unlink(os.path.join(m, "d/f127"))
            Path(m, "d/f000").write_bytes(b"back")
            assert sorted(os.listdir(os.path.join(m, "d"))) == ["f000"]
        assert d.changes("ctr") == [("/d", "modified"), ("/d/f000", "added"),
                                    ("/d/f127", "deleted")]
        below = UnionView(d.branches("ctr")[1:])
        assert below.lookup(b"d/f127") is not None and below.lookup(b"d/f126") is None

    def test_server_death_then_mount_again(self, driver):
        d = driver
        stack(d, [file_("f", b"x")])
        m = d.mount("ctr")
        try:
            Path(m, "g").write_bytes(b"kept")
            pid = server_pid(d, "ctr")
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            with pytest.raises(OSError) as ei:
                os.listdir(m)
            # a dead FUSE server: ENOTCONN, or ECONNABORTED when the kernel
            # aborted the connection with a request in flight
            assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
            assert d.metadata("ctr")["mount_count"] == 1
            # the stale count: the next mount notices the dead server and mounts anew
            assert d.mount("ctr") == m
            assert server_pid(d, "ctr") != pid
            assert sorted(os.listdir(m)) == ["f", "g"]
            assert Path(m, "g").read_bytes() == b"kept"
            assert d.metadata("ctr")["mount_count"] == 1
        finally:
            d.unmount("ctr")
        assert not mounts_under(m)

    def test_unmount_ends_the_server(self, driver):
        d = driver
        stack(d, [file_("f", b"x")], rw=None)
        with Mounted(d, "L0"):
            pid = server_pid(d, "L0")
            assert pid_alive(pid)
        assert not pid_alive(pid)
        assert "server_pid" not in d.metadata("L0")

    def test_mount_failure_reports_the_reason(self, driver):
        d = driver
        stack(d, [file_("f", b"x")])
        shutil.rmtree(d.diff_dir("L0"))  # a broken store: a layer directory is gone
        with pytest.raises(LayerError) as ei:
            d.mount("ctr")
        assert "opening the layer directory" in str(ei.value)
        assert ei.value.errno == errno.ENOENT
        assert not mounts_under(d.root)
        assert d.metadata("ctr")["mount_count"] == 0

    def test_mounts_describe_the_branches(self, driver):
        d = driver
        stack(d, [file_("f")], [file_("g")])
        (mnt,) = d.mounts("ctr")
        assert mnt.type == "fuse.layerfs"
        assert "rw" in mnt.options
        br = [o for o in mnt.options if o.startswith("br=")][0][3:].split(":")
        assert br == [f"{d.diff_dir('ctr')}=rw", f"{d.diff_dir('L1')}=ro",
                      f"{d.diff_dir('L0')}=ro"]
