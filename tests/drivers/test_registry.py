"""The driver registry: built-ins, third-party drivers through the
``layerfs.drivers`` entry-point group, support reasons, default choice, CLI."""
import json
import sys
import textwrap

import pytest

import layerfs.drivers as drivers
from layerfs.errors import NotFound


def test_builtins_are_known_and_supported_here():
    assert drivers.names()[:3] == ["overlay", "aufs", "vfs"]
    support = drivers.supported()
    for name in ("overlay", "aufs", "vfs"):
        assert support[name].ok, f"{name}: {support[name].reason}"
    # CI runs as root with overlayfs: the default is the first in priority order
    assert drivers.default() == "overlay"


def test_unknown_driver_is_not_found(tmp_path):
    with pytest.raises(NotFound) as ei:
        drivers.get("no-such-driver", str(tmp_path))
    assert isinstance(ei.value, FileNotFoundError)
    assert "overlay" in str(ei.value)  # the message lists the known drivers


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A real package on sys.path whose dist-info declares a driver entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_layers.py").write_text(textwrap.dedent('''
        from layerfs.drivers.vfs import VfsDriver

        class AcmeDriver(VfsDriver):
            """A third-party driver: vfs under another name."""
            name = "acme"
    '''))
    info = site / "acme_layers-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-layers\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[layerfs.drivers]\nacme = acme_layers:AcmeDriver\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("acme_layers", None)


def test_third_party_driver_through_entry_point(third_party, tmp_path):
    assert "acme" in drivers.names()
    assert drivers.supported()["acme"].ok
    d = drivers.get("acme", str(tmp_path / "store"))
    assert type(d).__name__ == "AcmeDriver"
    d.create("base")
    assert d.exists("base") and d.get("base").driver == "acme"


def test_cli_lists_drivers_with_reasons(layerfs_cli):
    r = layerfs_cli("drivers", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    by_name = {d["name"]: d for d in doc["drivers"]}
    assert {"overlay", "aufs", "vfs"} <= set(by_name)
    assert all(by_name[n]["supported"] for n in ("overlay", "aufs", "vfs"))
    assert doc["default"] == "overlay"
    text = layerfs_cli("drivers")
    assert text.returncode == 0 and "* overlay" in text.stdout
