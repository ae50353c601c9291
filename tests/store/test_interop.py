"""The store against the real tools: an image made by umoci (whiteouts, opaque
directories, a GNU tar layer) and one copied by skopeo into an OCI layout load;
mounted on every driver they give exactly the tree ``umoci unpack`` gives; what
the store saves is accepted by ``skopeo inspect`` / ``skopeo copy`` and unpacked
by umoci to the same tree."""
from __future__ import annotations

import json

import pytest

from .conftest import need_tools, run, trees_equal

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture(scope="module")
def tools():
    need_tools("umoci", "skopeo")


def skopeo(*args):
    return run("skopeo", "--insecure-policy", *args)


def test_umoci_image_mounts_as_umoci_unpacks(make_store, driver_name, umoci_layout, umoci_tree):
    layout, tag = umoci_layout
    s = make_store(driver_name)
    (r,) = s.load(f"oci:{layout}:{tag}", base_name="umoci/test")
    assert r.names == [f"docker.io/umoci/test:{tag}"] and r.new_layers == 4
    path = s.mount(f"umoci/test:{tag}")
    try:
        assert trees_equal(umoci_tree, path) == []
    finally:
        s.unmount(f"umoci/test:{tag}")
    assert s.fsck().ok


def test_skopeo_copy_loads_and_shares(make_store, driver_name, umoci_layout, umoci_tree,
                                      tmp_path):
    layout, tag = umoci_layout
    copied = tmp_path / "copied"
    skopeo("copy", f"oci:{layout}:{tag}", f"oci:{copied}:fromskopeo")
    s = make_store(driver_name)
    s.load(f"oci:{layout}:{tag}", base_name="umoci/test")
    (r,) = s.load(copied, base_name="skopeo/test")
    # skopeo kept the manifest: the same image, one more name, nothing stored
    assert r.stored_nothing and "docker.io/skopeo/test:fromskopeo" in r.names
    # recompressed by skopeo (zstd): a new manifest and new blobs, the same layers
    zst = tmp_path / "zst"
    skopeo("copy", "--dest-compress", "--dest-compress-format", "zstd",
           f"oci:{layout}:{tag}", f"oci:{zst}:zst")
    (z,) = s.load(zst, base_name="skopeo/test")
    assert z.image.manifest_digest != r.image.manifest_digest
    assert z.new_layers == 0 and z.reused_layers == 4 and z.blobs_written >= 4
    assert len(s.layers()) == 4
    path = s.mount("skopeo/test:zst")
    try:
        assert trees_equal(umoci_tree, path) == []
    finally:
        s.unmount("skopeo/test:zst")


@pytest.mark.parametrize("fmt", ["oci", "oci-dir", "docker-archive"])
def test_saved_image_accepted_by_the_tools(make_store, umoci_layout, umoci_tree, tmp_path, fmt):
    layout, tag = umoci_layout
    s = make_store("overlay")
    (r,) = s.load(f"oci:{layout}:{tag}", names=["example.com/team/app:1.0"])
    out = tmp_path / ("saved" if fmt == "oci-dir" else "saved.tar")
    s.save(["example.com/team/app:1.0"], out, fmt)
    transport = {"oci": "oci-archive", "oci-dir": "oci", "docker-archive": "docker-archive"}[fmt]
    ref = f"{transport}:{out}"
    info = json.loads(skopeo("inspect", ref).stdout)
    cfg = json.loads(skopeo("inspect", "--config", ref).stdout)
    assert cfg["rootfs"]["diff_ids"] == [l.diff_id for l in r.image.layers]
    if fmt != "docker-archive":
        assert info["Digest"] == r.image.manifest_digest
        assert info["Layers"] == [l.digest for l in r.image.layers]
        raw = skopeo("inspect", "--raw", ref).stdout.encode()
        assert raw == s.read_blob(r.image.manifest_digest)
    else:
        assert info["RepoTags"] == ["example.com/team/app:1.0"] or \
            info["Layers"] == [l.diff_id for l in r.image.layers]
    # skopeo copies it (verifying every blob), umoci unpacks the copy to the same tree
    copy = tmp_path / "copy"
    skopeo("copy", ref, f"oci:{copy}:c")
    run("umoci", "unpack", "--image", f"{copy}:c", tmp_path / "bundle")
    assert trees_equal(umoci_tree, str(tmp_path / "bundle/rootfs")) == []
    if fmt == "oci-dir":
        run("umoci", "unpack", "--image", f"{out}:1.0", tmp_path / "bundle2")
        assert trees_equal(umoci_tree, str(tmp_path / "bundle2/rootfs")) == []


def test_skopeo_docker_archive_loads(make_store, umoci_layout, umoci_tree, tmp_path):
    layout, tag = umoci_layout
    archive = tmp_path / "docker.tar"
    skopeo("copy", f"oci:{layout}:{tag}", f"docker-archive:{archive}:team/name:t")
    s = make_store("overlay")
    (r,) = s.load(archive)
    assert r.names == ["docker.io/team/name:t"] and r.new_layers == 4
    # uncompressed layers: regenerated from the records, not stored twice
    assert all(not s.has_blob(l.digest) for l in r.image.layers)
    path = s.mount("team/name:t")
    try:
        assert trees_equal(umoci_tree, path) == []
    finally:
        s.unmount("team/name:t")
    out = tmp_path / "again.tar"
    s.save(["team/name:t"], out, "docker-archive")
    info = json.loads(skopeo("inspect", f"docker-archive:{out}").stdout)
    assert info["Layers"] == [l.digest for l in r.image.layers]
