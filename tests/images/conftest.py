"""Test images, built without a network.

- :func:`build_layout` writes an OCI layout by hand: layer tarballs made by
  ``layerfs.archive.create_layer`` (plain, gzip or zstd) from directories the
  test fills, configs and manifests written as JSON, index.json naming them;
- the ``umoci_layout`` fixture builds a four-layer image with umoci (unpack,
  change the rootfs, repack): deleted files and directories, a changed mode, a
  symlink and a hardlink; then a GNU tar layer with an opaque directory;
- :func:`run` runs a real tool and fails the test with its output.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from layerfs.archive import create_layer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES = {"none": "application/vnd.oci.image.layer.v1.tar",
               "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
               "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}


def run(*cmd, cwd=None, check=True) -> subprocess.CompletedProcess:
    p = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       timeout=300)
    if check and p.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jbytes(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def put_blob(layout: str, data: bytes) -> dict:
    """Store bytes as a blob of the layout; returns {digest, size}."""
    d = os.path.join(layout, "blobs", "sha256")
    os.makedirs(d, exist_ok=True)
    h = sha256_hex(data)
    with open(os.path.join(d, h), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + h, "size": len(data)}


@dataclass
class BuiltImage:
    manifest: dict
    manifest_digest: str
    config: dict
    config_digest: str
    layer_digests: List[str]
    diff_ids: List[str]
    trees: List[str] = field(default_factory=list)


def build_image(layout: str, trees: List[str], *, compression: str = "gzip",
                arch: str = "amd64", variant: Optional[str] = None,
                extra_config: Optional[dict] = None) -> BuiltImage:
    """Layers from directories (each a whole layer), a config and a manifest in
    the layout's blobs (not yet in index.json)."""
    comps = compression if isinstance(compression, list) else [compression] * len(trees)
    layers, diff_ids, digests = [], [], []
    tmp = os.path.join(layout, ".layer-tmp")
    for tree, comp in zip(trees, comps):
        # "gzip -9": compressed by GNU gzip, as most published layers are made
        # (bytes that layerfs' own compressor does not reproduce)
        r = create_layer(tree, tmp, compression="none" if comp == "gzip -9" else comp)
        with open(tmp, "rb") as f:
            data = f.read()
        os.unlink(tmp)
        if comp == "gzip -9":
            data = subprocess.run(["gzip", "-9", "-n", "-c"], input=data, check=True,
                                  capture_output=True).stdout
        desc = put_blob(layout, data)
        assert desc["digest"] == r.digest or comp == "gzip -9"
        layers.append({"mediaType": LAYER_TYPES[comp.split()[0]], **desc})
        diff_ids.append(r.diff_id)
        digests.append(desc["digest"])
    config = {"architecture": arch, "os": "linux",
              "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"layer {i}"} for i in range(len(trees))]}
    if variant:
        config["variant"] = variant
    config.update(extra_config or {})
    cbytes = jbytes(config)
    cdesc = put_blob(layout, cbytes)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, **cdesc}, "layers": layers}
    mdesc = put_blob(layout, jbytes(manifest))
    return BuiltImage(manifest, mdesc["digest"], config, cdesc["digest"], digests, diff_ids,
                      list(trees))


def write_index(layout: str, entries: List[dict]) -> None:
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(jbytes({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))


def entry(img: BuiltImage, layout: str, ref: Optional[str] = None, full: Optional[str] = None,
          platform: Optional[dict] = None) -> dict:
    size = os.path.getsize(os.path.join(layout, "blobs", "sha256",
                                        img.manifest_digest.split(":")[1]))
    e = {"mediaType": OCI_MANIFEST, "digest": img.manifest_digest, "size": size}
    ann = {}
    if ref:
        ann["org.opencontainers.image.ref.name"] = ref
    if full:
        ann["io.containerd.image.name"] = full
    if ann:
        e["annotations"] = ann
    if platform:
        e["platform"] = platform
    return e


def fill(root: str, files: Dict[str, object]) -> str:
    """Create files (bytes/str content), dirs (None) and symlinks (("->", target))."""
    os.makedirs(root, exist_ok=True)
    for rel, content in files.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if content is None:
            os.makedirs(p, exist_ok=True)
        elif isinstance(content, tuple):
            os.symlink(content[1], p)
        else:
            with open(p, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
    return root


def tree_records(root: str) -> Dict[str, tuple]:
    """path -> (type, mode, uid, gid, mtime or None, content digest / link target,
    xattrs) for everything below root.  Directory mtimes are left out: they
    change as entries are made."""
    out: Dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    content = sha256_hex(f.read())
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(p)
            try:
                xattrs = tuple(sorted((k, os.getxattr(p, k, follow_symlinks=False))
                                      for k in os.listxattr(p, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            mtime = None if stat.S_ISDIR(st.st_mode) else st.st_mtime_ns
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, mtime, content,
                        xattrs)
    return out


def trees_equal(a: str, b: str) -> List[str]:
    """The differences between two trees (empty when equal), as readable lines."""
    ra, rb = tree_records(a), tree_records(b)
    diffs = []
    for path in sorted(set(ra) | set(rb)):
        if path not in ra:
            diffs.append(f"added {path}")
        elif path not in rb:
            diffs.append(f"deleted {path}")
        elif ra[path] != rb[path]:
            diffs.append(f"modified {path}: {ra[path]} != {rb[path]}")
    return diffs


@pytest.fixture
def simple_layout(tmp_path):
    """A layout with two images: "app" (gzip + zstd + plain layers) and "base"."""
    layout = str(tmp_path / "layout")
    os.makedirs(layout)
    t1 = fill(str(tmp_path / "t1"), {"etc/os-release": "ID=test\n", "bin/tool": b"\x7fELF" * 100,
                                     "usr/share/doc": None, "link": ("->", "etc/os-release")})
    t2 = fill(str(tmp_path / "t2"), {"app/main.py": "print('hi')\n", "app/data/x": "x" * 5000})
    t3 = fill(str(tmp_path / "t3"), {"app/VERSION": "1.0\n"})
    app = build_image(layout, [t1, t2, t3], compression=["gzip", "zstd", "none"])
    base = build_image(layout, [t1])
    write_index(layout, [entry(app, layout, "1.0", "registry.example:5000/team/app:1.0"),
                         entry(app, layout, "latest"),
                         entry(base, layout, "docker.io/library/base:3")])
    return {"layout": layout, "app": app, "base": base, "tmp": tmp_path}


@pytest.fixture(scope="session")
def umoci_layout(tmp_path_factory):
    """An image built with umoci in three repacks (files deleted: whiteouts) and
    a GNU tar layer with an opaque directory; returns (layout dir, tag)."""
    need("umoci")
    work = tmp_path_factory.mktemp("umoci")
    layout, bundle = work / "layout", work / "bundle"
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")

    def step(change):
        if bundle.exists():
            shutil.rmtree(bundle)
        run("umoci", "unpack", "--image", f"{layout}:t", bundle)
        change(bundle / "rootfs")
        run("umoci", "repack", "--image", f"{layout}:t", bundle)

    def first(root):
        fill(str(root), {"etc/hostname": "box\n", "etc/motd": "hello\n",
                         "opt/app/lib/a.so": b"A" * 3000, "opt/app/lib/b.so": b"B" * 10,
                         "opt/app/conf/x.conf": "x=1\n", "bin/sh-link": ("->", "../etc/motd")})
        os.link(root / "etc/motd", root / "etc/motd.hard")
        os.chmod(root / "opt/app/lib/a.so", 0o755)

    def second(root):
        os.unlink(root / "etc/hostname")                   # whiteout
        shutil.rmtree(root / "opt/app/lib")                # replaced: opaque directory
        fill(str(root), {"opt/app/lib/c.so": b"C" * 77, "var/log/new.log": "log\n"})
        os.chmod(root / "etc/motd", 0o600)

    def third(root):
        shutil.rmtree(root / "opt/app/conf")
        fill(str(root), {"etc/hostname": "again\n"})

    for change in (first, second, third):
        step(change)
    # a fourth layer made by GNU tar and added verbatim: an opaque directory
    opq = work / "opaque"
    fill(str(opq), {"opt/app/lib/.wh..wh..opq": "", "opt/app/lib/d.so": b"D" * 99})
    run("tar", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@1700000000",
        "-C", opq, "-cf", work / "opaque.tar", "opt")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:t", work / "opaque.tar")
    return str(layout), "t"


@pytest.fixture
def umoci_tree(umoci_layout, tmp_path):
    """The reference rootfs of the umoci image, unpacked by umoci itself."""
    layout, tag = umoci_layout
    bundle = tmp_path / "ref-bundle"
    run("umoci", "unpack", "--image", f"{layout}:{tag}", bundle)
    return str(bundle / "rootfs")
