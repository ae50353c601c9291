"""Storage drivers: one interface (:mod:`layerfs.drivers.base`), three built-ins.

- ``overlay``: kernel overlayfs (or fuse-overlayfs); whiteouts as char 0:0
- ``aufs``: AUFS-format layer directories, served as a union by layerfs's own
  FUSE filesystem (C core)
- ``vfs``: a full copy of the parent per layer

>>> import layerfs.drivers as drivers
>>> d = drivers.get("vfs", "/tmp/store")              # doctest: +SKIP
>>> drivers.supported()                                # doctest: +SKIP
{'overlay': Support(ok=True, reason='...'), ...}

Third-party drivers register through the ``layerfs.drivers`` entry-point group
(``name = "package.module:DriverClass"``); built-ins are imported lazily.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Type

from ..errors import NotFound, NotSupported
from .base import (AlreadyExists, Change, DirectoryDriver, Driver, LayerInfo, Mount,  # noqa: F401
                   PreconditionFailed, Support)

#: Built-in drivers by name, imported on first use.
BUILTIN = {
    "overlay": "layerfs.drivers.overlay:OverlayDriver",
    "aufs": "layerfs.drivers.aufs:AufsDriver",
    "vfs": "layerfs.drivers.vfs:VfsDriver",
}

#: The order in which a default driver is chosen.
PRIORITY = ("overlay", "aufs", "vfs")

_registered: Dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Register a driver class by import path ("package.module:Class")."""
    _registered[name] = target


def _entry_points() -> Dict[str, str]:
    from importlib.metadata import entry_points
    try:
        eps = entry_points(group="layerfs.drivers")
    except TypeError:  # Python < 3.10
        eps = entry_points().get("layerfs.drivers", [])
    return {ep.name: ep.value for ep in eps}


def names() -> List[str]:
    """Every known driver name: built-ins, registered, then entry points."""
    out = list(BUILTIN)
    for n in list(_registered) + list(_entry_points()):
        if n not in out:
            out.append(n)
    return out


def driver_class(name: str) -> Type[Driver]:
    target = _registered.get(name) or BUILTIN.get(name) or _entry_points().get(name)
    if target is None:
        raise NotFound(f"unknown storage driver {name!r} (known: {', '.join(names())})")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise NotSupported(f"storage driver {name!r} cannot be loaded from {target}: {e}") \
            from None
    return cls


def supported(root: Optional[str] = None) -> Dict[str, Support]:
    """Each known driver's Support (ok, reason) on this machine."""
    out = {}
    for n in names():
        try:
            out[n] = driver_class(n).supported(root)
        except NotSupported as e:
            out[n] = Support(False, e.strerror)
    return out


def default(root: Optional[str] = None) -> str:
    """The best supported driver: overlay, then aufs, then vfs."""
    reasons = []
    for n in PRIORITY:
        s = driver_class(n).supported(root)
        if s.ok:
            return n
        reasons.append(f"{n}: {s.reason}")
    raise NotSupported("no storage driver is supported here: " + "; ".join(reasons))


def get(name: Optional[str], root: str, **options) -> Driver:
    """An instance of driver ``name`` (None: the default) with its store at root."""
    name = name or default(root)
    cls = driver_class(name)
    s = cls.supported(root)
    if not s.ok:
        raise NotSupported(f"storage driver {name!r} is not supported here: {s.reason}")
    return cls(root, **options)
