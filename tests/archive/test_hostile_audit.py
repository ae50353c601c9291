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
from .tarbuild import Tar, apply_as_nobody
from .test_hostile import EVIL, SAFE_ERRORS, Sandbox, _link_targets

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
    return apply_as_nobody(root, data, env=dict(os.environ, PYTHONPATH=str(REPO)), **options)


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


# ---------------------------------------------------------------- probes that hold

MODES = ["apply", "overlay", "keep"]


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("no_openat2", [False, True], ids=["openat2", "walk"])
def test_lower_symlink_under_every_kind_of_entry(sb, monkeypatch, which, mode, no_openat2):
    # layer 2 onto a tree whose layer 1 planted a symlink to outside: files,
    # directories, hardlinks (name and target), symlinks, whiteouts and opaque
    # markers all go through it, with openat2 and with the component walk
    if no_openat2:
        monkeypatch.setenv("LAYERFS_NO_OPENAT2", "1")
    link = _link_targets(sb)[which]
    sb.make_root(lambda r: (os.symlink(link, r / "link"), (r / "own").write_bytes(b"own")))
    t = (Tar().file("link/file", EVIL).dir("link/nd/").file("link/nd/f", EVIL)
         .hardlink("link/h", "own").hardlink("h2", "link/hl").symlink("link/s", "/")
         .whiteout("link/x").whiteout("link/dir").opaque("link/dir").opaque("link/nd")
         .symlink("l2", "link/..").file("l2/l2/y", EVIL).whiteout("l2/own"))
    out = sb.apply(t.bytes(), whiteouts=mode).safe()
    assert os.path.islink(sb.root / "link")
    if out.ok and which == "slash":
        assert read(sb.root / "file") == EVIL
        assert read(sb.root / "nd" / "f") == EVIL


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
@pytest.mark.parametrize("mode", MODES)
def test_directory_replaced_by_symlink_then_whiteouts_below_it(sb, which, mode):
    # the parent cache held d and d/e when d became a symlink to outside
    link = _link_targets(sb)[which]
    t = (Tar().dir("d/").dir("d/e/").file("d/e/f", b"f").symlink("d", link)
         .whiteout("d/e").whiteout("d/file").whiteout("d/dir").opaque("d").opaque("d/dir")
         .file("d/e/g", EVIL).hardlink("d/e/h", "d/e/g"))
    out = sb.apply(t.bytes(), whiteouts=mode).safe()
    assert out.ok, out.describe()
    assert os.readlink(sb.root / "d") == os.fsdecode(link)


@pytest.mark.parametrize("which", ["abs-outside", "dotdot", "slash"])
@pytest.mark.parametrize("mode", MODES)
def test_whiteout_names_as_other_entry_types_under_a_lower_symlink(sb, which, mode):
    link = _link_targets(sb)[which]
    sb.make_root(lambda r: os.symlink(link, r / "d"))
    t = (Tar().symlink("d/.wh..wh..opq", link).dir("d/.wh.file/")
         .hardlink("d/.wh.dir", "d/.wh..wh..opq").whiteout("d/.wh..wh..opq").fifo("d/.wh.x"))
    sb.apply(t.bytes(), whiteouts=mode).safe()


@pytest.mark.parametrize("which", ["abs-outside", "dotdot"])
@pytest.mark.parametrize("mode", MODES)
def test_one_name_as_every_type_in_turn(sb, which, mode):
    link = _link_targets(sb)[which]
    t = (Tar().file("f", b"1").dir("f/").symlink("f", link).file("f/x", EVIL).dir("f/y/")
         .file("f", b"2").symlink("g", link).hardlink("f", "g").file("f/z", EVIL).fifo("f")
         .dir("f/").file("f/last", b"last"))
    out = sb.apply(t.bytes(), whiteouts=mode)
    assert out.ok, out.describe()
    assert os.path.islink(sb.root / "g")
    assert sorted(os.listdir(sb.root / "f")) == ["last"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("user_xattr", [False, True])
def test_overlay_xattrs_dropped_in_every_mode_and_on_every_type(sb, mode, user_xattr):
    evil = {"SCHILY.xattr.trusted.overlay.opaque": "y", "SCHILY.xattr.user.overlay.opaque": "y",
            "SCHILY.xattr.trusted.overlay.redirect": "/" + os.fsdecode(sb.abs),
            "LIBARCHIVE.xattr.trusted%2Eoverlay%2Emetacopy": "", "SCHILY.xattr.user.overlay.origin": "x"}
    t = (Tar().dir("./", pax=evil).dir("d/", pax=evil).file("f", b"f", pax=evil)
         .fifo("p", pax=evil).symlink("s", "f", pax={"SCHILY.xattr.trusted.overlay.redirect": "/x"})
         .dir("d/", pax=evil))
    out = sb.apply(t.bytes(), whiteouts=mode, overlay_user_xattr=user_xattr)
    assert out.ok, out.describe()
    for p in ("", "d", "f", "p", "s"):
        names = os.listxattr(sb.root / p, follow_symlinks=False)
        assert not [x for x in names if x.startswith(("trusted.overlay.", "user.overlay."))], (p, names)
    assert out.result["warnings"] > 0


def test_gnu_long_name_and_pax_path_together(sb):
    # PAX path wins over a GNU 'L' name, whichever of the two is the hostile one
    from . import tarbuild as tb
    t = (Tar().raw(tb.pax_header({"path": "ok"})).raw(tb.gnu_long(b"L", b"../../x"))
         .raw(tb.header("short", size=len(EVIL)) + tb.pad(EVIL)))
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert os.listdir(sb.root) == ["ok"]
    shutil.rmtree(sb.root)
    t = (Tar().raw(tb.gnu_long(b"L", b"fine")).raw(tb.pax_header({"path": "../x"}))
         .raw(tb.header("short", size=len(EVIL)) + tb.pad(EVIL)))
    sb.apply(t.bytes()).rejected(entry="../x")
    t = (Tar().file("inner", b"i").raw(tb.gnu_long(b"K", b"inner"))
         .raw(tb.pax_header({"linkpath": "../outside/file"})).raw(tb.header("h", typeflag=b"1")))
    sb.apply(t.bytes()).rejected(entry="h", codes=SAFE_ERRORS)


@pytest.mark.parametrize("case", ["file-to-outside-symlink", "through-lower-symlink", "opaque-root",
                                  "hardlinked-then-replaced"])
def test_record_of_a_hostile_layer_rebuilds_it_from_inside_the_root(sb, tmp_path, case):
    from layerfs.archive.tarsplit import reassemble
    out_link = sb.abs + b"/outside/file"
    t = {
        "file-to-outside-symlink": lambda: Tar().file("f", EVIL).symlink("f", out_link),
        "through-lower-symlink": lambda: Tar().file("link/file", EVIL).file("link/new", EVIL)
                                              .opaque("link").file("own", EVIL),
        "opaque-root": lambda: Tar().dir("d/").file("d/f", EVIL).opaque("d").opaque("")
                                    .file("d/g", EVIL).whiteout("d/f"),
        "hardlinked-then-replaced": lambda: Tar().file("f", EVIL).hardlink("h", "f").file("f", b"x")
                                                 .symlink("h", out_link),
    }[case]()
    if case == "through-lower-symlink":
        sb.make_root(lambda r: os.symlink(os.fsdecode(sb.abs) + "/outside", r / "link"))
    data = t.bytes()
    rec = sb.inputs / "record"
    out = sb.apply(data, record=str(rec))
    assert out.ok, out.describe()
    before = sb.snap()
    rebuilt = tmp_path / "rebuilt.tar"
    reassemble(str(rec), str(sb.root), str(rebuilt))
    assert rebuilt.read_bytes() == data
    from .model import assert_same_tree
    assert_same_tree(before, sb.snap(), "sandbox after reassembly")


def test_mode_0000_directories_with_mapped_owners(sb):
    t = (Tar().dir("./", mode=0o700, uid=5, gid=5).dir("a/", mode=0).file("a/f", b"f", mode=0)
         .dir("a/b/", mode=0).file("a/b/g", b"g").dir("a/", mode=0, uid=7))
    out = sb.apply(t.bytes(), owners="map", uid_map=[(0, 100000, 65536)],
                   gid_map=[(0, 200000, 65536)])
    assert out.ok, out.describe()
    st = os.lstat(sb.root / "a")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0, 100007, 200000)
    assert read(sb.root / "a" / "b" / "g") == b"g"
    assert (os.lstat(sb.root).st_uid, os.lstat(sb.root).st_gid) == (100005, 200005)


def test_file_entries_over_in_root_hardlinks_of_an_outside_file(tmp_path):
    # a tree may share inodes with files outside it (a driver's copy made with
    # hard links): an entry replacing such a name, a whiteout of it or a
    # directory over it must never write through to the shared inode
    outside = tmp_path / "outside"
    outside.write_bytes(b"shared\n")
    os.chmod(outside, 0o640)
    os.setxattr(outside, "user.keep", b"1")
    os.utime(outside, ns=(10**18, 10**18))
    root = tmp_path / "root"
    root.mkdir()
    for n in ("f", "g", "h", "w", "d", "s"):
        os.link(outside, root / n)
    before = os.lstat(outside)
    from layerfs.archive import apply_layer
    t = (Tar().file("f", EVIL, mode=0o4777, uid=1234, pax={"SCHILY.xattr.user.evil": "1"})
         .hardlink("x", "g").file("g", EVIL).symlink("h", "/etc/shadow").whiteout("w")
         .dir("d/", mode=0o777).fifo("s").file("x", EVIL))
    layer = tmp_path / "layer.tar"
    layer.write_bytes(t.bytes())
    apply_layer(str(layer), str(root))
    after = os.lstat(outside)
    assert outside.read_bytes() == b"shared\n"
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == \
        (before.st_mode, before.st_uid, before.st_gid, before.st_mtime_ns)
    assert os.listxattr(outside) == ["user.keep"]
    assert after.st_nlink == 1
    assert read(root / "f") == EVIL and read(root / "g") == EVIL and read(root / "x") == EVIL
    assert not os.path.lexists(root / "w")


def test_sparse_file_with_huge_offsets(tmp_path):
    from layerfs.archive import apply_layer
    from layerfs.errors import LayerError
    far = 1 << 43                            # 8 TiB apparent size, two blocks of data
    t = Tar().sparse_file("s", [(0, b"a" * 512), (far - 1, b"z")], far)
    (tmp_path / "l1").write_bytes(t.bytes())
    apply_layer(str(tmp_path / "l1"), str(tmp_path / "r1"))
    st = os.lstat(tmp_path / "r1" / "s")
    assert st.st_size == far and st.st_blocks * 512 < 1 << 20
    with open(tmp_path / "r1" / "s", "rb") as f:
        assert f.read(512) == b"a" * 512
        f.seek(far - 1)
        assert f.read() == b"z"
    t = Tar().sparse_file("s", [(1 << 62, b"z")], (1 << 62) + 1)
    (tmp_path / "l2").write_bytes(t.bytes())
    with pytest.raises(LayerError) as ei:
        apply_layer(str(tmp_path / "l2"), str(tmp_path / "r2"))
    assert ei.value.errno in (errno.EFBIG, errno.EINVAL)
    assert not os.path.lexists(tmp_path / "r2")
    assert [n for n in os.listdir(tmp_path) if n.startswith(".r2")] == []


# ---------------------------------------------------------------- union-private xattrs

FUSE_PRIVATE = {"SCHILY.xattr.user.fuseoverlayfs.opaque": "y",
                "SCHILY.xattr.user.fuseoverlayfs.origin": "x",
                "SCHILY.xattr.user.fuseoverlayfs.override_stat": "0:0:4755",
                "SCHILY.xattr.security.fuseoverlayfs.override_stat": "0:0:4755",
                "SCHILY.xattr.user.containers.override_stat": "0:0:4755:file"}


@pytest.mark.parametrize("mode", MODES)
def test_fuse_overlayfs_xattrs_never_set_from_archive(sb, mode):
    # fuse-overlayfs (the overlay driver's mount_program) reads these from its
    # lower directories, as the kernel reads trusted.overlay.*: a layer must
    # not be able to plant them
    t = (Tar().dir("d/", pax=FUSE_PRIVATE).file("f", b"f", pax=FUSE_PRIVATE)
         .dir("./", pax=FUSE_PRIVATE))
    out = sb.apply(t.bytes(), whiteouts=mode)
    assert out.ok, out.describe()
    for p in ("", "d", "f"):
        names = os.listxattr(sb.root / p, follow_symlinks=False)
        assert not [x for x in names if "fuseoverlayfs" in x or x.startswith("user.containers.")], \
            (p, names)
    assert out.result["warnings"] > 0


def test_fuse_overlayfs_mount_of_layers_sees_what_apply_sees(tmp_path):
    # the same two layers, flattened by apply_layer and mounted through
    # fuse-overlayfs from per-layer directories, show the same files
    from layerfs.archive import apply_layer
    l1 = Tar().dir("d/").file("d/lower", b"lower").bytes()
    l2 = Tar().dir("d/", pax={"SCHILY.xattr.user.fuseoverlayfs.opaque": "y"}).file("d/upper", b"u").bytes()
    for i, data in enumerate((l1, l2)):
        (tmp_path / f"l{i}.tar").write_bytes(data)
        apply_layer(str(tmp_path / f"l{i}.tar"), str(tmp_path / f"layer{i}"), whiteouts="overlay")
        apply_layer(str(tmp_path / f"l{i}.tar"), str(tmp_path / "flat"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["fuse-overlayfs", "-o", f"lowerdir={tmp_path / 'layer1'}:{tmp_path / 'layer0'}",
                    str(mnt)], check=True, capture_output=True)
    try:
        seen = sorted(os.listdir(mnt / "d"))
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert seen == sorted(os.listdir(tmp_path / "flat" / "d")) == ["lower", "upper"]


# ---------------------------------------------------------------- expected digests, in place

def _in_place_dest(tmp_path: Path) -> Path:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old").write_bytes(b"old")
    return dest


def test_expected_digest_in_place_from_a_pipe_path(tmp_path):
    # A path that is a pipe (/dev/fd/N, as a shell's <(...) gives) yields its
    # bytes once: checking the digest before touching dest must not use them up.
    import hashlib
    import threading
    from layerfs.archive import apply_layer
    data = Tar().file("new", b"new").bytes()
    dest = _in_place_dest(tmp_path)
    r, w = os.pipe()

    def feed():
        try:
            os.write(w, data)
        finally:
            os.close(w)
    threading.Thread(target=feed, daemon=True).start()
    try:
        res = apply_layer(f"/dev/fd/{r}", dest, expected_digest="sha256:" + hashlib.sha256(data).hexdigest())
    finally:
        os.close(r)
    assert res.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(dest)) == ["new", "old"]


def test_expected_digest_in_place_from_a_fifo_and_a_wrong_digest(tmp_path):
    # a named FIFO: read once (a second open would wait for a writer that never
    # comes); a wrong digest leaves dest as it was
    import hashlib
    import threading
    data = Tar().file("new", EVIL).bytes()
    fifo = tmp_path / "fifo"
    code = ("import sys; from layerfs.archive import apply_layer\n"
            "from layerfs.errors import DigestMismatch\n"
            "try:\n"
            "    apply_layer(sys.argv[1], sys.argv[2], expected_digest=sys.argv[3])\n"
            "except DigestMismatch:\n"
            "    sys.exit(3)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for digest, rc in (("sha256:" + hashlib.sha256(data).hexdigest(), 0), ("sha256:" + "4" * 64, 3)):
        dest = tmp_path / f"dest-{rc}"
        dest.mkdir()
        (dest / "old").write_bytes(b"old")
        os.mkfifo(fifo)

        def feed():
            with open(fifo, "wb") as f:
                f.write(data)
        threading.Thread(target=feed, daemon=True).start()
        p = subprocess.run([sys.executable, "-c", code, str(fifo), str(dest), digest],
                           capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
        os.unlink(fifo)
        assert p.returncode == rc, p.stderr
        assert sorted(os.listdir(dest)) == (["new", "old"] if rc == 0 else ["old"])


# ---------------------------------------------------------------- openat2 against the walk

def _random_layer(rnd, outside: str, files: list) -> bytes:
    """Directories and symlinks from one pool of names, files at leaves below them
    (so that most layers apply), hardlinks to files written before (files)."""
    t = Tar()
    names = ["a", "b", "c", "a/b", "a/b/c", "b/a", "c/c/c", "x"] + \
        ["/".join(["d"] * k) for k in (1, 30, 50, 55, 60)]
    targets = ["/", "..", "../..", "a", "/a/b", "b/../a", outside,
               "../" * 70 + outside.lstrip("/"), "/d/d/d"]
    for _ in range(rnd.randint(5, 40)):
        n = rnd.choice(names)
        leaf = n + rnd.choice(["/f", "/g"])
        op = rnd.random()
        if op < 0.25:
            t.file(leaf, b"v%d" % rnd.randrange(100))
            files.append(leaf)
        elif op < 0.45:
            t.dir(n + "/", mode=rnd.choice([0o755, 0o700, 0o555]))
        elif op < 0.6:
            t.symlink(n, rnd.choice(targets))
        elif op < 0.7 and files:
            t.hardlink(leaf, rnd.choice(files))
        elif op < 0.82:
            t.whiteout(rnd.choice([n, leaf]))
        elif op < 0.9:
            t.opaque(n)
        else:
            t.fifo(leaf)
    return t.bytes()


@pytest.mark.parametrize("seed", range(24))
def test_random_symlink_mazes_same_tree_with_openat2_and_the_walk(tmp_path, monkeypatch, seed):
    # two random layers of symlinks (in-root, to the root, climbing, to an
    # outside directory, deeper than the parent cache), directories, files,
    # hardlinks, whiteouts and opaque markers, applied with openat2 and with the
    # component walk: the same outcome and tree, and nothing outside changed
    import random
    from layerfs.archive import apply_layer
    from layerfs.errors import LayerError
    from .model import assert_same_tree
    rnd = random.Random(seed)
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "f").write_bytes(b"x")
    before = snapshot(outside, extra=True, include_root=True)
    layers, files = [], []
    for i in range(2):
        p = tmp_path / f"layer{i}"
        p.write_bytes(_random_layer(rnd, str(outside), files))
        layers.append(str(p))
    mode = rnd.choice(MODES)
    results = []
    for walk in ("0", "1"):
        monkeypatch.setenv("LAYERFS_NO_OPENAT2", walk)
        dest = tmp_path / f"dest{walk}"
        outcome = []
        for layer in layers:
            try:
                apply_layer(layer, str(dest), whiteouts=mode)
                outcome.append("ok")
            except LayerError as e:
                outcome.append(errno.errorcode.get(e.errno, e.errno))
        tree = snapshot(dest) if dest.is_dir() else None
        for node in (tree or {}).values():
            node.pop("mtime_ns", None)
        results.append((outcome, tree))
        assert_same_tree(before, snapshot(outside, extra=True, include_root=True), "outside")
    assert results[0] == results[1]


@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_unprivileged_device_entries(tmp_path, mode):
    # without root a device entry is refused by name, or skipped with
    # skip_devices; whiteouts still work in overlay mode (0:0 is allowed)
    t = (Tar().char("dev/mem", 1, 1, mode=0o666).block("dev/sda", 8, 0).file("f", b"f")
         .whiteout("gone"))
    (tmp_path / "a").mkdir()
    rc, err = _apply_as_nobody(tmp_path / "a", t.bytes(), owners="skip", whiteouts=mode)
    assert rc == errno.EPERM and "dev/mem" in err, err
    (tmp_path / "b").mkdir()
    rc, err = _apply_as_nobody(tmp_path / "b", t.bytes(), owners="skip", whiteouts=mode,
                               skip_devices=True)
    assert rc == 0, err
    root = tmp_path / "b" / "root"
    assert read(root / "f") == b"f"
    assert not os.path.lexists(root / "dev" / "mem") and not os.path.lexists(root / "dev" / "sda")
    if mode == "overlay":
        st = os.lstat(root / "gone")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and st.st_uid == 65534
    else:
        assert not os.path.lexists(root / "gone")
