"""Diff sources: directories, layer tarballs, layer stacks, images, overlay upper dirs.

The effective view of a stack is checked against the real thing: the layers
applied by layerfs.archive into a directory, compared with the engine.
"""
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from layerfs.archive import create_layer, unpack_layers
from layerfs.diff import compare, open_source
from layerfs.diff.sources import (DirectorySource, LayerStackSource, OverlayUpperSource,
                                  detect_file, layer_stack)
from layerfs.errors import NotFound

T0 = 1_700_000_000_123_456_789
# vfs_cap_data v2: effective, CAP_NET_RAW permitted
CAP_NET_RAW = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)


# ----------------------------------------------------------------- helpers (shared)

def mk(root: Path, rel: str, data: bytes = b"", mode: int = 0o644, mtime_ns: int = T0,
       uid: int = 0, gid: int = 0, xattrs=None) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    for k, v in (xattrs or {}).items():
        os.setxattr(p, k, v)
    os.utime(p, ns=(mtime_ns, mtime_ns))
    return p


def gnu_tar(tree: Path, out: Path, *, fmt: str = "posix", compress: str = "") -> Path:
    """A layer tarball of tree made with GNU tar."""
    xattrs = ["--xattrs", "--xattrs-include=*"] if fmt == "posix" else []   # PAX only
    argv = ["tar", "--sort=name", "--numeric-owner", *xattrs,
            f"--format={fmt}", "-C", str(tree), "-cf", "-", "."]
    data = subprocess.run(argv, check=True, capture_output=True).stdout
    if compress == "gzip":
        data = subprocess.run(["gzip", "-n", "-c"], input=data, check=True,
                              capture_output=True).stdout
    elif compress == "zstd":
        data = subprocess.run(["zstd", "-q", "-c"], input=data, check=True,
                              capture_output=True).stdout
    out.write_bytes(data)
    return out


class TarBuilder:
    """Hand-made layer tarballs (whiteouts, opaque markers, hardlinks) with tarfile."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name, type_, mode=0o644, mtime=1_700_000_000, uid=0, gid=0):
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = type_, mode, mtime, uid, gid
        return ti

    def dir(self, name, mode=0o755, **kw):
        self.tf.addfile(self._info(name, tarfile.DIRTYPE, mode, **kw))
        return self

    def file(self, name, data=b"", mode=0o644, **kw):
        ti = self._info(name, tarfile.REGTYPE, mode, **kw)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))
        return self

    def symlink(self, name, target, **kw):
        ti = self._info(name, tarfile.SYMTYPE, 0o777, **kw)
        ti.linkname = target
        self.tf.addfile(ti)
        return self

    def hardlink(self, name, target, **kw):
        ti = self._info(name, tarfile.LNKTYPE, **kw)
        ti.linkname = target
        self.tf.addfile(ti)
        return self

    def whiteout(self, name):
        d, _, base = name.rpartition("/")
        return self.file((d + "/" if d else "") + ".wh." + base, mtime=0)

    def opaque(self, dirname):
        return self.file(dirname.rstrip("/") + "/.wh..wh..opq", mtime=0)

    def write(self, path: Path) -> Path:
        self.tf.close()
        path.write_bytes(self.buf.getvalue())
        return path


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_image(layers, history=None, names=("example.com/test/img:1",)):
    """An ImageToWrite of layer tarball paths (plain or compressed)."""
    from layerfs.digest import layer_digests
    from layerfs.images import ImageToWrite, LayerToWrite, open_decompressed
    from layerfs.images.manifest import Descriptor
    media = {"none": "application/vnd.oci.image.layer.v1.tar",
             "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}
    descs, diff_ids, lws = [], [], []
    for p in layers:
        d = layer_digests(str(p))
        desc = Descriptor(media[d.compression], d.digest, d.compressed_size)
        descs.append(desc)
        diff_ids.append(d.diff_id)
        lws.append(LayerToWrite(desc, d.diff_id, (lambda q=p: open(q, "rb")),
                                (lambda q=p: open_decompressed(open(q, "rb")))))
    hist = history or [{"created_by": f"step {i}"} for i in range(len(layers))]
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}, "history": hist}
    cbytes = json.dumps(config, sort_keys=True).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": sha256(cbytes), "size": len(cbytes)},
                "layers": [d.to_json() for d in descs]}
    mbytes = json.dumps(manifest, sort_keys=True).encode()
    return ImageToWrite(list(names), mbytes, sha256(mbytes),
                        "application/vnd.oci.image.manifest.v1+json", cbytes, sha256(cbytes), lws)


def write_oci(layers, dest: Path, *, tar: bool = False, history=None) -> Path:
    from layerfs.images import write_oci_layout
    write_oci_layout([make_image(layers, history)], dest, tar=tar)
    return dest


def write_docker(layers, dest: Path, history=None) -> Path:
    from layerfs.images import write_docker_archive
    write_docker_archive([make_image(layers, history)], dest)
    return dest


def changes(a, b, **kw):
    return [(c.code, c.path, sorted(c.fields)) for c in compare(a, b, **kw)]


def sample_tree(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    mk(root, "etc/hosts", b"127.0.0.1 localhost\n")
    mk(root, "etc/passwd", b"root:x:0:0::/root:/bin/sh\n", mtime_ns=1_600_000_000_000_000_000)
    mk(root, "usr/bin/ping", b"\x7fELF" + b"p" * 5000, mode=0o4755,
       xattrs={"security.capability": CAP_NET_RAW})
    mk(root, "usr/bin/tool", b"tool", mode=0o755, uid=1000, gid=100)
    os.link(root / "usr/bin/tool", root / "usr/bin/tool2")
    os.symlink("usr/bin", root / "bin")
    mk(root, "var/empty", b"")
    (root / "var/cache").mkdir()
    os.mknod(root / "var/null", 0o20666, os.makedev(1, 3))
    for d in ("etc", "usr/bin", "usr", "var/cache", "var"):
        os.utime(root / d, ns=(T0, T0))
    return root


# ----------------------------------------------------------------- directories

def test_directory_map(tmp_path):
    root = sample_tree(tmp_path / "t")
    m = DirectorySource(root).entries()
    assert m["/"].type == "dir"
    assert m["/etc/hosts"].type == "file" and m["/etc/hosts"].size == 20
    assert m["/usr/bin/ping"].mode == 0o4755
    assert m["/usr/bin/ping"].xattrs == {"security.capability": CAP_NET_RAW}
    assert m["/bin"].type == "symlink" and m["/bin"].linkname == "usr/bin"
    assert m["/var/null"].type == "char" and m["/var/null"].rdev == (1, 3)
    assert m["/usr/bin/tool"].link == m["/usr/bin/tool2"].link is not None
    assert m["/usr/bin/tool"].uid == 1000 and m["/usr/bin/tool"].gid == 100
    assert m["/etc/hosts"].mtime_ns == T0
    assert m["/etc/hosts"].digest is None           # content is read only when needed


def test_same_tree_in_every_container_compares_equal(tmp_path):
    """A directory, GNU tar (posix, gnu formats; plain, gzip, zstd), create_layer,
    an OCI layout (directory and tar) and a docker-archive of the same tree."""
    root = sample_tree(tmp_path / "t")
    forms = {
        "posix": gnu_tar(root, tmp_path / "p.tar"),
        "gnu": gnu_tar(root, tmp_path / "g.tar", fmt="gnu"),
        "gz": gnu_tar(root, tmp_path / "p.tar.gz", compress="gzip"),
        "zst": gnu_tar(root, tmp_path / "p.tar.zst", compress="zstd"),
    }
    created = tmp_path / "c.tar.gz"
    create_layer(root, created, compression="gzip")
    forms["create_layer"] = created
    forms["oci-dir"] = f"oci:{write_oci([created], tmp_path / 'oci')}"
    forms["oci-tar"] = write_oci([forms['zst']], tmp_path / "oci.tar", tar=True)
    forms["docker"] = f"docker-archive:{write_docker([created], tmp_path / 'd.tar')}"
    for name, f in forms.items():
        ign = ["xattr"] if name == "gnu" else []      # the gnu format has no xattrs
        assert changes(root, f, ignore=ign) == [], name
        assert changes(f, root, ignore=ign) == [], name
    assert changes(forms["oci-dir"], forms["docker"]) == []


def test_gnu_format_mtime_matches_within_the_second(tmp_path):
    root = tmp_path / "t"
    mk(root, "f", b"x", mtime_ns=1_700_000_000_900_000_000)
    gnu = gnu_tar(root, tmp_path / "g.tar", fmt="gnu")
    assert changes(root, gnu) == []
    os.utime(root / "f", ns=(1_700_000_001_100_000_000,) * 2)
    assert changes(gnu, root) == [("M", "/f", ["mtime"])]


# ----------------------------------------------------------------- stacks

def _stack(tmp_path):
    l0 = (TarBuilder().dir("etc").file("etc/a", b"a0").file("etc/b", b"b0")
          .dir("opt").dir("opt/sub").file("opt/sub/x", b"x").file("opt/y", b"y")
          .file("keep", b"k").hardlink("keep2", "keep")
          .write(tmp_path / "l0.tar"))
    # whiteouts before and after the entries they would hit in the same layer;
    # opaque opt: lower content hidden, this layer's own kept
    l1 = (TarBuilder().whiteout("etc/a").file("etc/b", b"b1", mode=0o600)
          .file("opt/new", b"n").opaque("opt").file("etc/c", b"c1").whiteout("etc/c")
          .write(tmp_path / "l1.tar"))
    l2 = (TarBuilder().file("etc/a", b"a2").symlink("opt/sub", "/etc").file("keep", b"K")
          .write(tmp_path / "l2.tar"))
    return [l0, l1, l2]


def test_effective_view_matches_applied_layers(tmp_path):
    layers = _stack(tmp_path)
    for upto in range(3):
        dest = tmp_path / f"applied{upto}"
        unpack_layers([str(p) for p in layers[:upto + 1]], dest)
        src = layer_stack(layers, upto=upto)
        assert changes(src, dest) == [], upto
        assert changes(dest, layer_stack(layers, upto=upto)) == [], upto


def test_effective_view_entries(tmp_path):
    m = layer_stack(_stack(tmp_path)).entries()
    assert "/etc/c" in m              # a whiteout acts on lower layers only
    assert "/opt/y" not in m and "/opt/new" in m
    assert m["/opt/sub"].type == "symlink"
    assert m["/etc/a"].layer == 2 and m["/etc/b"].layer == 1 and m["/keep2"].layer == 0
    # keep2 still has l0's content: the new /keep is another file
    assert m["/keep2"].digest == sha256(b"k") and m["/keep"].digest == sha256(b"K")


def test_raw_view_shows_whiteouts_and_opaque_dirs(tmp_path):
    layers = _stack(tmp_path)
    m = open_source(str(layers[1]), "raw").entries()
    assert m["/etc/a"].type == "whiteout"
    assert m["/opt"].opaque and m["/opt"].implicit
    assert m["/etc/b"].mode == 0o600
    # raw against the lower layer: whiteouts are deletions
    got = changes(open_source(f"{layers[0]}"), open_source(str(layers[1]), "raw"))
    kinds = {p: code for code, p, _ in got}
    assert kinds["/etc/a"] == "D"
    assert kinds["/etc/b"] == "M"
    assert kinds["/opt/new"] == "A"


def test_layer_selector_in_images(tmp_path):
    layers = _stack(tmp_path)
    oci = write_oci(layers, tmp_path / "oci")
    src = open_source(f"oci:{oci}#1")
    assert len(src.layers) == 2
    dest = tmp_path / "two"
    unpack_layers([str(p) for p in layers[:2]], dest)
    assert changes(src, dest) == []
    raw = open_source(f"oci:{oci}#-1", "raw").entries()
    assert set(raw) == {"/", "/etc", "/etc/a", "/opt", "/opt/sub", "/keep"}
    with pytest.raises(NotFound):
        open_source(f"oci:{oci}#3").entries()


def test_image_layers_carry_history(tmp_path):
    layers = _stack(tmp_path)
    hist = [{"created_by": "base"}, {"created_by": "ENV x=1", "empty_layer": True},
            {"created_by": "RUN edit"}, {"created_by": "RUN more"}]
    oci = write_oci(layers, tmp_path / "oci", history=hist)
    src = open_source(f"oci:{oci}")
    assert [l.created_by for l in src.layers] == ["base", "RUN edit", "RUN more"]
    by_path = {c.path: c for c in compare(f"{layers[0]}", src)}
    assert by_path["/etc/a"].layer.index == 2
    assert by_path["/etc/a"].layer.created_by == "RUN more"
    assert by_path["/opt/y"].kind == "deleted" and by_path["/opt/y"].layer.index == 1
    assert by_path["/etc/b"].layer.diff_id == src.layers[1].diff_id


def test_detection(tmp_path):
    layers = _stack(tmp_path)
    assert detect_file(str(layers[0])) == "layer"
    gz = gnu_tar(sample_tree(tmp_path / "t"), tmp_path / "l.tgz", compress="gzip")
    assert detect_file(str(gz)) == "layer"
    otar = write_oci(layers, tmp_path / "o.tar", tar=True)
    assert detect_file(str(otar)) == "image"
    ogz = tmp_path / "o.tar.gz"
    ogz.write_bytes(subprocess.run(["gzip", "-c", str(otar)], check=True,
                                   capture_output=True).stdout)
    assert detect_file(str(ogz)) == "image"
    assert changes(str(ogz), str(otar)) == []
    d = write_docker(layers, tmp_path / "d.tar")
    assert detect_file(str(d)) == "image"
    assert open_source(str(d)).kind == "docker-archive"
    assert open_source(str(write_oci(layers, tmp_path / "o"))).kind == "oci"
    assert isinstance(open_source(str(layers[0])), LayerStackSource)
    assert isinstance(open_source(f"dir:{tmp_path / 't'}"), DirectorySource)
    with pytest.raises(NotFound):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(NotFound):
        open_source("store:example.com/none:1", store_root=str(tmp_path / "store"))


def test_stored_images_and_layers(tmp_path):
    from layerfs.digest import chain_ids
    from layerfs.store import Store
    layers = _stack(tmp_path)
    hist = [{"created_by": "base"}, {"created_by": "RUN edit"}, {"created_by": "RUN more"}]
    oci = write_oci(layers, tmp_path / "oci", history=hist)
    root = str(tmp_path / "store")
    with Store(root, driver="vfs") as st:
        (loaded,) = st.load(str(oci))
        st.set_names(loaded.image.manifest_digest, ["example.com/test/img:1"])
        image_id = loaded.image.id
    applied = tmp_path / "applied"
    unpack_layers([str(p) for p in layers], applied)
    for ref in ("example.com/test/img:1", image_id, image_id.split(":")[1][:12]):
        src = open_source(f"store:{ref}", store_root=root)
        try:
            assert src.kind == "store"
            assert [l.created_by for l in src.layers] == ["base", "RUN edit", "RUN more"]
            assert changes(src, applied) == []
            assert changes(src, f"oci:{oci}") == []
        finally:
            src.close()
    # a layer by ChainID: that layer and the ones below it
    diff_ids = [l.diff_id for l in open_source(f"oci:{oci}").layers]
    mid = chain_ids(diff_ids)[1]
    two = tmp_path / "two"
    unpack_layers([str(p) for p in layers[:2]], two)
    src = open_source(f"store:{mid}", store_root=root)
    try:
        assert len(src.layers) == 2 and changes(src, two) == []
    finally:
        src.close()
    os.environ["LAYERFS_ROOT"] = root
    try:
        with open_source("store:example.com/test/img:1#0") as src:
            assert changes(src, layers[0]) == []
    finally:
        del os.environ["LAYERFS_ROOT"]


def test_overlay_upper_directory(tmp_path):
    up = tmp_path / "upper"
    mk(up, "etc/hosts", b"new")
    os.mknod(up / "etc/gone", 0o20000, os.makedev(0, 0))
    (up / "opt").mkdir()
    os.setxattr(up / "opt", "trusted.overlay.opaque", b"y")
    m = OverlayUpperSource(up).entries()
    assert m["/etc/gone"].type == "whiteout"
    assert m["/opt"].opaque
    assert "trusted.overlay.opaque" not in m["/opt"].xattrs
    eff = open_source(f"upper:{up}", "effective").entries()
    assert "/etc/gone" not in eff and not eff["/opt"].opaque
    # the same change as a layer tarball made by the overlay-aware writer
    layer = tmp_path / "l.tar"
    create_layer(up, layer, source_format="overlay")
    assert changes(open_source(f"upper:{up}"), open_source(str(layer), "raw"),
                   ignore=["mtime"]) == []


# ----------------------------------------------------------------- the C walk and file comparison

def _as_tuples(m):
    return {p: (e.type, e.mode, e.uid, e.gid, e.size, e.mtime_ns, e.linkname, e.rdev,
                e.xattrs, e.content, e.link is not None, e.inode, e.flags)
            for p, e in m.items()}


def test_native_walk_matches_the_python_walk(tmp_path):
    from layerfs.diff.sources import sort_key
    root = sample_tree(tmp_path / "t")
    for name in ("a-b", "a", "a.b", "é", "Z", "b\udcff"):      # byte order, not str order
        mk(root, f"order/{name}/x", b"1")
    os.setxattr(root / "etc/hosts", "user.big", b"v" * 3000)
    os.setxattr(root / "etc/hosts", "trusted.overlay.origin", b"o")
    src = DirectorySource(root)
    native = src._load_native()
    assert src.in_order
    assert list(native) == sorted(native, key=sort_key)
    assert _as_tuples(native) == _as_tuples(DirectorySource(root)._load_python())
    assert native["/etc/hosts"].xattrs == {"user.big": b"v" * 3000}   # overlay's own left out
    up = tmp_path / "upper"
    mk(up, "f", b"x")
    os.mknod(up / "wh", 0o20000, os.makedev(0, 0))
    (up / "o").mkdir()
    os.setxattr(up / "o", "trusted.overlay.opaque", b"y")
    for view in ("raw", "effective"):
        s1, s2 = OverlayUpperSource(up, view), OverlayUpperSource(up, view)
        assert _as_tuples(s1._load_native()) == _as_tuples(s2._load_python())


def test_files_equal(tmp_path):
    from layerfs import _native
    big = os.urandom(3 << 20)
    pairs = []
    for i, (x, y) in enumerate([(b"", b""), (b"abc", b"abc"), (b"abc", b"abd"),
                                (big, big), (big, big[:-1] + b"\0"), (big, big + b"!")]):
        a, b = tmp_path / f"a{i}", tmp_path / f"b{i}"
        a.write_bytes(x)
        b.write_bytes(y)
        pairs.append((bytes(a), bytes(b)))
    pairs.append((pairs[0][0], bytes(tmp_path / "missing")))
    assert _native.files_equal(pairs) == [True, True, False, True, False, False, False]
    assert _native.files_equal(pairs, threads=1) == _native.files_equal(pairs, threads=4)
    assert _native.files_equal([]) == []


# ----------------------------------------------------------------- fast paths against the slow ones

def _gnu_tar(src: Path, out: Path, fmt: str, gz: bool = False) -> Path:
    argv = ["tar", f"--format={fmt}", "--sort=name", "-C", str(src), "-cf", str(out), "."]
    if gz:
        argv.insert(1, "-z")
    subprocess.run(argv, check=True)
    return out


# v7 cannot hold names past 100 bytes: the long-name cases are not made in it
@pytest.mark.parametrize("fmt,case", [
    (f, c) for f in ("gnu", "pax", "ustar", "v7")
    for c in ("oci", "docker", "deep-oci", "late", "plain")
    if not (f == "v7" and c in ("deep-oci", "plain"))])
@pytest.mark.parametrize("gz", [False, True])
def test_detect_file_reads_headers_as_tarfile_does(tmp_path, fmt, case, gz):
    """detect_file reads the headers itself; tarfile's answer is the reference."""
    from layerfs.diff.sources import _tarfile_detect
    src = tmp_path / "src"
    hexd = "ab" * 32
    long_dir = "d" * 60 + "/" + "e" * 60             # past 100 bytes: long names
    if case == "oci":
        mk(src, "oci-layout", b"{}")
        mk(src, f"blobs/sha256/{hexd}", b"x")
    elif case == "docker":
        mk(src, f"{hexd}/layer.tar", b"x")
    elif case == "deep-oci":
        for i in range(20):
            mk(src, f"{long_dir}/f{i:03d}", b"y" * 700)
        mk(src, f"{long_dir}/zz/blobs/sha256/{hexd}", b"x")    # not at the top: a layer
        mk(src, "zzz/index.json", b"{}")                    # not at the top either
    elif case == "late":
        for i in range(230):
            mk(src, f"a/f{i:03d}", b"z" * (i % 3) * 400)
        mk(src, "index.json", b"{}")                        # member 232: past the budget
    else:
        for i in range(30):
            mk(src, f"{long_dir}/sub{i}/file", b"w" * 1000)
    out = _gnu_tar(src, tmp_path / ("t.tar.gz" if gz else "t.tar"), fmt, gz)
    assert detect_file(str(out)) == _tarfile_detect(str(out))
    assert detect_file(str(out), budget=5) == _tarfile_detect(str(out), budget=5)
    expect = "image" if case in ("oci", "docker") else "layer"
    assert detect_file(str(out)) == expect


def test_detect_file_odd_archives(tmp_path):
    from layerfs.diff.sources import _tarfile_detect
    cases = {"empty": b"", "zeros": bytes(10240), "junk": os.urandom(4096),
             "short": b"x" * 100}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("x" * 150 + "/index.json")
        tf.addfile(ti, io.BytesIO(b""))
        ti = tarfile.TarInfo("index.json")
        ti.pax_headers = {"comment": "global-less pax"}
        tf.addfile(ti, io.BytesIO(b""))
    cases["pax"] = buf.getvalue()
    cases["truncated"] = buf.getvalue()[:1000]
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        assert detect_file(str(p)) == _tarfile_detect(str(p)), name
    assert detect_file(str(tmp_path / "pax")) == "image"
