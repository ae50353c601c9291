"""The store verbs of the layerfs command, end to end in real processes."""
from __future__ import annotations

import json
import os

import pytest

from tests.store.conftest import images, mounts_under  # noqa: F401  (fixture)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "store"
    yield str(r)
    import subprocess
    for mp in mounts_under(str(r)):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    return p


def test_load_images_tag_inspect_history(layerfs_cli, root, images):
    p = ok(layerfs_cli("--root", root, "--driver", "vfs", "load", "-i", images["layout"]))
    assert "Loaded image: docker.io/library/app:1" in p.stdout
    assert p.stdout.count("Loaded image:") == 3
    # the driver is remembered; --root also after the verb
    p = ok(layerfs_cli("images", "--json", "--root", root))
    doc = json.loads(p.stdout)
    by_name = {i["names"][0]: i for i in doc["images"]}
    assert set(by_name) == {"docker.io/library/base:1", "docker.io/library/app:1",
                            "example.com/team/other:1"}
    app = by_name["docker.io/library/app:1"]
    assert app["id"] == images["app"].config_digest and app["layers"] == 3
    assert app["shared_size"] > 0 and app["size"] == app["shared_size"] + app["unique_size"]
    p = ok(layerfs_cli("--root", root, "images"))
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["REPOSITORY", "TAG", "IMAGE", "ID"]
    assert any(l.split()[:3] == ["example.com/team/other", "1",
                                 images["other"].config_digest[7:19]] for l in lines)
    ok(layerfs_cli("--root", root, "tag", "app:1", "registry.local:5000/x/app"))
    p = ok(layerfs_cli("--root", root, "inspect", "registry.local:5000/x/app:latest"))
    (doc,) = json.loads(p.stdout)
    assert doc["Id"] == images["app"].config_digest
    assert doc["ManifestDigest"] == images["app"].manifest_digest
    assert sorted(doc["RepoTags"]) == ["docker.io/library/app:1",
                                       "registry.local:5000/x/app:latest"]
    assert [l["diff_id"] for l in doc["Layers"]] == images["app"].diff_ids
    p = ok(layerfs_cli("--root", root, "history", "--json", "app:1"))
    hist = json.loads(p.stdout)["history"]
    assert [h["created_by"] for h in hist] == ["layer 2", "layer 1", "layer 0"]
    assert [h["diff_id"] for h in hist] == images["app"].diff_ids[::-1]
    p = ok(layerfs_cli("--root", root, "history", "app:1"))
    assert "CREATED BY" in p.stdout.splitlines()[0]


def test_driver_is_remembered(layerfs_cli, root, images):
    ok(layerfs_cli("--root", root, "--driver", "vfs", "load", "-q", "-i",
                   images["only"]["base"]))
    p = layerfs_cli("--root", root, "--driver", "overlay", "images")
    assert p.returncode == 2
    assert "uses the 'vfs' driver" in p.stderr and p.stderr.startswith("layerfs: error:")
    with open(os.path.join(root, "store.json")) as f:
        assert json.load(f)["driver"] == "vfs"


def test_save_rmi_prune_df_fsck(layerfs_cli, root, images, tmp_path):
    ok(layerfs_cli("--root", root, "--driver", "overlay", "load", "-q", "-i",
                   images["layout"]))
    out = tmp_path / "app.tar"
    ok(layerfs_cli("--root", root, "save", "app:1", "-o", out))
    from layerfs.images import open_image_source
    with open_image_source(out) as src:
        (img,) = src.images()
        assert img.manifest_digest == images["app"].manifest_digest
    p = ok(layerfs_cli("--root", root, "df", "--json"))
    before = json.loads(p.stdout)["totals"]
    assert before["images"] == 3 and before["layers"] == 4
    assert before["blobs_regenerable_size"] > 0
    p = ok(layerfs_cli("--root", root, "df", "-v"))
    assert "SHARED SIZE" in p.stdout and "regenerable" in p.stdout
    # mounted: rmi refused, exit 2 with one line
    p = ok(layerfs_cli("--root", root, "mount", "base:1"))
    path = p.stdout.strip()
    assert os.path.isfile(os.path.join(path, "usr/lib/big.bin"))
    p = layerfs_cli("--root", root, "rmi", "base:1")
    assert p.returncode == 2 and "in use" in p.stderr and len(p.stderr.splitlines()) == 1
    ok(layerfs_cli("--root", root, "unmount", "base:1"))
    p = ok(layerfs_cli("--root", root, "rmi", "base:1", "app:1"))
    assert "Untagged: docker.io/library/base:1" in p.stdout
    assert f"Deleted: {images['app'].config_digest}" in p.stdout
    # prune --blobs: the OCI save must recompress now
    p = ok(layerfs_cli("--root", root, "prune", "--blobs", "--json"))
    assert json.loads(p.stdout)["deleted_blobs"]
    p = layerfs_cli("--root", root, "save", "example.com/team/other:1", "-o", tmp_path / "o.tar")
    assert p.returncode == 2 and "--allow-recompress" in p.stderr
    p = ok(layerfs_cli("--root", root, "save", "example.com/team/other:1", "-o",
                       tmp_path / "o.tar", "--allow-recompress", "--json"))
    assert json.loads(p.stdout)["manifest_changed"] is True
    assert "manifest is now" in p.stderr
    p = ok(layerfs_cli("--root", root, "save", "--format", "docker-archive",
                       "example.com/team/other:1", "-o", tmp_path / "d.tar"))
    p = ok(layerfs_cli("--root", root, "fsck", "--json"))
    assert json.loads(p.stdout)["ok"] is True
    # damage: fsck exits 1 and names it
    files = os.path.join(root, "blobs", "sha256")
    victim = sorted(os.listdir(files))[0]
    with open(os.path.join(files, victim), "ab") as f:
        f.write(b"x")
    p = layerfs_cli("--root", root, "fsck")
    assert p.returncode == 1 and f"blob sha256:{victim}: content has digest" in p.stdout


def test_import_and_errors(layerfs_cli, root, images, tmp_path):
    from layerfs.archive import create_layer
    tarball = tmp_path / "rootfs.tar.zst"
    create_layer(images["tmp"] / "t3", tarball, compression="zstd")
    p = ok(layerfs_cli("--root", root, "import", tarball, "mine:1", "-m", "hello"))
    image_id = p.stdout.strip()
    assert image_id.startswith("sha256:")
    p = ok(layerfs_cli("--root", root, "history", "--json", "mine:1"))
    (h,) = json.loads(p.stdout)["history"]
    assert h["comment"] == "hello" and h["created_by"].startswith("layerfs import")
    p = layerfs_cli("--root", root, "rmi", "nosuch:tag")
    assert p.returncode == 2 and "no such image" in p.stderr
    p = layerfs_cli("--root", root, "tag", "mine:1", "Bad:Name")
    assert p.returncode == 2 and "lowercase" in p.stderr
    p = layerfs_cli("--root", root, "load", "-i", tmp_path / "missing")
    assert p.returncode == 2 and "layerfs: error:" in p.stderr
    p = ok(layerfs_cli("--root", root, "rmi", image_id[7:19]))
    assert "Deleted:" in p.stdout
