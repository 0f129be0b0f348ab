"""A one-node SLURM for the tests, started from a temp dir as root and stopped again.

Installs ``slurm-wlm`` and ``munge`` from Debian when they are missing, writes a minimal
``slurm.conf`` (this host, its CPUs and memory, no cgroups, no accounting, free ports), runs
``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children of the test, and on the way
out cancels every job of that cluster before ending the daemons it started (by their process ids).

Usage (as root)::

    with local_slurm() as env:          # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)

``python tests/slurm_local.py`` starts one and keeps it up until Ctrl-C or ``kill``, for trying
``xrcam submit slurm``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ensure_slurm_installed", "local_slurm", "wait_for_job"]

PACKAGES = ("slurm-wlm", "munge")
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def ensure_slurm_installed() -> None:
    """apt-get install the SLURM and munge daemons and clients unless they are already on PATH."""
    if all(shutil.which(tool) for tool in TOOLS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
        check=True,
        env=env,
        capture_output=True,
    )
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        raise RuntimeError(f"apt-get installed {PACKAGES} but {missing} are still not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def _config(root: Path, host: str) -> str:
    return f"""\
ClusterName=xrcamtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb() * 9 // 10} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _query(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    return done.stdout.strip() if done.returncode == 0 else ""


def wait_for_job(job_id: str, env: dict[str, str], timeout_s: float) -> dict[str, str]:
    """Wait until the job has left the queue; returns ``scontrol show job`` as a dict (JobState, ExitCode...)."""
    deadline = time.monotonic() + timeout_s
    while _query(["squeue", "--noheader", "--jobs", job_id], env):
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still queued or running after {timeout_s:.0f} s")
        time.sleep(2)
    shown = _query(["scontrol", "show", "job", "--oneliner", job_id], env)
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


@contextlib.contextmanager
def local_slurm() -> Iterator[dict[str, str]]:
    """A running one-node SLURM cluster; yields the environment that points its clients at it."""
    ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="xrcam-slurm-"))  # short: munge's socket path must stay short
    root.chmod(0o755)  # munged wants its socket's folder searchable by everyone
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(_config(root, socket.gethostname().split(".")[0]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        munge = [f"--key-file={key}", f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid"]
        munge += [f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"]
        for argv in (
            ["munged", "--foreground", "--force", *munge],
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            ["slurmd", "-D", "-f", str(conf)],
        ):
            log = open(root / f"{argv[0]}.stderr", "w")  # noqa: SIM115 - lives as long as the daemon
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
            if argv[0] == "munged":
                _wait(lambda: (root / "munge.socket").exists(), 30, "munged did not create its socket", root)
        _wait(
            lambda: _query(["sinfo", "--noheader", "--format", "%T"], env) == "idle",
            60,
            "node not idle",
            root,
        )
        yield env
    finally:
        jobs = _query(["squeue", "--noheader", "--format", "%i"], env).split()
        if jobs:
            subprocess.run(["scancel", *jobs], env=env, capture_output=True)
            with contextlib.suppress(TimeoutError):
                _wait(lambda: not _query(["squeue", "--noheader"], env), 60, "jobs did not end", root)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait(ready, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")))
            raise TimeoutError(f"local SLURM: {what} within {timeout_s:.0f} s\n{logs}")
        time.sleep(0.5)


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    with local_slurm() as slurm_env:
        print(
            f"export SLURM_CONF={slurm_env['SLURM_CONF']}   # then sbatch/squeue/xrcam submit slurm; Ctrl-C stops"
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
