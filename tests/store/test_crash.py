"""Crashes and concurrency: a load killed at any point leaves nothing half-made
visible and its leftovers are swept on the next start; processes loading at
once make each shared layer once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from layerfs.store import Store

from .conftest import expected_tree, trees_equal

# A child process that loads an image and dies (os._exit, no clean-up at all) at a
# chosen point; the real code runs up to there.
CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    from layerfs.store import Store
    import layerfs.drivers.base as base
    import layerfs.store.store as store_mod
    point, root, driver, source = sys.argv[1:5]

    def die():
        os._exit(9)

    if point == "after-apply":               # the driver layer is filled, not marked complete
        orig = base.apply_layer
        def apply_layer(*a, **kw):
            orig(*a, **kw)
            die()
        base.apply_layer = apply_layer
    elif point == "before-layer-record":     # applied and complete in the driver, record staged
        real_rename = os.rename
        def rename(src, dst, *a, **kw):
            if "/layers/" in str(dst) and "/driver/" not in str(dst) and "tmp" in str(src):
                die()
            return real_rename(src, dst, *a, **kw)
        os.rename = rename
    elif point == "second-layer":            # one layer made, the next being applied
        orig = base.apply_layer
        n = [0]
        def apply_layer(*a, **kw):
            n[0] += 1
            if n[0] == 2:
                die()
            return orig(*a, **kw)
        base.apply_layer = apply_layer
    elif point == "before-image-record":
        store_mod.Store.put_image = lambda self, rec: die()
    s = Store(root, driver)
    s.load(source)
    print("finished")
""")


def _child(tmp_path, point, root, driver, source):
    script = tmp_path / "child.py"
    import layerfs
    script.write_text(CHILD.format(repo=os.path.dirname(os.path.dirname(layerfs.__file__))))
    return subprocess.run([sys.executable, str(script), point, root, driver, source],
                          capture_output=True, text=True, timeout=300)


def _assert_clean(s: Store, images_loaded=()):
    """Nothing half-made: every driver layer has a record and vice versa; tmp empty."""
    assert os.listdir(os.path.join(s.root, "tmp")) == []
    recorded = {l.id for l in s.layers()}
    in_driver = {i.id for i in s.driver.layers()}
    assert recorded == in_driver
    for i in s.driver.layers():
        assert i.complete
    assert {i.manifest_digest for i in s.images()} == set(images_loaded)
    rep = s.fsck()
    assert rep.ok, rep.problems


@pytest.mark.parametrize("point", ["after-apply", "before-layer-record", "second-layer",
                                   "before-image-record"])
def test_crash_points(make_store, images, tmp_path, point):
    s = make_store("overlay")
    root = s.root
    p = _child(tmp_path, point, root, "overlay", images["only"]["app"])
    assert p.returncode == 9, p.stdout + p.stderr
    # the dead process's work: not visible as an image
    assert s.images() == []
    with Store(root) as again:               # opened unused: sweeps
        if point in ("second-layer", "before-image-record"):
            assert len(again.layers()) >= 1  # complete layers stay, reusable
        _assert_clean(again)
        (r,) = again.load(images["only"]["app"])
        assert r.new_layers == 3 - (1 if point == "second-layer" else
                                    3 if point == "before-image-record" else 0)
        path = again.mount("app:1")
        try:
            assert trees_equal(expected_tree(images, tmp_path, "app"), path) == []
        finally:
            again.unmount("app:1")
        _assert_clean(again, [images["app"].manifest_digest])


def test_killed_at_random_moments(make_store, images, tmp_path):
    """SIGKILL a CLI load after growing delays; the store is always consistent."""
    s = make_store("vfs")
    root = s.root
    for delay in (0.05, 0.15, 0.3, 0.5, 0.8):
        p = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", root, "load", "-q",
                              "-i", images["layout"]], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with Store(root) as again:
            done = [i.manifest_digest for i in again.images()]
            _assert_clean(again, done)
    with Store(root) as again:
        again.load(images["layout"])
        _assert_clean(again, [images[n].manifest_digest for n in ("base", "app", "other")])


def test_concurrent_loads_share_the_base(make_store, images, tmp_path):
    for attempt in range(3):
        s = make_store("overlay")
        procs = [subprocess.Popen([sys.executable, "-m", "layerfs", "--root", s.root, "load",
                                   "-q", "--json", "-i", images["only"][name]],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for name in ("app", "other")]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
        loaded = [json.loads(out)["images"][0] for out, _ in outs]
        # base + 2 app layers + 1 other layer, the base made by exactly one of them
        assert sum(i["new_layers"] for i in loaded) == 4
        assert sum(i["reused_layers"] for i in loaded) == 1
        assert len(s.layers()) == 4 and len(s.driver.layers()) == 4
        _assert_clean(s, [images["app"].manifest_digest, images["other"].manifest_digest])


def test_removal_waits_for_a_load(make_store, images):
    """rmi takes the store lock exclusively: it cannot remove a base a load is reusing."""
    s = make_store("vfs")
    s.load(images["only"]["base"])
    holder = Store(s.root)
    with holder.reading():                   # as a load in progress does
        p = subprocess.Popen([sys.executable, "-m", "layerfs", "--root", s.root, "rmi",
                              "base:1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
        assert p.poll() is None              # waiting
        holder.load(images["only"]["other"])
    assert p.wait(timeout=60) == 0
    # the base layer survived: "other" uses it
    assert s.layer(images["base"].diff_ids[0]) is not None
    _assert_clean(s, [images["other"].manifest_digest])
