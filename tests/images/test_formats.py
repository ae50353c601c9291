"""Reading and writing image formats with hand-made layouts and archives:
names, digests, DiffIDs, platform choice, in-place tar reading, verification,
staged writes, and the errors corrupt inputs give."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from layerfs.archive import apply_layer, create_layer, unpack_layers
from layerfs.digest import layer_digests
from layerfs.errors import DigestMismatch, NotFound
from layerfs.images import (Descriptor, FormatError, ImageToWrite, LayerToWrite,
                            NoMatchingPlatform, Platform, current_platform, layer_compression,
                            open_image_source, parse_platform, write_docker_archive,
                            write_oci_layout)
from layerfs.images import manifest as mf
from layerfs.images.sources import parse_source

from .conftest import (OCI_INDEX, OCI_MANIFEST, build_image, entry, fill, jbytes, put_blob,
                       run, trees_equal, write_index)


def blob_file(layout, digest):
    return os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])


def rewrite_json(path, change):
    with open(path) as f:
        doc = json.load(f)
    change(doc)
    with open(path, "w") as f:
        json.dump(doc, f)


# --- platforms, media types, descriptors ----------------------------------------------------

def test_parse_platform_normalises():
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert parse_platform("linux/aarch64") == Platform("linux", "arm64")
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64")
    assert parse_platform("linux/armv7l") == Platform("linux", "arm", "v7")
    assert parse_platform("arm64") == Platform("linux", "arm64")
    assert str(parse_platform("linux/arm/v6")) == "linux/arm/v6"
    for bad in ("", "linux//v7", "a/b/c/d"):
        with pytest.raises(ValueError):
            parse_platform(bad)


def test_current_platform_follows_uname():
    machine = os.uname().machine
    expected = {"x86_64": ("amd64", None), "aarch64": ("arm64", "v8"),
                "armv7l": ("arm", "v7")}.get(machine)
    p = current_platform()
    assert p.os == "linux"
    if expected:
        assert (p.architecture, p.variant) == expected
    assert p.matches(p)


def test_platform_matching():
    arm64 = parse_platform("linux/arm64/v8")
    assert arm64.matches(Platform("linux", "arm64"))            # no variant = v8
    assert Platform("linux", "arm64").matches(arm64)
    arm7 = parse_platform("linux/arm/v7")
    assert arm7.matches(parse_platform("linux/arm/v6"))
    assert arm7.match_rank(parse_platform("linux/arm/v7")) < \
        arm7.match_rank(parse_platform("linux/arm/v6"))
    assert not parse_platform("linux/arm/v6").matches(arm7)
    assert not parse_platform("linux/amd64").matches(arm64)
    assert not parse_platform("linux/amd64").matches(Platform("windows", "amd64"))


def test_layer_compression_of_media_types():
    assert layer_compression(mf.OCI_LAYER) == "none"
    assert layer_compression(mf.OCI_LAYER_GZIP) == "gzip"
    assert layer_compression(mf.OCI_LAYER_ZSTD) == "zstd"
    assert layer_compression(mf.OCI_LAYER_NONDISTRIBUTABLE_GZIP) == "gzip"
    assert layer_compression(mf.DOCKER_LAYER_GZIP) == "gzip"
    assert layer_compression(mf.DOCKER_FOREIGN_LAYER) == "gzip"
    with pytest.raises(ValueError):
        layer_compression(mf.OCI_CONFIG)


def test_descriptor_json_round_trip():
    d = Descriptor(mf.OCI_MANIFEST, "sha256:" + "a" * 64, 12, {"k": "v"},
                   Platform("linux", "arm", "v7"), ("https://example.invalid/x",))
    j = d.to_json()
    assert j["platform"] == {"architecture": "arm", "os": "linux", "variant": "v7"}
    assert Descriptor.from_json(json.loads(json.dumps(j))) == d
    with pytest.raises(FormatError) as e:
        Descriptor.from_json({"mediaType": "x", "digest": "md5:abc", "size": 1},
                             mf.Where("index.json"), "manifests[3]")
    assert e.value.field == "manifests[3].digest" and e.value.filename == "index.json"
    with pytest.raises(FormatError, match="size"):
        Descriptor.from_json({"mediaType": "x", "digest": "sha256:" + "a" * 64, "size": -1})


# --- reading OCI layouts ------------------------------------------------------------------------

def test_layout_images_names_and_layers(simple_layout):
    layout, app, base = simple_layout["layout"], simple_layout["app"], simple_layout["base"]
    with open_image_source(layout) as src:
        assert src.format == "oci-layout"
        imgs = {i.manifest_digest: i for i in src.images()}
    assert set(imgs) == {app.manifest_digest, base.manifest_digest}
    a = imgs[app.manifest_digest]
    assert a.names == ["registry.example:5000/team/app:1.0"]
    assert a.tags == ["1.0", "latest"]
    assert [l.digest for l in a.layers] == app.layer_digests
    assert [l.media_type for l in a.layers] == [mf.OCI_LAYER_GZIP, mf.OCI_LAYER_ZSTD,
                                                mf.OCI_LAYER]
    assert a.diff_ids == app.diff_ids
    assert a.config == app.config and a.config_digest == app.config_digest
    assert a.history == app.config["history"]
    assert a.platform == Platform("linux", "amd64")
    with open(blob_file(layout, app.manifest_digest), "rb") as f:
        assert a.manifest_bytes == f.read()
    assert hashlib.sha256(a.config_bytes).hexdigest() == app.config_digest.split(":")[1]
    assert imgs[base.manifest_digest].names == ["docker.io/library/base:3"]


def test_base_name_turns_bare_tags_into_names(simple_layout):
    with open_image_source(simple_layout["layout"], base_name="example.com/app") as src:
        a = [i for i in src.images() if i.manifest_digest == simple_layout["app"].manifest_digest][0]
    assert a.names == ["registry.example:5000/team/app:1.0", "example.com/app:latest"]


def test_a_bad_base_name_is_refused_before_the_source_is_read(simple_layout):
    from layerfs.images import ReferenceError
    with pytest.raises(ReferenceError):
        open_image_source(simple_layout["layout"], base_name="Not/Valid")


def test_transport_selects_one_image(simple_layout):
    layout = simple_layout["layout"]
    with open_image_source(f"oci:{layout}:latest") as src:
        (img,) = src.images()
        assert img.manifest_digest == simple_layout["app"].manifest_digest
        assert img.tags == ["latest"]
    with open_image_source(f"oci:{layout}:base:3") as src:
        (img,) = src.images()
        assert img.manifest_digest == simple_layout["base"].manifest_digest
    with pytest.raises(NotFound, match="no image named 'nope'") as e:
        open_image_source(f"oci:{layout}:nope").images()
    assert "latest" in str(e.value)


def test_parse_source_forms(tmp_path):
    assert parse_source("oci:/x/y:tag") == ("oci", "/x/y", "tag")
    assert parse_source("oci-archive:/x/y.tar") == ("oci-archive", "/x/y.tar", None)
    assert parse_source("docker-archive:/a.tar:team/app:1") == ("docker-archive", "/a.tar",
                                                                "team/app:1")
    odd = tmp_path / "oci:dir"
    odd.mkdir()
    assert parse_source(str(odd)) == (None, str(odd), None)


def test_blobs_read_from_directory_and_verified(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    with open_image_source(layout) as src:
        img = [i for i in src.images() if i.manifest_digest == app.manifest_digest][0]
        for desc, diff_id in zip(img.layers, img.diff_ids):
            path = src.blob_path(desc.digest)
            assert path == os.path.realpath(blob_file(layout, desc.digest))
            with src.open_blob(desc.digest) as f:
                assert f.fileno() >= 0              # a real file: the C core reads it
                d = layer_digests(f)
            assert (d.digest, d.diff_id) == (desc.digest, diff_id)
            with src.open_blob(desc.digest, verify=True) as f:
                assert hashlib.sha256(f.read()).hexdigest() == desc.digest.split(":")[1]


def _tar_layout(layout, out, compress=None):
    run("tar", "-C", layout, "-cf", out, ".")
    if compress == "gzip":
        run("gzip", "-k", out)
        return out + ".gz"
    if compress == "zstd":
        run("zstd", "-q", out, "-o", out + ".zst")
        return out + ".zst"
    return out


@pytest.mark.parametrize("compress", [None, "gzip", "zstd"])
def test_layout_tarball_read_in_place(simple_layout, compress, tmp_path):
    layout, app = simple_layout["layout"], simple_layout["app"]
    tar_path = _tar_layout(layout, str(tmp_path / "layout.tar"), compress)
    with open_image_source(layout) as d, open_image_source(tar_path) as t:
        assert t.format == "oci-layout"
        assert [(i.names, i.manifest_bytes, i.diff_ids) for i in d.images()] == \
            [(i.names, i.manifest_bytes, i.diff_ids) for i in t.images()]
        img = [i for i in t.images() if i.manifest_digest == app.manifest_digest][0]
        dest = str(tmp_path / "rootfs")
        for desc, diff_id in zip(img.layers, img.diff_ids):
            assert t.blob_path(desc.digest) is None
            with t.open_blob(desc.digest, verify=True) as f:
                r = apply_layer(f, dest, expected_diff_id=diff_id)
            assert r.digest == desc.digest
    ref = str(tmp_path / "ref")
    unpack_layers([os.path.join(layout, "blobs/sha256", d.split(":")[1])
                   for d in app.layer_digests], ref)
    assert trees_equal(ref, dest) == []


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_damaged_compressed_layout_tarball_is_a_format_error(simple_layout, compress, tmp_path):
    tar_path = _tar_layout(simple_layout["layout"], str(tmp_path / "layout.tar"), compress)
    data = open(tar_path, "rb").read()
    cut = str(tmp_path / ("cut." + compress))
    with open(cut, "wb") as f:
        f.write(data[:len(data) // 2])
    flipped = str(tmp_path / ("flipped." + compress))
    with open(flipped, "wb") as f:
        f.write(data[:64] + bytes(b ^ 0x5A for b in data[64:4096]) + data[4096:])
    for bad in (cut, flipped):
        with pytest.raises(FormatError) as ei:
            with open_image_source(bad):
                pass
        assert ei.value.filename == os.path.abspath(bad)
        assert f"cannot decompress {compress} tarball" in str(ei.value)


def test_compressed_tarball_decompresses_into_var_tmp(simple_layout, tmp_path, monkeypatch):
    from layerfs.images._io import big_temp_dir
    monkeypatch.delenv("TMPDIR", raising=False)
    assert big_temp_dir() == "/var/tmp"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert big_temp_dir() is None           # tempfile's choice: TMPDIR


def test_tar_member_stream_stops_at_member_end(simple_layout, tmp_path):
    """A layer read from a tarball must end where the member ends, even when the
    next member is another tar."""
    tar_path = _tar_layout(simple_layout["layout"], str(tmp_path / "l.tar"))
    with open_image_source(tar_path) as src:
        for img in src.images():
            for desc in img.layers:
                with src.open_blob(desc.digest) as f:
                    data = f.read()
                assert len(data) == desc.size
                d = layer_digests(src.open_blob(desc.digest))
                assert d.digest == desc.digest


def _two_platforms(tmp_path, *, nested=False, side_by_side=False):
    layout = str(tmp_path / "multi")
    os.makedirs(layout)
    t_amd = fill(str(tmp_path / "amd"), {"arch": "amd64\n"})
    t_arm = fill(str(tmp_path / "arm"), {"arch": "arm64\n"})
    amd = build_image(layout, [t_amd], arch="amd64")
    arm = build_image(layout, [t_arm], arch="arm64", variant="v8")
    e_amd = entry(amd, layout, platform={"architecture": "amd64", "os": "linux"})
    e_arm = entry(arm, layout, platform={"architecture": "arm64", "os": "linux", "variant": "v8"})
    if side_by_side:
        for e in (e_amd, e_arm):
            e["annotations"] = {"org.opencontainers.image.ref.name": "multi"}
        write_index(layout, [e_amd, e_arm])
        return layout, amd, arm
    attest = dict(e_amd, platform={"architecture": "unknown", "os": "unknown"})
    idx = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                   "manifests": [e_amd, e_arm, attest]}))
    top = {"mediaType": OCI_INDEX, **idx}
    if nested:
        outer = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                         "manifests": [top]}))
        top = {"mediaType": OCI_INDEX, **outer}
    write_index(layout, [dict(top, annotations={"org.opencontainers.image.ref.name": "multi"})])
    return layout, amd, arm, idx["digest"]


@pytest.mark.parametrize("nested", [False, True])
def test_multi_platform_index_narrowed(tmp_path, nested):
    layout, amd, arm, idx_digest = _two_platforms(tmp_path, nested=nested)
    with open_image_source(layout, platform="linux/arm64/v8") as src:
        (img,) = src.images()
    assert img.manifest_digest == arm.manifest_digest
    assert img.platform == Platform("linux", "arm64", "v8")
    assert img.tags == ["multi"] and img.index_digest == idx_digest
    with open_image_source(layout, platform="linux/amd64") as src:
        (img,) = src.images()
    assert img.manifest_digest == amd.manifest_digest
    with open_image_source(layout, platform=Platform("linux", "aarch64")) as src:
        assert src.images()[0].manifest_digest == arm.manifest_digest
    with pytest.raises(NoMatchingPlatform) as e:
        open_image_source(layout, platform="linux/s390x").images()
    assert "linux/amd64" in str(e.value) and "linux/arm64/v8" in str(e.value)
    assert "unknown" not in str(e.value)
    assert set(e.value.available) == {"linux/amd64", "linux/arm64/v8"}
    if current_platform().architecture in ("amd64", "arm64"):
        with open_image_source(layout) as src:
            want = amd if current_platform().architecture == "amd64" else arm
            assert src.images()[0].manifest_digest == want.manifest_digest


def test_side_by_side_platforms_in_index_json(tmp_path):
    layout, amd, arm = _two_platforms(tmp_path, side_by_side=True)
    with open_image_source(layout, platform="linux/arm64") as src:
        (img,) = src.images()
    assert img.manifest_digest == arm.manifest_digest
    with pytest.raises(NoMatchingPlatform, match="linux/arm64/v8"):
        open_image_source(layout, platform="linux/ppc64le").images()


def test_entry_without_platform_gets_it_from_config(tmp_path):
    layout, amd, arm, _ = _two_platforms(tmp_path)
    idx_path = blob_file(layout, _)
    with open(idx_path) as f:
        doc = json.load(f)
    for e in doc["manifests"]:
        e.pop("platform")
    new = put_blob(layout, jbytes(doc))
    write_index(layout, [{"mediaType": OCI_INDEX, **new}])
    with open_image_source(layout, platform="linux/arm64") as src:
        assert src.images()[0].manifest_digest == arm.manifest_digest


# --- corrupt layouts ----------------------------------------------------------------------------

def test_missing_layer_blob_names_blob_and_field(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    os.unlink(blob_file(layout, app.layer_digests[1]))
    with pytest.raises(NotFound) as e:
        open_image_source(layout).images()
    assert e.value.filename == blob_file(layout, app.layer_digests[1])
    assert "layers[1]" in str(e.value) and app.manifest_digest in str(e.value)


def test_missing_manifest_blob(simple_layout):
    layout, base = simple_layout["layout"], simple_layout["base"]
    os.unlink(blob_file(layout, base.manifest_digest))
    with pytest.raises(NotFound) as e:
        open_image_source(layout).images()
    assert e.value.filename == blob_file(layout, base.manifest_digest)
    assert "index.json" in str(e.value) and "manifests[2]" in str(e.value)


def test_config_with_wrong_digest(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    path = blob_file(layout, app.config_digest)
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[data.index(b"amd64")] = ord("A")          # same size, other bytes
        f.seek(0)
        f.write(data)
    with pytest.raises(DigestMismatch) as e:
        open_image_source(layout).images()
    assert e.value.filename == path and app.config_digest in str(e.value)


def test_layer_blob_with_wrong_size(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    path = blob_file(layout, app.layer_digests[0])
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(DigestMismatch, match="layers\\[0\\].size") as e:
        open_image_source(layout).images()
    assert e.value.filename == path


def test_bad_json_in_index(simple_layout):
    layout = simple_layout["layout"]
    with open(os.path.join(layout, "index.json"), "w") as f:
        f.write('{"schemaVersion": 2, "manifests": [')
    with pytest.raises(FormatError, match="not valid JSON") as e:
        open_image_source(layout).images()
    assert e.value.filename == os.path.join(layout, "index.json")


def test_bad_fields_in_index(simple_layout):
    layout = simple_layout["layout"]
    rewrite_json(os.path.join(layout, "index.json"),
                 lambda d: d["manifests"][1].__setitem__("digest", "sha256:xyz"))
    with pytest.raises(FormatError) as e:
        open_image_source(layout).images()
    assert e.value.field == "manifests[1].digest"
    rewrite_json(os.path.join(layout, "index.json"), lambda d: d.__setitem__("schemaVersion", 3))
    with pytest.raises(FormatError) as e:
        open_image_source(layout).images()
    assert e.value.field == "schemaVersion"


def test_bad_json_in_manifest(simple_layout):
    """A manifest blob that is not JSON (its descriptor matching it)."""
    layout = simple_layout["layout"]
    bad = put_blob(layout, b"{not json")
    write_index(layout, [{"mediaType": OCI_MANIFEST, **bad}])
    with pytest.raises(FormatError, match="manifest is not valid JSON") as e:
        open_image_source(layout).images()
    assert e.value.filename == blob_file(layout, bad["digest"])


def test_manifest_missing_layers_field(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    m = dict(app.manifest)
    del m["layers"]
    bad = put_blob(layout, jbytes(m))
    write_index(layout, [{"mediaType": OCI_MANIFEST, **bad}])
    with pytest.raises(FormatError) as e:
        open_image_source(layout).images()
    assert e.value.field == "layers" and e.value.filename == blob_file(layout, bad["digest"])


def test_layer_count_differs_from_diff_ids(simple_layout):
    layout, app = simple_layout["layout"], simple_layout["app"]
    cfg = dict(app.config, rootfs={"type": "layers", "diff_ids": app.diff_ids[:2]})
    c = put_blob(layout, jbytes(cfg))
    m = dict(app.manifest, config={"mediaType": mf.OCI_CONFIG, **c})
    md = put_blob(layout, jbytes(m))
    write_index(layout, [{"mediaType": OCI_MANIFEST, **md}])
    with pytest.raises(FormatError) as e:
        open_image_source(layout).images()
    assert e.value.field == "rootfs.diff_ids"
    assert e.value.filename == blob_file(layout, c["digest"])
    assert "2 diff_ids" in str(e.value) and "3 layers" in str(e.value)


def test_errors_in_a_tarball_name_the_member(simple_layout, tmp_path):
    layout, app = simple_layout["layout"], simple_layout["app"]
    os.unlink(blob_file(layout, app.layer_digests[2]))
    tar_path = _tar_layout(layout, str(tmp_path / "broken.tar"))
    with pytest.raises(NotFound) as e:
        open_image_source(tar_path).images()
    assert e.value.filename == tar_path
    assert e.value.entry == "blobs/sha256/" + app.layer_digests[2].split(":")[1]


def test_not_an_image(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(FormatError, match="neither an OCI layout"):
        open_image_source(str(d))
    with pytest.raises(NotFound):
        open_image_source(str(tmp_path / "missing"))
    (tmp_path / "junk.tar").write_bytes(b"\1" * 2048)
    with pytest.raises(FormatError):
        open_image_source(str(tmp_path / "junk.tar"))


def test_verify_stream_raises_at_eof_and_apply_leaves_nothing(simple_layout, tmp_path):
    layout, app = simple_layout["layout"], simple_layout["app"]
    with open_image_source(layout) as src:
        img = [i for i in src.images() if i.manifest_digest == app.manifest_digest][0]
        desc = img.layers[2]                               # the plain tar layer
        path = blob_file(layout, desc.digest)
        with open(path, "r+b") as f:                       # same size, other content
            data = bytearray(f.read())
            i = data.index(b"1.0\n")
            data[i:i + 3] = b"9.9"
            f.seek(0)
            f.write(data)
        with src.open_blob(desc.digest, verify=True) as f:
            with pytest.raises(DigestMismatch) as e:
                f.read()
        assert e.value.filename == path and desc.digest in str(e.value)
        dest = str(tmp_path / "rootfs")
        with pytest.raises(DigestMismatch):
            apply_layer(src.open_blob(desc.digest, verify=True), dest)
        assert not os.path.exists(dest)


# --- docker-archive reading -----------------------------------------------------------------

def _legacy_archive(tmp_path, compress_second=False):
    """A Docker < 25 style archive: <config>.json, <id>/layer.tar, repositories."""
    root = tmp_path / "legacy"
    root.mkdir()
    t1 = fill(str(tmp_path / "l1"), {"a": "1\n"})
    t2 = fill(str(tmp_path / "l2"), {"b": "2\n"})
    diff_ids, paths = [], []
    for n, (t, comp) in enumerate([(t1, "none"), (t2, "gzip" if compress_second else "none")]):
        (root / f"id{n}").mkdir()
        r = create_layer(t, str(root / f"id{n}" / "layer.tar"), compression=comp)
        diff_ids.append(r.diff_id)
        paths.append(f"id{n}/layer.tar")
    cfg = jbytes({"architecture": "amd64", "os": "linux", "config": {},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}})
    cid = hashlib.sha256(cfg).hexdigest()
    (root / f"{cid}.json").write_bytes(cfg)
    (root / "manifest.json").write_bytes(jbytes(
        [{"Config": f"{cid}.json", "RepoTags": ["team/app:2", "app:latest"], "Layers": paths}]))
    (root / "repositories").write_text(json.dumps({"team/app": {"2": "id1"}}))
    return str(root), "sha256:" + cid, diff_ids


@pytest.mark.parametrize("as_tar", [False, True])
def test_legacy_docker_archive(tmp_path, as_tar):
    root, config_digest, diff_ids = _legacy_archive(tmp_path, compress_second=True)
    path = root
    if as_tar:
        path = str(tmp_path / "legacy.tar")
        run("tar", "-C", root, "-cf", path, ".")
    with open_image_source(path) as src:
        assert src.format == "docker-archive"
        (img,) = src.images()
        assert img.names == ["docker.io/team/app:2", "docker.io/library/app:latest"]
        assert img.config_digest == config_digest and img.diff_ids == diff_ids
        assert img.manifest_synthesized
        assert img.manifest_digest == "sha256:" + hashlib.sha256(img.manifest_bytes).hexdigest()
        assert [l.media_type for l in img.layers] == [mf.OCI_LAYER, mf.OCI_LAYER_GZIP]
        assert img.layers[0].digest == diff_ids[0]
        dest = str(tmp_path / "rootfs")
        for desc, diff_id in zip(img.layers, img.diff_ids):
            with src.open_blob(desc.digest, verify=True) as f:
                r = apply_layer(f, dest, expected_diff_id=diff_id)
            assert r.digest == desc.digest
        with src.open_blob(img.manifest_digest) as f:
            assert f.read() == img.manifest_bytes
    assert sorted(os.listdir(dest)) == ["a", "b"]
    with open_image_source(f"docker-archive:{path}:app") as src:
        assert len(src.images()) == 1
    with open_image_source(f"docker-archive:{path}:@0") as src:
        assert len(src.images()) == 1
    with pytest.raises(NotFound, match="team/app:2"):
        open_image_source(f"docker-archive:{path}:other:1").images()


def test_docker_archive_layer_count_and_bad_fields(tmp_path):
    root, _, _ = _legacy_archive(tmp_path)
    mpath = os.path.join(root, "manifest.json")
    rewrite_json(mpath, lambda d: d[0]["Layers"].pop())
    with pytest.raises(FormatError) as e:
        open_image_source(root).images()
    assert e.value.field == "rootfs.diff_ids" and "[0].Layers lists 1 layers" in str(e.value)
    rewrite_json(mpath, lambda d: d[0]["Layers"].append("../../etc/passwd"))
    with pytest.raises(FormatError) as e:
        open_image_source(root).images()
    assert e.value.field == "[0].Layers[1]" and e.value.filename == mpath
    rewrite_json(mpath, lambda d: d[0].__setitem__("Layers", ["id0/layer.tar", "gone.tar"]))
    with pytest.raises(NotFound, match=r"\[0\].Layers\[1\]") as e:
        open_image_source(root).images()
    assert e.value.filename == os.path.join(root, "gone.tar")
    rewrite_json(mpath, lambda d: d[0].__setitem__("RepoTags", ["Bad Name"]))
    with pytest.raises(FormatError) as e:
        open_image_source(root).images()
    assert e.value.field == "[0].RepoTags[0]"
    with open(mpath, "w") as f:
        f.write("[{")
    with pytest.raises(FormatError, match="manifest.json is not valid JSON") as e:
        open_image_source(root).images()
    assert e.value.filename == mpath


def test_docker_archive_config_name_checked(tmp_path):
    root, config_digest, _ = _legacy_archive(tmp_path)
    cpath = os.path.join(root, config_digest.split(":")[1] + ".json")
    with open(cpath, "ab") as f:
        f.write(b" ")
    with pytest.raises(DigestMismatch) as e:
        open_image_source(root).images()
    assert e.value.filename == cpath


# --- writing ------------------------------------------------------------------------------------

def _to_write(src, names=None):
    out = []
    for img in src.images():
        w = ImageToWrite.from_source(img, src)
        if names is not None:
            w.names = list(names)
        out.append(w)
    return out


def test_write_layout_round_trip_exact(simple_layout, tmp_path):
    with open_image_source(simple_layout["layout"]) as src:
        before = src.images()
        dest = str(tmp_path / "out")
        write_oci_layout(_to_write(src), dest)
        tar_dest = str(tmp_path / "out.tar")
        write_oci_layout(_to_write(src), tar_dest, tar=True)
    for path in (dest, tar_dest):
        with open_image_source(path) as again:
            after = again.images()
            assert [(i.manifest_bytes, i.config_bytes, i.layers, i.names) for i in after] == \
                [(i.manifest_bytes, i.config_bytes, i.layers, i.names) for i in before]
    with open(os.path.join(dest, "index.json")) as f:
        idx = json.load(f)
    anns = [e.get("annotations") for e in idx["manifests"]]
    assert {"io.containerd.image.name": "registry.example:5000/team/app:1.0",
            "org.opencontainers.image.ref.name": "1.0"} in anns
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_write_layout_extends_and_replaces_same_name(simple_layout, tmp_path):
    dest = str(tmp_path / "out")
    with open_image_source(simple_layout["layout"]) as src:
        imgs = {i.manifest_digest: i for i in src.images()}
        app = ImageToWrite.from_source(imgs[simple_layout["app"].manifest_digest], src)
        base = ImageToWrite.from_source(imgs[simple_layout["base"].manifest_digest], src)
        app.names, base.names = ["team/app:1"], ["team/base:1"]
        write_oci_layout([app], dest)
        write_oci_layout([base], dest)
        base.names = ["team/app:1"]                      # the name moves to base
        write_oci_layout([base], dest)
    with open_image_source(dest) as out:
        got = {tuple(i.names): i.manifest_digest for i in out.images()}
    assert got == {("docker.io/team/base:1", "docker.io/team/app:1"):
                   simple_layout["base"].manifest_digest}
    # app's blobs stay (a layout is never garbage-collected here)
    assert os.path.exists(blob_file(dest, simple_layout["app"].manifest_digest))


class _Boom(Exception):
    pass


def _new_image(tmp_path, name, contents, fail=None):
    """An ImageToWrite made from scratch: one layer per dict of files.  With fail
    ("raise" or "wrong") the last layer's streams fail or give other bytes."""
    layers = []
    for n, files in enumerate(contents):
        tree = fill(str(tmp_path / f"{name}-tree{n}"), files)
        path = str(tmp_path / f"{name}-layer{n}.tar.gz")
        r = create_layer(tree, path, compression="gzip")
        desc = Descriptor(mf.OCI_LAYER_GZIP, r.digest, r.size)

        def opener(path=path):
            return open(path, "rb")

        def tar_opener(path=path):
            return gzip.open(path, "rb")
        layers.append(LayerToWrite(desc, r.diff_id, opener, tar_opener))
    if fail:
        last = layers[-1]

        def bad():
            if fail == "raise":
                raise _Boom("layer unavailable")
            return io.BytesIO(b"\0" * last.descriptor.size)
        layers[-1] = LayerToWrite(last.descriptor, last.diff_id, bad, bad)
    config = jbytes({"architecture": "amd64", "os": "linux",
                     "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]}})
    cdig = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = jbytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": mf.OCI_CONFIG, "digest": cdig,
                                  "size": len(config)},
                       "layers": [l.descriptor.to_json() for l in layers]})
    return ImageToWrite([f"team/{name}:1"], manifest,
                        "sha256:" + hashlib.sha256(manifest).hexdigest(), OCI_MANIFEST,
                        config, cdig, layers)


@pytest.mark.parametrize("mode", ["raise", "wrong"])
def test_failed_writes_leave_nothing(simple_layout, tmp_path, mode):
    exc = _Boom if mode == "raise" else DigestMismatch
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    img = _new_image(work, "broken", [{"a": "1"}, {"b": "2"}, {"c": "3"}], fail=mode)
    with pytest.raises(exc):
        write_oci_layout([img], str(out / "new"))
    with pytest.raises(exc):
        write_oci_layout([img], str(out / "new.tar"), tar=True)
    with pytest.raises(exc):
        write_docker_archive([img], str(out / "new-docker.tar"))
    assert os.listdir(out) == []                     # no dest, no temp file
    # an existing layout keeps its index.json and gains no blob
    existing = simple_layout["layout"]
    blobs_before = sorted(os.listdir(os.path.join(existing, "blobs/sha256")))
    with open(os.path.join(existing, "index.json"), "rb") as f:
        index_before = f.read()
    with pytest.raises(exc):
        write_oci_layout([img], existing)
    assert sorted(os.listdir(os.path.join(existing, "blobs/sha256"))) == blobs_before
    with open(os.path.join(existing, "index.json"), "rb") as f:
        assert f.read() == index_before
    # and a good image extends it
    good = _new_image(work, "good", [{"a": "1"}, {"d": "4"}])
    write_oci_layout([good], existing)
    with open_image_source(f"oci:{existing}:team/good:1") as src:
        assert [i.manifest_digest for i in src.images()] == [good.manifest_digest]


def test_write_refuses_inconsistent_images(simple_layout, tmp_path):
    img = _new_image(tmp_path, "x", [{"a": "1"}])
    img.config_bytes += b" "
    with pytest.raises(DigestMismatch, match="config"):
        write_oci_layout([img], str(tmp_path / "x"))
    img = _new_image(tmp_path, "y", [{"a": "1"}, {"b": "1"}])
    img.layers.pop()
    with pytest.raises(FormatError, match="layers"):
        write_docker_archive([img], str(tmp_path / "x.tar"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.tar")
    img = _new_image(tmp_path, "z", [{"a": "1"}])
    with pytest.raises(FileExistsError):                  # a directory that is not a layout
        write_oci_layout([img], simple_layout["tmp"] / "t1")


def test_docker_archive_written_and_read_back(simple_layout, tmp_path):
    dest = str(tmp_path / "saved.tar")
    with open_image_source(simple_layout["layout"]) as src:
        imgs = _to_write(src)
        imgs[0].names = ["team/app:1", "quay.io/x/app:2"]
        imgs[1].names = []
        write_docker_archive(imgs, dest)
        originals = src.images()
    with tarfile.open(dest) as tf:
        names = tf.getnames()
        manifest = json.load(tf.extractfile("manifest.json"))
        repos = json.load(tf.extractfile("repositories"))
    assert {"manifest.json", "index.json", "oci-layout", "repositories"} <= set(names)
    assert manifest[0]["RepoTags"] == ["team/app:1", "quay.io/x/app:2"]
    assert manifest[1]["RepoTags"] == []
    assert manifest[0]["Layers"] == ["blobs/sha256/" + d.split(":")[1]
                                     for d in originals[0].diff_ids]
    assert repos["team/app"]["1"] == originals[0].diff_ids[-1].split(":")[1]
    with open_image_source(dest) as back:
        got = back.images()
        assert [i.config_bytes for i in got] == [i.config_bytes for i in originals]
        assert got[0].names == ["docker.io/team/app:1", "quay.io/x/app:2"]
        assert not got[0].manifest_synthesized
        assert [l.digest for l in got[0].layers] == originals[0].diff_ids
        for desc in got[0].layers:
            with back.open_blob(desc.digest, verify=True) as f:
                assert layer_digests(f).diff_id == desc.digest


def test_non_image_manifests_are_skipped(simple_layout):
    """An artifact (a manifest whose config is not an image config) is not an image."""
    layout = simple_layout["layout"]
    cfg = put_blob(layout, b"{}")
    art = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                   "config": {"mediaType": "application/vnd.example.sbom+json",
                                              **cfg}, "layers": []}))
    rewrite_json(os.path.join(layout, "index.json"), lambda d: d["manifests"].append(
        {"mediaType": OCI_MANIFEST, **art, "annotations": {
            "org.opencontainers.image.ref.name": "sbom"}}))
    with open_image_source(layout) as src:
        assert len(src.images()) == 2
        assert [d.digest for d, _ in src.skipped] == [art["digest"]]


def test_blob_symlink_leaving_the_directory_is_refused(simple_layout, tmp_path):
    layout, app = simple_layout["layout"], simple_layout["app"]
    path = blob_file(layout, app.layer_digests[0])
    outside = str(tmp_path / "outside")
    os.rename(path, outside)
    os.symlink(outside, path)
    with pytest.raises(FormatError, match="outside the image directory"):
        open_image_source(layout).images()


def test_absent_nondistributable_layer_is_allowed(tmp_path):
    layout = str(tmp_path / "l")
    os.makedirs(layout)
    img = build_image(layout, [fill(str(tmp_path / "t"), {"f": "1"})])
    os.unlink(blob_file(layout, img.layer_digests[0]))
    m = dict(img.manifest)
    m["layers"] = [dict(m["layers"][0], mediaType=mf.OCI_LAYER_NONDISTRIBUTABLE_GZIP,
                        urls=["https://example.invalid/layer"])]
    md = put_blob(layout, jbytes(m))
    write_index(layout, [{"mediaType": OCI_MANIFEST, **md}])
    with open_image_source(layout) as src:
        (got,) = src.images()
        assert got.layers[0].urls == ("https://example.invalid/layer",)
        with pytest.raises(NotFound):
            src.open_blob(got.layers[0].digest)


def test_write_into_empty_directory(simple_layout, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    with open_image_source(simple_layout["layout"]) as src:
        write_oci_layout(_to_write(src), dest)
    with open(dest / "oci-layout") as f:
        assert json.load(f) == {"imageLayoutVersion": "1.0.0"}
    with open_image_source(str(dest)) as src:
        assert len(src.images()) == 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
