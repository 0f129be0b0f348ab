"""``xrcam run``: explain every frame of an archive with Ray workers into a Zarr store."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("archive", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Results folder (created).")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="XRCAM_CONFIG",
    help="TOML file with any of these settings (keys named like the options); options override it.",
)
@click.option(
    "--model", envvar="XRCAM_MODEL", help="timm backbone (default skresnext50_32x4d, or the checkpoint's)."
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="XRCAM_CHECKPOINT",
    help="Fine-tuned weights; the JSON sidecar next to it supplies model, classes and preprocessing.",
)
@click.option("--methods", help="Comma-separated methods (default: all seven).")
@click.option("--layers", help="Comma-separated stages (default: layer1,layer2,layer3,layer4).")
@click.option(
    "--batch-size", type=int, envvar="XRCAM_BATCH_SIZE", help="Frames per forward pass (default 16)."
)
@click.option(
    "--workers",
    type=int,
    envvar="XRCAM_WORKERS",
    help="Worker actors (default: one per GPU, else half the CPU cores).",
)
@click.option(
    "--address",
    envvar="XRCAM_ADDRESS",
    help="Ray cluster to join (e.g. 10.0.0.5:6379); without it a local Ray on 127.0.0.1 is started.",
)
@click.option("--frame-step", type=int, help="Keep every n-th frame from the first (default 2).")
@click.option("--crop", help="Fixed crop x,y,size in source pixels instead of per-video FOV detection.")
@click.option("--chunk-frames", type=int, help="Frames per Zarr chunk (default 32).")
@click.option("--shard-chunks", type=int, help="Chunks per shard, the unit of work of a worker (default 4).")
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), help="Only the videos of this patient split."
)
@click.option("--device", envvar="XRCAM_DEVICE", help="Torch device for workers (default cuda when present).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store written with other settings.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
def command(config: Path | None, progress: bool, **options) -> None:
    """Explain every frame of ARCHIVE with all methods and layers into RESULTS/maps.zarr.

    ARCHIVE is ROOT/<class>/<patient>/<videos> or a CSV/Parquet manifest. Without --address a local
    Ray bound to 127.0.0.1 is started (no dashboard); with one, the run joins that cluster. Rerunning
    the same command resumes: finished shards are skipped. Settings that differ from those recorded in
    an existing store are refused unless --overwrite. A video that cannot be read is recorded in
    RESULTS/failures.parquet and the run carries on; the exit status is 1 when anything failed.

    \b
    Example:
      xrcam run archive/ --out results/ --checkpoint ckpt/model.pt --workers 2
      xrcam run --config run.toml --batch-size 8
    """
    from workflows.driver import run
    from workflows.settings import RunSettings
    from xrcam.errors import XrcamError

    try:
        settings = RunSettings.resolve(
            config, **{k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        )
        summary = run(settings, progress=progress)
    except XrcamError as exc:
        raise click.ClickException(str(exc)) from exc
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
        "  import xarray as xr, zarr\n"
        f"  keys = list(zarr.open_group('{maps}', mode='r')['videos'].group_keys())\n"
        f"  ds = xr.open_zarr('{maps}', group=f'videos/{{keys[0]}}', consolidated=False)\n"
        "Next: xrcam reduce " + summary.results
    )
