"""The aufs driver: the conformance suite, and what is particular to AUFS
layer directories served by layerfs's FUSE union (csrc/union.c)."""
from __future__ import annotations

from .conformance import Conformance


class TestAufs(Conformance):
    DRIVER = "aufs"
