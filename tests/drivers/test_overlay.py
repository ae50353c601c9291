"""The overlay driver: the conformance suite (kernel overlayfs and fuse-overlayfs),
and what is particular to overlay."""
from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from layerfs.drivers import overlay as ov

from .conformance import (Conformance, Entry, Mounted, build_stack, diff_bytes, dir_, file_,
                          tar_members, view_of, whiteout)
from .conftest import mounts_under

REPO = Path(__file__).resolve().parents[2]


class TestOverlay(Conformance):
    DRIVER = "overlay"


class TestOverlayFuse(Conformance):
    DRIVER = "overlay"
    OPTIONS = {"mount_program": "fuse-overlayfs"}
    MAX_EXAMPLES = 10


@pytest.fixture
def driver_name():
    return "overlay"


def _mountinfo(target: str):
    """(fstype, super options) of the mount at target."""
    real = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == real:
                sep = parts.index("-")
                return parts[sep + 1], parts[sep + 3]
    return None


def test_layout_short_links(make_driver):
    d = make_driver()
    d.create("base")
    d.create("app", "base")
    d.create_rw("ctr", "app")
    links = {}
    for id in ("base", "app", "ctr"):
        link = d.metadata(id)["link"]
        assert len(link) == 26 and link.isalnum() and link.upper() == link
        target = os.path.join(d.root, "l", link)
        assert os.readlink(target) == f"../layers/{id}/diff"
        assert os.path.samefile(target, d.diff_dir(id))
        links[id] = f"l/{link}"
    assert d.metadata("ctr")["lower"] == [links["app"], links["base"]]
    assert d.metadata("base")["lower"] == []
    assert os.path.isdir(os.path.join(d.layer_dir("ctr"), "work"))
    d.remove("ctr")
    assert not os.path.lexists(os.path.join(d.root, links["ctr"]))


def test_deep_stack_mounts_relative_lowers_from_the_root(make_driver):
    d = make_driver()
    ids = build_stack(d, [[file_(f"f{i}", b"%d" % i)] for i in range(128)])
    d.create_rw("ctr", ids[-1])
    page = os.sysconf("SC_PAGE_SIZE")
    for id in (ids[-1], "ctr"):
        (m,) = d.mounts(id)
        assert m.type == "overlay" and m.cwd == d.root
        lower = next(o for o in m.options if o.startswith("lowerdir="))
        assert len(lower.split(":")) == 128
        assert all(x.startswith("l/") for x in lower[len("lowerdir="):].split(":"))
        assert len(",".join(m.options)) < page
    (small,) = d.mounts(ids[1])
    assert small.cwd is None and f"lowerdir={d.root}/l/" in ",".join(small.options)
    with Mounted(d, "ctr") as m:
        fstype, opts = _mountinfo(m)
        assert fstype == "overlay" and "upperdir=" in opts
        assert Path(m, "f0").read_bytes() == b"0" and Path(m, "f127").read_bytes() == b"127"


def test_too_deep_a_stack_is_refused_when_created(make_driver):
    from layerfs.errors import PreconditionFailed
    d = make_driver()
    parent = None
    with pytest.raises(PreconditionFailed, match="must fit in"):
        for i in range(400):
            d.create(f"x{i}", parent)
            parent = f"x{i}"
    assert 128 <= len(d.layers()) < 400


def test_whiteouts_are_stored_in_overlay_format(make_driver):
    d = make_driver()
    ids = build_stack(d, [
        [dir_("d"), file_("d/x", b"x"), file_("y", b"y"), whiteout("nothing-below")],
        [dir_("d"), Entry(b"d", "opaque"), file_("d/z", b"z"), whiteout("y")],
    ])
    base, top = d.diff_dir(ids[0]), d.diff_dir(ids[1])
    # a bottom layer has nothing to hide: no whiteout is stored
    assert sorted(os.listdir(base)) == ["d", "y"]
    st_ = os.lstat(os.path.join(top, "y"))
    assert stat.S_ISCHR(st_.st_mode) and st_.st_rdev == 0
    assert os.getxattr(os.path.join(top, "d"), "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(os.path.join(top, "d"))) == ["z"]
    with Mounted(d, ids[1]) as m:
        assert sorted(os.listdir(m)) == ["d"] and os.listdir(os.path.join(m, "d")) == ["z"]
    names = set(tar_members(io.BytesIO(diff_bytes(d, ids[1]))))
    assert names == {"d", "d/.wh..wh..opq", "d/z", ".wh.y"}


def test_native_diff_of_a_container_layer(make_driver, tmp_path):
    d = make_driver()
    layers = [[dir_("etc"), file_("etc/a", b"a"), file_("etc/b", b"b"), dir_("opt"),
               dir_("opt/x"), file_("opt/x/1", b"1"), file_("f", b"f")]]
    ids = build_stack(d, layers)
    d.create_rw("ctr", ids[-1])
    with Mounted(d, "ctr") as m:
        from layerfs.drivers.base import remove_tree
        remove_tree(os.path.join(m, "opt"))         # delete a directory, make it anew
        os.mkdir(os.path.join(m, "opt"))
        Path(m, "opt/new").write_bytes(b"new")
        os.unlink(os.path.join(m, "f"))             # a file becomes a directory
        os.mkdir(os.path.join(m, "f"))
        Path(m, "f/inside").write_bytes(b"i")
        os.chmod(os.path.join(m, "etc/a"), 0o600)
        expected = view_of(m)
    upper = d.diff_dir("ctr")
    assert os.getxattr(os.path.join(upper, "opt"), "trusted.overlay.opaque") == b"y"
    assert d.metadata("ctr")["native_diff"] is True
    assert d.changes("ctr") == [
        ("/etc", "modified"), ("/etc/a", "modified"), ("/f", "modified"),
        ("/f/inside", "added"), ("/opt", "modified"), ("/opt/new", "added"),
        ("/opt/x", "deleted")]
    names = set(tar_members(io.BytesIO(diff_bytes(d, "ctr"))))
    # the kernel makes a directory created over a whiteout opaque: a harmless marker
    names.discard("f/.wh..wh..opq")
    assert names == {"etc", "etc/a", "f", "f/inside", "opt", "opt/.wh..wh..opq", "opt/new"}
    Conformance().check_diffs_reapply(d, ids + ["ctr"], expected, tmp_path)


@pytest.mark.parametrize("feature", [["redirect_dir=on"], ["redirect_dir=on", "metacopy=on"]],
                         ids=["redirect_dir", "metacopy"])
def test_exact_diff_when_the_upper_dir_cannot_be_trusted(make_driver, tmp_path, feature):
    d = make_driver(mount_options=feature)
    layers = [[dir_("etc"), file_("etc/a", b"a" * 100), dir_("srv"), dir_("srv/www"),
               file_("srv/www/index", b"<html>")]]
    ids = build_stack(d, layers)
    d.create_rw("ctr", ids[-1])
    with Mounted(d, "ctr") as m:
        os.rename(os.path.join(m, "srv/www"), os.path.join(m, "srv/site"))  # a redirect
        os.chmod(os.path.join(m, "etc/a"), 0o600)  # metadata-only copy-up with metacopy
        expected = view_of(m)
    upper = os.fsencode(d.diff_dir("ctr"))
    xattrs = {n for dp, dn, fn in os.walk(upper) for e in dn + fn
              for n in os.listxattr(os.path.join(dp, e), follow_symlinks=False)}
    assert "trusted.overlay.redirect" in xattrs
    if "metacopy=on" in feature:
        assert "trusted.overlay.metacopy" in xattrs
        assert os.path.getsize(os.path.join(upper, b"etc/a")) in (0, 100)
    assert d.metadata("ctr")["native_diff"] is False
    assert d.changes("ctr") == [("/etc", "modified"), ("/etc/a", "modified"), ("/srv", "modified"),
                                ("/srv/site", "added"), ("/srv/site/index", "added"),
                                ("/srv/www", "deleted")]
    members = tar_members(io.BytesIO(diff_bytes(d, "ctr")))
    assert members["etc/a"].data == b"a" * 100
    assert members["srv/site/index"].data == b"<html>"
    Conformance().check_diffs_reapply(d, ids + ["ctr"], expected, tmp_path)
    assert not [m for m in mounts_under(d.root) if "/staging/" in m], "views left mounted"


def test_fuse_overlayfs_mounts_through_the_program(make_driver):
    d = make_driver(mount_program="fuse-overlayfs")
    ids = build_stack(d, [[file_("a", b"a")], [file_("b", b"b")]])
    d.create_rw("ctr", ids[-1])
    with Mounted(d, "ctr") as m:
        assert _mountinfo(m)[0] == "fuse.fuse-overlayfs"
        Path(m, "c").write_bytes(b"c")
        os.unlink(os.path.join(m, "a"))
    with Mounted(d, ids[-1]) as m:
        assert _mountinfo(m)[0] == "fuse.fuse-overlayfs"
        assert sorted(os.listdir(m)) == ["a", "b"]
    members = tar_members(io.BytesIO(diff_bytes(d, "ctr")))
    assert set(members) == {".wh.a", "c"}
    for m in members.values():
        assert not any("fuseoverlayfs" in k for k in m.info.pax_headers)


def test_supported_reasons(tmp_path):
    assert ov.OverlayDriver.supported(None).ok
    s = ov.OverlayDriver.supported(str(tmp_path / "store"))
    assert s.ok and "overlay" in s.reason
    # a store on an overlay mount cannot use overlay
    for sub in ("l", "u", "w", "m"):
        (tmp_path / sub).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/l,upperdir={tmp_path}/u,workdir={tmp_path}/w",
                    str(tmp_path / "m")], check=True)
    try:
        s = ov.OverlayDriver.supported(str(tmp_path / "m" / "store"))
        assert not s.ok and "is on overlay" in s.reason and "ext4" in s.reason
    finally:
        subprocess.run(["umount", str(tmp_path / "m")], check=True)
    with pytest.raises(Exception, match="not found"):
        ov.OverlayDriver(str(tmp_path / "x"), mount_program="no-such-overlay-program")


def test_in_a_user_namespace_with_userxattr(tmp_path):
    """The driver run by root of a new user namespace: user.overlay.* xattrs."""
    if subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"]).returncode:
        pytest.skip("user namespaces are not available")
    code = textwrap.dedent(f"""
        import io, os, json
        from tests.drivers.conformance import layer_tar, file_, dir_, whiteout, Entry
        from layerfs.drivers.overlay import OverlayDriver, in_user_namespace
        assert in_user_namespace()
        assert OverlayDriver.supported({str(tmp_path)!r}).ok
        d = OverlayDriver({str(tmp_path / "store")!r})
        assert d.options["userxattr"]
        d.create("a")
        d.apply_diff("a", io.BytesIO(layer_tar([dir_("d"), file_("d/x", b"x"), file_("y", b"y")])))
        d.create("b", "a")
        d.apply_diff("b", io.BytesIO(layer_tar([dir_("d"), Entry(b"d", "opaque"),
                                                file_("d/z", b"z"), whiteout("y")])))
        opaque = os.getxattr(os.path.join(d.diff_dir("b"), "d"), "user.overlay.opaque")
        d.create_rw("c", "b")
        m = d.mount("c")
        try:
            view = sorted(os.listdir(m)), sorted(os.listdir(m + "/d"))
            os.unlink(m + "/d/z")
            open(m + "/new", "w").write("n")
        finally:
            d.unmount("c")
        import tarfile
        with d.diff("c") as s:
            names = sorted(t.name for t in tarfile.open(fileobj=s, mode="r|"))
        print(json.dumps({{"opaque": opaque.decode(), "view": view, "names": names,
                          "changes": d.changes("c")}}))
        d.cleanup()
    """)
    p = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable,
                        "-c", code], cwd=str(REPO), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    import json
    out = json.loads(p.stdout)
    assert out["opaque"] == "y"
    assert out["view"] == [["d"], ["z"]]
    assert out["names"] == ["d", "d/.wh.z", "new"]
    assert out["changes"] == [["/d", "modified"], ["/d/z", "deleted"], ["/new", "added"]]


def test_overlay_is_the_default_driver_here(tmp_path):
    import layerfs.drivers as drivers
    s = drivers.supported(str(tmp_path))
    assert s["overlay"].ok and s["vfs"].ok
    assert all(x.reason for x in s.values())
    assert drivers.default(str(tmp_path)) == "overlay"
    assert drivers.PRIORITY[:1] == ("overlay",) and drivers.PRIORITY[-1] == "vfs"


def test_d_type_probe():
    assert ov._has_d_type(str(REPO))
