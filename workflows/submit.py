"""Submitting ``xrcam run`` + ``xrcam reduce`` to a cluster: a SLURM batch job or a Ray job.

SLURM: :func:`render_sbatch` fills ``workflows/templates/slurm.sbatch``, a script that brings up a
private Ray cluster over the job's nodes (ports and temp dir derived from the job id, so jobs sharing a
node never meet), runs the two commands and stops only its own Ray. :func:`sbatch` submits it.
Ray: :func:`submit_ray_job` hands the same two commands to a long-lived cluster's Jobs API.
Both resume: ``xrcam run`` skips the shards a previous attempt finished.

Only the standard library is imported here; Ray's client is imported where it is used.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "DEFAULT_JOB_NAME",
    "LOG_LINES",
    "SlurmJob",
    "default_bin_dir",
    "render_sbatch",
    "sbatch",
    "run_commands",
    "submit_ray_job",
    "slurm_status",
    "ray_status",
    "SubmitError",
]

TEMPLATE = "slurm.sbatch"
DEFAULT_JOB_NAME = "xrcam"
LOG_LINES = 20  # log lines `xrcam status` shows
# seconds before the time limit at which SLURM warns the batch shell (USR1) when --requeue is on
REQUEUE_WARNING_S = 180
# how long `xrcam submit ray` waits for a just-started cluster's job agent
AGENT_WAIT_S = 120
_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says what to change."""


def default_bin_dir() -> Path:
    """The bin/ folder of the running environment: where this environment's ``xrcam`` and ``ray`` live.

    Not resolved: a virtualenv's python is a symlink to the base interpreter, whose bin/ lacks xrcam.
    """
    return Path(sys.executable).absolute().parent


@dataclass
class SlurmJob:
    """Everything the batch script needs; paths are made absolute because the job runs elsewhere."""

    archive: Path
    results: Path
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    requeue: bool = False
    job_name: str = DEFAULT_JOB_NAME
    extra_sbatch: Sequence[str] = ()
    run_args: Sequence[str] = ()
    reduce: bool = True
    dashboard: bool = False
    bin_dir: Path = field(default_factory=default_bin_dir)
    log_dir: Path | None = None

    def __post_init__(self) -> None:
        self.archive = Path(self.archive).expanduser().absolute()
        self.results = Path(self.results).expanduser().absolute()
        self.bin_dir = Path(self.bin_dir).expanduser().absolute()
        self.log_dir = (
            self.results / "slurm" if self.log_dir is None else Path(self.log_dir).expanduser().absolute()
        )

    @property
    def log_pattern(self) -> Path:
        """Where SLURM writes the job's output (``%j`` is the job id)."""
        return self.log_dir / f"{self.job_name}-%j.out"

    @property
    def script_path(self) -> Path:
        """Where :func:`sbatch` keeps the rendered script, so the same job can be resubmitted."""
        return self.log_dir / f"{self.job_name}.sbatch"


def _directive_value(name: str, value: str) -> str:
    """One value of an ``#SBATCH`` line: sbatch accepts double quotes there, but no way to escape them."""
    if any(c in value for c in '"\n\r'):
        raise SubmitError(f"--{name} {value!r}: double quotes and line breaks cannot go into an #SBATCH line")
    return f'"{value}"' if re.search(r"\s", value) else value


def _directives(job: SlurmJob) -> list[str]:
    if not job.job_name or "/" in job.job_name:
        raise SubmitError(
            f"--job-name {job.job_name!r}: give a non-empty name without '/'; it names the log file"
        )
    if "%" in str(job.log_dir):
        raise SubmitError(f"{job.log_dir}: '%' is a SLURM file-name pattern; pick a log folder without it")
    lines = [
        ("job-name", job.job_name),
        ("nodes", str(job.nodes)),
        ("ntasks-per-node", "1"),
        ("output", str(job.log_pattern)),
        ("open-mode", "append"),  # a requeued or resubmitted job adds to the log of its earlier attempts
    ]
    if job.cpus_per_task:
        lines.append(("cpus-per-task", str(job.cpus_per_task)))
    if job.gpus_per_node:
        lines.append(("gpus-per-node", str(job.gpus_per_node)))
    for name in ("partition", "time", "account"):
        if getattr(job, name):
            lines.append((name, getattr(job, name)))
    if job.requeue:
        lines += [("requeue", None), ("signal", f"B:USR1@{REQUEUE_WARNING_S}")]
    out = [f"#SBATCH --{n}" if v is None else f"#SBATCH --{n}={_directive_value(n, v)}" for n, v in lines]
    for extra in job.extra_sbatch:
        extra = extra.strip()
        if not extra.startswith("-") or "\n" in extra:
            raise SubmitError(f"--extra-sbatch {extra!r}: give one sbatch option per use, e.g. --mem=64G")
        out.append(f"#SBATCH {extra}")
    return out


def render_sbatch(job: SlurmJob) -> str:
    """The batch script for ``job``: the template with its placeholders filled and shell-quoted."""
    if job.nodes < 1 or job.gpus_per_node < 0:
        raise SubmitError("--nodes must be at least 1 and --gpus-per-node at least 0")
    for tool in ("xrcam", "ray", "python"):
        if not (job.bin_dir / tool).exists():
            raise SubmitError(
                f"{job.bin_dir}: no {tool} here; pass --venv with the environment xrcam is installed in"
            )
    values = {
        "sbatch_directives": "\n".join(_directives(job)),
        "bin_dir": shlex.quote(str(job.bin_dir)),
        "archive": shlex.quote(str(job.archive)),
        "results": shlex.quote(str(job.results)),
        "log_dir": shlex.quote(str(job.log_dir)),
        "run_args": " ".join(shlex.quote(a) for a in job.run_args),
        "reduce": str(int(job.reduce)),
        "requeue": str(int(job.requeue)),
        "dashboard": str(int(job.dashboard)),
    }
    template = resources.files("workflows").joinpath("templates", TEMPLATE).read_text()
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def sbatch(job: SlurmJob, script: str) -> str:
    """Write ``script`` beside the logs and submit it; returns SLURM's job id."""
    job.log_dir.mkdir(parents=True, exist_ok=True)
    job.script_path.write_text(script)
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(job.script_path)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        raise SubmitError("sbatch is not on PATH: run this on a SLURM login node") from None
    if done.returncode != 0:
        raise SubmitError(f"sbatch refused {job.script_path}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]  # --parsable prints "jobid[;cluster]"


def run_commands(
    xrcam: str, archive: str, results: str, run_args: Sequence[str] = (), reduce: bool = True
) -> str:
    """The shell line a Ray job runs: ``xrcam run`` then ``xrcam reduce`` on the job's own cluster.

    Inside a Ray job ``RAY_ADDRESS`` names the cluster the job runs on, so both commands join it.
    """
    run = [xrcam, "run", archive, "--out", results, *run_args]
    line = f'{shlex.join(run)} --address "$RAY_ADDRESS"'
    if reduce:
        line += f' && {shlex.join([xrcam, "reduce", results])} --address "$RAY_ADDRESS"'
    return line


def submit_ray_job(
    address: str, entrypoint: str, job_name: str = DEFAULT_JOB_NAME, metadata: dict | None = None
) -> str:
    """Submit ``entrypoint`` to the Ray cluster whose dashboard is at ``address``; returns the job id."""
    from ray.job_submission import JobSubmissionClient

    client = _ray_client(address, JobSubmissionClient)
    submission_id = f"{job_name}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint, submission_id=submission_id, metadata=metadata or {}
            )
        except RuntimeError as exc:
            # a freshly started cluster serves the Jobs API before its job agent has registered
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise SubmitError(f"the Ray cluster at {address} refused the job: {exc}") from None
            time.sleep(3)


def _ray_client(address: str, client_cls):
    try:
        return client_cls(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(
            f"cannot reach the Ray Jobs API at {address} ({exc}); pass the head's dashboard address, "
            "e.g. http://HEAD:8265, and check the cluster runs with the dashboard on"
        ) from None


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def slurm_status(job_id: str, log_lines: int = LOG_LINES) -> str:
    """A report on a SLURM job: its state from squeue (or sacct/scontrol once it left the queue)
    and the end of its output file."""
    state = ""
    code, queue, error = _slurm(["squeue", "--noheader", "--jobs", job_id, "--format", "%T|%M|%l|%D|%R"])
    if code != 0 and "invalid job id" not in error.lower():
        raise SubmitError(f"squeue failed: {error or 'no message'}; is this a SLURM login node?")
    if queue:
        status, elapsed, limit, nodes, reason = queue.splitlines()[0].split("|")
        state = f"{status} for {elapsed} of {limit} on {nodes} node(s) ({reason})"
    code, shown, _ = _slurm(["scontrol", "show", "job", "--oneliner", job_id])
    # values may hold spaces (paths), so a value runs up to the next " Key="
    fields = dict(re.findall(r"(\w+)=(.*?)(?= [\w:/]+=|$)", shown)) if code == 0 else {}
    if not state:
        code, acct, _ = _slurm(
            ["sacct", "--noheader", "--parsable2", "--jobs", job_id, "--format", "State,Elapsed,ExitCode"]
        )
        if code == 0 and "|" in acct:  # accounting is often off: then scontrol, while SLURM remembers the job
            status, elapsed, exit_code = acct.splitlines()[0].split("|")[:3]
            state = f"{status} after {elapsed} (exit code {exit_code})"
        elif fields:
            state = (
                f"{fields.get('JobState')} after {fields.get('RunTime')} (exit code {fields.get('ExitCode')})"
            )
    if not state:
        raise SubmitError(f"SLURM knows no job {job_id}; finished jobs are forgotten unless accounting is on")
    report = [f"job {job_id}: {state}"]
    if fields.get("StdOut"):
        log = Path(fields["StdOut"])
        report.append(f"log: {log}")
        if log.is_file():
            report.append(_tail(log.read_text(errors="replace"), log_lines))
    return "\n".join(report)


def ray_status(job_id: str, address: str, log_lines: int = LOG_LINES) -> str:
    """A report on a Ray job: its status, message and the end of its logs."""
    from ray.job_submission import JobSubmissionClient

    client = _ray_client(address, JobSubmissionClient)
    try:
        info = client.get_job_info(job_id)
    except RuntimeError:
        raise SubmitError(
            f"the Ray cluster at {address} knows no job {job_id}; list them with `ray job list`"
        ) from None
    report = [f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else "")]
    report.append(_tail(client.get_job_logs(job_id), log_lines))
    return "\n".join(report)


def _slurm(argv: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of a SLURM command."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError:
        raise SubmitError(
            f"{argv[0]} is not on PATH: run this where SLURM's commands are (a login node)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SubmitError(f"{argv[0]} did not answer within 60 s; is slurmctld up?") from None
    return done.returncode, done.stdout.strip(), done.stderr.strip()
