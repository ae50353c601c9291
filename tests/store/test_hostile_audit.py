"""Hostile images against the store: media types that lie, DiffIDs and ChainIDs
claimed for content that is not theirs, names that fail after the image is
stored, and loads, removals and prunes racing in real processes."""
from __future__ import annotations

import os

import pytest

from layerfs.errors import DigestMismatch
from layerfs.images import FormatError

from .conftest import build_image, entry, fill, write_index
from tests.images.conftest import LAYER_TYPES, OCI_MANIFEST, jbytes, put_blob


def _named(d: dict, name: str) -> dict:
    return dict(d, annotations={"io.containerd.image.name": name})


def _assert_consistent(s, manifests=()):
    assert {i.manifest_digest for i in s.images()} == set(manifests)
    assert os.listdir(os.path.join(s.root, "tmp")) == []
    assert {i.id for i in s.driver.layers()} == {l.id for l in s.layers()}
    rep = s.fsck()
    assert rep.ok, rep.problems


# --- media types that lie ------------------------------------------------------------------

def test_uncompressed_media_type_on_a_gzip_blob_is_refused(make_store, tmp_path):
    """The media type says "tar" but the blob is gzip: the store would take the
    blob for the layer tar its tar-split record rebuilds, not keep it, and the
    image could never be saved again."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": "1"})], compression="gzip")
    m = dict(img.manifest, layers=[dict(img.manifest["layers"][0], mediaType=LAYER_TYPES["none"])])
    write_index(layout, [_named({"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))},
                                "docker.io/library/lie:1")])
    s = make_store("vfs")
    with pytest.raises(FormatError, match="uncompressed"):
        s.load(layout)
    _assert_consistent(s)


# --- layers claimed by images they do not belong to ----------------------------------------

def _stack_and_impostor(tmp_path):
    """A two-layer image, and an image whose one uncompressed layer claims as its
    DiffID the two-layer stack's ChainID (so its own ChainID is that too)."""
    from layerfs.digest import chain_ids
    layout = str(tmp_path / "legit")
    os.makedirs(layout)
    legit = build_image(layout, [fill(str(tmp_path / "a"), {"a": "1"}),
                                 fill(str(tmp_path / "b"), {"b": "2"})])
    write_index(layout, [entry(legit, layout, full="docker.io/library/legit:1")])
    top = chain_ids(legit.diff_ids)[1]
    ev = str(tmp_path / "impostor")
    os.makedirs(os.path.join(ev, "blobs", "sha256"))
    blob = b"\0" * 1024
    with open(os.path.join(ev, "blobs", "sha256", top.split(":")[1]), "wb") as f:
        f.write(blob)
    cd = put_blob(ev, jbytes({"architecture": "amd64", "os": "linux",
                              "rootfs": {"type": "layers", "diff_ids": [top]}}))
    md = put_blob(ev, jbytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                              "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                         **cd},
                              "layers": [{"mediaType": LAYER_TYPES["none"], "digest": top,
                                          "size": len(blob)}]}))
    write_index(ev, [_named({"mediaType": OCI_MANIFEST, **md}, "docker.io/library/impostor:1")])
    return layout, legit, ev, md, cd


def test_bottom_layer_claiming_another_layers_chain_id_is_refused(make_store, tmp_path):
    """Reusing the stack's top layer as the impostor's bottom layer made the
    impostor depend on a layer its record does not list: removing the legit
    image then removed that layer from under it."""
    layout, legit, ev, _, _ = _stack_and_impostor(tmp_path)
    s = make_store("vfs")
    s.load(layout)
    with pytest.raises(DigestMismatch, match="parent"):
        s.load(ev)
    _assert_consistent(s, [legit.manifest_digest])
    s.rmi("legit:1")
    _assert_consistent(s)


def test_fsck_finds_an_image_whose_layers_are_not_its_chain(make_store, tmp_path):
    """An image record (written here by hand) whose one layer is the top of
    another image's stack: its blobs and ChainIDs agree with its config, but the
    layer record has another DiffID and a parent."""
    from layerfs.store import ImageLayer, ImageRecord
    layout, legit, ev, md, cd = _stack_and_impostor(tmp_path)
    s = make_store("vfs")
    (r,) = s.load(layout)
    for d in (md, cd):
        with open(os.path.join(ev, "blobs", "sha256", d["digest"].split(":")[1]), "rb") as f:
            s.put_blob_bytes(d["digest"], f.read())
    top = r.image.layers[1].chain_id
    bad = ImageRecord(md["digest"], OCI_MANIFEST, md["size"], cd["digest"],
                      "application/vnd.oci.image.config.v1+json", cd["size"],
                      [ImageLayer(top, top, top, LAYER_TYPES["none"], 1024)], None, None, 0.0)
    s.put_image(bad)
    problems = [str(p) for p in s.fsck().problems]
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"image {bad.id} ({md['digest']}): layer {top}")
    assert "DiffID" in problems[0] and "parent" in problems[0]


def _impostor_of(layout: str, tmp_path, victim, name: str, files: dict):
    """An image whose one gzip layer holds ``files`` while its config claims the
    DiffID of the victim's bottom layer."""
    img = build_image(layout, [fill(str(tmp_path / name), files)])
    cd = put_blob(layout, jbytes(dict(img.config, rootfs={"type": "layers",
                                                          "diff_ids": victim.diff_ids[:1]})))
    m = dict(img.manifest, config=dict(img.manifest["config"], **cd))
    return img, {"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))}


def test_new_blob_for_a_stored_layer_must_have_its_diff_id(make_store, tmp_path):
    """The layer exists, so the impostor's blob is not applied; it must still be
    checked to be that layer, or the store records (and saves) a blob that
    unpacks to other files under the victim's DiffID."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    good = build_image(layout, [fill(str(tmp_path / "good"), {"etc/passwd": "root:x:0:0\n"})])
    evil, evil_entry = _impostor_of(layout, tmp_path, good, "evil", {"etc/passwd": "evil::0:0\n"})
    write_index(layout, [entry(good, layout, full="docker.io/library/good:1")])
    s = make_store("vfs")
    s.load(layout)
    write_index(layout, [_named(evil_entry, "docker.io/library/evil:1")])
    with pytest.raises(DigestMismatch, match="DiffID"):
        s.load(layout)
    _assert_consistent(s, [good.manifest_digest])
    assert not s.has_blob(evil.layer_digests[0])


def test_stored_blob_of_another_layer_is_not_taken_for_a_stored_layer(make_store, tmp_path):
    """The blob is in the store already, as the layer it really is (image "real");
    the impostor names it for the victim's layer, which is in the store too."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    good = build_image(layout, [fill(str(tmp_path / "good"), {"etc/passwd": "root:x:0:0\n"})])
    evil, evil_entry = _impostor_of(layout, tmp_path, good, "evil", {"etc/passwd": "evil::0:0\n"})
    write_index(layout, [entry(good, layout, full="docker.io/library/good:1"),
                         entry(evil, layout, full="docker.io/library/real:1")])
    s = make_store("vfs")
    s.load(layout)
    write_index(layout, [_named(evil_entry, "docker.io/library/evil:1")])
    with pytest.raises(DigestMismatch, match="DiffID"):
        s.load(layout)
    _assert_consistent(s, [good.manifest_digest, evil.manifest_digest])


# --- failures after the image is stored -----------------------------------------------------

def test_invalid_name_fails_before_anything_is_stored(make_store, tmp_path):
    from layerfs.images import ReferenceError as BadReference
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    tree = fill(str(tmp_path / "t"), {"f": "1"})
    img = build_image(layout, [tree])
    write_index(layout, [entry(img, layout, full="docker.io/library/x:1")])
    s = make_store("vfs")
    with pytest.raises(BadReference):
        s.load(layout, names=["Not A Name"])
    _assert_consistent(s)
    assert s.layers() == [] and s.blob_digests() == []
    tarball = str(tmp_path / "rootfs.tar")
    import subprocess
    subprocess.run(["tar", "-C", tree, "-cf", tarball, "."], check=True)
    with pytest.raises(BadReference):
        s.import_rootfs(tarball, "Bad Name!")
    _assert_consistent(s)
    assert s.layers() == [] and s.blob_digests() == []


# --- real processes at once ---------------------------------------------------------------------

_WORKER = """
import sys
sys.path.insert(0, {repo!r})
from layerfs.store import Store
root, job = sys.argv[1], sys.argv[2]
args = sys.argv[3:]
with Store(root) as s:
    for _ in range(4):
        if job == "cycle":                    # load an image, then remove it
            s.load(args[0])
            s.rmi(args[1])
        elif job == "prune":
            s.prune(blobs=True, untagged=True)
        elif job == "keep":                   # load an image and keep it
            s.load(args[0])
        elif job == "tag":
            s.tag("base:1", "base:keep")
print("ok")
"""


def test_loads_removals_and_prunes_at_once_keep_what_is_named(make_store, images, tmp_path):
    """Processes load and remove images on one base, prune (blobs and untagged
    images too) and tag, all at once: afterwards the named images are whole,
    nothing is half-made, and fsck finds every digest right."""
    import subprocess
    import sys
    import layerfs
    from .conftest import expected_tree, trees_equal
    s = make_store("overlay")
    s.load(images["only"]["base"])
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(repo=os.path.dirname(os.path.dirname(layerfs.__file__))))
    jobs = [("cycle", images["only"]["app"], "app:1"),
            ("cycle", images["only"]["other"], "example.com/team/other:1"),
            ("prune",), ("keep", images["only"]["base"]), ("tag",), ("prune",)]
    procs = [subprocess.Popen([sys.executable, str(script), s.root, *job],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for job in jobs]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip() == "ok", err[-3000:]
    _assert_consistent(s, [images["base"].manifest_digest])
    assert s.names() == {"docker.io/library/base:1": images["base"].manifest_digest,
                         "docker.io/library/base:keep": images["base"].manifest_digest}
    path = s.mount("base:1")
    try:
        assert trees_equal(expected_tree(images, tmp_path, "base"), path) == []
    finally:
        s.unmount("base:1")
    for name in ("app", "other"):      # what the cycles removed loads again, whole
        (r,) = s.load(images["only"][name])
        assert r.image.manifest_digest == images[name].manifest_digest
    _assert_consistent(s, [images[n].manifest_digest for n in ("base", "app", "other")])


_DIE_DURING_RMI = """
import os, sys
sys.path.insert(0, {repo!r})
from layerfs.store import Store
import layerfs.store.store as store_mod
root, point, ref = sys.argv[1:4]
real_rename, real_unlink = os.rename, os.unlink
def die():
    os._exit(9)
if point == "layer-renamed":               # a layer's record moved to tmp/, driver layer kept
    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        if "/tmp/rm-" in str(dst):
            die()
    os.rename = rename
elif point == "driver-removed":            # the first layer gone from the driver
    orig = store_mod.Store._remove_driver_layer
    def remove(self, hexid):
        orig(self, hexid)
        die()
    store_mod.Store._remove_driver_layer = remove
elif point == "blob-removed":              # one blob unlinked, the rest not yet
    def unlink(path, *a, **kw):
        real_unlink(path, *a, **kw)
        if "/blobs/sha256/" in str(path):
            die()
    os.unlink = unlink
elif point == "record-dropped":            # the image record gone, its layers not yet
    orig_gc = store_mod.Store._gc
    store_mod.Store._gc = lambda self, *a: die()
with Store(root) as s:
    if ref == "prune":
        s.prune(blobs=True, untagged=True)
    else:
        s.rmi(ref)
print("finished")
"""


@pytest.mark.parametrize("point", ["record-dropped", "layer-renamed", "driver-removed",
                                   "blob-removed"])
@pytest.mark.parametrize("ref", ["app:1", "prune"])
def test_removal_killed_at_any_point_leaves_the_store_whole(make_store, images, tmp_path,
                                                            point, ref):
    import subprocess
    import sys
    import layerfs
    from layerfs.store import Store
    from .conftest import expected_tree, trees_equal
    s = make_store("overlay")
    s.load(images["layout"])
    if ref == "prune":                        # an unnamed image for prune -a to remove
        s.rmi("app:1")
        s.load(images["only"]["app"], names=[])
    script = tmp_path / "die.py"
    script.write_text(_DIE_DURING_RMI.format(
        repo=os.path.dirname(os.path.dirname(layerfs.__file__))))
    p = subprocess.run([sys.executable, str(script), s.root, point, ref],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stdout + p.stderr
    with Store(s.root) as again:              # opened unused: sweeps
        kept = {i.manifest_digest for i in again.images()}
        assert {images["base"].manifest_digest, images["other"].manifest_digest} <= kept
        _assert_consistent(again, kept)
        again.prune()
        _assert_consistent(again, kept)
        (r,) = again.load(images["only"]["app"])
        _assert_consistent(again, kept | {images["app"].manifest_digest})
        for name in ("base", "app", "other"):
            img = again.image(images[name].manifest_digest)
            path = again.mount(img.manifest_digest)
            try:
                assert trees_equal(expected_tree(images, tmp_path, name), path) == []
            finally:
                again.unmount(img.manifest_digest)


# --- names --------------------------------------------------------------------------------------

def test_names_with_a_digest_are_not_given(make_store, tmp_path):
    """A name that carries a digest says what the image's digest is; a source can
    say anything.  Such a name was stored, shown as the image's repository, and
    could neither be resolved nor removed."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": "1"})])
    other = "sha256:" + "ab" * 32
    write_index(layout, [entry(img, layout, full=f"docker.io/library/alpine@{other}"),
                         entry(img, layout, full="docker.io/library/alpine:3")])
    s = make_store("vfs")
    with pytest.raises(ValueError, match="digest"):
        s.load(layout, names=[f"alpine@{img.manifest_digest}"])
    _assert_consistent(s)
    (r,) = s.load(layout)
    assert r.names == ["docker.io/library/alpine:3"]
    assert s.names() == {"docker.io/library/alpine:3": img.manifest_digest}


# --- files written without fsync ---------------------------------------------------------------

def test_unsynced_state_files_left_empty_by_a_crash(make_store, tmp_path):
    """usage.json (a cache) and mounts/*.json are renamed into place without
    fsync: after a power cut they can be empty.  Then df, unmount and rmi must
    still work (the cache recomputed; a mount count that cannot be read is no
    mount: the crash took the mounts with it)."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": "1"})])
    write_index(layout, [entry(img, layout, full="docker.io/library/x:1")])
    s = make_store("vfs")
    (r,) = s.load(layout)
    s.df()
    s.mount("x:1")
    damaged = [os.path.join(s.layer_dir(r.image.layers[0].chain_id), "usage.json")]
    damaged += [os.path.join(s.root, "mounts", n) for n in os.listdir(os.path.join(s.root, "mounts"))
                if n.endswith(".json")]
    assert len(damaged) == 2
    for p in damaged:
        open(p, "w").close()
    assert s.df()["totals"]["layers_size"] > 0
    s.driver.cleanup()                        # the mounts a power cut takes away
    s.rmi("x:1")
    _assert_consistent(s)


# --- layer stacks ---------------------------------------------------------------------------------

def test_image_deeper_than_the_layer_limit_is_refused_before_storing(make_store, tmp_path):
    """One 64 KiB layer blob listed 200 times: 200 stacked layers, which vfs
    stores as 200 full copies (a manifest of a few KiB asks for 12.8 MB, and
    thousands of layers fit in one manifest).  The store refuses stacks deeper
    than 125 layers, the depth docker's layer store allows."""
    from layerfs.store.load import MAX_LAYERS
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": os.urandom(64 << 10)})])
    n = 200
    cfg = dict(img.config, rootfs={"type": "layers", "diff_ids": img.diff_ids * n},
               history=[])
    cd = put_blob(layout, jbytes(cfg))
    m = dict(img.manifest, config=dict(img.manifest["config"], **cd),
             layers=img.manifest["layers"] * n)
    write_index(layout, [_named({"mediaType": OCI_MANIFEST, **put_blob(layout, jbytes(m))},
                                "docker.io/library/deep:1")])
    s = make_store("vfs")
    with pytest.raises(ValueError, match=f"{n} layers.*{MAX_LAYERS}"):
        s.load(layout)
    _assert_consistent(s)
    assert s.layers() == []


# --- damaged records ------------------------------------------------------------------------------

def test_fsck_reports_damaged_records_instead_of_failing(make_store, tmp_path):
    """A damaged image record, layer record or repositories.json is what fsck is
    for: it reports each (naming the file) and goes on checking the rest; other
    commands fail naming the file."""
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    a = build_image(layout, [fill(str(tmp_path / "a"), {"a": "1"})])
    b = build_image(layout, [fill(str(tmp_path / "b"), {"b": "2"})])
    write_index(layout, [entry(a, layout, full="docker.io/library/a:1"),
                         entry(b, layout, full="docker.io/library/b:1")])
    s = make_store("vfs")
    s.load(layout)
    record = os.path.join(s.root, "images", a.manifest_digest.split(":")[1] + ".json")
    with open(record, "w") as f:
        f.write('{"manifest_digest": ')
    rep = s.fsck()
    text = "\n".join(map(str, rep.problems))
    assert record in text
    assert rep.images == 1                     # b was checked
    with pytest.raises(ValueError, match=record):
        s.images()
    with open(os.path.join(s.root, "repositories.json"), "w") as f:
        f.write("{")
    text = "\n".join(map(str, s.fsck().problems))
    assert "repositories.json" in text and record in text


# --- mounts the store does not count ---------------------------------------------------------------

def test_removal_of_an_image_whose_layer_is_mounted_uncounted(make_store, images, tmp_path):
    """A `mount` killed between the driver's mount and writing the store's count
    leaves the top layer mounted, uncounted (done here by mounting through the
    driver).  rmi then renamed the layer's record away, failed at the driver
    (mounted), and every later Store() failed in its sweep: the store was
    unusable until unmounted by hand.  Now the mounted layers (and those under
    them) stay, unreferenced, until a prune after the unmount."""
    from layerfs.store import Store
    from layerfs.store.records import hex_of
    s = make_store("overlay")
    s.load(images["only"]["app"])
    app = s.image(images["app"].manifest_digest)
    top = hex_of(app.top)
    s.driver.mount(top)
    s.rmi("app:1")
    assert s.images() == []
    assert {l.chain_id for l in s.layers()} == set(app.chain_ids)
    with Store(s.root) as again:
        _assert_consistent(again)
        again.prune()
        assert len(again.layers()) == 3
        again.driver.unmount(top)
        again.prune()
        assert again.layers() == [] and again.driver.layers() == []
        _assert_consistent(again)
