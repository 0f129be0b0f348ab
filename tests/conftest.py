"""Shared fixtures. Keep this file small and generic: area-specific fixtures live in their test modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

# Before anything imports ray: a local Ray then takes 127.0.0.1 as its node address instead of the
# machine's outward-facing one (loopback only), and sends no usage statistics.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session: 2 CPUs, bound to 127.0.0.1, no dashboard.

    Yields Ray's temporary folder (session logs, including worker stdout/stderr, live under it).
    Code under test that calls ``ray.init`` only when ``ray.is_initialized()`` is false reuses it.
    """
    ray = pytest.importorskip("ray")
    from workflows.ray_session import without_token_notice

    temp = Path(tempfile.mkdtemp(prefix="xrcam-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
    with without_token_notice():  # as for every local Ray of xrcam: Ray's default auth, without its notice
        ray.init(
            address="local",
            num_cpus=2,
            num_gpus=0,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=128 * 1024**2,
            _temp_dir=str(temp),
            log_to_driver=True,
        )
    try:
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


NOBODY = 65534


@pytest.fixture
def as_nobody():
    """Run ``xrcam ARGS...`` (the real CLI, in a subprocess) as user nobody, to meet permission errors.

    Yields ``.base``, a fresh world-readable folder in /tmp owned by root (nobody cannot write in it;
    pytest's own folders are 0700), and ``.run(*args)`` -> ``subprocess.CompletedProcess`` (text).
    Skipped unless the tests run as root and the virtual environment is readable by nobody.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user")
    repo = Path(__file__).parents[1]
    nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run(
        [*nobody, sys.executable, "-c", "import workflows.cli"], cwd=repo, capture_output=True
    )
    if probe.returncode:
        pytest.skip("the virtual environment is not readable by user nobody")
    base = Path(tempfile.mkdtemp(prefix="xrcam-nobody-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "home"  # nobody's own: caches (matplotlib, torch) go there
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)

    def run(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*nobody, sys.executable, "-m", "workflows.cli", *map(str, args)],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HOME": str(home)},
        )

    try:
        yield SimpleNamespace(base=base, run=run)
    finally:
        shutil.rmtree(base, ignore_errors=True)
