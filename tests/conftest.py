"""Shared fixtures. Keep this file small and generic: area-specific fixtures live in their test modules."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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
    temp = Path(tempfile.mkdtemp(prefix="xrcam-ray-", dir="/tmp"))  # short: Ray's socket paths must fit
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
