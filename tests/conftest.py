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



# CI (scripts/test) sets LAYERFS_NO_SKIPS=1: there every prerequisite is installed
# and the tests run as root, so a skip would hide a test CI can run — fail instead.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("LAYERFS_NO_SKIPS") == "1" \
            and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under LAYERFS_NO_SKIPS=1: {reason}"
