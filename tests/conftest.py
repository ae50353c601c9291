"""Shared test set-up: hypothesis profiles and a few small fixtures.

HYPOTHESIS_PROFILE=ci (derandomized, as CI runs it) or dev (the default).
"""
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

LAYERFS_CMD = [sys.executable, "-m", "layerfs"]


@pytest.fixture
def layerfs_cli():
    """Run the layerfs command: layerfs_cli("unpack", ...) -> CompletedProcess (text)."""
    def run(*args, timeout=300):
        return subprocess.run(LAYERFS_CMD + [os.fspath(a) for a in args], capture_output=True,
                              text=True, timeout=timeout)
    return run

