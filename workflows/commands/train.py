"""``xrcam train``: fine-tune a backbone on an archive, single process or data-parallel on Ray Train."""

from __future__ import annotations

from pathlib import Path

import click

from workflows.commands.conventions import classes_option
from xrcam.training.config import TrainConfig

_DEFAULTS = TrainConfig()  # the one place the defaults are written; help shows them


@click.command()
@click.argument("archive", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Checkpoint folder."
)
@click.option("--model", default=_DEFAULTS.model, help="timm backbone.")
@classes_option(
    help="Comma-separated class names in the classifier's logit order (default: the sorted archive labels)."
)
@click.option("--epochs", default=_DEFAULTS.epochs, type=click.IntRange(min=1), help="Most epochs.")
@click.option(
    "--batch-size",
    default=_DEFAULTS.batch_size,
    type=click.IntRange(min=1),
    help="Global batch (split over --workers).",
)
@click.option(
    "--dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=_DEFAULTS.dropout,
    help="Dropout after each stage (the paper's variant uses 0.1). Off by default.",
)
@click.option(
    "--patience",
    default=_DEFAULTS.patience,
    type=click.IntRange(min=1),
    help="Stop after this many epochs without validation improvement.",
)
@click.option("--lr", default=_DEFAULTS.lr, type=click.FloatRange(min=0), help="AdaMax rate.")
@click.option("--seed", default=_DEFAULTS.seed, type=int, help="Seeds the patient split, init and order.")
@click.option(
    "--frame-step", default=_DEFAULTS.frame_step, type=click.IntRange(min=1), help="Keep every n-th frame."
)
@click.option(
    "--max-frames-per-video",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_frames_per_video,
    help="Evenly spaced subset of the kept frames of each video.",
)
@click.option(
    "--image-size",
    type=click.IntRange(min=16),
    default=_DEFAULTS.image_size,
    help="Resize the FOV square to this size (default: the median crop side).",
)
@click.option(
    "--init-weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Local weights to fine-tune from (e.g. timm ImageNet weights); the classifier is re-initialised.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Train data-parallel on this many Ray Train workers (one per GPU when the cluster has them).",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join with --workers (default: a local Ray on 127.0.0.1).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    help="Where to train; auto picks CUDA when present.",
)
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def command(
    archive: Path,
    out: Path,
    model: str,
    classes: tuple[str, ...] | None,
    epochs: int,
    batch_size: int,
    dropout: float | None,
    patience: int,
    lr: float,
    seed: int,
    frame_step: int,
    max_frames_per_video: int | None,
    image_size: int | None,
    init_weights: Path | None,
    workers: int | None,
    address: str | None,
    device: str,
    progress: bool,
) -> None:
    """Fine-tune a classifier on ARCHIVE and write the checkpoint folder OUT.

    ARCHIVE is ROOT/<class>/<patient>/<videos> or a manifest CSV/Parquet. Patients are split
    80/10/10 into train/val/test (seeded; OUT/split.csv). Training uses AdaMax, random flips,
    rotation and contrast, and stops after --patience epochs without validation improvement.
    OUT holds model.pt (best weights) with its JSON sidecar — all that `xrcam run --checkpoint`
    needs — plus metrics.csv (one row per epoch) and last.pt. Running the same command again
    resumes from last.pt; a larger --epochs trains on. The test accuracy is printed at the end.
    """
    if address and workers is None:
        source = click.get_current_context().get_parameter_source("address")
        if source is click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("--address needs --workers: it names the Ray cluster to train on.")
        address = None  # XRCAM_ADDRESS set for the whole session: training in this process does not need it
    config = TrainConfig(
        model=model,
        classes=classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        dropout=dropout,
        seed=seed,
        frame_step=frame_step,
        max_frames_per_video=max_frames_per_video,
        image_size=image_size,
        init_weights=None if init_weights is None else str(init_weights),
    )
    _train(archive, out, config, workers, address, device, progress)  # an XrcamError exits 1 (docs/cli.md)


def _train(
    archive: Path, out: Path, config, workers: int | None, address: str | None, device: str, progress: bool
):
    import torch

    from xrcam.training import fit, prepare_data

    if device == "cuda" and workers is None and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is visible; use --device cpu.")
    data = prepare_data(archive, config, progress=progress)
    for problem in data.problems:
        click.echo(f"skipped: {problem}", err=True)
    sizes = ", ".join(f"{split} {len(frames)}" for split, frames in data.frames.items())
    click.echo(f"classes {data.classes}; frames: {sizes}")
    if workers is None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        result = fit(data, out, config, device=device, progress=progress)
    else:
        from workflows.ray_session import ray_session

        with ray_session(address):  # before anything imports ray: it binds to 127.0.0.1 only then
            from workflows.train_ray import train_distributed

            use_gpu = None if device == "auto" else device == "cuda"
            result = train_distributed(data, out, config, workers=workers, use_gpu=use_gpu, progress=progress)
    stop = "early stop" if result.stopped_early else "epoch limit"
    click.echo(
        f"trained {result.epochs_run} epochs ({stop}); best epoch {result.best_epoch}: "
        f"val accuracy {result.val_accuracy:.4f}"
    )
    click.echo(f"test accuracy {result.test_accuracy:.4f} on {result.test_frames} frames")
    click.echo(f"checkpoint: {result.checkpoint}")
