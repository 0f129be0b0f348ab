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

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BIN = Path(sys.executable).parent
XRCAM = str(BIN / "xrcam")


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
    import torch

    from xrcam.models import load_model, save_checkpoint
    from xrcam.synth import SynthConfig, write_archive

    root = tmp_path_factory.mktemp("ray jobs case")
    archive = root / "my archive"
    write_archive(archive, SynthConfig(patients=1, videos=1, frames=4, size=(64, 64), seed=5))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(load_model("resnet18", num_classes=2), root / "model.pt")
    run_args = ["--model", "resnet18", "--checkpoint", str(checkpoint), "--methods", "gradcam,xrelevancecam"]
    run_args += ["--workers", "1", "--batch-size", "4", "--no-progress"]
    return {"root": root, "archive": archive, "run_args": run_args}


def _arrays(results: Path) -> dict[str, np.ndarray]:
    import zarr

    videos = zarr.open_group(results / "maps.zarr", mode="r")["videos"]
    return {f"{k}/{n}": np.asarray(a[...]) for k, g in videos.groups() for n, a in g.arrays()}


def test_ray_job_equals_local_run_and_status_reports_it(ray_head, case):
    address, env = ray_head
    local = case["root"] / "local results"
    subprocess.run(
        [XRCAM, "run", str(case["archive"]), "--out", str(local), *case["run_args"]],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )

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

    ours, theirs = _arrays(remote), _arrays(local)
    assert theirs and ours.keys() >= theirs.keys()
    for name, expected in theirs.items():
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    assert (remote / "summary").is_dir()  # `xrcam reduce` ran in the same job


def test_status_of_unknown_ray_job_is_a_clear_error(ray_head):
    address, env = ray_head
    done = subprocess.run(
        [XRCAM, "status", "no-such-job", "--address", address], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "knows no job no-such-job" in done.stderr
