"""compare_trees: the exact diff of two real directory trees."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerfs.diff import TreeChange, compare_trees, path_key, with_parents
from tests.archive.model import snapshot

T0 = 1_600_000_000 * 10**9


def mk(root: Path, rel: str, data: bytes = b"", mode: int = 0o644, mtime_ns: int = T0) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)
    os.utime(p, ns=(mtime_ns, mtime_ns))
    return p


def clone(src: Path, dst: Path) -> None:
    """cp -a (GNU cp keeps nanosecond times, owners, xattrs, hardlinks)."""
    import subprocess
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def changes(old, new, **kw):
    return [(c.path, c.kind) for c in compare_trees(old, new, **kw)]


@pytest.fixture
def pair(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    mk(old, "etc/hosts", b"127.0.0.1 localhost\n")
    mk(old, "etc/passwd", b"root:x:0:0\n")
    mk(old, "bin/sh", b"#!ELF", 0o755)
    os.symlink("sh", old / "bin/bash")
    os.link(old / "bin/sh", old / "bin/dash")
    os.setxattr(old / "etc/hosts", "user.note", b"v1")
    os.mkfifo(old / "fifo")
    os.mknod(old / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (old / "var/lib/deep/er").mkdir(parents=True)
    mk(old, "var/lib/deep/er/file", b"x")
    new = tmp_path / "new"
    clone(old, new)
    return old, new


def test_identical_trees_have_no_changes(pair):
    old, new = pair
    assert changes(old, new) == []
    assert changes(old, old) == []


def test_each_field(pair):
    old, new = pair
    os.chmod(new / "etc/passwd", 0o600)
    os.chown(new / "bin/sh", 1000, 1000)  # hardlinked: bin/dash changes with it
    os.setxattr(new / "etc/hosts", "user.note", b"v2")
    os.unlink(new / "bin/bash")
    os.symlink("dash", new / "bin/bash")
    os.utime(new / "bin/bash", ns=(T0, T0), follow_symlinks=False)
    os.utime(old / "bin/bash", ns=(T0, T0), follow_symlinks=False)
    os.unlink(new / "null")
    os.mknod(new / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    os.utime(new / "null", ns=(os.lstat(old / "null").st_mtime_ns,) * 2)
    got = {c.path: c for c in compare_trees(old, new)}
    assert set(got) == {"/bin/bash", "/bin/dash", "/bin/sh", "/etc/hosts", "/etc/passwd", "/null"}
    assert got["/etc/passwd"].fields == {"mode": (0o644, 0o600)}
    assert got["/bin/sh"].fields == {"uid": (0, 1000), "gid": (0, 1000)}
    assert got["/bin/dash"].fields == got["/bin/sh"].fields  # each hardlinked path reported
    assert got["/etc/hosts"].fields == {"xattr:user.note": (b"v1", b"v2")}
    assert got["/bin/bash"].fields["linkname"] == ("sh", "dash")
    assert got["/bin/bash"].type == "symlink"
    assert got["/null"].fields == {"rdev": ((1, 3), (1, 5))}
    assert all(c.kind == "modified" for c in got.values())


def test_size_and_nanosecond_mtime(pair):
    old, new = pair
    mk(new, "etc/hosts", b"127.0.0.1 localhost other\n")
    os.setxattr(new / "etc/hosts", "user.note", b"v1")
    t = os.lstat(old / "etc/passwd").st_mtime_ns
    os.utime(new / "etc/passwd", ns=(t + 1, t + 1))
    got = {c.path: c.fields for c in compare_trees(old, new)}
    assert got["/etc/hosts"]["size"] == (20, 26)
    assert got["/etc/passwd"] == {"mtime": (t, t + 1)}


def test_content_compared_when_mtime_may_be_truncated(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    mk(old, "whole-seconds", b"aaaa", mtime_ns=T0)
    mk(new, "whole-seconds", b"bbbb", mtime_ns=T0)
    mk(old, "same", b"same", mtime_ns=T0)
    mk(new, "same", b"same", mtime_ns=T0)
    mk(old, "precise", b"aaaa", mtime_ns=T0 + 123)
    mk(new, "precise", b"bbbb", mtime_ns=T0 + 123)
    got = {c.path: c.fields for c in compare_trees(old, new)}
    # equal size, equal mtime with zero nanoseconds: only the bytes can tell
    assert set(got["/whole-seconds"]) == {"content"}
    old_d, new_d = got["/whole-seconds"]["content"]
    import hashlib
    assert old_d == "sha256:" + hashlib.sha256(b"aaaa").hexdigest()
    assert new_d == "sha256:" + hashlib.sha256(b"bbbb").hexdigest()
    # equal non-zero nanoseconds are trusted (as containerd does): not read
    assert "/precise" not in got and "/same" not in got


def test_large_files_compared_in_chunks(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    big = os.urandom(3 << 20)
    mk(old, "big", big)
    mk(new, "big", big[:-1] + bytes([big[-1] ^ 1]))
    mk(old, "same", big)
    mk(new, "same", big)
    assert changes(old, new) == [("/big", "modified")]


def test_added_and_deleted_directories(pair):
    old, new = pair
    shutil.rmtree(new / "var")
    (new / "opt/app/lib").mkdir(parents=True)
    mk(new, "opt/app/lib/x.so", b"so")
    mk(new, "opt/app/run", b"run")
    assert changes(old, new) == [
        ("/opt", "added"), ("/opt/app", "added"), ("/opt/app/lib", "added"),
        ("/opt/app/lib/x.so", "added"), ("/opt/app/run", "added"),
        ("/var", "deleted"),  # once for the directory, not for each child
    ]
    assert [c.type for c in compare_trees(old, new)][-1] == "dir"


def test_type_changes(pair):
    old, new = pair
    shutil.rmtree(new / "var/lib")
    mk(new, "var/lib", b"now a file")
    os.unlink(new / "etc/passwd")
    (new / "etc/passwd").mkdir()
    mk(new, "etc/passwd/inside", b"i")
    got = list(compare_trees(old, new))
    assert [(c.path, c.kind) for c in got] == [
        ("/etc/passwd", "modified"), ("/etc/passwd/inside", "added"), ("/var/lib", "modified")]
    assert got[0].fields == {"type": ("file", "dir")}
    assert got[2].fields == {"type": ("dir", "file")}


def test_order_is_by_path_components(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    for rel in ("a/b", "a.txt", "a-", "B", "a/a"):
        mk(new, rel, b"x")
    got = [c.path for c in compare_trees(old, new)]
    assert got == ["/B", "/a", "/a/a", "/a/b", "/a-", "/a.txt"]
    assert got == sorted(got, key=path_key)


def test_directory_mtime_only_on_request(pair):
    old, new = pair
    os.utime(new / "etc", ns=(T0 + 5, T0 + 5))
    assert changes(old, new) == []
    assert changes(old, new, dir_mtime=True) == [("/etc", "modified")]


def test_old_root_none_is_an_empty_tree(pair):
    old, _ = pair
    got = changes(None, old)
    assert all(k == "added" for _, k in got)
    assert {p for p, _ in got} == {"/" + os.fsdecode(p) for p in snapshot(old)}


def test_root_attributes_and_non_utf8_names(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    os.chmod(old, 0o755)
    os.chmod(new, 0o700)
    name = b"caf\xe9"  # latin-1, not UTF-8
    with open(os.path.join(os.fsencode(new), name), "wb") as f:
        f.write(b"x")
    got = list(compare_trees(old, new))
    assert got[0] == TreeChange("/", "modified", {"mode": (0o755, 0o700)}, "dir")
    assert os.fsencode(got[1].path) == b"/" + name


def test_overlay_private_xattrs_ignored(pair):
    old, new = pair
    os.setxattr(new / "etc", "trusted.overlay.opaque", b"y")
    assert changes(old, new) == []
    assert changes(old, new, ignore_xattrs=()) == [("/etc", "modified")]


def test_with_parents():
    cs = [TreeChange("/a/b/c", "modified", {}), TreeChange("/a/b/d", "deleted", {}),
          TreeChange("/e", "added", {}, "dir"), TreeChange("/e/f", "added", {})]
    got = [(c.path, c.kind) for c in with_parents(cs)]
    assert got == [("/a", "modified"), ("/a/b", "modified"), ("/a/b/c", "modified"),
                   ("/a/b/d", "deleted"), ("/e", "added"), ("/e/f", "added")]


def test_not_a_directory(tmp_path):
    mk(tmp_path, "f")
    with pytest.raises(NotADirectoryError):
        list(compare_trees(tmp_path / "f", tmp_path))


# ----------------------------------------------------------------- against an oracle

NAMES = ["a", "b", "c.txt"]


def oracle(old: Path, new: Path):
    """The expected changes from full snapshots (content by sha256)."""
    o, n = snapshot(old), snapshot(new)
    keys = ("type", "mode", "uid", "gid", "size", "sha256", "target", "rdev", "xattrs")
    out = set()
    for p in n:
        if p not in o:
            out.add((p, "added"))
        else:
            a, b = o[p], n[p]
            differ = any(a[k] != b[k] for k in keys)
            if a["type"] not in "dl" and a["mtime_ns"] != b["mtime_ns"]:
                differ = True
            if differ:
                out.add((p, "modified"))
    for p in o:
        if p not in n:
            parent = p.rpartition(b"/")[0]
            if not parent or (n.get(parent, {}).get("type") == "d" and o[parent]["type"] == "d"):
                out.add((p, "deleted"))
    return {("/" + os.fsdecode(p), k) for p, k in out}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_matches_oracle(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("oracle")
    old, new = base / "old", base / "new"
    old.mkdir()
    for i in range(data.draw(st.integers(1, 8))):
        rel = "/".join(data.draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3)))
        if (old / rel).exists() or any((old / q).is_file() for q in
                                       [rel.rsplit("/", k)[0] for k in range(1, rel.count("/") + 1)]):
            continue
        mk(old, rel, data.draw(st.binary(max_size=16)), mtime_ns=T0 + data.draw(
            st.sampled_from([0, 0, 7])))
    clone(old, new)
    entries = sorted(p for p in snapshot(new))
    for _ in range(data.draw(st.integers(0, 6))):
        entries = sorted(snapshot(new))
        if not entries:
            break
        rel = os.fsdecode(data.draw(st.sampled_from(entries)))
        p = new / rel
        if not os.path.lexists(p):
            continue
        op = data.draw(st.sampled_from(["chmod", "rm", "content_same_size", "touch", "xattr",
                                        "add", "chown"]))
        if op == "chmod":
            os.chmod(p, data.draw(st.sampled_from([0o600, 0o755, 0o700])))
        elif op == "chown":
            os.lchown(p, data.draw(st.sampled_from([0, 1, 1000])), 0)
        elif op == "rm":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif op == "content_same_size" and p.is_file():
            st_ = os.lstat(p)
            body = p.read_bytes()
            p.write_bytes(bytes(b ^ 0xFF for b in body))
            os.utime(p, ns=(st_.st_mtime_ns, st_.st_mtime_ns))
        elif op == "touch" and p.is_file():
            t = os.lstat(p).st_mtime_ns + data.draw(st.sampled_from([1, 10**9]))
            os.utime(p, ns=(t, t))
        elif op == "xattr":
            os.setxattr(p, "user.x", data.draw(st.binary(min_size=1, max_size=4)))
        elif op == "add" and p.is_dir():
            mk(p, data.draw(st.sampled_from(NAMES)) + "n", b"new")
    got = list(compare_trees(old, new))
    assert [c.path for c in got] == sorted((c.path for c in got), key=path_key)
    exp = oracle(old, new)
    # content hidden behind an equal non-zero-nanosecond mtime is the one thing
    # metadata cannot see, and the heuristic trusts: leave those out
    o, n = snapshot(old), snapshot(new)
    hidden = {("/" + os.fsdecode(p), "modified") for p in n if p in o and n[p]["type"] == "f"
              and o[p]["type"] == "f" and o[p]["mtime_ns"] == n[p]["mtime_ns"]
              and o[p]["mtime_ns"] % 10**9 and o[p]["sha256"] != n[p]["sha256"]
              and all(o[p][k] == n[p][k] for k in ("mode", "uid", "gid", "size", "xattrs"))}
    assert {(c.path, c.kind) for c in got} == exp - hidden
