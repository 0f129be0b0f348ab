"""``xrcam reduce``: raw per-stage maps -> Parquet metrics (with reference rows) and the paper's tables."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from workflows.reduce import ReduceSettings  # light: the defaults come from the library dataclass

_DEFAULTS = ReduceSettings.__dataclass_fields__


@click.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--layer-sets",
    default=",".join(_DEFAULTS["layer_sets"].default),
    show_default=True,
    help="Comma-separated layer sets: single stages give Table 1, the deepest stage and the '+' sets Table 2.",
)
@click.option(
    "--threshold",
    default=_DEFAULTS["threshold"].default,
    show_default=True,
    help="Mask rule on the normalised map: mean+std, fraction:<f> (f x max) or otsu.",
)
@click.option(
    "--references",
    default=",".join(_DEFAULTS["references"].default),
    show_default=True,
    help="Reference rows scored beside the methods on the annotated frames ('' for none); "
    "intensity re-reads the frames from the archive.",
)
@click.option(
    "--inverted",
    default=None,
    help="Comma-separated methods whose negated maps are scored as inverted_<method>, the sign check "
    "('' for none) [default: every relevance-family method that was run].",
)
@click.option(
    "--agreement/--no-agreement",
    default=_DEFAULTS["agreement"].default,
    show_default=True,
    help="Write the per-frame agreement of every method with XRelevanceCAM (mask IoU, rank correlation).",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to reduce on, one task per video (default: reduce in this process, no Ray).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=None,
    help="Videos reduced in parallel (default: all cores): threads of this process, or Ray tasks with "
    "--address; 0 reduces one video at a time in this process.",
)
@click.option(
    "--chunk-frames",
    type=click.IntRange(min=1),
    default=None,
    help="Frames read per step (default: one shard of each video, --shard-chunks x --chunk-frames of the run).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def command(
    results: Path,
    layer_sets: str,
    threshold: str,
    references: str,
    inverted: str | None,
    agreement: bool,
    address: str | None,
    workers: int | None,
    chunk_frames: int | None,
    progress: bool,
) -> None:
    """Reduce the results folder written by `xrcam run`.

    For every complete video it scores every method's maps over each layer set (upsampled, normalised,
    aggregated, thresholded into masks, IoU against the ground truth) with the same scoring core the
    read API and `xrcam evaluate` use, plus reference rows (random, centre, oracle, intensity and the
    inverted relevance maps) on the annotated frames. It writes, all inside RESULTS:

    \b
      metrics/method=<m>/part-0.parquet   one row per video, frame and layer set (hive-partitioned)
      agreement/part-0.parquet            every method vs XRelevanceCAM per frame: mask IoU, rank corr.
      summary/*.parquet                   Table 1, Table 2 (mIoU % with 95 % CIs over patients),
                                          Table 4 (if `xrcam evaluate --axioms` ran), accuracy, agreement
      reduce.json                         what was done, with which settings

    Aggregated maps and masks are not stored; read them with workflows.results (docs/results.md).
    Rerunning replaces everything it wrote. A video that cannot be reduced is reported (and listed in
    reduce.json), the others carry on, and the exit status is 1.
    """
    from workflows.reduce import reduce_results
    from workflows.store import ResultStore
    from xrcam.errors import XrcamError

    try:
        settings = ReduceSettings(
            layer_sets=tuple(s.strip() for s in layer_sets.split(",") if s.strip()),
            threshold=threshold,
            chunk_frames=chunk_frames,
            references=tuple(s.strip() for s in references.split(",") if s.strip()),
            inverted=None if inverted is None else tuple(s.strip() for s in inverted.split(",") if s.strip()),
            agreement=agreement,
        )
    except XrcamError as exc:
        raise click.UsageError(str(exc)) from exc
    store = ResultStore.open(results, mode="r")  # a missing or old store: one sentence, exit 1
    if not any(store.is_complete(k) for k in store.video_keys()):
        click.echo(
            f"Nothing to reduce: {results} holds no complete video yet; run or resume `xrcam run` first."
        )
        raise click.exceptions.Exit(1)  # refused: no tables are written from nothing
    from tqdm import tqdm

    bar = None

    def start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, unit="video", desc="xrcam reduce", disable=not progress, dynamic_ncols=True)

    def advance(done: int, total: int) -> None:
        bar.update(1)

    try:
        summary = reduce_results(
            results, settings, address=address, workers=workers, on_video=advance, on_start=start
        )
    finally:
        if bar is not None:
            bar.close()
    _print_summary(results, summary)
    if summary["failed_videos"]:
        raise click.exceptions.Exit(1)


def _print_summary(results: Path, summary: dict) -> None:
    click.echo(f"Reduced {summary['videos']} video(s) into {summary['rows']} rows: {summary['metrics']}")
    for failure in summary["failed_videos"]:
        click.echo(f"Failed: {failure['video_key']}: {failure['error_type']}: {failure['message']}", err=True)
    if summary["incomplete_videos"]:
        click.echo(
            f"Left out {len(summary['incomplete_videos'])} incomplete video(s); resume `xrcam run` and reduce again."
        )
    import pandas as pd

    names = ("table1_layer_miou", "table2_layerset_miou", "table4_axioms")
    paths = {name: summary["summary_tables"][name] for name in names if summary["summary_tables"].get(name)}
    echo_tables({f"{name} ({path})": pd.read_parquet(path) for name, path in paths.items()})


def echo_tables(tables: Mapping[str, Any], precision: int = 2) -> None:
    """Print summary tables (DataFrames), each under its title: the one table printer of reduce, evaluate
    and the demo. mIoU tables are pivoted like the paper (one row per method, ``mIoU [95 % CI]`` per
    layer set) under the number of frames and patients behind them."""
    import pandas as pd

    from workflows.tables import paper_view

    for title, df in tables.items():
        click.secho(f"\n{title}", bold=True)
        if "miou_pct" in df:
            if "n_patients" in df and len(df):
                click.echo(f"({int(df['n_frames'].max())} frames of {int(df['n_patients'].max())} patients)")
            df = paper_view(df)
        with pd.option_context(
            "display.width", 160, "display.precision", precision, "display.max_columns", 20
        ):
            click.echo(df.to_string(index=False))
