"""A SLURM of one (or two) nodes for the tests, started from a temp dir as root and stopped again.

Installs ``slurm-wlm`` and ``munge`` from Debian when they are missing, writes a minimal
``slurm.conf`` (this host, its CPUs and memory, no cgroups, no accounting, free ports), runs
``munged``, ``slurmctld`` and ``slurmd`` in the foreground as children of the test, and on the way
out cancels every job of that cluster before ending the daemons it started (by their process ids).

Usage (as root)::

    with local_slurm() as env:          # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)

``python tests/slurm_local.py [NODES]`` starts one (of 1 or 2 nodes) and keeps it up until Ctrl-C or
``kill``, for trying ``xrcam submit slurm``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
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


#: Lifetime of a job credential, which is also how long a requeued job waits before it starts again
#: (SLURM's default: 120 s). Starting it sooner by hand (``scontrol update StartTime=now``) races the
#: node daemon, which refuses a job id whose credential it still holds as revoked ("Job credential
#: revoked"): the requeue test failed that way twice in full test runs.
CRED_EXPIRE_S = 20


def _config(root: Path, nodes: list[tuple[str, str]], controller: str) -> str:
    """slurm.conf for ``nodes`` ((name, address) pairs) and a controller reachable at ``controller``."""
    cpus, memory = os.cpu_count(), _memory_mb() * 9 // 10
    node_lines = "\n".join(
        f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
        for name, addr in nodes
    )
    return f"""\
ClusterName=xrcamtest
SlurmctldHost={nodes[0][0]}({controller})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class _SecondNode:
    """A second 'node' on this machine: its own network namespace (so its Ray ports cannot clash with
    the first node's), its own host name, joined to the host by a private veth link.
    File system and process table stay shared, unlike a real second machine."""

    def __init__(self, root: Path, host: str):
        tag = root.name.rsplit("-", 1)[-1][:6]
        self.netns, self.veth = f"xrcam-{tag}", f"xrc{tag}"
        subnet = 10 + int.from_bytes(os.urandom(1)) % 200
        self.host_addr, self.addr = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        self.name = f"{host}-n2"
        self.hosts = root / "hosts-n2"

    def up(self, host: str) -> None:
        def ip(*args: str, netns: bool = False) -> None:
            subprocess.run(
                ["ip", *(["-n", self.netns] if netns else []), *args], check=True, capture_output=True
            )

        ip("netns", "add", self.netns)
        ip("link", "add", self.veth, "type", "veth", "peer", "name", f"{self.veth}b")
        ip("link", "set", f"{self.veth}b", "netns", self.netns)
        ip("addr", "add", f"{self.host_addr}/24", "dev", self.veth)
        ip("link", "set", self.veth, "up")
        ip("addr", "add", f"{self.addr}/24", "dev", f"{self.veth}b", netns=True)
        ip("link", "set", f"{self.veth}b", "up", netns=True)
        ip("link", "set", "lo", "up", netns=True)
        ip("route", "add", "default", "via", self.host_addr, netns=True)  # reaches every host address
        # its own /etc/hosts, so its name resolves without DNS (Ray looks it up)
        own = [line for line in Path("/etc/hosts").read_text().splitlines() if host not in line.split()[1:]]
        self.hosts.write_text("\n".join([*own, f"{self.addr} {self.name}", f"{self.host_addr} {host}", ""]))

    def slurmd(self, conf: Path) -> list[str]:
        inner = f"mount --bind {self.hosts} /etc/hosts && hostname {self.name} && "
        inner += f"exec nsenter --net=/var/run/netns/{self.netns} slurmd -D -f {conf}"
        return ["unshare", "--uts", "--mount", "sh", "-c", inner]

    def down(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


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
def local_slurm(nodes: int = 1) -> Iterator[dict[str, str]]:
    """A running SLURM cluster on this machine; yields the environment that points its clients at it.

    One node talks over 127.0.0.1 only. ``nodes=2`` adds a second node in a network namespace of its
    own (see :class:`_SecondNode`), linked to the host over a private veth pair.
    """
    if nodes not in (1, 2):
        raise ValueError("local_slurm runs one or two nodes")
    ensure_slurm_installed()
    root = Path(tempfile.mkdtemp(prefix="xrcam-slurm-"))  # short: munge's socket path must stay short
    root.chmod(0o755)  # munged wants its socket's folder searchable by everyone
    (root / "state").mkdir()
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    second = _SecondNode(root, host) if nodes == 2 else None
    node_list = (
        [(host, "127.0.0.1")] if second is None else [(host, second.host_addr), (second.name, second.addr)]
    )
    for name, _ in node_list:
        (root / f"spool-{name}").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(_config(root, node_list, controller=node_list[0][1]))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        if second is not None:
            second.up(host)
        munge = [f"--key-file={key}", f"--socket={root}/munge.socket", f"--pid-file={root}/munged.pid"]
        munge += [f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"]
        commands = [
            ["munged", "--foreground", "--force", *munge],
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            ["slurmd", "-D", "-f", str(conf)],
        ]
        if second is not None:
            commands.append(second.slurmd(conf))
        for i, argv in enumerate(commands):
            log = open(root / f"daemon-{i}.stderr", "w")  # noqa: SIM115 - lives as long as the daemon
            daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
            if argv[0] == "munged":
                _wait(lambda: (root / "munge.socket").exists(), 30, "munged did not create its socket", root)
        idle = "\n".join(["idle"] * nodes)
        _wait(
            lambda: _query(["sinfo", "--noheader", "--Node", "--format", "%T"], env) == idle,
            60,
            "nodes not idle",
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
        if second is not None:
            second.down()
        shutil.rmtree(root, ignore_errors=True)


def daemon_logs(env: Mapping[str, str]) -> str:
    """The tails of the local cluster's daemon logs (slurmctld, slurmd, munged), for a failure message."""
    root = Path(env["SLURM_CONF"]).parent
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(root.glob("*.log")))


def _wait(ready, timeout_s: float, what: str, root: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            logs = daemon_logs({"SLURM_CONF": str(root / "slurm.conf")})
            raise TimeoutError(f"local SLURM: {what} within {timeout_s:.0f} s\n{logs}")
        time.sleep(0.5)


if __name__ == "__main__":
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops it as cleanly as Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    with local_slurm(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 1) as slurm_env:
        print(
            f"export SLURM_CONF={slurm_env['SLURM_CONF']}   # then sbatch/squeue/xrcam submit slurm; Ctrl-C stops"
        )
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
