"""The diff engine: fields, content decisions, renames, hardlinks, filters, output,
and the properties (changes as a layer rebuild B from A; compare_trees agrees)."""
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from layerfs.archive import apply_layer, create_layer
from layerfs.diff import as_layer_changes, compare, compare_trees, tree_changes
from layerfs.diff.output import change_record, format_change
from layerfs.errors import LayerError

from .test_sources import CAP_NET_RAW, T0, gnu_tar, mk, write_oci

SECOND = 1_000_000_000


def changes(a, b, **kw):
    return [(c.code, c.path, sorted(c.fields)) for c in compare(a, b, **kw)]


def clone(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)
    return dst


@pytest.fixture
def pair(tmp_path):
    a = tmp_path / "a"
    mk(a, "etc/hosts", b"127.0.0.1 localhost\n")
    mk(a, "usr/bin/ping", b"ping" * 100, mode=0o755)
    mk(a, "usr/lib/x.so", b"lib")
    os.symlink("usr/lib", a / "lib")
    mk(a, "srv/data", b"d" * 1000)
    b = clone(a, tmp_path / "b")
    return a, b


def test_identical(pair):
    a, b = pair
    d = compare(a, b)
    assert list(d) == []
    assert d.summary.changes == 0


@pytest.mark.parametrize("renames", [False, True])
def test_a_diff_lists_its_changes_once(pair, renames):
    a, b = pair
    (b / "etc/hosts").write_bytes(b"changed\n")
    d = compare(a, b, renames=renames)
    first = list(d)
    assert [c.path for c in first] == ["/etc/hosts"]
    counted = d.summary.as_dict()
    with pytest.raises(RuntimeError, match="once"):
        list(d)
    assert d.summary.as_dict() == counted


def test_each_field_and_its_text(pair):
    a, b = pair
    os.chmod(b / "usr/bin/ping", 0o4755)
    os.setxattr(b / "usr/bin/ping", "security.capability", CAP_NET_RAW)
    os.utime(b / "usr/bin/ping", ns=(T0, T0))
    os.utime(a / "usr/bin/ping", ns=(T0, T0))
    (b / "etc/hosts").write_bytes(b"127.0.0.1 localhost\n10.0.0.1 db\n")
    os.chown(b / "srv/data", 1000, 100)
    os.utime(b / "srv/data", ns=(T0 + 5, T0 + 5))
    os.unlink(b / "lib")
    os.symlink("usr/lib64", b / "lib")
    for t in (a, b):
        os.utime(t / "lib", ns=(T0, T0), follow_symlinks=False)
    shutil.rmtree(b / "usr/lib")
    os.symlink("/opt", b / "usr/lib")
    got = {c.path: c for c in compare(a, b)}
    assert sorted(got) == ["/etc/hosts", "/lib", "/srv/data", "/usr/bin/ping", "/usr/lib"]
    lines = {p: format_change(c) for p, c in got.items()}
    assert lines["/usr/bin/ping"] == \
        "M /usr/bin/ping  mode 0755→4755, xattr security.capability added"
    assert lines["/etc/hosts"].startswith("M /etc/hosts  content (sha256 ")
    assert ", size 20→32, mtime 2023-11-14T22:13:20.123456789Z→" in lines["/etc/hosts"]
    assert lines["/srv/data"] == ("M /srv/data  uid 0→1000, gid 0→100, "
                                  "mtime 2023-11-14T22:13:20.123456789Z→2023-11-14T22:13:20.123456794Z")
    assert lines["/usr/lib"] == "T /usr/lib  dir→symlink"
    assert lines["/lib"] == "M /lib  target usr/lib→usr/lib64"
    assert got["/srv/data"].fields["uid"] == (0, 1000)
    assert got["/srv/data"].fields["gid"] == (0, 100)
    assert "mtime" in got["/srv/data"].fields
    # the type change takes the old directory's entries with it
    assert "/usr/lib/x.so" not in got


def test_content_read_when_metadata_cannot_decide(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "f", b"one", mtime_ns=100 * SECOND)
    mk(b, "f", b"two", mtime_ns=100 * SECOND)     # same size, whole-second mtime
    mk(a, "g", b"one", mtime_ns=T0)
    mk(b, "g", b"two", mtime_ns=T0)               # nanoseconds equal: trusted
    assert changes(a, b) == [("M", "/f", ["content"])]
    # a tarball carries digests: no trust needed
    ta = gnu_tar(a, tmp_path / "a.tar")
    assert changes(ta, b) == [("M", "/f", ["content"]), ("M", "/g", ["content"])]
    assert changes(ta, a) == []


def test_mode_and_mtime_only_changes_keep_content(pair):
    a, b = pair
    os.chmod(b / "srv/data", 0o600)
    [c] = compare(a, b)
    assert c.fields == {"mode": (0o644, 0o600)}


def test_added_and_deleted_directories_and_bytes(pair):
    a, b = pair
    shutil.rmtree(b / "srv")
    mk(b, "opt/app/bin/run", b"r" * 300)
    mk(b, "opt/app/README", b"x" * 7)
    d = compare(a, b)
    got = [(c.code, c.path) for c in d]
    assert got == [("A", "/opt"), ("A", "/opt/app"), ("A", "/opt/app/README"),
                   ("A", "/opt/app/bin"), ("A", "/opt/app/bin/run"), ("D", "/srv")]
    assert d.summary.bytes_added == 307
    assert d.summary.bytes_removed == 1000      # the deleted directory's file
    assert (d.summary.added, d.summary.deleted) == (5, 1)


def test_renames_by_content(pair):
    a, b = pair
    os.rename(b / "srv/data", b / "srv/data.old")
    os.chmod(b / "srv/data.old", 0o600)
    assert changes(a, b) == [("D", "/srv/data", []), ("A", "/srv/data.old", [])]
    d = compare(a, b, renames=True)
    [c] = list(d)
    assert (c.code, c.path, c.old_path, sorted(c.fields)) == \
        ("R", "/srv/data.old", "/srv/data", ["mode"])
    assert format_change(c) == "R /srv/data.old ← /srv/data  mode 0644→0600"
    assert d.summary.renamed == 1 and d.summary.bytes_added == 0
    assert as_layer_changes([c]) == [("/srv/data", "deleted"), ("/srv/data.old", "added")]


def test_hardlink_groups_and_bytes_once(pair):
    a, b = pair
    mk(b, "opt/big", b"B" * 5000)
    os.link(b / "opt/big", b / "opt/big2")
    os.link(b / "opt/big", b / "opt/big3")
    d = compare(a, b)
    recs = {c.path: c for c in d}
    assert recs["/opt/big2"].hardlinks == ("/opt/big", "/opt/big3")
    assert d.summary.bytes_added == 5000
    assert change_record(recs["/opt/big"])["hardlinks"] == ["/opt/big2", "/opt/big3"]
    # linking two existing files is a change of both
    c = clone(b, b.parent / "c")
    os.unlink(c / "opt/big3")
    shutil.copy2(b / "opt/big3", c / "opt/big3")
    got = {c_.path: c_.fields["hardlinks"] for c_ in compare(b, c)}
    assert got["/opt/big3"] == (("/opt/big", "/opt/big2"), ())
    assert got["/opt/big"] == (("/opt/big2", "/opt/big3"), ("/opt/big2",))


@pytest.mark.parametrize("as_tar", [False, True])
def test_bytes_of_a_hardlink_group_count_while_no_name_keeps_them(pair, as_tar):
    """Removing one name of a group, or a directory holding one, removes no
    data while another name keeps it; a new name for existing data adds none;
    the data goes (once) when the last name does."""
    a, b = pair
    mk(a, "opt/keep", b"K" * 5000)
    os.link(a / "opt/keep", a / "opt/keep-link")
    mk(a, "gone/x", b"G" * 700)
    os.link(a / "gone/x", a / "opt/gone-link")
    mk(a, "opt/last", b"L" * 300)
    os.link(a / "opt/last", a / "opt/last2")
    b = clone(a, b.parent / "b2")
    os.unlink(b / "opt/keep-link")                   # keep's data stays under /opt/keep
    shutil.rmtree(b / "gone")                        # x's data stays under /opt/gone-link
    os.link(b / "srv/data", b / "srv/data-link")     # a new name, no new data
    os.unlink(b / "opt/last")
    os.unlink(b / "opt/last2")                       # both names: 300 bytes gone once
    if as_tar:
        a, b = gnu_tar(a, a.parent / "a.tar"), gnu_tar(b, a.parent / "b.tar")
    d = compare(a, b)
    got = {(c.code, c.path) for c in d}
    assert {("D", "/opt/keep-link"), ("D", "/gone"), ("A", "/srv/data-link"),
            ("D", "/opt/last"), ("D", "/opt/last2")} <= got
    assert (d.summary.bytes_removed, d.summary.bytes_added) == (300, 0)


def test_ignore_include_exclude_semantic(pair):
    a, b = pair
    os.utime(b / "etc/hosts", ns=(T0 + 1, T0 + 1))
    os.chown(b / "usr/bin/ping", 7, 7)
    os.setxattr(b / "srv/data", "user.note", b"x")
    os.setxattr(b / "srv/data", "user.keep", b"y")
    assert {p for _, p, _ in changes(a, b)} == {"/etc/hosts", "/usr/bin/ping", "/srv/data"}
    assert changes(a, b, ignore=["mtime,owner", "xattr:user.*"]) == []
    assert changes(a, b, ignore=["mtime", "owner", "xattr:user.note"]) == \
        [("M", "/srv/data", ["xattr:user.keep"])]
    assert changes(a, b, semantic=True, ignore=["owner"]) == \
        [("M", "/srv/data", ["xattr:user.keep", "xattr:user.note"])]
    assert [p for _, p, _ in changes(a, b, include=["/usr"])] == ["/usr/bin/ping"]
    assert [p for _, p, _ in changes(a, b, exclude=["usr", "*.so", "/etc/*"])] == ["/srv/data"]
    with pytest.raises(ValueError):
        compare(a, b, ignore=["colour"])


def test_path_globs_stay_within_components(tmp_path):
    """*, ? and [...] do not cross a "/"; a "**" component spans any number;
    "./x" is x at the root; a pattern with a "/" takes everything below a match."""
    a, b = tmp_path / "a", tmp_path / "b"
    for p in ("usr/x.so", "usr/lib/y.so", "usr/lib/deep/z.so", "etc/hosts", "usr/etc/z"):
        mk(b, p, b"new")
    a.mkdir()

    def added(**kw):
        return sorted(p for code, p, _ in changes(a, b, **kw) if code == "A")
    assert added(include=["/usr/*.so"]) == ["/usr/x.so"]
    assert added(include=["/usr/**/*.so"]) == ["/usr/lib/deep/z.so", "/usr/lib/y.so", "/usr/x.so"]
    assert added(include=["/usr/l?b/*.so"]) == ["/usr/lib/y.so"]
    assert added(include=["./etc"]) == ["/etc", "/etc/hosts"]
    assert added(include=["etc"]) == ["/etc", "/etc/hosts", "/usr/etc", "/usr/etc/z"]
    assert added(include=["/[!u]*"]) == ["/etc", "/etc/hosts"]
    assert added(exclude=["/usr/**/deep", "/usr/[a-k]*"]) == \
        ["/etc", "/etc/hosts", "/usr", "/usr/lib", "/usr/lib/y.so", "/usr/x.so"]


def test_semantic_compares_content_not_mtime(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "f", b"one", mtime_ns=T0)
    mk(b, "f", b"two", mtime_ns=T0 + 17)
    mk(a, "g", b"same", mtime_ns=T0)
    mk(b, "g", b"same", mtime_ns=T0 + 17)
    assert changes(a, b, semantic=True) == [("M", "/f", ["content"])]


def test_json_record(pair):
    a, b = pair
    (b / "etc/hosts").write_bytes(b"x")
    os.setxattr(b / "etc/hosts", "user.k", b"\x00\xff")
    [c] = compare(a, b)
    r = change_record(c)
    assert r["path"] == "/etc/hosts" and r["kind"] == "modified" and r["code"] == "M"
    assert r["size"] == {"old": 20, "new": 1}
    assert r["digest"]["new"].startswith("sha256:") and r["digest"]["old"] != r["digest"]["new"]
    assert r["fields"]["xattr:user.k"] == {"old": None, "new": "AP8="}
    assert r["type"] == "file" and "old_path" not in r


# ----------------------------------------------------------------- properties

NAMES = ["a", "b", "c d", "é"]
POOL = sorted({"/".join(p) for n in range(1, 4) for p in
               __import__("itertools").product(NAMES[:3], repeat=n)} | {"é", "a/é"})

entry = st.one_of(
    st.none(),
    st.tuples(st.just("file"), st.sampled_from([b"", b"x", b"y", b"xx" * 700]),
              st.sampled_from([0o644, 0o600, 0o4755]),
              st.sampled_from([100 * SECOND, T0, T0 + 1]),
              st.sampled_from([None, b"v1", b"v2"])),
    st.tuples(st.just("dir"), st.sampled_from([0o755, 0o700])),
    st.tuples(st.just("symlink"), st.sampled_from(["a", "../b", "/x"])),
)
tree_spec = st.fixed_dictionaries({p: entry for p in POOL})


def build(root: Path, spec) -> Path:
    root.mkdir()
    os.chmod(root, 0o755)
    dirs = {""}
    for p in sorted(spec, key=lambda s: s.count("/")):
        e = spec[p]
        if e is None or p.rpartition("/")[0] not in dirs:
            continue
        if e[0] == "file":
            _, data, mode, mtime, xv = e
            mk(root, p, data, mode=mode, mtime_ns=mtime,
               xattrs={"user.t": xv} if xv is not None else None)
        elif e[0] == "dir":
            (root / p).mkdir()
            os.chmod(root / p, e[1])
            dirs.add(p)
        else:
            os.symlink(e[1], root / p)
            os.utime(root / p, ns=(T0, T0), follow_symlinks=False)
    return root


@settings(max_examples=40)
@given(spec_a=tree_spec, spec_b=tree_spec)
def test_changes_as_a_layer_rebuild_b(tmp_path_factory, spec_a, spec_b):
    tmp = tmp_path_factory.mktemp("prop")
    a, b = build(tmp / "a", spec_a), build(tmp / "b", spec_b)
    d = list(compare(a, b, renames=True))
    layer = tmp / "changes.tar"
    create_layer(b, layer, changes=as_layer_changes(d))
    c = clone(a, tmp / "c")
    apply_layer(str(layer), c)
    assert changes(c, b) == []
    # the engine agrees with the drivers' exact tree comparison; it also names
    # a content change that compare_trees leaves behind another changed field
    ours = [(c_.path, c_.kind, set(c_.fields)) for c_ in compare(a, b)]
    theirs = [(t.path, t.kind, set(t.fields)) for t in compare_trees(a, b)]
    assert [o[:2] for o in ours] == [t[:2] for t in theirs]
    assert [(t.path, t.kind, set(t.fields), t.type) for t in tree_changes(a, b)] == \
        [(c_.path, c_.kind, set(c_.fields), c_.type) for c_ in compare(a, b)]
    assert [(t.path, t.kind, t.type) for t in tree_changes(None, b)] == \
        [(t.path, t.kind, t.type) for t in compare_trees(None, b)]
    for (path, _, fo), (_, _, ft) in zip(ours, theirs):
        if any(c_.path == path and c_.type == "symlink" for c_ in d):
            ft.discard("size")          # a symlink's size is its target's length
        assert fo - ft <= {"content"} and ft <= fo, path


@settings(max_examples=10)
@given(spec=tree_spec)
def test_same_content_in_other_containers_compares_equal(tmp_path_factory, spec):
    tmp = tmp_path_factory.mktemp("same")
    t = build(tmp / "t", spec)
    layer = tmp / "l.tar.zst"
    create_layer(t, layer, compression="zstd")
    oci = write_oci([layer], tmp / "oci")
    from layerfs.diff.sources import StoreSource
    from layerfs.store import Store
    with Store(str(tmp / "store"), driver="vfs") as st:
        (loaded,) = st.load(str(oci))
        stored = StoreSource(loaded.image.id, store=st)
        for other in (layer, f"oci:{oci}", gnu_tar(t, tmp / "g.tar"), stored):
            assert changes(t, other) == []
            assert changes(other, t) == []
        stored.close()


def test_many_undecided_pairs_in_chunks(tmp_path):
    """More same-size, whole-second pairs than one comparison chunk: each
    differing one is found, in order."""
    a, b = tmp_path / "a", tmp_path / "b"
    for i in range(700):
        data = b"%05d" % i * 50
        mk(a, f"d{i % 7}/f{i:04d}", data, mtime_ns=100 * SECOND)
        other = data if i % 97 else data[:-1] + b"!"
        mk(b, f"d{i % 7}/f{i:04d}", other, mtime_ns=100 * SECOND)
    got = changes(a, b)
    want = sorted((("M", f"/d{i % 7}/f{i:04d}", ["content"]) for i in range(700) if i % 97 == 0),
                  key=lambda t: t[1])
    assert got == want


# ----------------------------------------------------------------- the fast paths agree with the slow ones

def _records(d):
    out = []
    for c in d:
        r = change_record(c)
        r.pop("layer", None)
        r.pop("old_layer", None)
        out.append(r)
    return out


def _tar(tree: Path, out: Path, gz: bool = False) -> Path:
    argv = ["tar", "--sort=name", "--numeric-owner", "--sparse", "--xattrs",
            "--xattrs-include=*", "--format=posix", "-C", str(tree), "-cf", str(out), "."]
    if gz:
        argv.insert(1, "-z")
    subprocess.run(argv, check=True)
    return out


def test_layer_files_read_in_place(tmp_path):
    """Two uncompressed layer files: contents compared in place, hashed only
    where needed -- the same change records as for their gzip copies, whose
    contents are all hashed while they are scanned."""
    a = tmp_path / "a"
    for i in range(40):
        mk(a, f"usr/share/f{i:02d}", b"%02d" % i * (100 + 50 * i), mtime_ns=100 * SECOND)
    mk(a, "etc/same-size", b"abcdef", mtime_ns=100 * SECOND)
    mk(a, "etc/grows", b"abc")
    mk(a, "etc/mode", b"m" * 10)
    mk(a, "etc/empty", b"")
    mk(a, "old/name", b"renamed content" * 30)
    mk(a, "gone/x", b"x" * 99)
    mk(a, "links/one", b"hard" * 10)
    os.link(a / "links/one", a / "links/two")
    with open(a / "sparse", "wb") as f:
        f.seek(1 << 20)
        f.write(b"tail")
    b = clone(a, tmp_path / "b")
    mk(b, "etc/same-size", b"abcdeX", mtime_ns=100 * SECOND)
    mk(b, "etc/grows", b"abcd")
    os.chmod(b / "etc/mode", 0o600)
    os.rename(b / "old/name", b / "old/moved")
    shutil.rmtree(b / "gone")
    mk(b, "new/dir/file", b"new" * 7)
    mk(b, "new/dir/empty", b"")
    os.unlink(b / "links/two")
    mk(b, "usr/share/f07", b"!" + (b"07" * 450)[1:], mtime_ns=100 * SECOND)
    with open(b / "sparse", "r+b") as f:
        f.seek(1 << 19)
        f.write(b"middle")
    ta, tb = _tar(a, tmp_path / "a.tar"), _tar(b, tmp_path / "b.tar")
    ga, gb = _tar(a, tmp_path / "a.tar.gz", True), _tar(b, tmp_path / "b.tar.gz", True)
    for renames in (False, True):
        d = compare(ta, tb, renames=renames)
        in_place = _records(d)
        assert d.old.data_path is not None and d.new.data_path is not None
        hashed = _records(compare(ga, gb, renames=renames))
        assert in_place == hashed
    got = {r["path"]: r for r in in_place}
    assert got["/etc/same-size"]["fields"].keys() == {"content"}
    assert got["/usr/share/f07"]["fields"].keys() == {"content"}
    assert got["/sparse"]["fields"].keys() >= {"content"}
    assert got["/new/dir/file"]["digest"]["new"] is not None
    assert "/etc/mode" in got and "/usr/share/f08" not in got
    assert len([r for r in in_place if r["kind"] == "renamed"]) == 1
    # the in-place scan skips the stream hash: the layer digests come when asked
    import gzip
    import hashlib
    d = compare(ta, tb)
    dg = compare(ga, gb)
    list(d), list(dg)                   # the layers are read as the changes are
    sha = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()    # noqa: E731
    for side, path, gside, gpath in ((d.old, ta, dg.old, ga), (d.new, tb, dg.new, gb)):
        want = sha(path.read_bytes())
        assert (side.layers[0].digest, side.layers[0].diff_id) == (want, want)
        assert (gside.layers[0].digest, gside.layers[0].diff_id) == \
            (sha(gpath.read_bytes()), sha(gzip.decompress(gpath.read_bytes())))


def test_truncated_layer_file_read_in_place(tmp_path):
    """Seeking over file data must not hide a layer that ends inside it."""
    a = tmp_path / "a"
    mk(a, "small", b"s" * 10)
    mk(a, "big", os.urandom(3 << 20))
    mk(a, "after", b"a" * 10)
    ta = _tar(a, tmp_path / "a.tar")
    names = [m.name for m in tarfile.open(ta)]
    big_at = names.index("./big")
    cut = tmp_path / "cut.tar"
    data = ta.read_bytes()
    off = [m.offset_data for m in tarfile.open(ta)][big_at]
    cut.write_bytes(data[:off + (1 << 20)])           # ends in the middle of ./big
    with pytest.raises(LayerError) as ei:
        list(compare(ta, cut))
    assert "truncated" in str(ei.value) and "big" in str(ei.value)


def test_walk_compare(tmp_path):
    """lfs_walk_compare: which pairs it compares, and what it says of them."""
    import hashlib
    from layerfs import _native
    a, b = tmp_path / "a", tmp_path / "b"
    mk(a, "same", b"12345", mtime_ns=10 * SECOND)
    mk(b, "same", b"12345", mtime_ns=10 * SECOND)
    mk(a, "differs", b"12345", mtime_ns=10 * SECOND)
    mk(b, "differs", b"12346", mtime_ns=10 * SECOND)
    mk(a, "sizes", b"1")
    mk(b, "sizes", b"12")
    mk(a, "trusted", b"aaa", mtime_ns=10 * SECOND + 5)
    mk(b, "trusted", b"bbb", mtime_ns=10 * SECOND + 5)
    mk(a, "empty", b"")
    mk(b, "empty", b"")
    mk(b, "only-b", b"x")
    os.mkfifo(a / "fifo")                   # never opened: not a regular file
    mk(b, "fifo", b"x")
    os.symlink("same", a / "link")
    mk(b, "link", b"12345")
    (a / "d").mkdir()
    entries, got = _native.walk_compare(str(b), str(a), trust_mtime=True)
    assert {e.path for e in entries} >= {"same", "differs", "sizes", "only-b"}
    sha = lambda data: "sha256:" + hashlib.sha256(data).hexdigest()   # noqa: E731
    assert got["same"] == (True, None, None)
    assert got["differs"] == (False, sha(b"12345"), sha(b"12346"))
    assert got["sizes"] == (False, sha(b"1"), sha(b"12"))
    assert "trusted" not in got                # equal mtimes with nanoseconds decide
    assert set(got) == {"same", "differs", "sizes"}
    _, got = _native.walk_compare(str(b), str(a), trust_mtime=False)
    assert got["trusted"] == (False, sha(b"aaa"), sha(b"bbb"))
    _, got = _native.walk_compare(str(a), str(a))
    assert got == {}                           # one inode: nothing to read


def test_layers_prematch(tmp_path):
    """The C core's pairing of two layer files by name from their headers: the
    pairs it compares are the same-named, same-size files (the last of a name
    in the old layer), and what it says of each is what their bytes say."""
    import hashlib
    from layerfs import _native
    a_tar, b_tar = tmp_path / "a.tar", tmp_path / "b.tar"
    common = {f"d/f{i}": os.urandom(100 + 37 * i) for i in range(30)}
    a_files = dict(common, **{"d/sized": b"x" * 10, "only-a": b"a" * 5})
    b_files = dict(common, **{"d/sized": b"x" * 11, "only-b": b"b" * 5})
    b_files["d/f3"] = b"!" + common["d/f3"][1:]
    dup_first = os.urandom(500)
    with tarfile.open(a_tar, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in a_files.items():
            ti = tarfile.TarInfo("./" + name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("dup")                 # twice: the second one counts
        ti.size = 500
        tf.addfile(ti, io.BytesIO(dup_first))
        tf.addfile(ti, io.BytesIO(common["d/f0"][:0] + b"z" * 500))
    with tarfile.open(b_tar, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in list(b_files.items()) + [("dup", b"z" * 500)]:
            ti = tarfile.TarInfo(name)              # no "./": the same names
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    offs = {}
    for side, path in (("a", a_tar), ("b", b_tar)):
        with tarfile.open(path) as tf:
            for m in tf:
                offs[(side, m.name.lstrip("./") if m.name.startswith("./") else m.name)] = \
                    (m.offset_data, m.size)
    fa, fb = os.open(a_tar, os.O_RDONLY), os.open(b_tar, os.O_RDONLY)
    try:
        got = _native.layers_prematch(fa, fb)
    finally:
        os.close(fa)
        os.close(fb)
    want_pairs = {}
    for name in set(a_files) | set(b_files) | {"dup"}:
        if ("a", name) in offs and ("b", name) in offs and \
                offs[("a", name)][1] == offs[("b", name)][1]:
            (oa, n), (ob, _) = offs[("a", name)], offs[("b", name)]
            want_pairs[(oa, ob, n)] = name
    assert set(got) == set(want_pairs)
    raw_a, raw_b = a_tar.read_bytes(), b_tar.read_bytes()
    for (oa, ob, n), (same, da, db) in got.items():
        ba, bb = raw_a[oa:oa + n], raw_b[ob:ob + n]
        assert same == (ba == bb), want_pairs[(oa, ob, n)]
        if not same:
            assert da == "sha256:" + hashlib.sha256(ba).hexdigest()
            assert db == "sha256:" + hashlib.sha256(bb).hexdigest()
    assert not got[next(k for k, v in want_pairs.items() if v == "d/f3")][0]
    assert got[next(k for k, v in want_pairs.items() if v == "dup")][0]
