"""Benchmark corpora: real trees, their layer tarballs and OCI layouts.

Each corpus is a directory tree plus the layer tarballs made from it with GNU
tar (``tar --sort=name --numeric-owner --xattrs -C TREE -cf - .``), stored
uncompressed (``layer.tar``), gzip -6 (``layer.tar.gz``, what registries hold)
and zstd -3 (``layer.tar.zst``), and an OCI image layout per compressed layer
(for the umoci and skopeo comparisons).

    debian-minbase   ``debootstrap --variant=minbase bookworm`` from the mirror apt
                     uses here: ~6.7k files, ~120 MB, a typical base image layer.
    site-packages    ``pip install --target DIR numpy scipy pandas``: many small
                     files (.py, .pyc, .so), a typical application layer.

Everything lives under ``$LAYERFS_BENCH_CACHE`` (default
``/var/tmp/layerfs-bench``), never in the repository.  Building is idempotent:
a corpus is complete once its ``corpus.json`` exists, and each step writes to a
``.partial`` name and renames it into place.  Build by hand with::

    python -m bench.corpora [NAME ...]
"""
from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

CACHE = Path(os.environ.get("LAYERFS_BENCH_CACHE", "/var/tmp/layerfs-bench"))
SUITE = "bookworm"
SITE_PACKAGES = ("numpy", "scipy", "pandas")
TAG = "bench"

# ext -> (compression name, OCI media type, command compressing stdin to stdout)
LAYER_FORMATS = {
    "tar": ("none", "application/vnd.oci.image.layer.v1.tar", None),
    "gz": ("gzip", "application/vnd.oci.image.layer.v1.tar+gzip", ["gzip", "-6", "-n", "-c"]),
    "zst": ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd", ["zstd", "-3", "-q", "-c"]),
}
LAYER_FILES = {"tar": "layer.tar", "gz": "layer.tar.gz", "zst": "layer.tar.zst"}
OCI_FORMATS = ("gz", "zst")


@dataclass(frozen=True)
class Layer:
    path: Path
    ext: str                 # "tar", "gz" or "zst"
    compression: str         # "none", "gzip" or "zstd"
    media_type: str
    digest: str              # sha256 of the file as stored
    size: int
    diff_id: str             # sha256 of the uncompressed tar
    tar_size: int


@dataclass(frozen=True)
class TreeStats:
    files: int               # regular file entries (hardlinks counted per name)
    dirs: int
    symlinks: int
    other: int               # devices, fifos, sockets
    hardlinks: int           # names beyond the first of a regular file
    bytes: int               # size of the regular files (each inode once)
    xattrs: int              # entries carrying at least one xattr

    @property
    def entries(self) -> int:
        return self.files + self.dirs + self.symlinks + self.other


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    dir: Path
    tree: Path
    stats: TreeStats
    layers: Dict[str, Layer]
    oci: Dict[str, Path]     # ext -> OCI image layout holding that layer, tag TAG
    info: Dict[str, str] = field(default_factory=dict)   # versions, mirror, build time

    def layer(self, ext: str) -> Layer:
        return self.layers[ext]

    def oci_ref(self, ext: str) -> str:
        """``LAYOUT:TAG`` of the image whose only layer is ``layer(ext)``."""
        return f"{self.oci[ext]}:{TAG}"


# ---------------------------------------------------------------- helpers

def _log(msg: str) -> None:
    print(f"[corpora] {msg}", file=sys.stderr, flush=True)


def _run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    _log("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def _sha256_file(path: Path) -> tuple:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                break
            h.update(b)
            n += len(b)
    return "sha256:" + h.hexdigest(), n


def _remove_partial(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def tree_stats(root: Path) -> TreeStats:
    files = dirs = symlinks = other = hardlinks = size = xattrs = 0
    seen = set()
    stack = [str(root)]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                try:
                    if os.listxattr(e.path, follow_symlinks=False):
                        xattrs += 1
                except OSError:
                    pass
                if stat.S_ISDIR(st.st_mode):
                    dirs += 1
                    stack.append(e.path)
                elif stat.S_ISREG(st.st_mode):
                    files += 1
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        hardlinks += 1
                    else:
                        seen.add(key)
                        size += st.st_size
                elif stat.S_ISLNK(st.st_mode):
                    symlinks += 1
                else:
                    other += 1
    return TreeStats(files, dirs, symlinks, other, hardlinks, size, xattrs)


def apt_mirror(suite: str = SUITE) -> str:
    """The Debian mirror apt uses on this machine for ``suite`` (sources.list*)."""
    env = os.environ.get("LAYERFS_BENCH_MIRROR")
    if env:
        return env
    paths = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")) \
        + sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for p in paths:
        try:
            text = Path(p).read_text()
        except OSError:
            continue
        if p.endswith(".sources"):          # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields: Dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" in fields.get("types", "").split() and \
                        suite in fields.get("suites", "").split():
                    return fields["uris"].split()[0]
        else:                               # one-line format
            for line in text.splitlines():
                parts = line.split("#", 1)[0].split()
                if len(parts) >= 3 and parts[0] == "deb":
                    rest = parts[1:]
                    if rest[0].startswith("["):        # [options]
                        while rest and not rest[0].endswith("]"):
                            rest = rest[1:]
                        rest = rest[1:]
                    if len(rest) >= 2 and rest[1] == suite:
                        return rest[0]
    return "http://deb.debian.org/debian"


# ---------------------------------------------------------------- tree builders

def _build_debian(dest: Path) -> Dict[str, str]:
    mirror = apt_mirror()
    _run(["debootstrap", "--variant=minbase", SUITE, dest, mirror],
         stdout=subprocess.DEVNULL)
    # As image builds do (apt-get clean; rm -rf /var/lib/apt/lists/*): the
    # downloaded .debs and package lists are not part of a base image layer.
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*"):
        for p in dest.glob(pattern):
            if p.is_file() and not p.is_symlink():
                p.unlink()
    version = (dest / "etc/debian_version").read_text().strip()
    return {"mirror": mirror, "debian_version": version,
            "command": f"debootstrap --variant=minbase {SUITE} DIR {mirror}; apt-get clean; "
                       "rm /var/lib/apt/lists/*"}


def _build_site_packages(dest: Path) -> Dict[str, str]:
    _run([sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
          "--no-warn-script-location", "--target", dest, *SITE_PACKAGES],
         stdout=subprocess.DEVNULL)
    versions = {}
    for di in dest.glob("*.dist-info"):
        m = re.match(r"(.+)-([^-]+)\.dist-info$", di.name)
        if m:
            versions[m.group(1).lower()] = m.group(2)
    return {"packages": ", ".join(f"{k} {v}" for k, v in sorted(versions.items())),
            "python": sys.version.split()[0],
            "command": "pip install --target DIR " + " ".join(SITE_PACKAGES)}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    build: Callable[[Path], Dict[str, str]]


RECIPES: Dict[str, Recipe] = {
    "debian-minbase": Recipe("debian-minbase",
                             f"Debian {SUITE} minbase rootfs (debootstrap)", _build_debian),
    "site-packages": Recipe("site-packages",
                            "pip site-packages with " + ", ".join(SITE_PACKAGES),
                            _build_site_packages),
}
NAMES = tuple(RECIPES)


# ---------------------------------------------------------------- layers and layouts

def _make_layers(tree: Path, cdir: Path) -> Dict[str, Layer]:
    tar = cdir / LAYER_FILES["tar"]
    if not tar.exists():
        part = cdir / (tar.name + ".partial")
        with open(part, "wb") as out:
            _run(["tar", "--sort=name", "--numeric-owner", "--xattrs", "-C", tree, "-cf", "-", "."],
                 stdout=out)
        os.rename(part, tar)
    diff_id, tar_size = _sha256_file(tar)
    layers = {}
    for ext, (comp, media, cmd) in LAYER_FORMATS.items():
        path = cdir / LAYER_FILES[ext]
        if cmd and not path.exists():
            part = cdir / (path.name + ".partial")
            with open(tar, "rb") as src, open(part, "wb") as out:
                _run(cmd, stdin=src, stdout=out)
            os.rename(part, path)
        digest, size = _sha256_file(path) if cmd else (diff_id, tar_size)
        layers[ext] = Layer(path, ext, comp, media, digest, size, diff_id, tar_size)
    return layers


def _write_blob(blobs: Path, data: bytes) -> tuple:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


def make_oci_layout(layer: Layer, dest: Path, tag: str = TAG) -> Path:
    """Write an OCI image layout at dest whose image ``tag`` has the single layer ``layer``.

    The layer blob is hard-linked into the layout (same filesystem), else copied.
    """
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".partial")
    _remove_partial(part)
    blobs = part / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (part / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    lblob = blobs / layer.digest.split(":", 1)[1]
    try:
        os.link(layer.path, lblob)
    except OSError:
        shutil.copyfile(layer.path, lblob)
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "layerfs bench corpus"}],
    }
    cdigest, csize = _write_blob(blobs, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": cdigest, "size": csize},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}],
    }
    mdigest, msize = _write_blob(blobs, json.dumps(manifest, sort_keys=True).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": mdigest, "size": msize,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (part / "index.json").write_text(json.dumps(index, sort_keys=True))
    os.rename(part, dest)
    return dest


# ---------------------------------------------------------------- corpus

def _load(recipe: Recipe, cdir: Path, meta: dict) -> Corpus:
    layers = {ext: Layer(Path(d["path"]), ext, d["compression"], d["media_type"], d["digest"],
                         d["size"], d["diff_id"], d["tar_size"])
              for ext, d in meta["layers"].items()}
    return Corpus(recipe.name, recipe.description, cdir, Path(meta["tree"]),
                  TreeStats(**meta["stats"]), layers,
                  {ext: Path(p) for ext, p in meta["oci"].items()}, meta.get("info", {}))


def build(name: str, cache: Path = CACHE) -> Corpus:
    """Build (or load the already built) corpus ``name``; safe to call concurrently."""
    recipe = RECIPES[name]
    cdir = cache / name
    cdir.mkdir(parents=True, exist_ok=True)
    meta_path = cdir / "corpus.json"
    with open(cdir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if all(Path(d["path"]).exists() for d in meta["layers"].values()) and \
                    all(Path(p).exists() for p in meta["oci"].values()) and \
                    Path(meta["tree"]).is_dir():
                return _load(recipe, cdir, meta)
            meta_path.unlink()

        t0 = time.monotonic()
        tree = cdir / "tree"
        info: Dict[str, str] = {}
        info_path = cdir / "tree.info.json"
        if not tree.is_dir():
            part = cdir / "tree.partial"
            _remove_partial(part)
            part.mkdir()
            info = recipe.build(part)
            info_path.write_text(json.dumps(info))
            os.rename(part, tree)
        elif info_path.exists():
            info = json.loads(info_path.read_text())
        t_tree = time.monotonic() - t0
        stats = tree_stats(tree)
        layers = _make_layers(tree, cdir)
        oci = {ext: make_oci_layout(layers[ext], cdir / f"oci-{ext}") for ext in OCI_FORMATS}
        info = dict(info)
        info["build_seconds"] = f"{time.monotonic() - t0:.1f}"
        info.setdefault("tree_seconds", f"{t_tree:.1f}")
        meta = {
            "name": name,
            "tree": str(tree),
            "stats": stats._asdict(),
            "layers": {ext: {"path": str(l.path), "compression": l.compression,
                             "media_type": l.media_type, "digest": l.digest, "size": l.size,
                             "diff_id": l.diff_id, "tar_size": l.tar_size}
                       for ext, l in layers.items()},
            "oci": {ext: str(p) for ext, p in oci.items()},
            "info": info,
        }
        tmp = cdir / "corpus.json.partial"
        tmp.write_text(json.dumps(meta, indent=2))
        os.rename(tmp, meta_path)
        return _load(recipe, cdir, meta)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(c: Corpus) -> str:
    s = c.stats
    lines = [f"{c.name}: {c.description}",
             f"  tree      {c.tree}",
             f"  entries   {s.entries} ({s.files} files, {s.dirs} dirs, {s.symlinks} symlinks, "
             f"{s.other} other; {s.hardlinks} hardlinks, {s.xattrs} with xattrs)",
             f"  content   {_mb(s.bytes)}"]
    for ext, l in c.layers.items():
        lines.append(f"  {l.path.name:<14}{_mb(l.size):>10}  {l.digest}")
    lines.append(f"  diff_id   {c.layers['tar'].diff_id}")
    for ext, p in c.oci.items():
        lines.append(f"  oci-{ext:<6}{p}:{TAG}")
    for k, v in c.info.items():
        lines.append(f"  {k + ' ':<10}{v}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.corpora", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", help=f"corpora to build (default: all of {', '.join(NAMES)})")
    args = ap.parse_args(argv)
    names = args.names or list(NAMES)
    for n in names:
        if n not in RECIPES:
            ap.error(f"unknown corpus {n!r}; known: {', '.join(NAMES)}")
    for n in names:
        t0 = time.monotonic()
        c = build(n)
        print(describe(c))
        print(f"  ready in  {time.monotonic() - t0:.1f}s (cache {c.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
