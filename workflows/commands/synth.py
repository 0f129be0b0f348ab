"""``xrcam synth``: write a deterministic synthetic pCLE archive."""

from __future__ import annotations

from pathlib import Path

import click

from xrcam.synth import DESIGNS, SynthConfig, write_archive

FORMAT_NAMES = ["mkt", "avi", "mp4", "png", "jpg", "tif", "tiff-stack"]


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMAT_NAMES), default="png", show_default=True,
              help="File format of the videos: .mkt, .avi (lossless FFV1), .mp4 (H.264), folders of "
                   ".png/.jpg/.tif frames, or multi-page .tif stacks.")  # fmt: skip
@click.option(
    "--classes",
    default=SynthConfig.classes,
    show_default=True,
    help="Number of classes (meningioma, glioblastoma, fibrous, sparse).",
)
@click.option("--patients", default=SynthConfig.patients, show_default=True, help="Patients per class.")
@click.option("--videos", default=SynthConfig.videos, show_default=True, help="Videos per patient.")
@click.option("--frames", default=SynthConfig.frames, show_default=True, help="Frames per video.")
@click.option("--size", nargs=2, type=int, default=SynthConfig.size, show_default=True, metavar="H W",
              help="Frame size in pixels; the FOV's inscribed square is about 0.6 of it.")  # fmt: skip
@click.option("--bit-depth", type=click.Choice(["8", "16"]), default=None,
              help="Pixel depth. Default: 16 for mkt (its only depth), 8 otherwise.")  # fmt: skip
@click.option(
    "--seed", default=SynthConfig.seed, show_default=True, help="Everything follows from this seed."
)
@click.option(
    "--mask-every",
    default=SynthConfig.mask_every,
    show_default=True,
    help="Write a ground-truth mask for every k-th meningioma frame.",
)
@click.option(
    "--design",
    type=click.Choice(DESIGNS),
    default=SynthConfig.design,
    show_default=True,
    help="blobs: the localisation benchmark (one texture for both classes, the psammoma-like "
    "bodies are the only class cue, redrawn along each video); texture: the classes also "
    "differ in texture and each video keeps one blob layout (a shortcut: negative control).",
)
@click.option(
    "--crop",
    type=click.IntRange(min=24),
    default=SynthConfig.crop,
    help="blobs design: side in px of the FOV's inscribed square (the paper's is 230, e.g. with "
    "--size 576 578). Default: FOV radius 40-46 % of the frame.",
)
@click.option(
    "--layout-every",
    type=click.IntRange(min=1),
    default=SynthConfig.layout_every,
    show_default=True,
    help="blobs design: frames per blob layout (the bodies slide in between).",
)
@click.option(
    "--distractors/--no-distractors",
    default=SynthConfig.distractors,
    show_default=True,
    help="blobs design: dark vessel-like bands in both classes, so darkness alone is no cue.",
)
@click.option(
    "--rims/--no-rims",
    default=SynthConfig.rims,
    show_default=True,
    help="blobs design: bright rims and concentric lamellae on the bodies.",
)
@click.option("--force", is_flag=True, help="Write into OUT even if it already holds files.")
def command(out: Path, fmt: str, classes: int, patients: int, videos: int, frames: int, size: tuple[int, int],
            bit_depth: str | None, seed: int, mask_every: int, design: str, crop: int | None,
            layout_every: int, distractors: bool, rims: bool, force: bool) -> None:  # fmt: skip
    """Write a synthetic pCLE archive to OUT: OUT/<class>/<patient>/<video> plus OUT/manifest.csv.

    Each video shows a circular field of view (varying, sometimes off-centre) with a vendor-like text
    mark outside it, slow probe drift and noise. Meningioma frames carry dark round psammoma-like
    bodies, with exact ground-truth masks in <video>.masks/frame_NNNNNN.png; glioblastoma frames none.
    With --design blobs both classes share one texture distribution, so the bodies are the only cue
    (a localisation benchmark with a known answer); with --design texture glioblastoma also has a
    denser, brighter texture and each video one fixed layout (a model can be right for the wrong reason). Patient folders are pseudonyms (P01, ...); .mkt files
    carry a fake patient_id in their metadata block so leak checks have something to find.

    Example: xrcam synth bench --design blobs --format mkt --size 576 578 --crop 230 --patients 40
    """
    if out.exists() and any(out.iterdir()) and not force:
        raise click.ClickException(f"{out} already holds files; choose an empty folder or pass --force")
    depth = int(bit_depth) if bit_depth else (16 if fmt == "mkt" else 8)
    try:
        config = SynthConfig(classes, patients, videos, frames, tuple(size), depth, seed, mask_every, design, crop,
                             layout_every, distractors, rims)  # fmt: skip
        archive = write_archive(out, config, fmt)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    for r in archive.records:
        masks = f", {r.num_masks} masks in {r.mask_path}" if r.mask_path else ""
        click.echo(f"{r.path}: {r.num_frames} frames{masks}")
    per_class: dict[str, int] = {}
    for r in archive.records:
        per_class[r.label] = per_class.get(r.label, 0) + 1
    counts = ", ".join(f"{n} {label}" for label, n in per_class.items())
    click.echo(
        f"Wrote {len(archive.records)} videos ({counts}) of {config.size[0]}x{config.size[1]} {depth}-bit {fmt}, "
        f"{sum(r.num_frames for r in archive.records)} frames, {sum(r.num_masks for r in archive.records)} masks, "
        f"{len({r.patient for r in archive.records})} patients in {archive.root}"
    )
    click.echo(f"Manifest: {archive.manifest}")
