"""Fixtures for the store tests: real stores on every driver, real images.

    make_store    make_store(driver=None, root=None) -> Store on a new directory;
                  every store is unmounted and swept after the test
    images        a layout with "base" (one layer holding 4 MiB of random bytes)
                  and "app" (base + gzip, zstd and plain layers), and "other"
                  (the same base + its own layer)
    umoci_layout, umoci_tree   (tests/images/conftest.py) the umoci-built image
"""
from __future__ import annotations

import os
import subprocess
from typing import List

import pytest

import layerfs.drivers as drivers
from layerfs.drivers.base import remove_tree
from layerfs.store import Store

from tests.images.conftest import (build_image, entry, fill, run, trees_equal,  # noqa: F401
                                   umoci_layout, umoci_tree, write_index)

DRIVERS = list(drivers.BUILTIN)


def mounts_under(root: str) -> List[str]:
    root = os.path.realpath(root)
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split(b" ")[4].decode("utf-8", "surrogateescape").replace("\\040", " ")
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


def store_usage(root: str) -> int:
    """Disk bytes under root (st_blocks, each inode once, mounted views not entered)."""
    from layerfs.store._fs import disk_usage
    return disk_usage(root)


@pytest.fixture
def make_store(tmp_path_factory):
    made = []

    def make(driver=None, root=None, **kw):
        if driver is not None:
            s = drivers.driver_class(driver).supported(None)
            if not s.ok:
                pytest.fail(f"driver {driver!r} not supported here: {s.reason}")
        root = root or str(tmp_path_factory.mktemp(f"store-{driver or 'default'}"))
        st = Store(root, driver, **kw)
        made.append(st)
        return st

    yield make
    for st in made:
        try:
            st.driver.cleanup()
        finally:
            for mp in mounts_under(st.root):
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
            st.close()
            if not mounts_under(st.root):
                remove_tree(st.root)


@pytest.fixture(params=DRIVERS)
def driver_name(request):
    return request.param


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """One layout: base:1 (a layer of random bytes), app:1 (base + gzip, zstd, plain
    layers), other:1 (base + one layer, compressed by GNU gzip -9).  Returns a dict of
    paths and BuiltImages."""
    tmp = tmp_path_factory.mktemp("images")
    layout = str(tmp / "layout")
    os.makedirs(layout)
    big = os.urandom(4 << 20)
    t0 = fill(str(tmp / "t0"), {"etc/os-release": "ID=test\n", "usr/lib/big.bin": big,
                                "usr/bin": None, "bin": ("->", "usr/bin"),
                                "etc/gone": "to be deleted\n", "var/cache/x/y": "y\n"})
    os.chmod(os.path.join(t0, "etc/os-release"), 0o640)
    t1 = fill(str(tmp / "t1"), {"app/main.py": "print('hi')\n", "app/data/x": "x" * 5000,
                                "etc/gone": None})
    # a real whiteout and an opaque dir, AUFS style, in a hand-made layer dir
    os.rmdir(os.path.join(t1, "etc/gone"))
    fill(t1, {"etc/.wh.gone": "", "var/cache/x/.wh..wh..opq": "", "var/cache/x/z": "z\n"})
    t2 = fill(str(tmp / "t2"), {"app/VERSION": "1.0\n"})
    t3 = fill(str(tmp / "t3"), {"srv/other": "other\n"})
    base = build_image(layout, [t0])
    app = build_image(layout, [t0, t1, t2], compression=["gzip", "zstd", "none"])
    other = build_image(layout, [t0, t3], compression=["gzip", "gzip -9"])
    write_index(layout, [entry(base, layout, "base:1", "docker.io/library/base:1"),
                         entry(app, layout, "app:1", "docker.io/library/app:1"),
                         entry(other, layout, "other:1", "example.com/team/other:1")])
    only = {}
    for name, img, full in (("base", base, "docker.io/library/base:1"),
                            ("app", app, "docker.io/library/app:1"),
                            ("other", other, "example.com/team/other:1")):
        one = str(tmp / f"only-{name}")
        os.makedirs(one)
        for d in ("blobs",):
            subprocess.run(["cp", "-a", os.path.join(layout, d), one], check=True)
        write_index(one, [entry(img, one, name, full)])
        only[name] = one
    return {"layout": layout, "base": base, "app": app, "other": other, "only": only,
            "tmp": tmp}


def expected_tree(images, tmp_path, name: str) -> str:
    """The image's rootfs unpacked by layerfs.archive (the reference view)."""
    from layerfs.archive import unpack_layers
    layout = images["only"][name]
    img = images[name]
    dest = str(tmp_path / f"expected-{name}")
    unpack_layers([os.path.join(layout, "blobs/sha256", d.split(":")[1])
                   for d in img.layer_digests], dest)
    return dest


def need_tools(*tools: str) -> None:
    import shutil
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed (scripts/setup installs it)")
