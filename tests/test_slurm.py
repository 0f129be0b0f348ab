"""`xrcam submit slurm` on a real SLURM started by the test: the job's maps equal a local `xrcam run`.

Needs root (it installs and starts the SLURM daemons; CI runs as root). Two jobs cover the paths:
a one-node job warned of its time limit mid-run, which stops its run and its own Ray, requeues
itself and resumes; and a two-node job with Ray across both nodes. Both must leave none of their
Ray processes behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from cluster_case import XRCAM, assert_same_maps, cluster_case

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    return cluster_case(tmp_path_factory)


def _own_processes(tag: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"XRCAM_RAY_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(2)


def _job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    shown = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


@pytest.mark.skipif(os.geteuid() != 0, reason="starts SLURM daemons: needs root (CI runs as root)")
def test_slurm_job_requeues_resumes_equals_local_run_and_cleans_up(case):
    """One job with --requeue: warned of its time limit mid-run (the USR1 SLURM sends with --signal),
    it stops its run and its own Ray and requeues itself; the second start finishes the work."""
    from slurm_local import daemon_logs, local_slurm, wait_for_job

    remote = case["root"] / "slurm results"
    with local_slurm() as slurm_env:
        submitted = subprocess.run(
            [XRCAM, "submit", "slurm", str(case["archive"]), "--out", str(remote), "--cpus-per-task", "2"]
            + ["--requeue", "--job-name", "xr test", "--", *case["run_args"]],
            env={**slurm_env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split("Submitted SLURM job ")[1].split()[0]
        log = remote / "slurm" / f"xr test-{job_id}.out"
        assert str(log) in submitted.stdout
        tag = f"xrcam-ray-{job_id}"

        # first start: once `xrcam run` has joined the job's Ray, send the time-limit warning
        _wait_for(
            lambda: "xrcam: joining the Ray cluster at" in (log.read_text() if log.exists() else ""),
            300,
            "no run",
        )
        time.sleep(3)  # the line is printed as the join starts; let it finish (a second at most)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_env, check=True)
        _wait_for(lambda: _job_fields(job_id, slurm_env).get("Restarts") == "1", 120, "job did not requeue")
        _wait_for(lambda: not _own_processes(tag), 60, "the first start left Ray processes behind")
        assert not Path(f"/tmp/{tag}").exists()
        # the requeued job starts again by itself once its old credential has expired (slurm_local)

        job = wait_for_job(job_id, slurm_env, timeout_s=900)
        output = log.read_text() if log.exists() else "(no log)"
        assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", (
            f"{output}\n{job}\n{daemon_logs(slurm_env)}"  # the daemons' side of a failed start
        )
        assert f"requeueing job {job_id}" in output and output.count("Ray at 127.0.0.1:") == 2, output

        status = subprocess.run([XRCAM, "status", job_id], env=slurm_env, capture_output=True, text=True)
        assert status.returncode == 0 and "COMPLETED" in status.stdout, status.stdout + status.stderr

    assert_same_maps(remote, case["local"])
    # the job stopped its own Ray: no process carries its tag, its temp dir is gone
    assert _own_processes(tag) == []
    assert not Path(f"/tmp/{tag}").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="starts SLURM daemons: needs root (CI runs as root)")
def test_two_node_job_runs_ray_across_both_nodes(case):
    """The multi-node path: Ray's head on the first node, a Ray node on the second via srun, both
    used by `xrcam run`, and the cleanup step on the second node. The second node is a network
    namespace of this machine (see slurm_local), so ports are per node as on real machines."""
    from slurm_local import daemon_logs, local_slurm, wait_for_job

    remote = case["root"] / "two node results"
    run_args = [*case["run_args"], "--workers", "2"]  # the last --workers wins: one actor per node
    with local_slurm(nodes=2) as slurm_env:
        submitted = subprocess.run(
            [XRCAM, "submit", "slurm", str(case["archive"]), "--out", str(remote), "--nodes", "2"]
            + ["--cpus-per-task", "1", "--", *run_args],
            env={**slurm_env, "OMP_NUM_THREADS": "1"},
            capture_output=True,
            text=True,
        )
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.split("Submitted SLURM job ")[1].split()[0]
        job = wait_for_job(job_id, slurm_env, timeout_s=900)
        output = (remote / "slurm" / f"xrcam-{job_id}.out").read_text()
        assert job.get("JobState") == "COMPLETED" and job.get("ExitCode") == "0:0", (
            f"{output}\n{job}\n{daemon_logs(slurm_env)}"  # the daemons' side of a failed start
        )
        assert job.get("NumNodes") == "2", job
        # two Ray nodes, each on its own node's address, none on loopback
        addresses = set(re.findall(r"Local node IP.*?(\d+\.\d+\.\d+\.\d+)", output))
        assert len(addresses) == 2 and "127.0.0.1" not in addresses, output
        # two worker actors ran, and with one CPU per node Ray had to place one on each node
        assert json.loads((remote / "run.json").read_text())["workers"] == 2
    assert_same_maps(remote, case["local"])
    assert _own_processes(f"xrcam-ray-{job_id}") == []
