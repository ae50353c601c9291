"""The overlay driver: the conformance suite (kernel overlayfs and fuse-overlayfs),
and what is particular to overlay."""
from __future__ import annotations

from .conformance import Conformance


class TestOverlay(Conformance):
    DRIVER = "overlay"


class TestOverlayFuse(Conformance):
    DRIVER = "overlay"
    OPTIONS = {"mount_program": "fuse-overlayfs"}
    MAX_EXAMPLES = 10
