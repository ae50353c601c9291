"""Interoperability with the real tools: images made by umoci and converted by
skopeo are read; what layerfs writes is accepted by skopeo and unpacked by umoci
to the same tree as the original."""
from __future__ import annotations

import json
import os

import pytest

from layerfs.archive import unpack_layers
from layerfs.digest import layer_digests
from layerfs.images import (ImageToWrite, Platform, open_image_source, write_docker_archive,
                            write_oci_layout)
from layerfs.images import manifest as mf

from .conftest import (build_image, entry, fill, jbytes, need, put_blob, run, trees_equal,
                       write_index)

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture(scope="module")
def tools():
    need("umoci")
    need("skopeo")


def skopeo(*args, check=True):
    return run("skopeo", "--insecure-policy", *args, check=check)


def skopeo_json(*args):
    return json.loads(skopeo(*args).stdout)


def flatten(src, img, dest):
    """Unpack an image from an ImageSource with layerfs (blobs streamed, verified)."""
    return unpack_layers([src.open_blob(d.digest, verify=True) for d in img.layers], dest,
                         expected=[(d.digest, diff) for d, diff in zip(img.layers, img.diff_ids)])


def check_image(src, img):
    """Layer blobs hash to the manifest's digests, and decompress to the DiffIDs."""
    assert len(img.layers) == len(img.diff_ids)
    for desc, diff_id in zip(img.layers, img.diff_ids):
        with src.open_blob(desc.digest) as f:
            d = layer_digests(f)
        assert (d.digest, d.diff_id, d.compressed_size) == (desc.digest, diff_id, desc.size)


# --- reading what the tools write ---------------------------------------------------------

def test_read_umoci_layout(umoci_layout, umoci_tree, tmp_path):
    layout, tag = umoci_layout
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    (e,) = index["manifests"]
    with open_image_source(layout) as src:
        (img,) = src.images()
        assert img.tags == [tag] and img.names == []
        assert img.manifest_digest == e["digest"]
        with open(os.path.join(layout, "blobs/sha256", e["digest"].split(":")[1]), "rb") as f:
            manifest = json.loads(f.read())
        assert [l.digest for l in img.layers] == [l["digest"] for l in manifest["layers"]]
        assert len(img.layers) == 4
        assert img.diff_ids == img.config["rootfs"]["diff_ids"]
        assert img.platform.architecture == img.config["architecture"]
        assert len(img.history) == 4
        check_image(src, img)
        flatten(src, img, str(tmp_path / "rootfs"))
    assert trees_equal(umoci_tree, str(tmp_path / "rootfs")) == []
    # the changes between repacks are really there
    root = tmp_path / "rootfs"
    assert (root / "etc/hostname").read_text() == "again\n"
    assert sorted(os.listdir(root / "opt/app/lib")) == ["d.so"]         # opaque layer
    assert (root / "etc/motd").stat().st_ino == (root / "etc/motd.hard").stat().st_ino
    assert oct((root / "etc/motd").stat().st_mode & 0o777) == oct(0o600)
    assert not (root / "opt/app/conf").exists()


def test_read_skopeo_copies(umoci_layout, umoci_tree, tmp_path):
    layout, tag = umoci_layout
    with open_image_source(f"oci:{layout}:{tag}") as src:
        (orig,) = src.images()
    oci_dir = tmp_path / "copy"
    skopeo("copy", f"oci:{layout}:{tag}", f"oci:{oci_dir}:copied")
    oci_tar = tmp_path / "copy-archive.tar"
    skopeo("copy", f"oci:{layout}:{tag}", f"oci-archive:{oci_tar}:archived")
    docker_tar = tmp_path / "docker.tar"
    skopeo("copy", f"oci:{layout}:{tag}", f"docker-archive:{docker_tar}:team/name:t")

    with open_image_source(f"oci:{oci_dir}:copied") as src:
        (img,) = src.images()
        assert img.tags == ["copied"]
        assert [l.digest for l in img.layers] == [l.digest for l in orig.layers]
        assert img.diff_ids == orig.diff_ids
        assert img.config_digest == orig.config_digest
    with open_image_source(f"oci-archive:{oci_tar}") as src:
        (img,) = src.images()
        assert img.tags == ["archived"] and img.manifest_bytes == orig.manifest_bytes
        check_image(src, img)
        flatten(src, img, str(tmp_path / "from-oci-archive"))
    with open_image_source(str(docker_tar)) as src:
        assert src.format == "docker-archive"
        (img,) = src.images()
        assert img.names == ["docker.io/team/name:t"]
        assert img.diff_ids == orig.diff_ids
        assert img.config_digest == orig.config_digest
        # docker-archive layers are the uncompressed tars: digest = DiffID
        assert [l.digest for l in img.layers] == orig.diff_ids
        assert all(l.media_type == mf.OCI_LAYER for l in img.layers)
        check_image(src, img)
        flatten(src, img, str(tmp_path / "from-docker-archive"))
    with open_image_source(f"docker-archive:{docker_tar}:team/name:t") as src:
        assert len(src.images()) == 1
    for out in ("from-oci-archive", "from-docker-archive"):
        assert trees_equal(umoci_tree, str(tmp_path / out)) == []


def test_platform_choice_agrees_with_skopeo(tmp_path):
    layout = str(tmp_path / "multi")
    os.makedirs(layout)
    amd = build_image(layout, [fill(str(tmp_path / "a"), {"arch": "amd64\n"})], arch="amd64")
    arm = build_image(layout, [fill(str(tmp_path / "b"), {"arch": "arm64\n"})], arch="arm64",
                      variant="v8")
    idx = put_blob(layout, jbytes({"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        entry(amd, layout, platform={"architecture": "amd64", "os": "linux"}),
        entry(arm, layout, platform={"architecture": "arm64", "os": "linux", "variant": "v8"})]}))
    write_index(layout, [{"mediaType": mf.OCI_INDEX, **idx,
                          "annotations": {"org.opencontainers.image.ref.name": "multi"}}])
    for arch, variant, want in (("amd64", None, amd), ("arm64", "v8", arm)):
        args = ["--override-os", "linux", "--override-arch", arch]
        if variant:
            args += ["--override-variant", variant]
        cfg = skopeo_json(*args, "inspect", "--config", f"oci:{layout}:multi")
        with open_image_source(f"oci:{layout}:multi",
                               platform=Platform("linux", arch, variant)) as src:
            (img,) = src.images()
        assert img.manifest_digest == want.manifest_digest
        assert json.loads(img.config_bytes) == cfg
        # skopeo copies the same single-platform image out of the index
        out = tmp_path / f"out-{arch}"
        skopeo(*args, "copy", f"oci:{layout}:multi", f"oci:{out}:one")
        with open_image_source(str(out)) as src:
            assert [i.manifest_digest for i in src.images()] == [want.manifest_digest]


# --- the tools reading what layerfs writes ------------------------------------------------

def test_written_layout_accepted_by_skopeo_and_umoci(umoci_layout, umoci_tree, tmp_path):
    layout, tag = umoci_layout
    dest = tmp_path / "written"
    with open_image_source(f"oci:{layout}:{tag}") as src:
        (img,) = src.images()
        w = ImageToWrite.from_source(img, src)
        w.names = ["example.com/team/app:1.0", "app:latest"]
        write_oci_layout([w], dest)
        write_oci_layout([w], tmp_path / "written.tar", tar=True)
    for ref in (f"oci:{dest}:1.0", f"oci:{dest}:latest", f"oci-archive:{tmp_path}/written.tar:1.0"):
        info = skopeo_json("inspect", ref)
        assert info["Digest"] == img.manifest_digest
        assert info["Layers"] == [l.digest for l in img.layers]
        raw = skopeo("inspect", "--raw", ref).stdout
        assert raw.encode() == img.manifest_bytes
    run("umoci", "unpack", "--image", f"{dest}:1.0", tmp_path / "bundle")
    assert trees_equal(umoci_tree, str(tmp_path / "bundle/rootfs")) == []
    # umoci can also add to the layout layerfs wrote, and layerfs reads the result
    run("umoci", "tag", "--image", f"{dest}:1.0", "extra")
    with open_image_source(f"oci:{dest}:extra") as src:
        assert [i.manifest_digest for i in src.images()] == [img.manifest_digest]


def test_written_layout_extends_skopeo_layout(umoci_layout, tmp_path):
    layout, tag = umoci_layout
    dest = tmp_path / "shared"
    skopeo("copy", f"oci:{layout}:{tag}", f"oci:{dest}:from-skopeo")
    other_layout = str(tmp_path / "other")
    os.makedirs(other_layout)
    other = build_image(other_layout, [fill(str(tmp_path / "o"), {"hello": "world\n"})])
    write_index(other_layout, [entry(other, other_layout, "x")])
    with open_image_source(other_layout) as src:
        w = [ImageToWrite.from_source(i, src) for i in src.images()]
        w[0].names = ["team/other:2"]
        write_oci_layout(w, dest)
    assert skopeo_json("inspect", f"oci:{dest}:2")["Digest"] == other.manifest_digest
    assert skopeo_json("inspect", f"oci:{dest}:from-skopeo")["Layers"]
    with open_image_source(str(dest)) as src:
        assert len(src.images()) == 2


def test_written_docker_archive_accepted_by_skopeo(umoci_layout, umoci_tree, tmp_path):
    layout, tag = umoci_layout
    archive = tmp_path / "saved.tar"
    with open_image_source(f"oci:{layout}:{tag}") as src:
        (img,) = src.images()
        w = ImageToWrite.from_source(img, src)
        w.names = ["team/app:1.0"]
        write_docker_archive([w], archive)
    info = skopeo_json("inspect", f"docker-archive:{archive}")
    assert info["Layers"] == img.diff_ids
    assert skopeo_json("inspect", "--config", f"docker-archive:{archive}") == img.config
    skopeo("copy", f"docker-archive:{archive}", f"oci:{tmp_path}/out:t")
    run("umoci", "unpack", "--image", f"{tmp_path}/out:t", tmp_path / "bundle")
    assert trees_equal(umoci_tree, str(tmp_path / "bundle/rootfs")) == []
    # read back: names from RepoTags, the config (image id) unchanged
    with open_image_source(str(archive)) as src:
        (back,) = src.images()
        assert back.names == ["docker.io/team/app:1.0"]
        assert back.config_bytes == img.config_bytes and back.id == img.id
        assert not back.manifest_synthesized
        check_image(src, back)
    # skopeo's own docker-archive round trip of our archive
    skopeo("copy", f"docker-archive:{archive}", f"docker-archive:{tmp_path}/again.tar:x/y:z")
    with open_image_source(f"{tmp_path}/again.tar") as src:
        (again,) = src.images()
        assert again.diff_ids == img.diff_ids and again.names == ["docker.io/x/y:z"]


def test_round_trip_through_docker_archive_and_back_to_oci(umoci_layout, tmp_path):
    """OCI layout -> docker-archive (layerfs) -> OCI layout (layerfs): the config
    and DiffIDs survive; skopeo reads the final layout."""
    layout, tag = umoci_layout
    with open_image_source(f"oci:{layout}:{tag}") as src:
        (img,) = src.images()
        w = ImageToWrite.from_source(img, src)
        w.names = ["team/app:1"]
        write_docker_archive([w], tmp_path / "d.tar")
    with open_image_source(str(tmp_path / "d.tar")) as src:
        (mid,) = src.images()
        write_oci_layout([ImageToWrite.from_source(mid, src)], tmp_path / "final")
    info = skopeo_json("inspect", f"oci:{tmp_path}/final:1")
    assert info["Layers"] == img.diff_ids
    with open_image_source(str(tmp_path / "final")) as src:
        (final,) = src.images()
        assert final.config_bytes == img.config_bytes
        assert final.names == ["docker.io/team/app:1"]
