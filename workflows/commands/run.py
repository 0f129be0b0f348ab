"""``xrcam run``: explain every frame of an archive with Ray workers into a Zarr store."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from workflows.commands.conventions import classes_option
from workflows.settings import RunSettings

_DEFAULTS = RunSettings.__dataclass_fields__  # defaults shown in --help come from the dataclass


def _setting(name: str, help: str, **kwargs):
    """An option whose default (shown in --help) is the RunSettings field's; counts must be >= 1."""
    default = _DEFAULTS[name.lstrip("-").replace("-", "_")].default
    if isinstance(default, tuple):
        default = ",".join(default)
    elif isinstance(default, int):
        kwargs.setdefault("type", click.IntRange(min=1))
    return click.option(name, default=default, show_default=True, help=help, **kwargs)


@click.command()
@click.argument("archive", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Results folder (created).")
@click.option("--model", help="timm backbone (default skresnext50_32x4d, or the checkpoint's).")
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Weights (a state_dict, a training script's checkpoint, DataParallel, .safetensors, torchvision "
    "ResNet layout); the JSON sidecar next to it supplies model, classes and preprocessing.",
)
@click.option(
    "--random-init",
    type=click.IntRange(min=0),
    metavar="SEED",
    help="No checkpoint: explain with random weights drawn from SEED (every worker builds the same "
    "ones; recorded in the store). For tests and demos: the maps then mean nothing.",
)
@classes_option()
@click.option(
    "--skip-unknown-labels",
    is_flag=True,
    default=None,
    help="Record videos whose label is not one of the classes as failures instead of refusing the run.",
)
@click.option("--methods", help="Comma-separated methods (default: all registered, xrcam.list_methods()).")
@_setting("--rules", "LRP rule preset of the relevance methods (reference, epsilon, alphabeta).")
@_setting("--clrp", "CLRP start relevance: unit (published code) or logit (the paper's derivation).")
@_setting("--layers", "Comma-separated stages of the model.")
@_setting("--batch-size", "Frames per forward pass.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Worker actors (default: one per GPU, else half the CPU cores).",
)
@click.option(
    "--address",
    help="Ray cluster to join (e.g. 10.0.0.5:6379); without it a local Ray on 127.0.0.1 is started.",
)
@_setting("--frame-step", "Keep every n-th frame from the first.")
@click.option("--crop", help="Fixed crop x,y,size in source pixels instead of per-video FOV detection.")
@_setting("--chunk-frames", "Frames per Zarr chunk.")
@_setting("--shard-chunks", "Chunks per shard, the unit of work of a worker.")
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), help="Only the videos of this patient split."
)
@click.option("--device", help="Torch device for workers (default cuda when present).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store written with other settings.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
def command(progress: bool, **options) -> None:
    """Explain every frame of ARCHIVE with all methods and layers into RESULTS/maps.zarr.

    ARCHIVE is ROOT/<class>/<patient>/<videos> or a CSV/Parquet manifest. Weights are required:
    --checkpoint (classes from its sidecar or --classes), or --random-init SEED. Everything is checked
    before anything starts; a refused run writes nothing. Without --address a local
    Ray bound to 127.0.0.1 is started (no dashboard); with one, the run joins that cluster. Rerunning
    the same command resumes: finished shards are skipped. Settings that differ from those recorded in
    an existing store are refused unless --overwrite. A video that cannot be read is recorded in
    RESULTS/failures.parquet and the run carries on; the exit status is 1 when anything failed.

    \b
    Example:
      xrcam run archive/ --out results/ --checkpoint ckpt/model.pt --workers 2
      xrcam run archive/ --out results/ --checkpoint resnet50.pth --model resnet50 \\
                --classes glioblastoma,meningioma
      xrcam run --config run.toml --batch-size 8
    """
    from workflows.driver import run

    # an XrcamError or OSError escaping here is one sentence, exit 1 (workflows.commands.conventions)
    settings = RunSettings.resolve(
        None, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    )
    summary = run(settings, progress=progress)
    _print_summary(summary)
    if not summary.ok:
        raise click.exceptions.Exit(1)


def _print_summary(summary) -> None:
    maps = Path(summary.results) / "maps.zarr"
    click.echo(
        f"\n{summary.videos} videos ({summary.videos_complete} complete), {summary.frames} frames; "
        f"this run explained {summary.frames_processed} frames in {summary.shards_processed} shards "
        f"({summary.shards_skipped} already done) with {summary.workers} worker(s) in {summary.seconds:.0f} s"
        + (f", {summary.worker_restarts} worker restarts" if summary.worker_restarts else "")
        + "."
    )
    if summary.failures:
        click.secho(
            f"{len(summary.failures)} failures (see {Path(summary.results) / 'failures.parquet'}):", fg="red"
        )
        for row in summary.failures[:5]:
            click.echo(f"  {row['video_id']} shard {row['shard']}: {row['error_type']}: {row['message']}")
        if len(summary.failures) > 5:
            click.echo(f"  ... and {len(summary.failures) - 5} more")
    click.echo(f"Results: {maps}")
    click.echo(
        "Open them with:\n"
        "  from workflows import results\n"
        f"  res = results.open({summary.results!r})\n"
        "  ds = res.video(res.video_keys[0])   # xarray Dataset of one video\n"
        f"Next: {next_command('reduce', summary.results)}"
    )


def next_command(*words: str) -> str:
    """``xrcam WORDS...`` quoted for a POSIX shell, so it can be pasted (paths with spaces, quotes, $)."""
    return shlex.join(["xrcam", *words])
