"""``xrcam reduce``: per-layer maps -> aggregated maps, masks, Parquet metrics and the paper's tables."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--layer-sets",
    default="1,2,3,4,4+3,4+3+2,4+3+2+1",
    show_default=True,
    help="Comma-separated layer sets: single stages give Table 1, the '+' sets Table 2.",
)
@click.option(
    "--threshold",
    default="meanstd",
    show_default=True,
    help="Mask rule on the normalised map: meanstd (mean + std), fraction:<f> (f x max) or otsu.",
)
@click.option(
    "--address",
    envvar="RAY_ADDRESS",
    default=None,
    help="Ray cluster to join (default: start a local Ray on 127.0.0.1, no dashboard).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Videos reduced in parallel (default: all cores); 0 runs in this process without Ray.",
)
@click.option(
    "--chunk-frames",
    type=click.IntRange(min=1),
    default=None,
    help="Frames held in memory per step (default: the store's chunk length).",
)
def command(
    results: Path,
    layer_sets: str,
    threshold: str,
    address: str | None,
    workers: int | None,
    chunk_frames: int | None,
) -> None:
    """Reduce the results folder written by `xrcam run`.

    For every complete video and method it aggregates the per-layer maps over each layer set, thresholds
    them into masks and scores the masks against the ground truth (IoU). It writes, all inside RESULTS:

    \b
      maps.zarr/videos/<video>/agg_<method>_<set>   aggregated maps (float16, crop grid, '+' sets)
      maps.zarr/videos/<video>/mask_<method>_<set>  masks (uint8 0/1, compressed)
      metrics/<method>/part-0.parquet               one row per video, frame, method and layer set
      summary/*.parquet                              Table 1, Table 2, Table 4 (if `xrcam evaluate` ran),
                                                     accuracy per class and per patient
      reduce.json                                    what was done, with which settings

    Set ids in array names use '-' for '+' (4+3 -> 4-3). Rerunning replaces everything it wrote. A video
    that cannot be reduced is reported (and listed in reduce.json), the others carry on, and the exit
    status is 1.
    """
    from workflows.reduce import ReduceSettings, reduce_results
    from xrcam.errors import XrcamError

    try:
        settings = ReduceSettings(
            layer_sets=tuple(s.strip() for s in layer_sets.split(",") if s.strip()),
            threshold=threshold,
            chunk_frames=chunk_frames,
        )
    except XrcamError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        with click.progressbar(length=1, label="Reducing videos") as bar:

            def advance(done: int, total: int) -> None:
                bar.length = total
                bar.update(1)

            summary = reduce_results(results, settings, address=address, workers=workers, on_video=advance)
    except XrcamError as exc:
        raise click.ClickException(str(exc)) from exc
    _print_summary(results, summary)
    if summary["failed_videos"]:
        raise SystemExit(1)


def _print_summary(results: Path, summary: dict) -> None:

    click.echo(f"Reduced {summary['videos']} video(s) into {summary['rows']} rows: {results / 'metrics'}")
    for failure in summary["failed_videos"]:
        click.echo(f"Failed: {failure['video_key']}: {failure['error_type']}: {failure['message']}", err=True)
    if summary["incomplete_videos"]:
        click.echo(
            f"Left out {len(summary['incomplete_videos'])} incomplete video(s); resume `xrcam run` and reduce again."
        )
    names = ("table1_layer_miou", "table2_layerset_miou", "table4_axioms")
    echo_tables(
        {name: summary["summary_tables"][name] for name in names if summary["summary_tables"].get(name)}
    )


def echo_tables(tables: dict[str, Path]) -> None:
    """Print summary tables read back from their Parquet files, each under its title and path."""
    import pandas as pd

    for title, path in tables.items():
        click.secho(f"\n{title} ({path})", bold=True)
        with pd.option_context("display.width", 140, "display.precision", 2):
            click.echo(pd.read_parquet(path).to_string(index=False))
