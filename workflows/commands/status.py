"""``xrcam status``: how far a submitted job got, on SLURM or on a Ray cluster."""

from __future__ import annotations

import click

from workflows.submit import LOG_LINES  # standard library only: --help stays light


@click.command(context_settings={"show_default": True})
@click.argument("job")
@click.option(
    "--backend",
    type=click.Choice(["slurm", "ray"]),
    default=None,
    help="Where JOB runs [default: ray when --address is given, else slurm].",
)
@click.option(
    "--jobs-address",
    "--address",
    "address",
    envvar="RAY_API_SERVER_ADDRESS",  # Ray's own name for the Jobs API; XRCAM_ADDRESS is a cluster (GCS) address
    default=None,
    help="The Ray cluster's Jobs API, e.g. http://HEAD:8265 (Ray jobs only).",
)
@click.option("--lines", type=click.IntRange(min=0), default=LOG_LINES, help="Log lines to show.")
def command(job: str, backend: str | None, address: str | None, lines: int) -> None:
    """Report the state of JOB and the end of its log.

    JOB is what `xrcam submit` printed: a SLURM job id (state from squeue, or sacct/scontrol once
    it has left the queue) or a Ray job id (status and logs from the Jobs API at --address).
    """
    from workflows.submit import SubmitError, ray_status, slurm_status

    backend = backend or ("ray" if address else "slurm")
    try:
        if backend == "ray":
            if not address:
                raise click.UsageError("a Ray job needs --address http://HEAD:8265")
            click.echo(ray_status(job, address, lines))
        else:
            click.echo(slurm_status(job, lines))
    except SubmitError as exc:
        raise click.ClickException(str(exc)) from None
