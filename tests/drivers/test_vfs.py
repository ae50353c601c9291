"""The vfs driver: the conformance suite, and what is particular to full copies."""
from __future__ import annotations

import io
import os
from pathlib import Path

from .conformance import Conformance, Mounted, file_, layer_tar


class TestVfs(Conformance):
    DRIVER = "vfs"
