"""The store on every driver: layers shared by ChainID (on disk, not only in the
listing), names, reference counting, mounts, saves with the original digests,
blobs pruned and regenerated, fsck."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile

import pytest

from layerfs.errors import NotFound, PreconditionFailed
from layerfs.images import open_image_source
from layerfs.store import Store

from .conftest import expected_tree, run, store_usage, trees_equal


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _listing(root: str):
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not os.path.ismount(os.path.join(d, x))]
        for n in files:
            p = os.path.join(d, n)
            if n in ("usage.json",) or n.endswith(".lock") or "/locks/" in p:
                continue
            out.append(os.path.relpath(p, root))
    return sorted(out)


# --- sharing and reference counts ------------------------------------------------------------

def test_layers_shared_on_disk(make_store, driver_name, images, tmp_path):
    s = make_store(driver_name)
    (base,) = s.load(images["only"]["base"])
    assert base.new_layers == 1 and base.names == ["docker.io/library/base:1"]
    after_base = store_usage(s.root)

    # the same image again: nothing new stored, not even a file
    files = _listing(s.root)
    (again,) = s.load(images["only"]["base"])
    assert again.stored_nothing and again.reused_layers == 1
    assert _listing(s.root) == files
    assert store_usage(s.root) == after_base

    # an image on the same base: only its own layers are stored
    (app,) = s.load(images["only"]["app"])
    assert (app.new_layers, app.reused_layers) == (2, 1)
    grew = store_usage(s.root) - after_base
    alone = make_store(driver_name)
    alone.load(images["only"]["app"])
    app_alone = store_usage(alone.root)
    base_layer = s.layer_usage(images["base"].diff_ids[0])
    assert base_layer > 4 << 20
    if driver_name == "vfs":
        # vfs copies the parent into every layer: the shared part is the base layer itself
        assert grew < app_alone - base_layer + (1 << 20)
    else:
        assert grew < 1 << 20, f"the second image added {grew} bytes"
        assert app_alone > 4 << 20
    assert len(s.layers()) == 3
    assert {l.chain_id for l in s.layers()} == set(images["app"].diff_ids[:1]) | \
        set(s.image(images["app"].manifest_digest).chain_ids)

    d = {i["names"][0]: i for i in s.df()["images"]}
    app_row, base_row = d["docker.io/library/app:1"], d["docker.io/library/base:1"]
    assert base_row["shared_size"] == base_row["size"] == base_layer
    assert base_row["unique_size"] == 0
    assert app_row["shared_size"] == base_layer
    assert app_row["unique_size"] == app_row["size"] - base_layer > 0


def test_rmi_removes_only_what_nothing_else_uses(make_store, driver_name, images):
    s = make_store(driver_name)
    s.load(images["layout"])
    assert len(s.images()) == 3
    base_chain = images["base"].diff_ids[0]
    app = s.image(images["app"].manifest_digest)
    before = store_usage(s.root)
    r = s.rmi("app:1")
    assert r.untagged == ["docker.io/library/app:1"]
    assert set(r.deleted_layers) == set(app.chain_ids[1:])
    assert s.layer(base_chain) is not None
    for c in app.chain_ids[1:]:
        assert s.layer(c) is None
        assert not s.driver.exists(c.split(":")[1])
    for l in app.layers[1:]:
        assert not s.has_blob(l.digest)
    assert s.has_blob(app.layers[0].digest)
    assert not s.has_blob(app.manifest_digest)
    assert store_usage(s.root) < before
    s.rmi("base:1")
    assert s.layer(base_chain) is not None          # "other" still uses it
    s.rmi("example.com/team/other:1")
    assert s.layers() == [] and s.images() == [] and s.names() == {}
    assert s.driver.layers() == []
    assert s.blob_digests() == []
    assert s.fsck().ok


def test_prune_removes_unreferenced_and_leftovers(make_store, images):
    s = make_store("vfs")
    s.load(images["only"]["other"])
    # an unreferenced layer: a record whose image went away without a gc (as a crash
    # between layer and image record leaves it), and a stray blob
    with open(s.blob_path("sha256:" + hashlib.sha256(b"stray").hexdigest()), "wb") as f:
        f.write(b"stray")
    img = s.image(images["other"].manifest_digest)
    os.unlink(os.path.join(s.root, "images", img.key + ".json"))
    r = s.prune()
    assert set(r.deleted_layers) == set(img.chain_ids)
    assert len(r.deleted_blobs) == 1 + len(img.blob_digests())
    assert s.layers() == [] and s.driver.layers() == [] and s.blob_digests() == []


def test_names_tags_and_references(make_store, images):
    s = make_store("vfs")
    s.load(images["layout"])
    app = images["app"]
    cid = app.config_digest
    for ref in ("app:1", "docker.io/library/app:1", "library/app:1", "index.docker.io/app:1",
                cid, cid.split(":")[1], cid.split(":")[1][:12],
                f"app@{app.manifest_digest}", app.manifest_digest):
        assert s.resolve(ref).image.manifest_digest == app.manifest_digest, ref
    with pytest.raises(NotFound):
        s.resolve("app")                 # app:latest does not exist
    with pytest.raises(ValueError):
        s.resolve("")
    assert s.tag("app:1", "example.com:5000/x/y") == "example.com:5000/x/y:latest"
    assert s.resolve("example.com:5000/x/y").image.manifest_digest == app.manifest_digest
    # a tag moves: base:1 now names the app image
    s.tag("app:1", "base:1")
    assert s.resolve("base:1").image.manifest_digest == app.manifest_digest
    names = s.names_of(app.manifest_digest)
    assert names == sorted(["docker.io/library/app:1", "docker.io/library/base:1",
                            "example.com:5000/x/y:latest"])
    # removing one of several names only untags; by id it is refused unless forced
    r = s.rmi("example.com:5000/x/y")
    assert r.untagged == ["example.com:5000/x/y:latest"] and not r.deleted_images
    with pytest.raises(PreconditionFailed):
        s.rmi(cid[:19])
    r = s.rmi(cid[:19], force=True)
    assert r.deleted_images == [cid] and len(r.untagged) == 2
    # the base image lost its name: it stays, untagged, until prune --untagged
    assert s.image(images["base"].manifest_digest) is not None
    r = s.prune(untagged=True)
    assert r.deleted_images == [images["base"].config_digest]


# --- mounts ----------------------------------------------------------------------------------

def test_mount_gives_the_image_tree(make_store, driver_name, images, tmp_path):
    s = make_store(driver_name)
    s.load(images["layout"])
    want = expected_tree(images, tmp_path, "app")
    path = s.mount("app:1")
    try:
        assert trees_equal(want, path) == []
        assert not os.path.exists(os.path.join(path, "etc/gone"))
        assert os.listdir(os.path.join(path, "var/cache/x")) == ["z"]
        with pytest.raises(OSError):
            open(os.path.join(path, "etc/new"), "w")          # read-only view
        # in use: rmi refused
        with pytest.raises(PreconditionFailed):
            s.rmi("app:1")
        assert s.mount("app:1") == path                       # counted
        assert s.unmount("app:1") == 1
        assert s.mounted_path(s.resolve("app:1").image) == path
    finally:
        s.unmount("app:1", all_mounts=True)
    assert s.mount_count(s.resolve("app:1").image) == 0
    r = s.rmi("app:1")
    assert r.deleted_images


def test_rmi_force_unmounts(make_store, images):
    s = make_store("overlay")
    s.load(images["only"]["app"])
    path = s.mount("app:1")
    assert os.path.ismount(path)
    s.rmi("app:1", force=True)
    assert not os.path.ismount(path)
    assert s.images() == [] and s.driver.layers() == []


# --- saving ----------------------------------------------------------------------------------

def test_save_keeps_digests(make_store, images, tmp_path):
    s = make_store("overlay")
    s.load(images["layout"])
    app = images["app"]
    out = tmp_path / "app-oci.tar"
    res = s.save(["app:1"], out, "oci")
    assert not res.manifest_changed
    with open_image_source(out) as src:
        (img,) = src.images()
        assert img.manifest_digest == app.manifest_digest
        assert [l.digest for l in img.layers] == app.layer_digests
        assert img.names == ["docker.io/library/app:1"]
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{out}:app:1").stdout) \
        if False else json.loads(run("skopeo", "inspect", f"oci-archive:{out}").stdout)
    assert info["Digest"] == app.manifest_digest and info["Layers"] == app.layer_digests
    # oci-dir, extended by a second save
    d = tmp_path / "dir"
    s.save(["app:1"], d, "oci-dir")
    s.save(["base:1"], d, "oci-dir")
    with open_image_source(d) as src:
        assert sorted(i.manifest_digest for i in src.images()) == \
            sorted([app.manifest_digest, images["base"].manifest_digest])
    # docker-archive: uncompressed layers whose digests are the DiffIDs
    da = tmp_path / "app-docker.tar"
    s.save([app.config_digest], da, "docker-archive")
    with tarfile.open(da) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == ["app:1"]
        for member, diff_id in zip(manifest[0]["Layers"], app.diff_ids):
            data = tf.extractfile(member).read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == diff_id


def test_pruned_blobs_regenerated(make_store, driver_name, images, tmp_path):
    s = make_store(driver_name)
    s.load(images["only"]["app"])
    app = images["app"]
    before = store_usage(s.root)
    d = s.df()["totals"]
    assert d["blobs_regenerable_size"] > 0
    # the plain layer's blob is never kept: the record regenerates it exactly
    assert not s.has_blob(app.layer_digests[2])
    r = s.prune(blobs=True)
    assert set(r.deleted_blobs) == set(app.layer_digests[:2])
    assert store_usage(s.root) < before - (3 << 20)     # the 4 MiB random layer blob
    assert s.fsck().ok
    # docker-archive: exact
    da = tmp_path / "app.tar"
    s.save(["app:1"], da, "docker-archive")
    with tarfile.open(da) as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
        for member, diff_id in zip(manifest[0]["Layers"], app.diff_ids):
            data = tf.extractfile(member).read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == diff_id
    # OCI: refused without --allow-recompress, then a new manifest, reported
    with pytest.raises(PreconditionFailed, match="allow-recompress"):
        s.save(["app:1"], tmp_path / "x.tar", "oci")
    assert not (tmp_path / "x.tar").exists()
    # app's layers were compressed by layerfs (create_layer's levels), and the
    # recompression gives those bytes again: the save is exact after all
    res = s.save(["app:1"], tmp_path / "y", "oci-dir", allow_recompress=True)
    assert not res.manifest_changed
    (saved,) = res.images
    assert saved.recompressed_layers == 2 and saved.regenerated_layers == 1
    with open_image_source(tmp_path / "y") as src:
        (img,) = src.images()
        assert img.manifest_digest == saved.written_manifest_digest == app.manifest_digest
        assert img.diff_ids == app.diff_ids and img.config_digest == app.config_digest
        assert [l.digest for l in img.layers] == app.layer_digests
        from layerfs.archive import unpack_layers
        unpack_layers([src.open_blob(l.digest, verify=True) for l in img.layers],
                      str(tmp_path / "rootfs"),
                      expected=[(l.digest, d) for l, d in zip(img.layers, img.diff_ids)])
    assert trees_equal(expected_tree(images, tmp_path, "app"), str(tmp_path / "rootfs")) == []
    # skopeo verifies every blob while copying (this umoci cannot read zstd layers)
    run("skopeo", "--insecure-policy", "copy", f"oci:{tmp_path / 'y'}:1",
        f"oci:{tmp_path / 'copied'}:c")
    # other's top layer was compressed by GNU gzip -9: compressed again, it gets
    # a new digest, and the image a new manifest, reported
    other = images["other"]
    s.load(images["only"]["other"])
    s.prune(blobs=True)
    res = s.save(["example.com/team/other:1"], tmp_path / "o", "oci-dir",
                 allow_recompress=True)
    assert res.manifest_changed
    (saved,) = res.images
    assert saved.recompressed_layers == 2
    with open_image_source(tmp_path / "o") as src:
        (img,) = src.images()
        assert img.manifest_digest == saved.written_manifest_digest != other.manifest_digest
        assert img.diff_ids == other.diff_ids and img.config_digest == other.config_digest
        assert img.layers[0].digest == other.layer_digests[0]
        assert img.layers[1].digest != other.layer_digests[1]
        with src.open_blob(img.layers[1].digest, verify=True) as f:
            tar = gzip.decompress(f.read())
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == other.diff_ids[1]
    run("skopeo", "--insecure-policy", "copy", f"oci:{tmp_path / 'o'}:1",
        f"oci:{tmp_path / 'copied-o'}:c")
    # loading the original again brings the blobs back: exact again
    (again,) = s.load(images["only"]["app"])
    assert again.new_layers == 0 and again.blobs_written == 2
    res = s.save(["app:1"], tmp_path / "z.tar", "oci")
    assert not res.manifest_changed


# --- import ----------------------------------------------------------------------------------

@pytest.mark.parametrize("comp", ["none", "gzip"])
def test_import_rootfs(make_store, images, tmp_path, comp):
    from layerfs.archive import create_layer
    s = make_store("overlay")
    tree = images["tmp"] / "t0"
    tarball = tmp_path / f"rootfs.tar{'.gz' if comp == 'gzip' else ''}"
    cr = create_layer(tree, tarball, compression=comp)
    r = s.import_rootfs(tarball, "imported:v1", message="from a test")
    assert r.names == ["docker.io/library/imported:v1"] and r.new_layers == 1
    cfg = json.loads(s.read_blob(r.image.config_digest))
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": [cr.diff_id]}
    assert len(cfg["history"]) == 1 and cfg["history"][0]["comment"] == "from a test"
    assert cfg["os"] == "linux" and cfg["architecture"]
    assert r.image.layers[0].digest == cr.digest
    assert s.has_blob(cr.digest) == (comp == "gzip")
    path = s.mount("imported:v1")
    try:
        assert trees_equal(str(tree), path) == [] or \
            all(d.startswith("modified .") or d.startswith("modified usr") or
                d.startswith("modified etc") or d.startswith("modified var")
                for d in trees_equal(str(tree), path))
        assert open(os.path.join(path, "usr/lib/big.bin"), "rb").read() == \
            open(tree / "usr/lib/big.bin", "rb").read()
    finally:
        s.unmount("imported:v1")
    out = tmp_path / "imp.tar"
    s.save(["imported:v1"], out, "oci")
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{out}").stdout)
    assert info["Layers"] == [cr.digest] and info["Digest"] == r.image.manifest_digest
    # the same tarball again: the layer is reused
    r2 = s.import_rootfs(tarball, "imported:v2")
    assert r2.new_layers == 0 and r2.reused_layers == 1


# --- formats ---------------------------------------------------------------------------------

def test_load_docker_archive_and_platform_index(make_store, images, tmp_path):
    from layerfs.images import ImageToWrite, write_docker_archive
    s = make_store("vfs")
    da = tmp_path / "in.tar"
    with open_image_source(images["only"]["app"]) as src:
        (img,) = src.images()
        w = ImageToWrite.from_source(img, src)
        w.names = ["team/app:7"]
        write_docker_archive([w], da)
    (r,) = s.load(da)
    assert r.names == ["docker.io/team/app:7"] and r.new_layers == 3
    assert r.image.config_digest == images["app"].config_digest
    # docker-archive layers are plain tars: nothing kept but the records
    assert all(not s.has_blob(l.digest) for l in r.image.layers)
    # an index: the platform chooses
    from .conftest import build_image, entry, fill, write_index
    from tests.images.conftest import jbytes, put_blob
    layout = str(tmp_path / "multi")
    os.makedirs(layout)
    amd = build_image(layout, [fill(str(tmp_path / "a"), {"arch": "amd64\n"})], arch="amd64")
    arm = build_image(layout, [fill(str(tmp_path / "b"), {"arch": "arm64\n"})], arch="arm64",
                      variant="v8")
    idx = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType":
                                   "application/vnd.oci.image.index.v1+json", "manifests": [
        entry(amd, layout, platform={"architecture": "amd64", "os": "linux"}),
        entry(arm, layout, platform={"architecture": "arm64", "os": "linux", "variant": "v8"})]}))
    write_index(layout, [{"mediaType": "application/vnd.oci.image.index.v1+json", **idx,
                          "annotations": {"org.opencontainers.image.ref.name": "multi"}}])
    (r,) = s.load(layout, platform="linux/arm64/v8", base_name="example.com/multi")
    assert r.image.manifest_digest == arm.manifest_digest
    assert r.names == ["example.com/multi:multi"] and r.image.platform == "linux/arm64/v8"
    (r,) = s.load(layout, platform="linux/amd64")
    assert r.image.manifest_digest == amd.manifest_digest and r.names == [] and r.tags == ["multi"]


def test_corrupt_blob_refused(make_store, images, tmp_path):
    import shutil
    s = make_store("vfs")
    bad = tmp_path / "bad"
    shutil.copytree(images["only"]["app"], bad)
    blob = bad / "blobs/sha256" / images["app"].layer_digests[1].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(OSError):
        s.load(bad)
    # the good bottom layer may stay (complete); nothing half-made is visible
    assert s.images() == []
    for l in s.layers():
        assert l.chain_id == images["app"].diff_ids[0]
    assert os.listdir(os.path.join(s.root, "tmp")) == []
    assert {i.id for i in s.driver.layers()} == {l.id for l in s.layers()}
    rep = s.fsck()
    assert rep.ok, rep.problems


# --- fsck ------------------------------------------------------------------------------------

def test_fsck_finds_damage(make_store, driver_name, images):
    s = make_store(driver_name)
    s.load(images["only"]["app"])
    assert s.fsck().ok
    app = s.image(images["app"].manifest_digest)
    # a flipped byte in a blob
    p = s.blob_path(app.layers[0].digest)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    # a changed file in a layer
    files = s.layer_files(app.layers[1].chain_id)
    with open(os.path.join(files, "app/main.py"), "a") as f:
        f.write("# changed\n")
    # a name pointing nowhere
    names = s.names()
    names["docker.io/library/ghost:1"] = "sha256:" + "0" * 64
    s._write_names(names)
    rep = s.fsck()
    text = "\n".join(map(str, rep.problems))
    assert f"blob {app.layers[0].digest}: content has digest" in text
    assert f"layer {app.layers[1].chain_id}: the unpacked files no longer rebuild" in text
    assert "main.py" in text
    assert "name docker.io/library/ghost:1" in text
    assert len(rep.problems) == 3


def test_store_remembers_its_driver(make_store, tmp_path):
    s = make_store("vfs")
    with pytest.raises(PreconditionFailed, match="vfs"):
        Store(s.root, "overlay")
    with Store(s.root) as again:
        assert again.driver_name == "vfs"
