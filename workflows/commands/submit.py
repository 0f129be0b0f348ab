"""``xrcam submit``: run ``xrcam run`` + ``xrcam reduce`` as a SLURM batch job or a Ray job."""

from __future__ import annotations

from pathlib import Path

import click

from workflows.submit import DEFAULT_JOB_NAME, SlurmJob  # standard library only: --help stays light

_SLURM = SlurmJob.__dataclass_fields__  # the defaults live on the dataclass; the options read them
_ARCHIVE = click.argument("archive", type=click.Path(exists=True, path_type=Path))
_OUT = click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Results folder."
)
_RUN_ARGS = click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
_NO_REDUCE = click.option("--no-reduce", is_flag=True, help="Only `xrcam run`; skip `xrcam reduce`.")
_JOB_NAME = click.option("--job-name", default=DEFAULT_JOB_NAME, show_default=True, help="Name of the job.")


@click.group()
def command() -> None:
    """Submit `xrcam run` and `xrcam reduce` to a cluster.

    `xrcam submit slurm` renders a batch script that starts a private Ray cluster over the job's
    nodes; `xrcam submit ray` hands the commands to a running Ray cluster's Jobs API. Options after
    `--` go to `xrcam run` unchanged, e.g. `-- --model resnet50 --checkpoint ckpt/model.pt`.
    Submitting the same job again resumes it. Follow a job with `xrcam status JOB`.
    """


@command.command("slurm", context_settings={"show_default": True})
@_ARCHIVE
@_OUT
@click.option(
    "--nodes",
    type=click.IntRange(min=1),
    default=_SLURM["nodes"].default,
    help="Nodes; Ray gets one node each.",
)
@click.option(
    "--gpus-per-node",
    type=click.IntRange(min=0),
    default=_SLURM["gpus_per_node"].default,
    help="GPUs per node (#SBATCH --gpus-per-node); Ray sees what SLURM grants.",
)
@click.option("--cpus-per-task", type=click.IntRange(min=1), default=None, help="CPUs per node.")
@click.option("--partition", default=None, help="SLURM partition.")
@click.option("--time", "time_limit", default=None, help="Time limit, e.g. 04:00:00.")
@click.option("--account", default=None, help="Account to charge.")
@click.option(
    "--requeue",
    is_flag=True,
    help="Requeue on preemption, and requeue itself shortly before the time limit; the run resumes.",
)
@_JOB_NAME
@click.option(
    "--extra-sbatch",
    multiple=True,
    metavar="OPTION",
    help="Any other sbatch option, one per use, e.g. --extra-sbatch=--mem=64G.",
)
@click.option(
    "--venv",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Environment with xrcam installed, as the nodes see it [default: the running one].",
)
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the job's output and script go [default: OUT/slurm].",
)
@click.option("--dashboard", is_flag=True, help="Start Ray's dashboard on the head node (127.0.0.1 only).")
@_NO_REDUCE
@click.option("--dry-run", is_flag=True, help="Print the batch script instead of submitting it.")
@_RUN_ARGS
def slurm(
    archive: Path,
    out: Path,
    nodes: int,
    gpus_per_node: int,
    cpus_per_task: int | None,
    partition: str | None,
    time_limit: str | None,
    account: str | None,
    requeue: bool,
    job_name: str,
    extra_sbatch: tuple[str, ...],
    venv: Path | None,
    log_dir: Path | None,
    dashboard: bool,
    no_reduce: bool,
    dry_run: bool,
    run_args: tuple[str, ...],
) -> None:
    """Submit ARCHIVE -> OUT as a SLURM batch job with its own Ray cluster.

    The job starts Ray's head on its first node and one Ray node on each other node, with ports and
    temp dir derived from the job id so jobs sharing a node cannot collide, runs `xrcam run` and
    `xrcam reduce`, and stops only its own Ray. Prints the job id and where its log goes; the script
    is kept beside the log, so `sbatch` on it again resumes the run after a timeout.
    """
    from workflows.submit import SlurmJob, SubmitError, default_bin_dir, render_sbatch, sbatch

    job = SlurmJob(
        archive=archive,
        results=out,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        partition=partition,
        time=time_limit,
        account=account,
        requeue=requeue,
        job_name=job_name,
        extra_sbatch=extra_sbatch,
        run_args=run_args,
        reduce=not no_reduce,
        dashboard=dashboard,
        bin_dir=default_bin_dir() if venv is None else venv / "bin",
        log_dir=log_dir,
    )
    try:
        script = render_sbatch(job)
        if dry_run:
            click.echo(script, nl=False)
            return
        job_id = sbatch(job, script)
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Submitted SLURM job {job_id}")
    click.echo(f"log:      {str(job.log_pattern).replace('%j', job_id)}")
    click.echo(f"script:   {job.script_path} (sbatch it again to resume)")
    click.echo(f"progress: xrcam status {job_id}")


@command.command("ray", context_settings={"show_default": True})
@_ARCHIVE
@_OUT
@click.option(
    "--jobs-address",
    "--address",
    "address",
    required=True,
    envvar="RAY_API_SERVER_ADDRESS",  # Ray's own name for the Jobs API; XRCAM_ADDRESS is a cluster (GCS) address
    help="The cluster's Jobs API (its dashboard), e.g. http://HEAD:8265.",
)
@click.option(
    "--xrcam",
    "xrcam_exe",
    default=None,
    help="The xrcam executable as the cluster's head sees it [default: this environment's, by absolute path].",
)
@_JOB_NAME
@_NO_REDUCE
@_RUN_ARGS
def ray_job(
    archive: Path,
    out: Path,
    address: str,
    xrcam_exe: str | None,
    job_name: str,
    no_reduce: bool,
    run_args: tuple[str, ...],
) -> None:
    """Submit ARCHIVE -> OUT to a long-lived Ray cluster through its Jobs API.

    ARCHIVE and OUT must be paths the cluster's nodes see (a shared file system); they are made
    absolute here. Prints the job id; follow it with `xrcam status JOB --address ADDRESS`.
    """
    from workflows.submit import SubmitError, default_bin_dir, run_commands, submit_ray_job

    exe = xrcam_exe or str(default_bin_dir() / "xrcam")
    results = str(out.expanduser().absolute())
    entrypoint = run_commands(exe, str(archive.absolute()), results, run_args, reduce=not no_reduce)
    try:
        job_id = submit_ray_job(address, entrypoint, job_name=job_name, metadata={"results": results})
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Submitted Ray job {job_id} to {address}")
    click.echo(f"progress: xrcam status {job_id} --address {address}")
