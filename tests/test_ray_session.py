"""`workflows.ray_session`: the one way xrcam starts or joins Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = [pytest.mark.ray]

FRESH = """
import os, ray  # ray imported first on purpose: the session must still bind to loopback
os.environ.pop("XRCAM_ADDRESS", None)
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
from workflows.ray_session import ray_session

@ray.remote
def probe():
    import logging
    import workflows.ray_session as rs
    tuned = all(logging.getLogger(n).getEffectiveLevel() == logging.ERROR for n in rs._WITHOUT_DASHBOARD_NOISE)
    return tuned, ray.util.get_node_ip_address()

with ray_session(None, num_cpus=1) as started:
    tuned, ip = ray.get(probe.remote())
    print("STARTED", started, "TUNED", tuned, "IP", ip, "NODE", ray.nodes()[0]["NodeManagerAddress"])
print("AFTER", ray.is_initialized())
"""


@pytest.mark.slow
def test_fresh_local_session_binds_loopback_tunes_workers_and_shuts_down():
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STARTED True TUNED True IP 127.0.0.1 NODE 127.0.0.1" in proc.stdout, proc.stdout
    assert "AFTER False" in proc.stdout
    # one line of feedback, and none of Ray's INFO lines or its token-authentication notice
    assert "starting a local Ray on 127.0.0.1" in proc.stderr
    assert "Token authentication" not in proc.stderr, proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_running_ray_is_reused_and_left_running(ray_local, capsys):
    import ray

    from workflows.ray_session import ray_session

    with ray_session("127.0.0.1:1") as started:  # an address is not even contacted: Ray is already up
        assert started is False
        assert ray.is_initialized()
    assert ray.is_initialized()
    assert capsys.readouterr().err == ""


def test_address_comes_from_the_one_variable(monkeypatch):
    from workflows.ray_session import ADDRESS_ENVVAR, resolve_address

    assert ADDRESS_ENVVAR == "XRCAM_ADDRESS"
    monkeypatch.delenv("XRCAM_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # Ray's own variable is not ours
    assert resolve_address(None) is None
    monkeypatch.setenv("XRCAM_ADDRESS", "10.0.0.5:6379")
    assert resolve_address(None) == "10.0.0.5:6379"
    assert resolve_address("auto") == "auto"


def test_tune_process_silences_ray_trains_polling_warnings_and_is_idempotent():
    import logging

    from workflows import ray_session

    ray_session.tune_process()
    ray_session.tune_process()
    for name in ray_session._WITHOUT_DASHBOARD_NOISE:  # what the worker start-up hook is for
        assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR


GUARDED = """
import os, ray
os.environ.pop("XRCAM_ADDRESS", None)
from workflows.ray_guard import MARKER_ENVVAR, marked_processes
from workflows.ray_session import ray_session

with ray_session(None, num_cpus=1, quiet=True):
    token = os.environ[MARKER_ENVVAR]
    print("MARKED", len(marked_processes(token)) > 0)
print("LEFT", len(marked_processes(token)), MARKER_ENVVAR in os.environ)
"""


@pytest.mark.slow
def test_a_local_session_leaves_no_ray_process_behind():
    proc = subprocess.run([sys.executable, "-c", GUARDED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MARKED True" in proc.stdout and "LEFT 0 False" in proc.stdout, proc.stdout


def test_only_rays_token_notice_is_dropped(caplog):
    """``without_token_notice`` (used by ray_session and the test session's ``ray_local``) filters Ray's
    one informational line about token authentication, and nothing else."""
    import logging

    from workflows.ray_session import _TOKEN_LOGGER, without_token_notice

    logger = logging.getLogger(_TOKEN_LOGGER)
    with caplog.at_level(logging.INFO, logger=_TOKEN_LOGGER):
        with without_token_notice():
            logger.info("Token authentication is enabled for this Ray cluster. ...")
            logger.warning("the token file cannot be read")
        logger.info("Token authentication is enabled for this Ray cluster (after the block)")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "the token file cannot be read",
        "Token authentication is enabled for this Ray cluster (after the block)",
    ]
