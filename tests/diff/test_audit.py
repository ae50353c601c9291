"""The diff engine against an independent reference model.

The model walks two directory trees with os.lstat / os.readlink /
os.listxattr and lists the changes by the rules the module docstrings give
(type, permission bits, owner, device numbers, symlink target, xattrs, size,
mtime with the tar whole-second rule, hardlink groups, content), in the
documented shape (parents first, a deleted directory as one record, an added
one followed by its entries) with the summary's byte counts (each hardlink
group once, a deleted directory's files included).  compare() must give that
answer for every way of presenting the same two trees: directories, overlay
upper directories, layer tarballs written by create_layer and by GNU tar
(plain, gzip, zstd), OCI layouts (directory and tar) and docker-archives, in
mixed pairs too.

Layer stacks are checked against stacks applied by layerfs.archive, and the
waste accounting of analyze_layers against the copies an applied image
still holds.

AUDIT_EXAMPLES=300 runs each property with that many examples.
"""
from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from hypothesis import example, given, settings, strategies as st

from layerfs.archive import create_layer, unpack_layers
from layerfs.diff import analyze_layers, compare, layer_stack

from .test_sources import TarBuilder, gnu_tar, mk, write_docker, write_oci

S = 1_000_000_000
T0 = 1_700_000_000_123_456_789
PRIVATE = ("trusted.overlay.", "user.overlay.")


def examples(n: int) -> int:
    """n hypothesis examples, or AUDIT_EXAMPLES of them (a longer search)."""
    return int(os.environ.get("AUDIT_EXAMPLES", n))

# ----------------------------------------------------------------- the reference model


def walk(root: Path):
    """path ("/a/b", str with surrogateescape) -> facts about the entry, by lstat."""
    out = {}
    rootb = os.fsencode(root)

    def visit(full: bytes, rel: bytes):
        st_ = os.lstat(full)
        fmt = stat.S_IFMT(st_.st_mode)
        t = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
             stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}[fmt]
        try:
            names = os.listxattr(full, follow_symlinks=False)
        except OSError:
            names = []
        e = {
            "type": t, "mode": stat.S_IMODE(st_.st_mode), "uid": st_.st_uid, "gid": st_.st_gid,
            "size": st_.st_size if t == "file" else 0, "mtime": st_.st_mtime_ns,
            "ino": st_.st_ino, "nlink": st_.st_nlink,
            "rdev": (os.major(st_.st_rdev), os.minor(st_.st_rdev)) if t in ("char", "block")
            else None,
            "linkname": os.fsdecode(os.readlink(full)) if t == "symlink" else "",
            "xattrs": {n: os.getxattr(full, n, follow_symlinks=False) for n in names
                       if not n.startswith(PRIVATE)},
            "data": open(full, "rb").read() if t == "file" else None,
        }
        out["/" + os.fsdecode(rel) if rel else "/"] = e
        if t == "dir":
            for n in os.listdir(full):
                visit(full + b"/" + n, rel + b"/" + n if rel else n)

    visit(rootb, b"")
    return out


def path_order(p: str):
    """Parents first, then each directory's entries by name as bytes."""
    return tuple(os.fsencode(p).split(b"/")[1:]) if p != "/" else ()


def others(tree, path):
    """The other paths of path's hardlink group (regular files sharing an inode)."""
    e = tree[path]
    if e["type"] != "file" or e["nlink"] < 2:
        return ()
    return tuple(sorted(p for p, o in tree.items()
                        if p != path and o["type"] == "file" and o["ino"] == e["ino"]))


def mtime_same(a, a_tar, b, b_tar):
    """Equal to the nanosecond, or the same second when a tar header without a
    sub-second part is on either side."""
    if a == b:
        return True
    if (a_tar and a % S == 0) or (b_tar and b % S == 0):
        return a // S == b // S
    return False


def group_of(tree, p):
    e = tree[p]
    return ("ino", e["ino"]) if e["nlink"] > 1 else ("path", p)


def meta_fields(ta, pa, tb, pb, a_tar, b_tar, ignore=frozenset(), dir_mtime=False):
    """The differing fields of ta[pa] and tb[pb], both of the same type."""
    a, b = ta[pa], tb[pb]
    both_dirs = not a_tar and not b_tar
    t = a["type"]
    f = {}
    if t != "symlink" and a["mode"] != b["mode"] and "mode" not in ignore:
        f["mode"] = (a["mode"], b["mode"])
    for k in ("uid", "gid"):
        if a[k] != b[k] and k not in ignore:
            f[k] = (a[k], b[k])
    if t in ("char", "block") and a["rdev"] != b["rdev"] and "rdev" not in ignore:
        f["rdev"] = (a["rdev"], b["rdev"])
    if t == "file" and a["size"] != b["size"] and "size" not in ignore:
        f["size"] = (a["size"], b["size"])
    if (t != "dir" or dir_mtime) and "mtime" not in ignore and \
            not mtime_same(a["mtime"], a_tar, b["mtime"], b_tar):
        f["mtime"] = (a["mtime"], b["mtime"])
    if t == "symlink" and a["linkname"] != b["linkname"] and "linkname" not in ignore:
        f["linkname"] = (a["linkname"], b["linkname"])
    if "xattr" not in ignore:
        globs = [i[6:] for i in ignore if i.startswith("xattr:")]
        for n in sorted(set(a["xattrs"]) | set(b["xattrs"])):
            if a["xattrs"].get(n) != b["xattrs"].get(n) and \
                    not any(fnmatch.fnmatchcase(n, g) for g in globs):
                f["xattr:" + n] = (a["xattrs"].get(n), b["xattrs"].get(n))
    oa, ob = others(ta, pa), others(tb, pb)
    if oa != ob and "hardlinks" not in ignore:
        f["hardlinks"] = (oa, ob)
    if t == "file" and "content" not in ignore:
        if a["size"] != b["size"]:
            differs = True
        elif both_dirs and "mtime" not in ignore and a["mtime"] == b["mtime"] and \
                a["mtime"] % S != 0:
            differs = False          # the documented trust in equal ns mtimes
        else:
            differs = a["data"] != b["data"]
        if differs:
            f["content"] = None
    return f


def wanted_by(include=(), exclude=()):
    """The documented path filter: a pattern with a "/" is anchored at the root
    ("./" or "/" in front and "/" at the end dropped) and matches the path or
    an ancestor, component by component ("*", "?", "[...]" within one, a "**"
    component any number of them); one without a "/" matches any component
    name; "/" is always included."""
    def anchored(pat, path):
        p = pat.rstrip("/")
        while p.startswith("./") or p.startswith("/"):
            p = p[2:] if p.startswith("./") else p[1:]
        pc = p.split("/") if p else []
        parts = [c for c in path.split("/") if c]

        def m(i, j):                      # pc[i:] against parts[j:], a prefix of them
            if i == len(pc):
                return True
            if pc[i] == "**":
                return any(m(i + 1, k) for k in range(j, len(parts) + 1))
            return j < len(parts) and fnmatch.fnmatchcase(parts[j], pc[i]) and m(i + 1, j + 1)
        return bool(pc) and m(0, 0)

    def match(pat, path):
        if "/" in pat.rstrip("/"):
            return anchored(pat, path)
        return any(fnmatch.fnmatchcase(c, pat.strip("/")) for c in path.split("/") if c)

    def wanted(path):
        if any(match(x, path) for x in exclude):
            return False
        return not include or path == "/" or any(match(x, path) for x in include)
    return wanted


def expected(ta, tb, a_tar, b_tar, ignore=frozenset(), wanted=lambda p: True, renamed=(),
             dir_mtime=False):
    """The reference answer: [(code, path, type, fields, hardlinks)] and the summary.

    wanted: the path filter (a path left out is not reported, nor counted; the
    entries below a deleted directory left out are judged each on its own);
    renamed: (old path, new path) pairs of a deleted and an added file
    reported as one record (its hardlink groups count for no bytes)."""
    out = []
    summ = dict(added=0, deleted=0, modified=0, type_changed=0, renamed=0, bytes_added=0,
                bytes_removed=0)
    new_of = {o: n for o, n in renamed}
    old_of = {n: o for o, n in renamed}
    left, came = set(), set()        # paths whose old data left, whose new data came

    def count(tree, p, paths):
        if tree[p]["type"] == "file":
            paths.add(p)

    def subtree(tree, p):
        return [q for q in tree if q.startswith(p.rstrip("/") + "/")]

    def removed_with_subtree(p):
        count(ta, p, left)
        if ta[p]["type"] == "dir":
            for q in sorted(subtree(ta, p), key=path_order):
                count(ta, q, left)

    skipped = set()
    for p in sorted(set(ta) | set(tb), key=path_order):
        if p in skipped:
            continue
        a, b = ta.get(p), tb.get(p)
        if not wanted(p):
            continue
        if b is None:
            if p in new_of:
                continue
            out.append(("D", p, a["type"], {}, others(ta, p)))
            summ["deleted"] += 1
            removed_with_subtree(p)
            skipped.update(subtree(ta, p))
            continue
        if a is None:
            if p in old_of:
                f = meta_fields(ta, old_of[p], tb, p, a_tar, b_tar, ignore)
                f.pop("hardlinks", None)
                out.append(("R", p, b["type"], f, others(tb, p)))
                summ["renamed"] += 1
                continue
            out.append(("A", p, b["type"], {}, others(tb, p)))
            summ["added"] += 1
            count(tb, p, came)
            continue
        if a["type"] != b["type"]:
            out.append(("T", p, b["type"], {"type": (a["type"], b["type"])}, others(tb, p)))
            summ["type_changed"] += 1
            removed_with_subtree(p)
            count(tb, p, came)
            if a["type"] == "dir":
                skipped.update(subtree(ta, p))
            continue
        f = meta_fields(ta, p, tb, p, a_tar, b_tar, ignore, dir_mtime)
        if f:
            out.append(("M", p, a["type"], f, others(tb, p)))
            summ["modified"] += 1
            if "content" in f:
                count(ta, p, left)
                count(tb, p, came)
    # The bytes: the data of a hardlink group counts once, and not at all
    # while one of its names shows it unchanged on the other side (no change
    # took it from that name) or a rename carried it to a new name.
    def unkept(tree, other, changed, moved):
        total = 0
        for g in {group_of(tree, p) for p in changed}:
            names = [q for q in tree if tree[q]["type"] == "file" and group_of(tree, q) == g]
            if any(q in moved or (q not in changed and other.get(q, {}).get("type") == "file")
                   for q in names):
                continue
            total += tree[names[0]]["size"]
        return total
    summ["bytes_removed"] = unkept(ta, tb, left, new_of)
    summ["bytes_added"] = unkept(tb, ta, came, old_of)
    return out, summ


VALUED = ("type", "mode", "uid", "gid", "rdev", "size", "linkname", "hardlinks")


def got(d, records=None):
    """The engine's answer in the reference's shape (records: d, iterated already)."""
    out = []
    for c in (d if records is None else records):
        f = {k: (None if k in ("content", "mtime") else v) for k, v in c.fields.items()}
        out.append((c.code, c.path, c.type, f, c.hardlinks))
    s = d.summary
    return out, dict(added=s.added, deleted=s.deleted, modified=s.modified,
                     type_changed=s.type_changed, renamed=s.renamed, bytes_added=s.bytes_added,
                     bytes_removed=s.bytes_removed)


def strip_mtime_values(records):
    return [(code, p, t, {k: (None if k in ("mtime", "content") else v)
                          for k, v in f.items()}, h)
            for code, p, t, f, h in records]


# ----------------------------------------------------------------- trees

NAMES = ["a", "b c", "n\nl", os.fsdecode(b"\xff\xfe"), "\u00e9"]
POOL = NAMES + [f"{d}/{n}" for d in NAMES[:2] for n in NAMES] + \
    [f"a/{d}/{n}" for d in NAMES[:2] for n in NAMES[:2]]
XATTRS = [None, {"user.k": b"v1"}, {"user.k": b"v2"},
          {"user.k": b"v1", "trusted.overlay.origin": b"o"}]
TARGETS = ["a", "../b c", "/x", os.fsdecode(b"\xfe")]
DATA = [b"", b"x", b"y", b"hello world\n", b"hello world!", b"A" * 5000,
        b"A" * 4999 + b"B", b"B" + b"A" * 4999]
MTIMES = [100 * S, 100 * S + 500_000_000, 100 * S + 5, 101 * S, T0]
OWNERS = [(0, 0), (1000, 0), (0, 100)]

file_entry = st.tuples(st.just("file"), st.sampled_from(range(len(DATA))),
                       st.sampled_from([0o644, 0o600, 0o4755]), st.sampled_from(MTIMES),
                       st.sampled_from(OWNERS), st.sampled_from(XATTRS))
# a hardlink to the n-th regular file of the tree
link_entry = st.tuples(st.just("link"), st.integers(0, 9))
entry = st.one_of(
    file_entry, file_entry, link_entry,
    st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700]),
              st.sampled_from([None, {"user.d": b"1"}]), st.sampled_from(OWNERS)),
    st.tuples(st.just("symlink"), st.sampled_from(TARGETS), st.sampled_from(MTIMES),
              st.sampled_from(OWNERS)),
    st.tuples(st.just("fifo"), st.sampled_from([0o644, 0o600]), st.sampled_from(MTIMES)),
    st.tuples(st.sampled_from(["char", "block"]), st.sampled_from([(1, 3), (1, 5)]),
              st.sampled_from(MTIMES)),
)
spec_strategy = st.dictionaries(st.sampled_from(POOL), entry, min_size=1, max_size=10)
# the new tree: the old one with a few entries changed in one field each,
# removed, replaced, or made a hardlink
EDIT_OPS = ("data", "data", "data", "mode", "mtime", "owner", "xattrs", "target", "delete",
            "replace")
# (a path of the old tree by number, or any path)
edits_strategy = st.lists(st.tuples(st.one_of(st.integers(0, 20), st.sampled_from(POOL)),
                                    st.sampled_from(EDIT_OPS), st.integers(0, 7), entry),
                          min_size=1, max_size=6)
_FIELD = {  # op -> {kind: (index in the tuple, choices)}
    "data": {"file": (1, range(len(DATA)))},
    "mode": {"file": (2, [0o644, 0o600, 0o4755]), "dir": (1, [0o755, 0o700]),
             "fifo": (1, [0o644, 0o600])},
    "mtime": {"file": (3, MTIMES), "symlink": (2, MTIMES), "fifo": (2, MTIMES),
              "char": (2, MTIMES), "block": (2, MTIMES)},
    "owner": {"file": (4, OWNERS), "dir": (3, OWNERS), "symlink": (3, OWNERS)},
    "xattrs": {"file": (5, XATTRS), "dir": (2, [None, {"user.d": b"1"}, {"user.d": b"2"}])},
    "target": {"symlink": (1, TARGETS), "char": (1, [(1, 3), (1, 5)]),
               "block": (1, [(1, 3), (1, 5)]), "link": (1, range(10))},
}


def edited(spec, edits):
    new = dict(spec)
    for p, op, k, e in edits:
        if isinstance(p, int):
            if not new:
                continue
            p = sorted(new)[p % len(new)]
        if op == "delete":
            new.pop(p, None)
        elif op == "replace" or p not in new:
            new[p] = e
        else:
            cur = new[p]
            f = _FIELD.get(op, {}).get(cur[0])
            if f is not None:
                i, choices = f
                choices = list(choices)
                new[p] = cur[:i] + (choices[k % len(choices)],) + cur[i + 1:]
    return new


def build(root: Path, spec) -> Path:
    root.mkdir()
    os.chmod(root, 0o755)
    rb = os.fsencode(root)
    made = {}
    links = []
    for p in sorted(spec, key=lambda s: s.count("/")):
        e = spec[p]
        parts = p.split("/")[:-1]
        ancestors = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        if any(made.get(d, "dir") != "dir" or (d in spec and d not in made)
               for d in ancestors):
            continue                         # a parent that is not a directory
        for d in ancestors:
            if d not in made:                # a parent the spec does not name
                os.mkdir(rb + b"/" + os.fsencode(d))
                made[d] = "dir"
        full = rb + b"/" + os.fsencode(p)
        kind = e[0]
        if kind == "file":
            _, di, mode, mtime, (uid, gid), xattrs = e
            with open(full, "wb") as f:
                f.write(DATA[di])
            os.chown(full, uid, gid)
            os.chmod(full, mode)
            for k, v in (xattrs or {}).items():
                os.setxattr(full, k, v)
            os.utime(full, ns=(mtime, mtime))
        elif kind == "dir":
            _, mode, xattrs, (uid, gid) = e
            os.mkdir(full)
            os.chown(full, uid, gid)
            os.chmod(full, mode)
            for k, v in (xattrs or {}).items():
                os.setxattr(full, k, v)
        elif kind == "symlink":
            _, target, mtime, (uid, gid) = e
            os.symlink(os.fsencode(target), full)
            os.lchown(full, uid, gid)
            os.utime(full, ns=(mtime, mtime), follow_symlinks=False)
        elif kind == "fifo":
            os.mkfifo(full, e[1])
            os.chmod(full, e[1])
            os.utime(full, ns=(e[2], e[2]))
        elif kind in ("char", "block"):
            os.mknod(full, (stat.S_IFCHR if kind == "char" else stat.S_IFBLK) | 0o640,
                     os.makedev(*e[1]))
            os.utime(full, ns=(e[2], e[2]))
        elif kind == "whiteout":            # overlayfs' whiteout: char 0:0
            os.mknod(full, stat.S_IFCHR, os.makedev(0, 0))
        elif kind == "opaque":              # overlayfs' opaque directory
            os.mkdir(full)
            os.setxattr(full, "trusted.overlay.opaque", b"y")
            kind = "dir"
        else:
            links.append((p, e[1]))
            continue
        made[p] = kind
    files = sorted(p for p, k in made.items() if k == "file")
    for p, n in links:
        if not files:
            break
        target = files[n % len(files)]
        parent = p.rpartition("/")[0]
        if made.get(target) == "file" and (not parent or made.get(parent) == "dir") \
                and p not in made:
            os.link(rb + b"/" + os.fsencode(target), rb + b"/" + os.fsencode(p))
            made[p] = "file"
    os.utime(root, ns=(T0, T0))         # (other directories keep the time they were made)
    return root


TAR_KINDS = ("cl", "cl.gz", "cl.zst", "gnu", "gnu.gz", "gnu.zst", "oci", "oci.tar", "docker")


class Presented:
    """One tree in each of its presentations (made on first use)."""

    def __init__(self, tree: Path, tmp: Path, tag: str):
        self.tree, self.tmp, self.tag = tree, tmp, tag
        self._made = {}

    def __getitem__(self, kind: str):
        if kind not in self._made:
            self._made[kind] = self._make(kind)
        return self._made[kind]

    def _make(self, kind: str):
        out = self.tmp / f"{self.tag}-{kind}"
        if kind == "dir":
            return str(self.tree)
        if kind == "upper":
            return f"upper:{self.tree}"
        if kind.startswith("cl"):
            comp = {"cl": "none", "cl.gz": "gzip", "cl.zst": "zstd"}[kind]
            create_layer(self.tree, out, compression=comp)
            return out
        if kind.startswith("gnu"):
            comp = {"gnu": "", "gnu.gz": "gzip", "gnu.zst": "zstd"}[kind]
            return gnu_tar(self.tree, out, compress=comp)
        if kind == "oci":
            return f"oci:{write_oci([self['cl.gz']], out)}"
        if kind == "oci.tar":
            return write_oci([self["cl.zst"]], out, tar=True)
        if kind == "docker":
            return f"docker-archive:{write_docker([self['cl']], out)}"
        raise ValueError(kind)


PAIRS = [("dir", "dir"), ("upper", "dir"), ("dir", "upper"), ("dir", "cl"), ("cl", "dir"),
         ("cl", "cl"), ("gnu", "gnu"), ("gnu", "cl"), ("cl.gz", "gnu.zst"), ("gnu.gz", "dir"),
         ("dir", "oci"), ("oci", "cl.zst"), ("oci", "oci"), ("cl.zst", "upper"),
         ("oci.tar", "gnu"), ("docker", "oci")]


def check_all_presentations(tmp: Path, a: Path, b: Path):
    ta, tb = walk(a), walk(b)
    pa, pb = Presented(a, tmp, "a"), Presented(b, tmp, "b")
    for ka, kb in PAIRS:
        want_list, want_sum = expected(ta, tb, ka in TAR_KINDS, kb in TAR_KINDS)
        got_list, got_sum = got(compare(pa[ka], pb[kb]))
        assert got_list == strip_mtime_values(want_list), (ka, kb)
        assert got_sum == want_sum, (ka, kb)


def replace(path, e):
    return (path, "replace", 0, e)


def delete(path):
    return (path, "delete", 0, ("fifo", 0o644, T0))


FILE = ("file", 3, 0o644, T0, (0, 0), None)
DIR = ("dir", 0o755, None, (0, 0))


@settings(max_examples=examples(25))
@given(spec=spec_strategy, edits=edits_strategy)
# the same size, the last byte differs; a whole-second mtime on one side only
@example(spec={"a": ("file", 5, 0o644, 100 * S, (0, 0), None)},
         edits=[replace("a", ("file", 6, 0o644, 100 * S + 500_000_000, (0, 0), None))])
# a deleted directory with a hardlink group inside (its bytes once)
@example(spec={"a": DIR, "a/a": ("file", 5, 0o644, T0, (0, 0), None),
               "a/b c": ("link", 0), "b c": FILE},
         edits=[delete("a"), delete("a/a"), delete("a/b c")])
# a directory replaced by a file, a file by a directory, odd names inside
@example(spec={"a": DIR, "a/n\nl": FILE, "b c": ("file", 4, 0o644, T0, (0, 0), None)},
         edits=[replace("a", FILE), delete("a/n\nl"), replace("b c", DIR),
                replace("b c/" + os.fsdecode(b"\xff\xfe"), ("file", 2, 0o600, T0, (0, 0), None))])
# a hardlink group that gains a name, one that loses one
@example(spec={"a": FILE, "b c": ("link", 0), "n\nl": FILE},
         edits=[replace("\u00e9", ("link", 0)), delete("b c"), replace("b c/a", ("link", 1))])
def test_every_presentation_matches_the_reference(tmp_path_factory, spec, edits):
    tmp = tmp_path_factory.mktemp("ref")
    a, b = build(tmp / "a", spec), build(tmp / "b", edited(spec, edits))
    check_all_presentations(tmp, a, b)



IGNORES = ["mtime", "owner", "uid", "mode", "xattr", "xattr:user.*", "xattr:user.k", "content",
           "size", "linkname", "rdev", "hardlinks"]


@settings(max_examples=examples(15))
@given(spec=spec_strategy, edits=edits_strategy,
       ignore=st.lists(st.sampled_from(IGNORES), min_size=1, max_size=3),
       semantic=st.booleans())
def test_ignored_fields_match_the_reference(tmp_path_factory, spec, edits, ignore, semantic):
    tmp = tmp_path_factory.mktemp("ign")
    a, b = build(tmp / "a", spec), build(tmp / "b", edited(spec, edits))
    names = set(ignore) | ({"mtime"} if semantic else set())
    if "owner" in names:
        names |= {"uid", "gid"}
    ta, tb = walk(a), walk(b)
    pa, pb = Presented(a, tmp, "a"), Presented(b, tmp, "b")
    for ka, kb in (("dir", "dir"), ("upper", "dir"), ("cl", "cl"), ("gnu.gz", "dir"),
                   ("dir", "cl.zst")):
        want_list, want_sum = expected(ta, tb, ka in TAR_KINDS, kb in TAR_KINDS,
                                       ignore=frozenset(names))
        got_list, got_sum = got(compare(pa[ka], pb[kb], ignore=ignore, semantic=semantic))
        assert got_list == strip_mtime_values(want_list), (ka, kb)
        assert got_sum == want_sum, (ka, kb)



@settings(max_examples=examples(10))
@given(spec=spec_strategy, edits=edits_strategy)
def test_directory_mtimes_on_request(tmp_path_factory, spec, edits):
    tmp = tmp_path_factory.mktemp("dmt")
    a, b = build(tmp / "a", spec), build(tmp / "b", edited(spec, edits))
    ta, tb = walk(a), walk(b)
    pa, pb = Presented(a, tmp, "a"), Presented(b, tmp, "b")
    for ka, kb in (("dir", "dir"), ("upper", "dir"), ("gnu", "dir"), ("cl", "gnu.zst"),
                   ("oci", "cl")):
        want_list, want_sum = expected(ta, tb, ka in TAR_KINDS, kb in TAR_KINDS, dir_mtime=True)
        got_list, got_sum = got(compare(pa[ka], pb[kb], dir_mtime=True))
        assert got_list == strip_mtime_values(want_list), (ka, kb)
        assert got_sum == want_sum, (ka, kb)



def test_large_files_differing_in_one_byte(tmp_path):
    """Files of several C read chunks, the same size and whole-second mtime,
    differing only in their last (or first) byte: found in every presentation."""
    a, b = tmp_path / "a", tmp_path / "b"
    n = 3 * (1 << 20) + 1
    mk(a, "last", b"z" * (n - 1) + b"A", mtime_ns=100 * S)
    mk(b, "last", b"z" * (n - 1) + b"B", mtime_ns=100 * S)
    mk(a, "first", b"x" + b"z" * (n - 1), mtime_ns=100 * S)
    mk(b, "first", b"y" + b"z" * (n - 1), mtime_ns=100 * S)
    mk(a, "same", b"z" * n, mtime_ns=100 * S)
    mk(b, "same", b"z" * n, mtime_ns=100 * S)
    for d in (a, b):
        os.utime(d, ns=(T0, T0))
    check_all_presentations(tmp_path, a, b)


# ----------------------------------------------------------------- path filters

PATTERNS = ["a", "b c", "/a", "/b c/*", "a/*", "*\n*", "\u00e9", "/a/a", "*", "?", "/*/a",
            "./a", "/**/a", "/a/**", "/[!b]*/?",
            "/" + os.fsdecode(b"\xff\xfe")]


def check_filtered(tmp: Path, a: Path, b: Path, include, exclude, pairs=(("dir", "dir"),
                                                                        ("cl", "gnu.gz"))):
    ta, tb = walk(a), walk(b)
    pa, pb = Presented(a, tmp, "a"), Presented(b, tmp, "b")
    wanted = wanted_by(include, exclude)
    for ka, kb in pairs:
        want_list, want_sum = expected(ta, tb, ka in TAR_KINDS, kb in TAR_KINDS, wanted=wanted)
        got_list, got_sum = got(compare(pa[ka], pb[kb], include=include, exclude=exclude))
        assert got_list == strip_mtime_values(want_list), (ka, kb)
        assert got_sum == want_sum, (ka, kb)


def test_filtered_out_deleted_directory_counts_no_bytes(tmp_path):
    """A deleted directory left out by --exclude is not in the summary either."""
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "srv/data", b"d" * 1000)
    mk(a, "etc/hosts", b"h" * 10)
    mk(b, "etc/hosts", b"h" * 10)
    d = compare(a, b, exclude=["srv"])
    assert list(d) == []
    assert d.summary.bytes_removed == 0 and d.summary.changes == 0
    check_filtered(tmp_path, a, b, (), ("srv",))


def test_include_finds_entries_of_a_deleted_directory(tmp_path):
    """--include of a path inside a deleted directory reports that path deleted,
    as it reports the same path of an added directory added."""
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "keep/sub/f", b"zz")
    mk(a, "keep/other", b"o" * 50)
    b.mkdir()
    fwd = compare(a, b, include=["keep/sub/*"])
    assert [(c.code, c.path) for c in fwd] == [("D", "/keep/sub/f")]
    assert fwd.summary.bytes_removed == 2
    back = compare(b, a, include=["keep/sub/*"])
    assert [(c.code, c.path) for c in back] == [("A", "/keep/sub/f")]
    assert back.summary.bytes_added == 2
    # a directory replaced by a file: its entries, each on its own
    (b / "keep").write_bytes(b"now a file")
    assert [(c.code, c.path) for c in compare(a, b, include=["/keep/sub"])] == \
        [("D", "/keep/sub")]
    check_filtered(tmp_path, a, b, ("keep/sub/*",), ())


@settings(max_examples=examples(15))
@given(spec=spec_strategy, edits=edits_strategy,
       include=st.lists(st.sampled_from(PATTERNS), max_size=2),
       exclude=st.lists(st.sampled_from(PATTERNS), max_size=2))
# a deleted directory left out, with an entry inside that is wanted
@example(spec={"a": DIR, "a/a": FILE, "a/b c": FILE}, edits=[delete("a"), delete("a/a"),
                                                             delete("a/b c")],
         include=["/a/a"], exclude=[])
@example(spec={"a": DIR, "a/a": FILE}, edits=[replace("a", FILE), delete("a/a")],
         include=[], exclude=["a"])
def test_filters_match_the_reference(tmp_path_factory, spec, edits, include, exclude):
    tmp = tmp_path_factory.mktemp("filt")
    a, b = build(tmp / "a", spec), build(tmp / "b", edited(spec, edits))
    check_filtered(tmp, a, b, tuple(include), tuple(exclude))


# ----------------------------------------------------------------- renames

def check_renames(tmp: Path, a: Path, b: Path, pairs=(("dir", "dir"), ("cl", "dir"),
                                                      ("gnu.zst", "oci"))):
    ta, tb = walk(a), walk(b)
    pa, pb = Presented(a, tmp, "a"), Presented(b, tmp, "b")
    for ka, kb in pairs:
        a_tar, b_tar = ka in TAR_KINDS, kb in TAR_KINDS
        plain, _ = expected(ta, tb, a_tar, b_tar)
        d = compare(pa[ka], pb[kb], renames=True)
        records = list(d)
        pairs_ = [(c.old_path, c.path) for c in records if c.kind == "renamed"]
        deleted = {p for code, p, t, _, _ in plain if code == "D" and t == "file"}
        added = {p for code, p, t, _, _ in plain if code == "A" and t == "file"}
        olds = [o for o, _ in pairs_]
        assert len(set(olds)) == len(olds), "one deleted file paired twice"
        for o, n in pairs_:
            assert o in deleted and n in added, (o, n)
            assert ta[o]["size"] > 0 and ta[o]["data"] == tb[n]["data"], (o, n)
        # no pair left unmade
        left_old = {ta[o]["data"] for o in deleted - set(olds) if ta[o]["size"] > 0}
        left_new = {tb[n]["data"] for n in added - {n for _, n in pairs_}}
        assert not left_old & left_new
        want_list, want_sum = expected(ta, tb, a_tar, b_tar, renamed=pairs_)
        got_list, got_sum = got(d, records)
        assert got_list == strip_mtime_values(want_list), (ka, kb)
        assert got_sum == want_sum, (ka, kb)
        assert [c.old_path for c in records if c.kind == "renamed"] == \
            [dict((n, o) for o, n in pairs_)[c.path] for c in records if c.kind == "renamed"]


def test_renamed_hardlink_groups_count_no_bytes(tmp_path):
    """Two copies renamed into one hardlink group (and back): no bytes were
    added or removed, and never a negative count."""
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "p", b"X" * 100)
    mk(a, "q", b"X" * 100)
    mk(b, "r", b"X" * 100)
    os.link(b / "r", b / "s")
    d = compare(a, b, renames=True)
    assert sorted((c.code, c.old_path, c.path) for c in d) == \
        [("R", "/p", "/r"), ("R", "/q", "/s")]
    assert (d.summary.bytes_added, d.summary.bytes_removed) == (0, 0)
    back = compare(b, a, renames=True)
    assert [c.code for c in back] == ["R", "R"]
    assert (back.summary.bytes_added, back.summary.bytes_removed) == (0, 0)
    check_renames(tmp_path, a, b)
    (tmp_path / "back").mkdir()
    check_renames(tmp_path / "back", b, a)


@settings(max_examples=examples(15))
@given(spec=spec_strategy, edits=st.lists(
    st.tuples(st.one_of(st.integers(0, 20), st.sampled_from(POOL)),
              st.sampled_from(("delete", "replace", "data", "mode")), st.integers(0, 7),
              st.one_of(file_entry, link_entry)), min_size=1, max_size=6))
def test_renames_match_the_reference(tmp_path_factory, spec, edits):
    tmp = tmp_path_factory.mktemp("ren")
    a, b = build(tmp / "a", spec), build(tmp / "b", edited(spec, edits))
    check_renames(tmp, a, b)



# ----------------------------------------------------------------- overlay upper directories

upper_entry = st.one_of(entry, st.tuples(st.just("whiteout")), st.tuples(st.just("opaque")))


@settings(max_examples=examples(15))
@given(spec=st.dictionaries(st.sampled_from(POOL), upper_entry, min_size=1, max_size=10))
def test_upper_directory_and_its_layer(tmp_path_factory, spec):
    """An upper directory (char 0:0 whiteouts, opaque xattrs) and the layer
    create_layer makes of it: the same raw view (whiteouts as deletions, opaque
    directories flagged) and the same effective view (the upper dir without
    its whiteouts)."""
    tmp = tmp_path_factory.mktemp("upper")
    u = build(tmp / "u", spec)
    layer = tmp / "u.tar.gz"
    create_layer(u, layer, compression="gzip", source_format="overlay")
    tu = walk(u)
    whiteouts = {p for p, e in tu.items() if e["type"] == "char" and e["rdev"] == (0, 0)}

    def is_opaque(p):
        full = os.fsencode(u) + os.fsencode(p)
        return "trusted.overlay.opaque" in os.listxattr(full, follow_symlinks=False) and \
            os.getxattr(full, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    opaque = {p for p in tu if tu[p]["type"] == "dir" and p != "/" and is_opaque(p)}
    for view in ("raw", "effective"):
        assert got(compare(f"upper:{u}", layer, view=view))[0] == [], view
        assert got(compare(layer, f"upper:{u}", view=view))[0] == [], view
        for src in (f"upper:{u}", layer):
            recs = list(compare("empty:", src, new_view=view))
            want = sorted((("D" if p in whiteouts else "A"), p,
                           view == "raw" and p in opaque)
                          for p in tu if p != "/" and (view == "raw" or p not in whiteouts))
            assert sorted((c.code, c.path, bool(c.new is not None and c.new.opaque))
                          for c in recs) == want, (view, src)


# ----------------------------------------------------------------- layer stacks

LNAMES = ["a", "b", "d", "d/a", "d/b", "d/e", "d/e/a"]
LDATA = [b"", b"one", b"two", b"x" * 3000]
layer_op = st.one_of(
    st.tuples(st.just("file"), st.sampled_from(LNAMES), st.sampled_from(range(len(LDATA))),
              st.sampled_from([0o644, 0o600])),
    st.tuples(st.just("file"), st.sampled_from(LNAMES), st.sampled_from(range(len(LDATA))),
              st.sampled_from([0o644, 0o600])),
    st.tuples(st.just("dir"), st.sampled_from(["d", "d/e", "a"]), st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("symlink"), st.sampled_from(LNAMES), st.sampled_from(["a", "/d"])),
    st.tuples(st.just("link"), st.sampled_from(LNAMES), st.sampled_from(LNAMES)),
    st.tuples(st.just("whiteout"), st.sampled_from(LNAMES)),
    st.tuples(st.just("opaque"), st.sampled_from(["d", "d/e"])),
)


def build_layer(ops, index: int, unique: bool = False) -> TarBuilder:
    """A layer of the ops: parent directories written before what goes in them,
    a hardlink only to a file this layer wrote.  unique: every non-empty copy of
    file content has bytes of its own (at least 16, naming layer and entry)."""
    b = TarBuilder()
    kinds = {}
    copies = [0]

    def data(i):
        d = LDATA[i]
        copies[0] += 1
        if unique and d:
            d = (b"L%dC%04d|" % (index, copies[0])).ljust(max(len(d), 16), b".")
        return d

    def parents(name) -> bool:
        parts = name.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            d = "/".join(parts[:n])
            if kinds.get(d) not in (None, "dir"):
                return False
        for n in range(1, len(parts) + 1):
            d = "/".join(parts[:n])
            if d not in kinds:
                b.dir(d, mtime=1_700_000_000 + index)
                kinds[d] = "dir"
        return True

    def clear(name):
        # an entry written over another: what was below the old one goes
        for k in [k for k in kinds if k.startswith(name + "/")]:
            del kinds[k]

    for op in ops:
        kind, name = op[0], op[1]
        if kind in ("file", "dir", "symlink", "link") and not parents(name):
            continue
        if kind == "file":
            clear(name)
            b.file(name, data(op[2]), mode=op[3],
                   mtime=1_700_000_000 + index)
            kinds[name] = "file"
        elif kind == "dir":
            if kinds.get(name) not in (None, "dir"):
                clear(name)
            b.dir(name, mode=op[2], mtime=1_700_000_000 + index)
            kinds[name] = "dir"
        elif kind == "symlink":
            clear(name)
            b.symlink(name, op[2], mtime=1_700_000_000 + index)
            kinds[name] = "symlink"
        elif kind == "link":
            if kinds.get(op[2]) != "file" or name == op[2] or name in kinds:
                continue
            b.hardlink(name, op[2], mtime=1_700_000_000 + index)
            kinds[name] = "file"
        elif kind == "whiteout":
            if not parents(name):
                continue
            b.whiteout(name)
        else:
            if kinds.get(name) not in (None, "dir") or not parents(name + "/x"):
                continue
            if name not in kinds:
                b.dir(name, mtime=1_700_000_000 + index)
                kinds[name] = "dir"
            b.opaque(name)
    return b


def raw_reference(layer: Path):
    """A layer's own entries read with tarfile: path -> (type, opaque).  A
    hardlink to a file of a lower layer is of type "hardlink".  A
    whiteout acts on the lower layers only: an entry of the layer at the same
    path stays (a directory then hides the lower one's entries: opaque)."""
    import tarfile
    entries, whiteouts, opaques = {}, [], []
    with tarfile.open(layer) as tf:
        for ti in tf:
            p = "/" + ti.name.strip("/")
            d, _, base = p.rpartition("/")
            if base == ".wh..wh..opq":
                opaques.append(d or "/")
            elif base.startswith(".wh."):
                whiteouts.append(d + "/" + base[4:])
            else:
                t = "dir" if ti.isdir() else "symlink" if ti.issym() else "file"
                if ti.islnk():
                    # a hardlink to a file of this layer is that file; one to a
                    # file of a lower layer stays a "hardlink" (to linkname)
                    target = "/" + ti.linkname.strip("/")
                    if target.startswith("/./"):
                        target = target[2:]
                    if entries.get(target, ["dir"])[0] == "dir":
                        t = "hardlink"
                # a later entry replaces an earlier one, and what was below it
                for q in [q for q in entries if q.startswith(p + "/")] if t != "dir" else []:
                    del entries[q]
                entries[p] = [t, False]
    for p in list(entries):           # the parents of the layer's own entries
        parent = p.rpartition("/")[0]
        while parent and parent not in entries:
            entries[parent] = ["dir", False]
            parent = parent.rpartition("/")[0]
    own = set(entries)
    for p in whiteouts:
        if p in own:
            if entries[p][0] == "dir":
                entries[p][1] = True
            continue
        up = [p.rsplit("/", k)[0] for k in range(1, p.count("/"))]
        if any(u in whiteouts and u not in own for u in up):
            continue                  # a whited-out directory above it covers it
        if any(u in own and entries[u][0] != "dir" for u in up):
            continue                  # below a non-directory of the layer
        entries[p] = ["whiteout", False]
        for u in up:
            entries.setdefault(u, ["dir", False])
    for d in opaques:
        up = [d.rsplit("/", k)[0] for k in range(0, d.count("/"))]
        if any(u in own and entries[u][0] != "dir" for u in up):
            continue                  # the layer's own non-directory: nothing to hide
        entries.setdefault(d, ["dir", False])[1] = True
    return {p: tuple(v) for p, v in entries.items()}


def check_stack(tmp: Path, layers):
    dests = []
    for n in range(len(layers)):
        dest = tmp / f"applied{n}"
        unpack_layers([str(p) for p in layers[:n + 1]], dest)
        dests.append(dest)
        # the effective view is the applied tree
        assert got(compare(layer_stack(layers, upto=n), dest))[0] == [], n
        assert got(compare(dest, layer_stack(layers, upto=n)))[0] == [], n
        # the raw view is the layer's own entries, whiteouts as deletions
        raw = compare("empty:", layer_stack(layers, view="raw", upto=n))
        want = raw_reference(layers[n])
        recs = list(raw)
        assert sorted((c.path, c.type if c.kind != "deleted" else "whiteout",
                       bool(c.new is not None and c.new.opaque)) for c in recs) == \
            sorted((p, t, o) for p, (t, o) in want.items()), n
        assert all(c.kind == ("deleted" if want[c.path][0] == "whiteout" else "added")
                   for c in recs), n
        if n == 0:
            continue
        # a layer's changes in the effective view are those of the applied trees,
        # each made by that layer
        d = compare(layer_stack(layers, upto=n - 1), layer_stack(layers, upto=n))
        records = list(d)
        want_list, want_sum = expected(walk(dests[n - 1]), walk(dest), True, True)
        got_list, got_sum = got(d, records)
        assert got_list == strip_mtime_values(want_list), n
        assert got_sum == want_sum, n
        # (a name whose hardlink group changed may be from a lower layer)
        assert all(c.layer is not None and c.layer.index == n for c in records
                   if set(c.fields) != {"hardlinks"}), n
    # the bottom against the top, both ways, and the stack against an OCI
    # layout of its layers
    last = len(layers) - 1
    for x, y in ((0, last), (last, 0)):
        want_list, want_sum = expected(walk(dests[x]), walk(dests[y]), True, True)
        got_list, got_sum = got(compare(layer_stack(layers, upto=x), layer_stack(layers, upto=y)))
        assert (got_list, got_sum) == (strip_mtime_values(want_list), want_sum), (x, y)
    oci = f"oci:{write_oci(layers, tmp / 'oci')}"
    for n in range(len(layers)):
        assert got(compare(layer_stack(layers, upto=n), f"{oci}#{n}"))[0] == [], n
        assert got(compare(f"{oci}#{n}", dests[n]))[0] == [], n
    assert got(compare(layer_stack(layers, view="raw"), oci, new_view="raw"))[0] == []


def test_raw_view_keeps_entries_the_layer_also_whites_out(tmp_path):
    """A whiteout acts on the lower layers: the layer's own entry at that path
    is in its raw view (a directory as an opaque one), and what is below it."""
    layer = (TarBuilder().whiteout("d").dir("d").file("d/x", b"xx").file("c", b"c1")
             .whiteout("c").write(tmp_path / "l.tar"))
    m = layer_stack([layer], view="raw").entries()
    assert m["/c"].type == "file" and m["/d/x"].type == "file"
    assert m["/d"].type == "dir" and m["/d"].opaque
    got_ = [(c.code, c.path) for c in compare("empty:", layer_stack([layer], view="raw"))]
    assert got_ == [("A", "/c"), ("A", "/d"), ("A", "/d/x")]
    lower = TarBuilder().dir("d").file("d/y", b"y").file("c", b"c0").write(tmp_path / "l0.tar")
    check_stack(tmp_path, [lower, layer])



def test_hardlinks_to_lower_layers(tmp_path):
    """Hardlinks to files of lower layers: the effective views are the applied
    trees; in a layer's raw view such a link is a "hardlink" entry, and a link
    to another file is a change of its target."""
    layers = [TarBuilder().dir("d").file("d/x", b"x0" * 10).file("y", b"yy")
              .file("z", b"zz").write(tmp_path / "0.tar"),
              TarBuilder().hardlink("l", "d/x").hardlink("d/m", "y").write(tmp_path / "1.tar"),
              TarBuilder().whiteout("d").file("y", b"new").write(tmp_path / "2.tar"),
              TarBuilder().hardlink("d2", "l").hardlink("l2", "z").write(tmp_path / "3.tar")]
    check_stack(tmp_path, layers)
    other = TarBuilder().hardlink("l", "y").hardlink("d/m", "y").write(tmp_path / "1b.tar")
    got_ = [(c.code, c.path, c.fields) for c in
            compare(layer_stack([layers[1]], view="raw"), layer_stack([other], view="raw"))]
    assert got_ == [("M", "/l", {"linkname": ("/d/x", "/y")})]
    # a copy linked from a later layer is wasted only when its last name goes
    r = analyze_layers(layer_stack(layers))
    assert [(l.content_bytes, l.wasted_bytes) for l in r.layers] == [(24, 2), (0, 0), (3, 0),
                                                                       (0, 0)]
    assert [(w.path, w.size, w.by_layer, w.reason) for w in r.layers[0].wasted] == \
        [("/y", 2, 2, ["content"])]


@settings(max_examples=examples(15))
@given(st.lists(st.lists(layer_op, max_size=7), min_size=1, max_size=3))
# whiteouts and an opaque marker of paths the layer writes itself
@example(plan=[[("file", "a", 1, 0o644)], [("file", "a", 2, 0o644), ("whiteout", "a")]])
@example(plan=[[("file", "d/a", 1, 0o644)], [("opaque", "d"), ("file", "d", 0, 0o644)]])
@example(plan=[[("file", "d/a", 1, 0o644)], [("whiteout", "d/a"), ("file", "d", 0, 0o644),
                                             ("whiteout", "d")]])
def test_stacks_match_the_applied_layers(tmp_path_factory, plan):
    tmp = tmp_path_factory.mktemp("stack")
    layers = [build_layer(ops, i).write(tmp / f"l{i}.tar") for i, ops in enumerate(plan)]
    check_stack(tmp, layers)



def test_deletion_is_credited_to_the_layer_that_made_it_last(tmp_path):
    """A path deleted, written again, then deleted with its directory: the
    deletion is the later layer's (each removal is noted, not only the
    whiteout's own path)."""
    layers = [TarBuilder().dir("d").file("d/x", b"x0").write(tmp_path / "0.tar"),
              TarBuilder().whiteout("d/x").write(tmp_path / "1.tar"),
              TarBuilder().file("d/x", b"x2").write(tmp_path / "2.tar"),
              TarBuilder().whiteout("d").dir("d").file("d/y", b"y").write(tmp_path / "3.tar"),
              TarBuilder().file("d", b"file").write(tmp_path / "4.tar"),
              TarBuilder().dir("d").write(tmp_path / "5.tar")]
    base = layer_stack(layers, upto=0)
    by_path = {c.path: c for c in compare(base, layer_stack(layers, upto=3))}
    assert by_path["/d/x"].kind == "deleted" and by_path["/d/x"].layer.index == 3
    # d/y, written by layer 3, goes when layer 4 writes a file over its directory
    by_path = {c.path: c for c in compare(layer_stack(layers, upto=3), layer_stack(layers))}
    assert by_path["/d/y"].kind == "deleted" and by_path["/d/y"].layer.index == 4
    check_stack(tmp_path, layers)


# ----------------------------------------------------------------- waste

def stored_copies(layer: Path):
    """(content, size) of every copy of file content a layer tar stores."""
    import tarfile
    with tarfile.open(layer) as tf:
        return [(tf.extractfile(ti).read(), ti.size) for ti in tf
                if ti.isreg() and not ti.name.rpartition("/")[2].startswith(".wh.")]


def held_contents(root: Path):
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            full = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(full).st_mode):
                out.add(Path(full).read_bytes())
    return out


@settings(max_examples=examples(20))
@given(st.lists(st.lists(layer_op, max_size=7), min_size=1, max_size=4))
# a file rewritten in three layers; one deleted later; a hardlinked copy
@example(plan=[[("file", "a", 3, 0o644)], [("file", "a", 3, 0o644)], [("file", "a", 1, 0o644)]])
@example(plan=[[("file", "d/a", 3, 0o644), ("link", "b", "d/a")], [("whiteout", "d")],
               [("whiteout", "b")]])
@example(plan=[[("file", "b", 1, 0o644), ("link", "a", "b"), ("file", "b", 2, 0o644)],
               [("opaque", "d"), ("file", "a", 0, 0o644)]])
def test_waste_is_every_stored_copy_the_image_no_longer_holds(tmp_path_factory, plan):
    """Each layer wastes exactly the bytes of the copies it stores that the
    applied image no longer holds (each copy once, hardlinked or not)."""
    tmp = tmp_path_factory.mktemp("waste")
    layers = [build_layer(ops, i, unique=True).write(tmp / f"l{i}.tar")
              for i, ops in enumerate(plan)]
    dest = tmp / "rootfs"
    unpack_layers([str(p) for p in layers], dest)
    held = held_contents(dest)
    r = analyze_layers(layer_stack(layers))
    for n, layer in enumerate(layers):
        copies = stored_copies(layer)
        report = r.layers[n]
        assert report.content_bytes == sum(size for _, size in copies), n
        assert report.wasted_bytes == sum(size for data, size in copies if data not in held), n
        assert report.wasted_bytes == sum(w.size for w in report.wasted), n
        assert all(w.layer == n and n <= w.by_layer < len(layers) for w in report.wasted), n
    assert sum(l.causes_bytes for l in r.layers) == r.wasted_bytes
    assert r.image_bytes == sum(len(d) for d in held)
