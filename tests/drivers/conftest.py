"""Fixtures for the driver tests: real stores under tmp dirs, real mounts.

    driver_name   the driver under test: the test class's DRIVER, else the
                  parametrization over layerfs.drivers.BUILTIN (conformance.py)
    make_driver   make_driver(name=None, **options) -> a driver on a new store;
                  every store is cleaned up (unmounted, swept) after the test and
                  checked to have no mount left
    driver        make_driver() with the test class's OPTIONS
"""
from __future__ import annotations

import os
import subprocess
from typing import List

import pytest

pytest.register_assert_rewrite("tests.drivers.conformance")

import layerfs.drivers as drivers  # noqa: E402
from layerfs.drivers.base import remove_tree  # noqa: E402


def mounts_under(root: str) -> List[str]:
    """Mount points at or below root (deepest first), from /proc/self/mountinfo."""
    root = os.path.realpath(root)
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mp = line.split(b" ")[4].decode("utf-8", "surrogateescape")
            mp = mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                   .replace("\\134", "\\")
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return sorted(set(out), key=lambda m: m.count("/"), reverse=True)


@pytest.fixture
def driver_name(request) -> str:
    cls = request.cls
    if cls is not None and getattr(cls, "DRIVER", None):
        return cls.DRIVER
    param = getattr(request, "param", None)
    if param:
        return param
    pytest.fail("no driver under test: set DRIVER on the test class")


@pytest.fixture
def make_driver(driver_name, tmp_path_factory, request):
    made = []
    cls_options = dict(getattr(request.cls, "OPTIONS", None) or {})

    def make(name=None, **options):
        name = name or driver_name
        opts = dict(cls_options) if name == driver_name else {}
        opts.update(options)
        cls = drivers.driver_class(name)  # NotSupported names a driver that cannot load
        s = cls.supported(None)
        if not s.ok:
            pytest.fail(f"driver {name!r} not supported here: {s.reason}")
        root = str(tmp_path_factory.mktemp(f"store-{name}"))
        d = cls(root, **opts)
        made.append(d)
        return d

    yield make
    left = []
    for d in made:
        try:
            d.cleanup()
        finally:
            for mp in mounts_under(d.root):
                left.append(mp)
                subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)
            if not mounts_under(d.root):
                remove_tree(d.root)
    assert not left, f"cleanup() left mounts behind: {left}"


@pytest.fixture
def driver(make_driver):
    return make_driver()


def pytest_collect_file(file_path, parent):
    """conformance.py is a test module too: it runs the suite for every built-in
    driver that has no test_<name>.py of its own running it."""
    if file_path.name == "conformance.py" and \
            str(file_path.parent) == os.path.dirname(os.path.abspath(__file__)) and \
            not parent.session.isinitpath(file_path):  # named on the command line: pytest has it
        return pytest.Module.from_parent(parent, path=file_path)
    return None
