"""Loading an image into a store: ``layerfs load`` against ``skopeo copy`` into
containers-storage, side by side in the same rounds.

The image has three layers, bottom first: the Debian minbase corpus, the
site-packages corpus and a small top layer (a few hundred small files), each a
corpus layer blob (gzip -6 or zstd -3) in one OCI layout.  Every round loads it
into a fresh, empty store on the benchmark's own filesystem:

    layerfs --root STORE --driver D load -q -i oci:LAYOUT:bench
    skopeo copy oci:LAYOUT:bench containers-storage:[D@STORE/root+STORE/run]bench:latest

D is overlay when containers-storage can use it on that filesystem (else vfs),
the same for both.  Both verify the blob digests and DiffIDs, extract every
layer and keep what they need to give the layer tars back (layerfs: the blobs
and tar-split records; containers-storage: its tar-split files).  Goal: layerfs
at least 3x faster (ratio <= 1/3).  After the rounds, the last store of each is
checked: layerfs's image has its three layers and its view equals the corpus
trees stacked; skopeo's layers are where containers-storage puts them.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from bench import corpora as C
from bench.conftest import Contender, run_command
from bench.test_bench_unpack import _skopeo_argv, _skopeo_driver, _skopeo_env, _probe, cli_startup

LOAD_DIR = C.CACHE / "load-3layer"
TAG = "bench"


def _top_layer(ext: str) -> C.Layer:
    """A small top layer: 300 small text files and a config dir, made by GNU tar."""
    d = LOAD_DIR / "top"
    tree = d / "tree"
    if not tree.is_dir():
        part = d / "tree.partial"
        if part.exists():
            subprocess.run(["rm", "-rf", str(part)], check=True)
        (part / "srv/app/static").mkdir(parents=True)
        (part / "etc/app").mkdir(parents=True)
        for i in range(300):
            (part / "srv/app/static" / f"page{i:03d}.html").write_text(
                f"<html><body>page {i}</body></html>\n" * (1 + i % 7))
        (part / "etc/app/app.conf").write_text("listen = 8080\nworkers = 4\n")
        (part / "srv/app/VERSION").write_text("1.0.0\n")
        os.rename(part, tree)
    tar = d / "layer.tar"
    if not tar.exists():
        with open(str(tar) + ".partial", "wb") as out:
            run_command(["tar", "--sort=name", "--numeric-owner", "--mtime=@1700000000",
                         "--owner=0", "--group=0", "-C", tree, "-cf", "-", "."], stdout=out)
        os.rename(str(tar) + ".partial", tar)
    comp, media, cmd = C.LAYER_FORMATS[ext]
    path = d / C.LAYER_FILES[ext]
    if not path.exists():
        with open(tar, "rb") as src, open(str(path) + ".partial", "wb") as out:
            subprocess.run(cmd, stdin=src, stdout=out, check=True)
        os.rename(str(path) + ".partial", path)
    diff_id, tar_size = C._sha256_file(tar)
    digest, size = C._sha256_file(path)
    return C.Layer(path, ext, comp, media, digest, size, diff_id, tar_size)


def _blob(blobs: Path, data: bytes) -> dict:
    h = hashlib.sha256(data).hexdigest()
    (blobs / h).write_bytes(data)
    return {"digest": "sha256:" + h, "size": len(data)}


def three_layer_layout(corpora, ext: str) -> (Path, List[C.Layer]):
    """The OCI layout (built once, cached) and its layers, bottom first."""
    LOAD_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOAD_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        layers = [corpora("debian-minbase").layer(ext), corpora("site-packages").layer(ext),
                  _top_layer(ext)]
        dest = LOAD_DIR / f"oci-{ext}"
        if dest.exists():
            return dest, layers
        part = LOAD_DIR / f"oci-{ext}.partial"
        if part.exists():
            subprocess.run(["rm", "-rf", str(part)], check=True)
        blobs = part / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        (part / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        for l in layers:
            target = blobs / l.digest.split(":", 1)[1]
            try:
                os.link(l.path, target)
            except OSError:
                subprocess.run(["cp", str(l.path), str(target)], check=True)
        config = {
            "created": "2024-01-01T00:00:00Z", "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [l.diff_id for l in layers]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": what}
                        for what in ("debootstrap --variant=minbase bookworm",
                                     "pip install numpy scipy pandas", "COPY app /srv/app")],
        }
        cdesc = _blob(blobs, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cdesc},
            "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size}
                       for l in layers]}
        mdesc = _blob(blobs, json.dumps(manifest, sort_keys=True).encode())
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                **mdesc, "annotations": {
                                    "org.opencontainers.image.ref.name": TAG}}]}
        (part / "index.json").write_text(json.dumps(index, sort_keys=True))
        os.rename(part, dest)
        return dest, layers


def _check_layerfs_store(cli, store: Path, layers: List[C.Layer], corpora) -> None:
    out = run_command(cli + ["--root", store, "images", "--json"], stdout=subprocess.PIPE)
    images = json.loads(out.stdout)["images"]
    assert len(images) == 1 and images[0]["layers"] == 3, images
    assert images[0]["names"] == ["docker.io/library/bench:latest"], images
    fsck = subprocess.run(cli + ["--root", str(store), "fsck", "--quick", "--json"],
                          capture_output=True, text=True)
    assert fsck.returncode == 0 and json.loads(fsck.stdout)["ok"], fsck.stdout + fsck.stderr
    path = run_command(cli + ["--root", store, "mount", "bench"],
                       stdout=subprocess.PIPE).stdout.decode().strip()
    try:
        # the three trees are disjoint except for the root: the view holds each one whole
        for name, sub in (("debian-minbase", "etc/debian_version"),
                          ("site-packages", "numpy/__init__.py")):
            want = (corpora(name).tree / sub).read_bytes()
            assert (Path(path) / sub).read_bytes() == want, f"{sub} differs in the view"
        assert (Path(path) / "srv/app/VERSION").read_text() == "1.0.0\n"
        got = C.tree_stats(Path(path))
        want_files = sum(corpora(n).stats.files for n in ("debian-minbase", "site-packages")) + 302
        assert got.files == want_files, (got, want_files)
    finally:
        run_command(cli + ["--root", store, "unmount", "bench"])


def _skopeo_layers(store: Path, driver: str) -> int:
    if driver == "overlay":
        return sum(1 for p in (store / "root" / "overlay").iterdir() if (p / "diff").is_dir())
    return sum(1 for _ in (store / "root" / "vfs" / "dir").iterdir())


@pytest.mark.benchmark(group="load 3-layer image vs skopeo")
@pytest.mark.parametrize("ext", ["gz", "zst"])
def test_load_vs_skopeo(side_by_side, fresh_fs, corpora, layerfs_cli, peers_only, ext):
    layout, layers = three_layer_layout(corpora, ext)
    ref = f"{layout}:{TAG}"
    driver = _skopeo_driver(ref, fresh_fs)

    def layerfs_load(store: Path):
        return run_command(layerfs_cli + ["--root", store, "--driver", driver, "load", "-q",
                                          "-i", f"oci:{ref}", "-t", "bench"])

    peer = Contender(
        "skopeo copy",
        lambda s: run_command(_skopeo_argv(ref, s, driver), env=_skopeo_env(s)),
        f"skopeo copy oci:{layout.name}:{TAG} containers-storage:[{driver}@STORE+RUN]bench:latest",
        goal=1 / 3)
    me = Contender("layerfs load", layerfs_load,
                   f"layerfs --root STORE --driver {driver} load -q -i oci:{layout.name}:{TAG} "
                   "-t bench")
    info: Dict[str, object] = {
        "image": f"3 layers ({ext}): debian-minbase, site-packages, small top layer",
        "layer_bytes": sum(l.size for l in layers),
        "tar_bytes": sum(l.tar_size for l in layers),
        "driver": driver,
    }
    if not peers_only:
        info["cli_startup_s"] = cli_startup(layerfs_cli)
    side_by_side.run(me, [peer], skopeo=f"{_probe['skopeo_version']}; containers-storage "
                                        f"driver {driver}", **info)
    extra = side_by_side.benchmark.extra_info
    if extra.get("ratio"):
        extra["speedup"] = round(1 / extra["ratio"], 2)
    if not peers_only:
        _check_layerfs_store(layerfs_cli, side_by_side.last["layerfs load"], layers, corpora)
    assert _skopeo_layers(side_by_side.last["skopeo copy"], driver) == 3
