"""``xrcam report``: one self-contained HTML page of a reduced results folder (and an overlay video)."""

from __future__ import annotations

from pathlib import Path

import click

from workflows.report.options import OverlayOptions, ReportOptions  # light: no torch, no matplotlib


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
    default=ReportOptions.frames,
    show_default=True,
    help="Sample frames per class shown as method x layer grids (3: the best, a typical and the worst by IoU).",
)
@click.option(
    "--videos",
    type=click.IntRange(min=0),
    default=ReportOptions.videos,
    show_default=True,
    help="Videos that get their own section (probability and IoU along the video, overlay strip).",
)
@click.option(
    "--gallery",
    type=click.IntRange(min=0),
    default=ReportOptions.gallery,
    show_default=True,
    help="Frames in the gallery of where XRelevanceCAM and the gradient family disagree most.",
)
@click.option(
    "--overlay-video",
    "video_key",
    default=None,
    metavar="VIDEO_KEY",
    help="Also write RESULTS/overlay_<VIDEO_KEY>.mp4: the video's frames with saliency overlaid, the class, "
    "prediction, probability and a colour bar burnt in (VIDEO_KEY as in maps.zarr/videos/).",
)
@click.option(
    "--method", default=OverlayOptions.method, show_default=True, help="Method of the overlay video."
)
@click.option(
    "--layer-set", default=OverlayOptions.layer_set, show_default=True, help="Layer set of the overlay video."
)
@click.option(
    "--fps",
    default=OverlayOptions.fps,
    show_default=True,
    metavar="RATE",
    help="Overlay video frame rate, written exactly: 7.5 or 30000/1001 (a rate that cannot be encoded exactly is refused).",
)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def command(
    results: Path,
    out: Path | None,
    frames: int,
    videos: int,
    gallery: int,
    video_key: str | None,
    method: str,
    layer_set: str,
    fps: str,
    progress: bool,
) -> None:
    """Write an HTML report of RESULTS after `xrcam reduce`.

    One page, no network, no JavaScript: the paper's Tables 1, 2 (3, 4 where computed) with 95 %
    confidence intervals over patients and the reference rows, bar charts, sample frames of each
    class (best, typical, worst), the frames where the methods disagree most, the classification
    verdict per patient and per video, and a section per video with its probability and IoU along
    the video. docs/report.md says how to read each figure.

    Example: xrcam report results/ --overlay-video meningioma__P01__V01.mkt --fps 7.5
    """
    from workflows.report import build_report, export_overlay_video, parse_fps

    # an XrcamError or OSError escaping here is one sentence, exit 1 (workflows.commands.conventions)
    rate = parse_fps(fps) if video_key else None
    options = ReportOptions(frames=frames, videos=videos, gallery=gallery)
    path = build_report(results, out, options=options, progress=progress)
    click.echo(f"Report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if video_key:
        video = export_overlay_video(
            results,
            video_key,
            results / f"overlay_{video_key}.mp4",
            method=method,
            layer_set=layer_set,
            fps=rate,
        )
        click.echo(f"Overlay video: {video} ({rate} fps)")
