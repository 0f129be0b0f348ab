"""`xrcam submit ray` + `xrcam status` against a real `ray start --head` on 127.0.0.1.

The cluster is private to the test: free ports, its own temp dir, its own auth token, and it is
stopped through its own `ray start --block` process (never a machine-wide `ray stop`).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from cluster_case import XRCAM, assert_same_maps, cluster_case

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tagged(tag: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"XRCAM_TEST_RAY={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head with the Jobs API on 127.0.0.1; yields (dashboard address, client environment)."""
    gcs, dashboard, client_server = _free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="xrcam-rj-")  # short: Ray's socket paths must stay < 108 chars
    tag = Path(temp_dir).name
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # single-node Ray: the node's address is 127.0.0.1
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "OMP_NUM_THREADS": "1",
        "XRCAM_TEST_RAY": tag,
    }
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}"]
        + ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"]
        + [f"--ray-client-server-port={client_server}", f"--temp-dir={temp_dir}", "--num-cpus=2"]
        + ["--disable-usage-stats"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        probe = [str(BIN / "ray"), "job", "list", "--address", address]
        while subprocess.run(probe, env=env, capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head with the Jobs API at {address} did not come up")
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in _tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["rm", "-rf", temp_dir], check=False)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    return cluster_case(tmp_path_factory)


def test_ray_job_equals_local_run_and_status_reports_it(ray_head, case):
    address, env = ray_head
    remote = case["root"] / "ray results"
    submitted = subprocess.run(
        [XRCAM, "submit", "ray", str(case["archive"]), "--out", str(remote), "--address", address]
        + ["--", *case["run_args"]],
        env=env,
        capture_output=True,
        text=True,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.split("Submitted Ray job ")[1].split()[0]

    status = ""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        done = subprocess.run(
            [XRCAM, "status", job_id, "--address", address], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        status = done.stdout
        if any(f"{job_id}: {s}" in status for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        time.sleep(5)
    assert f"{job_id}: SUCCEEDED" in status, status
    assert len(status.splitlines()) > 3, status  # the state, then the tail of the job's own log

    assert_same_maps(remote, case["local"])  # `xrcam reduce` ran in the same job too


def test_status_of_unknown_ray_job_is_a_clear_error(ray_head):
    address, env = ray_head
    done = subprocess.run(
        [XRCAM, "status", "no-such-job", "--address", address], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "knows no job no-such-job" in done.stderr
