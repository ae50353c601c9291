"""Hostile archives: apply_layer must keep everything it writes inside the root.

Every case builds a tar by hand (tarbuild: raw headers, PAX and GNU records),
applies it in a child process (a crash, a hang on a FIFO or a runaway
allocation fails the case instead of the run; the child's address space is
capped) into <sandbox>/root, next to a sentinel tree the archive aims at:

    sandbox/
        x                    a file right beside the root ("../x")
        outside/file         a file, with a second hard link outside/hl
        outside/dir/inner    a directory with an xattr and a file in it
        outside/link-to-file
        target/              a world-writable /tmp-like directory
        root/                the destination

Each case checks its outcome (an error naming the errno and the entry, or a
safe result inside the root) and that nothing outside the root changed: names,
types, modes, owners, content hashes, xattrs, mtimes, ctimes, link counts. The
sandbox's own directory entry is allowed to change (root appears on success);
no staging directory may be left beside the root; after a failure a root that
did not exist does not exist; no inode of the root is an inode from outside.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

from . import tarbuild as tb
from .model import assert_same_tree, snapshot, stat_node
from .tarbuild import Tar

REPO = Path(__file__).resolve().parents[2]

# errno values that mean "this entry is refused" (escapes, bad names, links to
# directories, bad numbers)
REJECT = {errno.EINVAL, errno.EPERM, errno.EXDEV, errno.EACCES, errno.ELOOP, errno.EILSEQ,
          errno.ENAMETOOLONG}
# ... plus what in-root resolution may legitimately say when a symlinked path
# leads nowhere inside the root
SAFE_ERRORS = REJECT | {errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}
# errno values of a corrupt or truncated stream
CORRUPT = {errno.EINVAL, errno.EIO, errno.EILSEQ, errno.EBADMSG, errno.EPROTO, errno.ENODATA,
           errno.EOVERFLOW, errno.ERANGE, errno.EFBIG, errno.E2BIG}

RLIMIT_AS = 1 << 30   # the child may not map more than 1 GiB
TIMEOUT = 120         # a hang guard, not a timing assertion

CHILD = r"""
import json, os, resource, sys
args = json.loads(sys.argv[1])
if "libasan" not in os.environ.get("LD_PRELOAD", ""):
    # (AddressSanitizer maps terabytes of shadow; it reports huge allocations itself)
    resource.setrlimit(resource.RLIMIT_AS, (args["rlimit_as"], args["rlimit_as"]))
from layerfs.archive import apply_layer
from layerfs.errors import LayerError
src = args["source"]
if args["stream"]:
    src = open(src, "rb")
try:
    r = apply_layer(src, args["dest"], **args["options"])
    out = {"ok": True, "result": r.as_dict()}
except OSError as e:
    out = {"ok": False, "type": type(e).__name__, "layer_error": isinstance(e, LayerError),
           "errno": e.errno, "filename": None if e.filename is None else os.fsdecode(e.filename),
           "entry": getattr(e, "entry", None), "offset": getattr(e, "offset", None),
           "message": str(e)}
sys.stdout.write(json.dumps(out))
"""


@dataclass
class Outcome:
    ok: bool
    result: dict = field(default_factory=dict)
    type: str = ""
    layer_error: bool = False
    errno: Optional[int] = None
    filename: Optional[str] = None
    entry: Optional[str] = None
    offset: Optional[int] = None
    message: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"succeeded: {self.result}"
        name = errno.errorcode.get(self.errno, self.errno)
        return f"{self.type} {name}: {self.message} (entry {self.entry!r}, offset {self.offset})"

    def rejected(self, entry=None, codes=REJECT):
        """The archive was refused with a LayerError naming entry."""
        assert not self.ok, f"expected an error, {self.describe()}"
        assert self.layer_error, f"expected a LayerError, got {self.describe()}"
        assert self.errno in codes, f"unexpected errno: {self.describe()}"
        if entry is not None:
            want = entry if isinstance(entry, (list, tuple, set)) else [entry]
            want = [os.fsdecode(e) for e in want]
            assert self.entry in want, f"error should name entry {want}: {self.describe()}"
        return self

    def safe(self, codes=SAFE_ERRORS):
        """Either applied (and the sandbox checks passed) or refused cleanly."""
        if not self.ok:
            assert self.layer_error, f"expected a LayerError, got {self.describe()}"
            assert self.errno in codes, f"unexpected errno: {self.describe()}"
        return self


class Sandbox:
    def __init__(self, tmp: Path):
        self.base = tmp / "sb"
        self.inputs = tmp / "in"
        self.root = self.base / "root"
        self.inputs.mkdir()
        b = self.base
        b.mkdir()
        (b / "x").write_bytes(b"sentinel x\n")
        (b / "outside").mkdir()
        (b / "outside" / "file").write_bytes(b"outside file\n")
        os.link(b / "outside" / "file", b / "outside" / "hl")
        (b / "outside" / "dir").mkdir()
        (b / "outside" / "dir" / "inner").write_bytes(b"inner\n")
        os.setxattr(b / "outside" / "dir", "user.sentinel", b"1")
        os.symlink("file", b / "outside" / "link-to-file")
        (b / "target").mkdir()
        os.chmod(b / "target", 0o1777)
        (b / "target" / "keep").write_bytes(b"keep\n")
        for p in sorted(b.rglob("*"), reverse=True):
            os.utime(p, ns=(10**18, 10**18), follow_symlinks=False)
        self.outside_inodes = {(n["dev"], n["ino"]) for n in self.snap().values()}

    # absolute host paths of the sentinels, as bytes, for archives to aim at
    @property
    def abs(self) -> bytes:
        return os.fsencode(self.base)

    def in_root(self, abs_path: bytes) -> Path:
        """Where an absolute host path lands when resolved inside the root."""
        return self.root / os.fsdecode(abs_path).lstrip("/")

    def snap(self):
        return snapshot(self.base, extra=True, exclude=(b"root",))

    def make_root(self, build=None):
        """Create the destination before the apply (as a lower layer would)."""
        self.root.mkdir()
        if build:
            build(self.root)

    def apply(self, data: bytes, *, stream: bool = False, timeout: int = TIMEOUT,
              **options) -> Outcome:
        src = self.inputs / f"layer-{uuid.uuid4().hex[:8]}"
        src.write_bytes(data)
        before = self.snap()
        names_before = set(os.listdir(self.base))
        root_existed = self.root.exists()
        root_was_empty = root_existed and not os.listdir(self.root)
        args = {"source": str(src), "dest": str(self.root), "options": options,
                "stream": stream, "rlimit_as": RLIMIT_AS}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout, (
            f"apply_layer crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        out = Outcome(**json.loads(proc.stdout))
        # nothing outside the root changed
        assert_same_tree(before, self.snap(), f"sandbox outside the root ({out.describe()})")
        names_after = set(os.listdir(self.base))
        expected_names = names_before | ({"root"} if out.ok else set())
        assert names_after == expected_names, (
            f"left beside the root: {sorted(names_after ^ expected_names)} ({out.describe()})")
        if not out.ok:
            if not root_existed:
                assert not os.path.lexists(self.root), f"root left after failure: {out.describe()}"
            elif root_was_empty:
                assert os.listdir(self.root) == [], f"empty root changed by a failure: {out.describe()}"
        if out.ok or root_existed:
            assert os.path.isdir(self.root) and not os.path.islink(self.root)
            shared = [p for p, n in snapshot(self.root, extra=True).items()
                      if (n["dev"], n["ino"]) in self.outside_inodes]
            assert not shared, f"root entries share inodes with outside files: {shared}"
        return out


@pytest.fixture
def sb(tmp_path):
    return Sandbox(tmp_path)


def read(p: Path) -> bytes:
    return p.read_bytes()


EVIL = b"evil content\n"
EVIL_SHA = hashlib.sha256(EVIL).hexdigest()


# ---------------------------------------------------------------- absolute names

def test_absolute_name_lands_inside_root(sb):
    real = stat_node(b"/etc/passwd", extra=True)
    out = sb.apply(Tar().file("/etc/passwd", EVIL).bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "etc" / "passwd") == EVIL
    assert stat_node(b"/etc/passwd", extra=True) == real


def test_absolute_name_aimed_at_sentinel_lands_inside_root(sb):
    target = sb.abs + b"/outside/file"
    out = sb.apply(Tar().file(target, EVIL).bytes())
    assert out.ok, out.describe()
    assert read(sb.in_root(target)) == EVIL


@pytest.mark.parametrize("name", [b"//x", b"/./x", b"/../x", b"/../../../../x", b"///../x"])
def test_absolute_dotted_names_stay_inside(sb, name):
    out = sb.apply(Tar().file(name, EVIL).bytes()).safe()
    if out.ok:
        assert read(sb.root / "x") == EVIL


def test_absolute_dir_and_file_in_tmp_like_target(sb):
    t = Tar().dir(sb.abs + b"/target/", mode=0o1777).file(sb.abs + b"/target/evil", EVIL)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.in_root(sb.abs + b"/target/evil")) == EVIL


# ---------------------------------------------------------------- ../ escapes

@pytest.mark.parametrize("name", [
    b"../x", b"./../x", b"a/../../x", b"a/b/../../../x", b"a/./../../x", b"../root/../x",
    b"..", b"../", b"a/../..",
])
def test_dotdot_file_rejected(sb, name):
    sb.apply(Tar().dir("a/").file(name, EVIL).bytes()).rejected(entry=name)


@pytest.mark.parametrize("kind", ["dir", "symlink", "hardlink", "fifo", "char"])
def test_dotdot_other_types_rejected(sb, kind):
    t = Tar().file("inner", b"i")
    name = b"../newthing"
    {"dir": lambda: t.dir(name + b"/"),
     "symlink": lambda: t.symlink(name, b"/etc"),
     "hardlink": lambda: t.hardlink(name, b"inner"),
     "fifo": lambda: t.fifo(name),
     "char": lambda: t.char(name, 1, 3)}[kind]()
    sb.apply(t.bytes()).rejected(entry=[name, name + b"/"])


@pytest.mark.parametrize("name", [b"a/../b", b"a/./b", b"./b", b"a//../b"])
def test_dotdot_staying_inside_is_safe(sb, name):
    out = sb.apply(Tar().dir("a/").file(name, EVIL).bytes()).safe()
    if out.ok:
        assert read(sb.root / os.path.normpath(os.fsdecode(name))) == EVIL


# ---------------------------------------------------------------- through symlinks

def _link_targets(sb):
    return {
        "slash": b"/",
        "abs-outside": sb.abs + b"/outside",
        "abs-target": sb.abs + b"/target",
        "rel-climb": b"../../outside",
        "rel-deep": b"../../../../../../../../../../" + sb.abs.lstrip(b"/") + b"/outside",
        "dotdot": b"..",
    }


@pytest.mark.parametrize("which", ["slash", "abs-outside", "abs-target", "rel-climb",
                                   "rel-deep", "dotdot"])
def test_file_through_symlink_in_same_layer(sb, which):
    link = _link_targets(sb)[which]
    t = Tar().symlink("link", link).file("link/file", EVIL).file("link/keep", EVIL)
    out = sb.apply(t.bytes()).safe()
    if out.ok:
        # resolved as if the root were "/": both files are somewhere inside the root
        assert os.path.islink(sb.root / "link")
        found = [p for p, n in snapshot(sb.root).items() if n["sha256"] == EVIL_SHA]
        assert len(found) == 2, found


def test_file_through_symlink_to_slash_resolves_in_root(sb):
    name = f"layerfs-hostile-{uuid.uuid4().hex}"
    t = Tar().symlink("link", "/").file(f"link/{name}", EVIL)
    out = sb.apply(t.bytes()).safe()
    assert not os.path.lexists("/" + name)
    if out.ok:
        assert read(sb.root / name) == EVIL


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot"])
def test_dir_and_file_through_symlink(sb, which):
    link = _link_targets(sb)[which]
    t = Tar().symlink("link", link).dir("link/newdir/").file("link/newdir/f", EVIL)
    sb.apply(t.bytes()).safe()


def test_chained_symlinks_climbing_out(sb):
    t = (Tar().dir("d/").symlink("d/a", "b").symlink("d/b", "../c").symlink("c", "../..")
         .file(b"d/a/" + sb.abs.lstrip(b"/") + b"/x", EVIL)
         .file(b"d/a/sb/x", EVIL))
    sb.apply(t.bytes()).safe()


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
def test_file_through_symlink_from_lower_layer(sb, which):
    link = _link_targets(sb)[which]
    sb.make_root(lambda r: os.symlink(link, r / "link"))
    out = sb.apply(Tar().file("link/file", EVIL).file("link/dir/inner", EVIL).bytes()).safe()
    assert os.path.islink(sb.root / "link")
    if which == "slash" and out.ok:
        assert read(sb.root / "file") == EVIL


def test_symlink_to_file_outside_then_write_through_it_as_dir(sb):
    t = Tar().symlink("link", sb.abs + b"/outside/file").file("link/x", EVIL)
    sb.apply(t.bytes()).safe()


# ---------------------------------------------------------------- hardlinks

def test_hardlink_target_through_symlink(sb):
    t = Tar().symlink("link", sb.abs + b"/outside").hardlink("h", "link/file")
    sb.apply(t.bytes()).safe()


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot"])
def test_hardlink_name_through_symlink(sb, which):
    link = _link_targets(sb)[which]
    t = Tar().file("inner", b"inner").symlink("link", link).hardlink("link/h", "inner")
    out = sb.apply(t.bytes()).safe()
    if out.ok:
        assert read(sb.root / "inner") == b"inner"


def test_hardlink_target_through_symlink_from_lower_layer(sb):
    sb.make_root(lambda r: os.symlink(os.fsdecode(sb.abs) + "/outside", r / "link"))
    sb.apply(Tar().hardlink("h", "link/file").hardlink("h2", "link/hl").bytes()).safe()


@pytest.mark.parametrize("target", ["abs-file", "abs-hl", "rel", "rel-deep", "dotdot-inner"])
def test_hardlink_to_outside_rejected(sb, target):
    linkname = {
        "abs-file": sb.abs + b"/outside/file",
        "abs-hl": sb.abs + b"/outside/hl",
        "rel": b"../x",
        "rel-deep": b"a/../../outside/file",
        "dotdot-inner": b"../outside/dir/inner",
    }[target]
    out = sb.apply(Tar().dir("a/").hardlink("h", linkname).bytes())
    out.rejected(entry="h", codes=SAFE_ERRORS)


def test_hardlink_absolute_target_inside_root(sb):
    t = Tar().dir("etc/").file("etc/inroot", b"in").hardlink("h", "/etc/inroot")
    out = sb.apply(t.bytes()).safe()
    if out.ok:
        assert os.lstat(sb.root / "h").st_ino == os.lstat(sb.root / "etc" / "inroot").st_ino


@pytest.mark.parametrize("link", ["abs", "rel"])
def test_hardlink_to_symlink_pointing_outside_links_the_symlink(sb, link):
    target = sb.abs + b"/outside/file" if link == "abs" else b"../outside/file"
    out = sb.apply(Tar().symlink("sl", target).hardlink("h", "sl").bytes())
    assert out.ok, out.describe()
    st_h, st_sl = os.lstat(sb.root / "h"), os.lstat(sb.root / "sl")
    assert stat.S_ISLNK(st_h.st_mode)
    assert st_h.st_ino == st_sl.st_ino
    assert os.readlink(sb.root / "h") == os.fsdecode(target)


def test_hardlink_to_directory_rejected(sb):
    out = sb.apply(Tar().dir("d/").file("d/f", b"f").hardlink("h", "d").bytes())
    out.rejected(entry="h", codes=REJECT | {errno.EISDIR})


def test_hardlink_to_root_rejected(sb):
    out = sb.apply(Tar().hardlink("h", ".").bytes())
    out.rejected(entry="h", codes=SAFE_ERRORS)


def test_hardlink_to_missing_target(sb):
    out = sb.apply(Tar().hardlink("h", "nothing-here").bytes())
    out.rejected(entry="h", codes={errno.ENOENT, errno.EINVAL})


def test_hardlink_to_itself(sb):
    sb.apply(Tar().hardlink("h", "h").bytes()).safe()


def test_hardlink_to_itself_existing(sb):
    out = sb.apply(Tar().file("g", b"g").hardlink("g", "g").bytes()).safe()
    if out.ok:
        assert read(sb.root / "g") == b"g"


def test_hardlink_replacing_its_own_target_by_other_name(sb):
    # h -> f, then f replaced: h keeps the old content (it is the old inode)
    t = Tar().file("f", b"old").hardlink("h", "f").file("f", b"new")
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "f") == b"new"
    assert read(sb.root / "h") == b"old"


# ---------------------------------------------------------------- replacing symlinks

@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
def test_symlink_replaced_by_directory_then_files(sb, which):
    link = _link_targets(sb)[which]
    t = Tar().symlink("link", link).dir("link/").file("link/file", EVIL).dir("link/dir/")
    t.file("link/dir/inner", EVIL)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert not os.path.islink(sb.root / "link")
    assert read(sb.root / "link" / "file") == EVIL
    assert read(sb.root / "link" / "dir" / "inner") == EVIL


@pytest.mark.parametrize("target", ["abs-file", "rel-file", "abs-dir"])
@pytest.mark.parametrize("lower", [False, True], ids=["same-layer", "lower-layer"])
def test_file_replacing_symlink_to_outside(sb, target, lower):
    link = {"abs-file": sb.abs + b"/outside/file", "rel-file": b"../outside/file",
            "abs-dir": sb.abs + b"/outside/dir"}[target]
    t = Tar()
    if lower:
        sb.make_root(lambda r: os.symlink(link, r / "link"))
    else:
        t.symlink("link", link)
    t.file("link", EVIL, mode=0o600)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    st = os.lstat(sb.root / "link")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert read(sb.root / "link") == EVIL


@pytest.mark.parametrize("kind", ["hardlink", "fifo", "char", "symlink"])
def test_other_types_replacing_symlink_to_outside(sb, kind):
    t = Tar().file("f", b"f").symlink("link", sb.abs + b"/outside/file")
    {"hardlink": lambda: t.hardlink("link", "f"),
     "fifo": lambda: t.fifo("link"),
     "char": lambda: t.char("link", 1, 3),
     "symlink": lambda: t.symlink("link", "elsewhere")}[kind]()
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    mode = os.lstat(sb.root / "link").st_mode
    assert {"hardlink": stat.S_ISREG, "fifo": stat.S_ISFIFO, "char": stat.S_ISCHR,
            "symlink": stat.S_ISLNK}[kind](mode)


def test_directory_replaced_by_symlink_then_files(sb):
    t = (Tar().dir("d/").file("d/x", b"x").symlink("d", sb.abs + b"/outside")
         .file("d/file", EVIL).file("d/y", EVIL))
    sb.apply(t.bytes()).safe()


def test_root_entry_as_file_or_symlink(sb):
    for t in (Tar().file(".", EVIL), Tar().symlink(".", sb.abs + b"/outside").file("./file", EVIL),
              Tar().symlink("./", sb.abs + b"/outside").file("file", EVIL),
              Tar().file("", EVIL), Tar().hardlink(".", "x")):
        out = sb.apply(t.bytes()).safe()
        if out.ok:
            assert os.path.isdir(sb.root) and not os.path.islink(sb.root)
            shutil.rmtree(sb.root)


def test_root_directory_entry_sets_attributes_only(sb):
    out = sb.apply(Tar().dir("./", mode=0o750).file("f", b"f").bytes())
    assert out.ok, out.describe()
    assert stat.S_ISDIR(os.lstat(sb.root).st_mode)


# ---------------------------------------------------------------- whiteouts

@pytest.mark.parametrize("name", [b".wh..", b".wh...", b"a/.wh..", b"a/.wh...", b".wh.", b"a/.wh."])
@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_whiteout_of_dot_and_dotdot(sb, name, mode):
    sb.make_root(lambda r: ((r / "a").mkdir(), (r / "a" / "keep").write_bytes(b"k"),
                            (r / "keep").write_bytes(b"k")))
    out = sb.apply(Tar().dir("a/").file(name).bytes(), whiteouts=mode).safe()
    assert (sb.root / "keep").exists() or not out.ok
    assert os.path.isdir(sb.root / "a")


@pytest.mark.parametrize("name", [b"../.wh.x", b"a/../../.wh.x", b"../root/../.wh.x",
                                  b"../.wh..wh..opq", b"../outside/.wh..wh..opq"])
@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_whiteout_escaping_rejected(sb, name, mode):
    sb.apply(Tar().dir("a/").file(name).bytes(), whiteouts=mode).rejected(entry=name)


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
@pytest.mark.parametrize("lower", [False, True], ids=["same-layer", "lower-layer"])
@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_whiteout_through_symlink(sb, which, lower, mode):
    link = _link_targets(sb)[which]
    t = Tar()
    if lower:
        sb.make_root(lambda r: os.symlink(link, r / "link"))
    else:
        t.symlink("link", link)
    for victim in (b"file", b"dir", b"hl", b"link-to-file", b"outside", b"x", b"target", b"sb"):
        t.whiteout(b"link/" + victim)
    t.whiteout(b"link/dir/inner")
    sb.apply(t.bytes(), whiteouts=mode).safe()


@pytest.mark.parametrize("which", ["abs-outside", "rel-climb", "dotdot", "slash"])
@pytest.mark.parametrize("lower", [False, True], ids=["same-layer", "lower-layer"])
@pytest.mark.parametrize("mode", ["apply", "overlay", "keep"])
def test_opaque_through_symlink(sb, which, lower, mode):
    link = _link_targets(sb)[which]
    t = Tar()
    if lower:
        sb.make_root(lambda r: os.symlink(link, r / "link"))
    else:
        t.symlink("link", link)
    t.opaque(b"link").opaque(b"link/dir")
    sb.apply(t.bytes(), whiteouts=mode).safe()


@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_whiteout_of_symlink_removes_link_only(sb, mode):
    sb.make_root(lambda r: (os.symlink(os.fsdecode(sb.abs) + "/outside", r / "link"),
                            os.symlink(os.fsdecode(sb.abs) + "/outside/dir", r / "dlink")))
    out = sb.apply(Tar().whiteout("link").whiteout("dlink/").bytes(), whiteouts=mode)
    assert out.ok, out.describe()
    if mode == "apply":
        assert not os.path.lexists(sb.root / "link")
        assert not os.path.lexists(sb.root / "dlink")
    else:
        st = os.lstat(sb.root / "link")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_whiteout_of_dir_holding_symlinks_to_outside(sb, mode):
    def build(r):
        (r / "d" / "sub").mkdir(parents=True)
        os.symlink(os.fsdecode(sb.abs) + "/outside", r / "d" / "l1")
        os.symlink("../../..", r / "d" / "sub" / "l2")
        os.symlink(os.fsdecode(sb.abs) + "/outside/file", r / "d" / "l3")
        os.link(r / "d" / "l3", r / "d" / "sub" / "l3-hard")
    sb.make_root(build)
    out = sb.apply(Tar().whiteout("d").bytes(), whiteouts=mode)
    assert out.ok, out.describe()
    assert mode != "apply" or not os.path.lexists(sb.root / "d")


@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_root_opaque_with_symlinks_to_outside(sb, mode):
    def build(r):
        os.symlink(os.fsdecode(sb.abs) + "/outside", r / "l1")
        os.symlink("..", r / "l2")
        (r / "d").mkdir()
        os.symlink("../..", r / "d" / "up")
    sb.make_root(build)
    out = sb.apply(Tar().opaque(b"").file("new", b"n").bytes(), whiteouts=mode).safe()
    if out.ok and mode == "apply":
        assert sorted(os.listdir(sb.root)) == ["new"]


# ---------------------------------------------------------------- PAX / GNU names

def test_pax_path_with_dotdot_rejected(sb):
    t = Tar().file("innocent", EVIL, pax={"path": "../x"})
    sb.apply(t.bytes()).rejected(entry="../x")


def test_pax_path_absolute_lands_inside(sb):
    target = sb.abs + b"/outside/file"
    out = sb.apply(Tar().file("innocent", EVIL, pax={b"path": target}).bytes())
    assert out.ok, out.describe()
    assert read(sb.in_root(target)) == EVIL
    assert not (sb.root / "innocent").exists()


def test_pax_linkpath_absolute_symlink_then_write(sb):
    t = Tar().symlink("sl", "harmless", pax={b"linkpath": sb.abs + b"/outside/file"})
    t.file("sl", EVIL)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "sl") == EVIL


def test_pax_linkpath_absolute_symlink_kept_as_value(sb):
    target = sb.abs + b"/outside/file"
    out = sb.apply(Tar().symlink("sl", "harmless", pax={b"linkpath": target}).bytes())
    assert out.ok, out.describe()
    assert os.readlink(sb.root / "sl") == os.fsdecode(target)


@pytest.mark.parametrize("linkpath", ["abs", "rel"])
def test_pax_linkpath_on_hardlink_outside_rejected(sb, linkpath):
    lp = sb.abs + b"/outside/file" if linkpath == "abs" else b"../outside/file"
    t = Tar().file("inner", b"i").hardlink("h", "inner", pax={b"linkpath": lp})
    sb.apply(t.bytes()).rejected(entry="h", codes=SAFE_ERRORS)


def test_gnu_longname_with_dotdot_rejected(sb):
    name = b"../" + b"a" * 150
    t = Tar(long="gnu").file(name, EVIL)
    sb.apply(t.bytes()).rejected(entry=name)


def test_gnu_longname_climbing_through_dirs_rejected(sb):
    name = b"d/" * 60 + b"../" * 61 + b"x"
    t = Tar(long="gnu").dir("d/").file(name, EVIL)
    sb.apply(t.bytes()).rejected(entry=name)


def test_gnu_longlink_on_hardlink_rejected(sb):
    lp = b"../" * 40 + os.fsencode(sb.base).lstrip(b"/") + b"/outside/file"
    t = Tar(long="gnu").hardlink("h", lp)
    sb.apply(t.bytes()).rejected(entry="h", codes=SAFE_ERRORS)


def test_ustar_prefix_with_dotdot_rejected(sb):
    t = Tar().raw(tb.header("x", prefix="..", size=len(EVIL)) + tb.pad(EVIL))
    sb.apply(t.bytes()).rejected(entry="../x")


def test_name_field_stops_at_nul(sb):
    t = Tar().raw(tb.header(b"ok\0../../x", size=len(EVIL)) + tb.pad(EVIL))
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "ok") == EVIL


@pytest.mark.parametrize("value", [b"ok\0/../../x", b"\0../x", b"a\0", b"../x\0ok"])
def test_pax_path_with_nul(sb, value):
    out = sb.apply(Tar().file("innocent", EVIL, pax={b"path": value}).bytes())
    out.safe(codes=REJECT | CORRUPT)
    if out.ok:
        assert not os.path.lexists(sb.base / "x") or read(sb.base / "x") == b"sentinel x\n"


def test_pax_linkpath_with_nul(sb):
    t = Tar().file("inner", b"i").hardlink("h", "inner", pax={b"linkpath": b"inner\0/../../../x"})
    sb.apply(t.bytes()).safe(codes=SAFE_ERRORS | CORRUPT)


def test_pax_empty_path(sb):
    sb.apply(Tar().file("innocent", EVIL, pax={b"path": b""}).bytes()).safe(codes=SAFE_ERRORS | CORRUPT)


def test_global_pax_path_does_not_escape(sb):
    t = Tar().raw(tb.pax_header({b"path": b"../x"}, typeflag=b"g", name=b"GlobalHead"))
    t.file("y", EVIL)
    out = sb.apply(t.bytes()).safe(codes=REJECT | CORRUPT)
    if out.ok:
        assert read(sb.base / "x") == b"sentinel x\n"


def test_pax_record_malformed(sb):
    for data in (b"99 path=x\n", b"5 path=x\n", b"abc path=x\n", b"12 pathx\n", b"0 =\n",
                 b"-12 path=../x\n", b"18446744073709551626 path=x\n"):
        t = Tar().raw(tb.pax_header(None, data=data)).file("innocent", EVIL)
        out = sb.apply(t.bytes()).safe(codes=REJECT | CORRUPT)
        if out.ok:
            shutil.rmtree(sb.root)


# ---------------------------------------------------------------- resource limits

def test_huge_pax_header_declared_size(sb):
    # declares 16 GiB of PAX records, holds 1 MiB, then ends
    t = Tar().raw(tb.pax_header(None, data=tb.pax_record("comment", "x" * (1 << 20)),
                                size=tb.base256(1 << 34, 12)))
    out = sb.apply(t.bytes(trailer=False))
    out.rejected(codes=CORRUPT | {errno.ENOSPC})
    assert out.errno != errno.ENOMEM


def test_pax_header_over_default_limit(sb):
    t = Tar().raw(tb.pax_header([("comment", "x" * (2 << 20))])).file("f", b"f")
    out = sb.apply(t.bytes())
    out.rejected(codes=CORRUPT | REJECT)


def test_pax_header_over_max_pax_size(sb):
    t = Tar().file("f", b"f", pax={"comment": "y" * 8192})
    sb.apply(t.bytes(), max_pax_size=4096).rejected(codes=CORRUPT | REJECT)
    out = sb.apply(t.bytes(), max_pax_size=1 << 20)
    assert out.ok, out.describe()


def test_gnu_longname_huge_declared_size(sb):
    t = Tar().raw(tb.gnu_long(b"L", b"a" * 1000, size=tb.base256(1 << 34, 12)))
    out = sb.apply(t.bytes(trailer=False))
    out.rejected(codes=CORRUPT | REJECT)
    assert out.errno != errno.ENOMEM


def test_max_entries(sb):
    t = Tar()
    for i in range(101):
        t.file(f"f{i:03d}", b"")
    sb.apply(t.bytes(), max_entries=100).rejected(codes=CORRUPT | REJECT)
    out = sb.apply(t.bytes(), max_entries=101)
    assert out.ok, out.describe()
    assert out.result["entries"] == 101


def test_max_xattrs_size(sb):
    t = Tar().file("f", b"f", pax={"SCHILY.xattr.user.big": "z" * 4000})
    sb.apply(t.bytes(), max_xattrs_size=1000).rejected(codes=CORRUPT | REJECT)


@pytest.mark.parametrize("size", [8**11 - 1, tb.base256(1 << 40, 12), tb.base256((1 << 62), 12)],
                         ids=["octal-8GiB", "base256-1TiB", "base256-4EiB"])
def test_gigantic_declared_size_truncated_data(sb, size):
    t = Tar().raw(tb.header("big", size=size) + tb.pad(b"x" * 1024))
    out = sb.apply(t.bytes(trailer=False))
    out.rejected(codes=CORRUPT | {errno.ENOSPC})
    assert out.errno != errno.ENOMEM


def test_sparse_map_huge_count(sb):
    body = tb.pad(b"99999999999999\n0\n1\n") + b"x"
    records = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
               "GNU.sparse.realsize": "10"}
    t = Tar().raw(tb.pax_header(records)).raw(tb.header("GNUSparseFile.0/s", size=len(body))
                                               + tb.pad(body))
    out = sb.apply(t.bytes())
    out.rejected(codes=CORRUPT | REJECT)
    assert out.errno != errno.ENOMEM


@pytest.mark.parametrize("mp", [b"1\n-512\n1\n", b"1\n0\n-1\n", b"2\n1024\n512\n0\n512\n",
                                b"1\n9223372036854775807\n512\n", b"1\n0\n99999\n", b"x\n"],
                         ids=["neg-offset", "neg-length", "unsorted", "overflow", "beyond-data",
                              "garbage"])
def test_sparse_map_invalid(sb, mp):
    body = tb.pad(mp) + b"y" * 512
    records = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
               "GNU.sparse.realsize": "2048"}
    t = Tar().raw(tb.pax_header(records)).raw(tb.header("GNUSparseFile.0/s", size=len(body))
                                               + tb.pad(body))
    out = sb.apply(t.bytes())
    out.rejected(codes=CORRUPT | REJECT)


# ---------------------------------------------------------------- special files

def test_device_nodes_created(sb):
    t = Tar().char("null", 1, 3, mode=0o666).block("loopish", 7, 200, mode=0o660)
    t.char("bigdev", 4095, 1048575)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    st = os.lstat(sb.root / "null")
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3)
    assert stat.S_IMODE(st.st_mode) == 0o666
    st = os.lstat(sb.root / "loopish")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 200)
    st = os.lstat(sb.root / "bigdev")
    assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (4095, 1048575)


def test_device_nodes_skipped(sb):
    t = Tar().char("null", 1, 3).block("loopish", 7, 200).file("f", b"f")
    out = sb.apply(t.bytes(), skip_devices=True)
    assert out.ok, out.describe()
    assert not os.path.lexists(sb.root / "null")
    assert not os.path.lexists(sb.root / "loopish")
    assert read(sb.root / "f") == b"f"
    assert out.result["warnings"] >= 1
    assert out.result["first_warning"] and "null" in out.result["first_warning"]


def test_device_node_replacing_symlink_to_outside_device(sb):
    sb.make_root(lambda r: os.symlink("/dev/null", r / "n"))
    real = stat_node(b"/dev/null", extra=True)
    out = sb.apply(Tar().char("n", 1, 5).bytes())
    assert out.ok, out.describe()
    st = os.lstat(sb.root / "n")
    assert stat.S_ISCHR(st.st_mode) and os.minor(st.st_rdev) == 5
    now = stat_node(b"/dev/null", extra=True)
    for k in ("mode", "uid", "gid", "rdev", "ino"):
        assert now[k] == real[k]


def test_setuid_kept_never_executed(sb):
    marker = sb.abs + b"/executed"
    script = b"#!/bin/sh\ntouch " + marker + b"\n"
    t = (Tar().file("bin/tool", script, mode=0o4755, uid=0).file("bin/gtool", script, mode=0o2755, gid=0)
         .file("bin/sticky", script, mode=0o1755).file(".profile", script, mode=0o755)
         .file("etc/rc.local", script, mode=0o755))
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert stat.S_IMODE(os.lstat(sb.root / "bin" / "tool").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(sb.root / "bin" / "gtool").st_mode) == 0o2755
    assert stat.S_IMODE(os.lstat(sb.root / "bin" / "sticky").st_mode) == 0o1755
    assert not os.path.lexists(marker)


def test_setuid_with_foreign_owner_kept(sb):
    out = sb.apply(Tar().file("tool", b"#!/bin/sh\n", mode=0o6755, uid=1234, gid=5678).bytes())
    assert out.ok, out.describe()
    st = os.lstat(sb.root / "tool")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o6755)


def test_fifo_replaced_by_file_never_opened(sb):
    t = Tar().fifo("p").file("p", EVIL).fifo("q").hardlink("r", "q").file("r", EVIL)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "p") == EVIL
    assert read(sb.root / "r") == EVIL
    assert stat.S_ISFIFO(os.lstat(sb.root / "q").st_mode)


def test_fifo_from_lower_layer_overwritten(sb):
    sb.make_root(lambda r: (os.mkfifo(r / "p"), os.mkfifo(r / "q")))
    t = Tar().file("p", EVIL).hardlink("q2", "q").file("q", b"q")
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "p") == EVIL
    assert stat.S_ISFIFO(os.lstat(sb.root / "q2").st_mode)


def test_fifo_with_data_not_opened(sb):
    t = Tar().raw(tb.header("p", typeflag=b"6", size=len(EVIL)) + tb.pad(EVIL)).file("after", b"a")
    out = sb.apply(t.bytes()).safe(codes=REJECT | CORRUPT)
    if out.ok:
        assert stat.S_ISFIFO(os.lstat(sb.root / "p").st_mode)
        assert read(sb.root / "after") == b"a"


def test_fifo_outside_through_symlink_not_opened(sb):
    os.mkfifo(sb.base / "outside" / "fifo")
    os.utime(sb.base / "outside" / "fifo", ns=(10**18, 10**18))
    os.utime(sb.base / "outside", ns=(10**18, 10**18))
    t = Tar().symlink("f", sb.abs + b"/outside/fifo").file("f", EVIL)
    out = sb.apply(t.bytes())
    assert out.ok, out.describe()
    assert read(sb.root / "f") == EVIL


# ---------------------------------------------------------------- corrupt streams

def _layer():
    return Tar().dir("d/").file("d/f", b"content" * 1000).file("g", os.urandom(50000)).bytes()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
@pytest.mark.parametrize("cut", [0.5, 0.99, 10])
def test_truncated_compressed(sb, kind, cut):
    blob = tb.gzip_bytes(_layer()) if kind == "gzip" else tb.zstd_bytes(_layer())
    n = int(len(blob) * cut) if cut < 1 else cut
    out = sb.apply(blob[:n])
    out.rejected(codes=CORRUPT)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_corrupt_compressed(sb, kind):
    blob = bytearray(tb.gzip_bytes(_layer()) if kind == "gzip" else tb.zstd_bytes(_layer()))
    blob[-6] ^= 0xff   # gzip: CRC/ISIZE trailer; zstd: checksum or last block
    sb.apply(bytes(blob)).rejected(codes=CORRUPT)


def test_gzip_trailing_garbage_after_member(sb):
    blob = tb.gzip_bytes(_layer()) + b"\x1f\x8b garbage"
    sb.apply(blob).safe(codes=CORRUPT)


def test_truncated_plain_tar_mid_data(sb):
    data = _layer()
    sb.apply(data[:3000]).rejected(codes=CORRUPT)


def test_corrupt_checksum_first_header(sb):
    t = Tar().raw(tb.header("f", size=1, chksum=12345) + tb.pad(b"x"))
    sb.apply(t.bytes()).rejected(codes=CORRUPT)


def test_corrupt_checksum_later_header(sb):
    good = Tar().file("a", b"a" * 600).bytes(trailer=False)
    bad = tb.header("b", size=1)
    bad = bad[:10] + b"Z" + bad[11:]   # change a byte after the checksum was computed
    out = sb.apply(good + bad + tb.pad(b"b") + tb.end())
    out.rejected(codes=CORRUPT)
    if out.offset is not None:
        assert out.offset == len(good)


def test_garbage_is_not_a_layer(sb):
    sb.apply(os.urandom(4096)).rejected(codes=CORRUPT)


@pytest.mark.parametrize("field,value", [
    ("size", tb.base256(-1, 12)),
    ("size", b"-1"),
    ("size", b"zzzzzzzzzzz"),
    ("size", b"\xff" * 12),
    ("size", b"\x80" + b"\xff" * 11),
    ("mode", b"9999999"),
    ("uid", b"abcdefg"),
    ("uid", tb.base256(1 << 32, 8)),
    ("gid", tb.base256(-5, 8)),
    ("mtime", b"zzzzzzzzzzz"),
    ("devmajor", b"zz"),
], ids=lambda v: v if isinstance(v, str) else v.hex()[:12])
def test_bad_numbers_rejected(sb, field, value):
    kw = {field: value}
    typeflag = b"3" if field.startswith("dev") else b"0"
    size = kw.pop("size", 1)
    hdr = tb.header("f", typeflag=typeflag, size=size, **kw) if field != "mtime" else \
        tb.header("f", size=1, raw={"mtime": value})
    out = sb.apply(Tar().raw(hdr + tb.pad(b"x")).bytes())
    out.rejected(codes=CORRUPT | REJECT)


@pytest.mark.parametrize("key,value", [
    ("uid", "4294967296"), ("gid", "4294967296"), ("uid", "-1"), ("uid", "18446744073709551617"),
    ("size", "-5"), ("size", "99999999999999999999999"), ("uid", "12abc"), ("size", "0x10"),
    ("mtime", "1e400"), ("mtime", "99999999999999999999999.5"), ("mtime", "abc"),
])
def test_bad_pax_numbers_rejected(sb, key, value):
    out = sb.apply(Tar().file("f", b"x", pax={key: value}).bytes())
    out.rejected(codes=CORRUPT | REJECT)


def test_uid_two_to_the_32_rejected(sb):
    out = sb.apply(Tar().file("f", b"x", pax={"uid": str(1 << 32)}).bytes())
    out.rejected(entry="f", codes=CORRUPT | REJECT)


def test_negative_mtime_is_a_date(sb):
    out = sb.apply(Tar().file("f", b"x", pax={"mtime": "-1.5"}).file("g", b"y", mtime=tb.base256(-86400, 12)).bytes())
    assert out.ok, out.describe()
    assert os.lstat(sb.root / "f").st_mtime_ns == -1_500_000_000
    assert os.lstat(sb.root / "g").st_mtime_ns == -86400 * 10**9


# ---------------------------------------------------------------- expected digests

def test_expected_digest_mismatch_dest_not_created(sb):
    data = Tar().file("f", EVIL).bytes()
    out = sb.apply(data, expected_digest="sha256:" + "0" * 64)
    out.rejected(codes={errno.EILSEQ, errno.EINVAL, errno.EBADMSG})
    assert not os.path.lexists(sb.root)


def test_expected_diff_id_mismatch_dest_not_created(sb):
    data = tb.gzip_bytes(Tar().file("f", EVIL).bytes())
    out = sb.apply(data, expected_diff_id="sha256:" + "1" * 64, stream=True)
    out.rejected(codes={errno.EILSEQ, errno.EINVAL, errno.EBADMSG})
    assert not os.path.lexists(sb.root)


@pytest.mark.parametrize("which", ["digest", "diff_id"])
@pytest.mark.parametrize("stream", [False, True], ids=["path", "stream"])
def test_expected_digest_mismatch_existing_tree_unchanged(sb, which, stream):
    def build(r):
        (r / "d").mkdir()
        (r / "d" / "keep").write_bytes(b"keep")
        (r / "f").write_bytes(b"old")
        os.symlink("d", r / "l")
    sb.make_root(build)
    before = snapshot(sb.root, extra=True, include_root=True)
    data = tb.gzip_bytes(Tar().opaque("d").file("f", EVIL).whiteout("l").file("new", EVIL).bytes())
    opt = {"expected_digest" if which == "digest" else "expected_diff_id": "sha256:" + "2" * 64}
    out = sb.apply(data, stream=stream, **opt)
    out.rejected(codes={errno.EILSEQ, errno.EINVAL, errno.EBADMSG})
    assert_same_tree(before, snapshot(sb.root, extra=True, include_root=True), "existing dest")


def test_expected_digest_mismatch_empty_dest_stays_empty(sb):
    sb.make_root()
    out = sb.apply(Tar().file("f", EVIL).bytes(), expected_digest="sha256:" + "3" * 64)
    out.rejected(codes={errno.EILSEQ, errno.EINVAL, errno.EBADMSG})
    assert os.listdir(sb.root) == []


def test_expected_digest_match_applies(sb):
    data = tb.gzip_bytes(Tar().file("f", EVIL).bytes())
    out = sb.apply(data, expected_digest="sha256:" + hashlib.sha256(data).hexdigest())
    assert out.ok, out.describe()
    assert read(sb.root / "f") == EVIL


def test_failure_midway_leaves_no_new_dest(sb):
    data = Tar().dir("d/").file("d/f", b"ok").file("../x", EVIL).bytes()
    sb.apply(data).rejected(entry="../x")
    assert not os.path.lexists(sb.root)


# ---------------------------------------------------------------- more names and attributes

def test_symlink_loop(sb):
    t = Tar().symlink("a", "b").symlink("b", "a").file("a/x", EVIL)
    sb.apply(t.bytes()).rejected(entry="a/x", codes=SAFE_ERRORS)


@pytest.mark.parametrize("name", [b"n" * 256, b"d/" * 2100 + b"x", b"e" * 5000],
                         ids=["component-256", "deep-4201", "path-5000"])
def test_overlong_names(sb, name):
    out = sb.apply(Tar().file(name, EVIL).bytes()).safe()
    if out.ok:
        assert read(sb.root / os.fsdecode(name)) == EVIL


@pytest.mark.parametrize("xattr", ["trusted.overlay.redirect", "trusted.overlay.metacopy",
                                   "trusted.overlay.origin", "user.overlay.redirect"])
@pytest.mark.parametrize("mode", ["apply", "overlay"])
def test_overlay_private_xattrs_never_set_from_archive(sb, xattr, mode):
    # overlayfs follows these (redirects to other lower paths, metacopy): a
    # layer must not be able to plant them
    t = Tar().dir("d/", pax={"SCHILY.xattr." + xattr: b"/../../../" + sb.abs.lstrip(b"/")})
    t.file("f", b"f", pax={"SCHILY.xattr." + xattr: b"/etc/shadow"})
    out = sb.apply(t.bytes(), whiteouts=mode).safe(codes=REJECT)
    if out.ok:
        for p in ("d", "f"):
            assert xattr not in os.listxattr(sb.root / p, follow_symlinks=False)
