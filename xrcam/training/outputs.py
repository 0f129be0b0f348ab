"""The run folder's files: ``model.pt`` sidecar, ``last.pt`` (resume), ``split.csv``, ``metrics.csv``.

Everything needed to resume or to use the result lives in the output folder: ``model.pt`` (best
weights, plain ``state_dict``) with its JSON sidecar, ``last.pt`` (weights, optimizer, epoch and
early-stopping state; loadable with ``weights_only=True``), ``metrics.csv`` (one row per epoch)
and ``split.csv`` (video -> train/val/test, patient-level).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xrcam.archive import SPLITS
from xrcam.errors import XrcamConfigError
from xrcam.training.config import TrainConfig
from xrcam.training.data import TrainData

__all__ = [
    "LAST_FILE",
    "METRICS_FILE",
    "METRIC_COLUMNS",
    "MODEL_FILE",
    "SPLIT_FILE",
    "TrainResult",
    "append_metrics",
    "fresh_state",
    "read_result",
    "resume",
    "save_last",
    "sidecar",
    "truncate_metrics",
    "write_split",
]

MODEL_FILE, LAST_FILE, METRICS_FILE, SPLIT_FILE = "model.pt", "last.pt", "metrics.csv", "split.csv"
METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "best",
    "seconds",
)
# settings that must not change when a run is resumed (the weights would not fit or the data would differ)
_RESUME_KEYS = ("model", "dropout", "seed", "frame_step", "image_size", "max_frames_per_video", "fractions")


@dataclass
class TrainResult:
    """Summary of a finished (or resumed-and-finished) run."""

    out_dir: Path
    checkpoint: Path
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    val_accuracy: float
    val_loss: float
    test_accuracy: float | None
    test_loss: float | None
    test_frames: int


def read_result(out_dir: str | Path) -> TrainResult:
    """The summary of the run in ``out_dir``, from ``model.pt``'s sidecar (any process can read it)."""
    from xrcam.models import read_checkpoint_sidecar

    checkpoint = Path(out_dir) / MODEL_FILE
    saved = read_checkpoint_sidecar(checkpoint)
    if saved is None or "metrics" not in saved:
        raise XrcamConfigError(f"{checkpoint}: no training sidecar beside it; train into this folder first")
    metrics = saved["metrics"]
    return TrainResult(
        out_dir=Path(out_dir),
        checkpoint=checkpoint,
        **{f.name: metrics[f.name] for f in dataclasses.fields(TrainResult) if f.name in metrics},
    )


def sidecar(
    data: TrainData, config: TrainConfig, state: dict[str, Any], test: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON that travels with ``model.pt``: enough for ``xrcam run --checkpoint`` to need no flags."""
    from xrcam import __version__

    videos = {s: [r["video_id"] for r in data.split_rows if r["split"] == s] for s in SPLITS}
    return {
        "xrcam_version": __version__,
        "model": config.model,
        "num_classes": len(data.classes),
        "classes": list(data.classes),
        "dropout": config.dropout,
        "preprocessing": data.preprocessing,
        "split": {
            "seed": config.seed,
            "fractions": list(config.fractions),
            "file": SPLIT_FILE,
            "videos": videos,
        },
        "training": config.to_dict(),
        "metrics": {
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            "stopped_early": state["bad_epochs"] >= config.patience,
            "val_accuracy": state["best_val_accuracy"],
            "val_loss": state["best_val_loss"],
            "test_accuracy": None if test is None else test["accuracy"],
            "test_loss": None if test is None else test["loss"],
            "test_frames": None if test is None else test["frames"],
        },
    }


def fresh_state() -> dict[str, Any]:
    return {
        "epoch": 0,
        "best_epoch": 0,
        "best_val_accuracy": -1.0,
        "best_val_loss": math.inf,
        "bad_epochs": 0,
    }


def resume(
    out: Path, config: TrainConfig, data: TrainData, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load ``last.pt`` into model and optimizer if present; return the loop state to continue from."""
    path = out / LAST_FILE
    if not path.exists():
        return fresh_state()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise XrcamConfigError(
            f"{path}: cannot read the resume state ({exc}); delete it or use a new --out"
        ) from exc
    before = json.loads(saved["config"])
    changed = [k for k in _RESUME_KEYS if before.get(k) != config.to_dict()[k]]
    if saved["classes"] != list(data.classes):
        changed.append("classes")
    if changed:
        raise XrcamConfigError(
            f"{path}: cannot resume, these settings differ from the saved run: {', '.join(changed)}; "
            "use the same settings or a new --out"
        )
    old_split = _read_split(out / SPLIT_FILE)
    new_split = {r["video_id"]: r["split"] for r in data.split_rows}
    if old_split and old_split != new_split:
        raise XrcamConfigError(
            f"{out / SPLIT_FILE}: the archive's videos or their split changed since the saved run; "
            "use a new --out to train on the new archive"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # --lr may be changed on resume
        group["lr"] = config.lr
    return {k: saved["state"][k] for k in fresh_state()}


def save_last(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    state: dict[str, Any],
    classes: list[str],
) -> None:
    """Write ``last.pt`` atomically (tensors, numbers and strings only: ``weights_only`` loads it)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": dict(state),
        "config": json.dumps(config.to_dict()),
        "classes": list(classes),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def write_split(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video_id", "patient", "label", "split", "frames"])
        writer.writeheader()
        writer.writerows(rows)


def _read_split(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {row["video_id"]: row["split"] for row in csv.DictReader(handle)}


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows past the resumed epoch (written after the last saved state), keep the rest."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) <= epochs_done]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
