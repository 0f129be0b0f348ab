"""``xrcam report``: one self-contained HTML page of a reduced results folder (and an overlay video)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("results", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write [default: RESULTS/report.html].",
)
@click.option(
    "--frames",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Sample frames shown as map and mask grids (annotated, correctly classified ones first).",
)
@click.option(
    "--overlay-video",
    "video_key",
    default=None,
    metavar="VIDEO_KEY",
    help="Also write RESULTS/overlay_<VIDEO_KEY>.mp4: the video's frames with saliency overlaid "
    "(VIDEO_KEY is the video id with '/' replaced by '__', as in maps.zarr/videos/).",
)
@click.option("--method", default="xrelevancecam", show_default=True, help="Method of the overlay video.")
@click.option("--layer-set", default="4+3+2+1", show_default=True, help="Layer set of the overlay video.")
@click.option(
    "--fps", type=click.FloatRange(min=1), default=10, show_default=True, help="Overlay video frame rate."
)
def command(
    results: Path,
    out: Path | None,
    frames: int,
    video_key: str | None,
    method: str,
    layer_set: str,
    fps: float,
) -> None:
    """Write an HTML report of RESULTS after `xrcam reduce`.

    The page needs no network: styles are inline and every image is an embedded PNG. It holds the
    run's settings, Tables 1, 2 and 4 as in the paper (best value per column in bold), classification
    accuracy per class and per patient, mIoU bar charts, and for a sample of frames the grids of the
    paper's Figs. 2-3: each method's map per layer as a colour overlay and its masks against the
    ground-truth contour. Frames are reread from the archive the run used; if it has moved, the maps
    are drawn on grey and the report says so.
    """
    from workflows.report import build_report, export_overlay_video
    from xrcam.errors import XrcamError

    try:
        path = build_report(results, out, frames=frames)
        click.echo(f"Report: {path}")
        if video_key:
            video = export_overlay_video(
                results,
                video_key,
                results / f"overlay_{video_key}.mp4",
                method=method,
                layer_set=layer_set,
                fps=fps,
            )
            click.echo(f"Overlay video: {video}")
    except XrcamError as exc:
        raise click.ClickException(str(exc)) from exc
