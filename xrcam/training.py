"""Fine-tuning a backbone on an archive, as in the paper (§4.1): AdaMax, early stopping, four augmentations.

Why it looks like this:

* Frames are read and preprocessed **once** into an in-memory grey float16 tensor set (every
  ``frame_step``-th frame, cropped to the FOV square, resized to one common size): decoding and FOV
  detection are then off the training loop, so an epoch is pure tensor work and fast on CPU.
* Augmentation is batched torch on those tensors (flips, rotation, contrast — the paper's only four).
* Batch-norm statistics are recomputed after every epoch (see :func:`_recalibrate_batchnorm`), so
  validation judges the weights rather than lagging running averages.
* One loop serves one process and data-parallel training: when ``torch.distributed`` is initialised
  (Ray Train does that in ``workflows/train_ray.py``), the model is wrapped in DDP, each rank takes its
  share of every batch and the metrics are summed over ranks. This module never imports Ray.
* Everything needed to resume or to use the result lives in the output folder: ``model.pt`` (best
  weights, plain ``state_dict``) with its JSON sidecar, ``last.pt`` (weights, optimizer, epoch and
  early-stopping state; loadable with ``weights_only=True``), ``metrics.csv`` (one row per epoch)
  and ``split.csv`` (video -> train/val/test, patient-level).

Example::

    from xrcam.training import TrainConfig, prepare_data, fit
    data = prepare_data("archive/", TrainConfig(model="resnet18", image_size=96))
    result = fit(data, "ckpt/", TrainConfig(model="resnet18", image_size=96, epochs=5))
    print(result.test_accuracy)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xrcam.archive import SPLITS
from xrcam.errors import XrcamConfigError, XrcamInputError

__all__ = [
    "TrainConfig",
    "FrameSet",
    "TrainData",
    "TrainResult",
    "SPLITS",
    "augment",
    "prepare_data",
    "fit",
    "read_result",
]

log = logging.getLogger(__name__)

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
BN_FRAMES = 512  # training frames used to recompute batch-norm statistics after each epoch
# settings that must not change when a run is resumed (the weights would not fit or the data would differ)
_RESUME_KEYS = ("model", "dropout", "seed", "frame_step", "image_size", "max_frames_per_video", "fractions")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the paper's (§4.1)."""

    model: str = "skresnext50_32x4d"
    epochs: int = 100
    batch_size: int = 32  # global batch: split over data-parallel workers
    lr: float = 1e-3
    patience: int = 10  # epochs without validation improvement before stopping
    dropout: float | None = None  # Dropout(p) after each stage (paper §4.6 uses 0.1)
    seed: int = 0
    frame_step: int = 2
    max_frames_per_video: int | None = None  # evenly spaced subset of the kept frames
    image_size: int | None = None  # resize the FOV square to this many pixels
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    init_weights: str | None = None  # e.g. ImageNet weights to fine-tune from (classifier re-initialised)
    rotation_degrees: float = 180.0  # pCLE tissue has no preferred orientation
    contrast: float = 0.2  # contrast factor drawn from [1 - c, 1 + c]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class FrameSet:
    """Preprocessed frames of one split, kept grey: a third of the memory of three normalised channels.

    ``images`` (N, 1, S, S) float16 in [0, 1] (cropped, resized, intensity-scaled); ``labels`` (N,)
    int64; ``mean``/``std`` the model's normalisation, applied per batch by :meth:`inputs`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(
        self,
        index: torch.Tensor | slice = slice(None),
        device: str | torch.device | None = None,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Model input of the frames at ``index``: float32 (B, 3, S, S), grey repeated and normalised.

        ``augmentation`` acts on the grey [0, 1] frames before normalisation.
        """
        grey = self.images[index].to(device, torch.float32)
        if augmentation is not None:
            grey = augmentation(grey)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=grey.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=grey.device).view(1, 3, 1, 1)
        return (grey - mean) / std


@dataclass
class TrainData:
    """What :func:`fit` trains on; plain tensors and lists, so it pickles into Ray's object store."""

    classes: list[str]
    frames: dict[str, FrameSet]  # split name -> frames
    split_rows: list[dict[str, str]]  # video_id, patient, label, split, frames
    preprocessing: dict[str, Any]
    problems: list[str] = field(default_factory=list)  # videos skipped, with the reason


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


# --------------------------------------------------------------------------------------------- data


def prepare_data(archive: Any, config: TrainConfig, *, progress: bool = False) -> TrainData:
    """Discover ``archive`` (a root folder, a manifest or an ``Archive``), split by patient, preprocess frames.

    A video that cannot be read is skipped and listed in ``TrainData.problems`` (by path, never by
    patient identifier); the rest carries on.
    """
    from xrcam.archive import discover_archive, split_patients

    if not hasattr(archive, "entries"):
        archive = discover_archive(archive)
    entries = list(archive.entries)
    problems = [str(p) for p in getattr(archive, "problems", [])]
    if not entries:
        raise XrcamInputError(getattr(archive, "root", "archive"), "no readable videos found")
    classes = archive.classes
    if len(classes) < 2:
        raise XrcamConfigError(f"training needs at least two classes, the archive has {classes}")
    assignment = split_patients(entries, fractions=tuple(config.fractions), seed=config.seed)

    from xrcam.models import load_model, model_normalisation
    from xrcam.preprocess import PreprocessConfig

    mean, std = model_normalisation(load_model(config.model, num_classes=len(classes)))
    # frames are stored grey in [0, 1] (identity normalisation); the model's mean/std apply per batch
    pre_config = PreprocessConfig(frame_step=config.frame_step, mean=(0.0,) * 3, std=(1.0,) * 3)
    geometry = {}  # video_id -> its detected crop and FOV
    for entry in entries:
        try:
            geometry[entry.video_id] = _detect_geometry(entry.path, pre_config)
        except XrcamInputError as exc:
            problems.append(str(exc))
            log.warning("skipping video: %s", exc)
    if not geometry:
        raise XrcamInputError(getattr(archive, "root", "archive"), "no video with a usable field of view")
    # one tensor set needs one size: the median crop side unless --image-size says otherwise
    size = config.image_size or int(np.median([crop.size for crop, _, _ in geometry.values()]))
    pre_config = dataclasses.replace(pre_config, size=size)

    per_split: dict[str, list[tuple[torch.Tensor, int]]] = {s: [] for s in SPLITS}
    rows: list[dict[str, str]] = []
    iterator = [e for e in entries if e.video_id in geometry]
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="preprocessing", unit="video")
    for entry in iterator:
        split = assignment[entry.patient]
        try:
            images = _load_video(entry.path, config, pre_config, geometry[entry.video_id])
        except XrcamInputError as exc:
            problems.append(str(exc))
            log.warning("skipping video: %s", exc)
            continue
        per_split[split].append((images, classes.index(entry.label)))
        rows.append(
            {
                "video_id": entry.video_id,
                "patient": entry.patient,
                "label": entry.label,
                "split": split,
                "frames": str(len(images)),
            }
        )
    frames = {}
    for split, videos in per_split.items():
        if not videos:
            raise XrcamConfigError(
                f"the {split} split has no videos ({len(entries)} videos, "
                f"{len({e.patient for e in entries})} patients): add patients or change the split fractions"
            )
        frames[split] = FrameSet(
            images=torch.cat([v for v, _ in videos]),
            labels=torch.cat([torch.full((len(v),), label, dtype=torch.int64) for v, label in videos]),
            mean=mean,
            std=std,
        )
    return TrainData(
        classes=classes,
        frames=frames,
        split_rows=rows,
        preprocessing=dataclasses.replace(pre_config, mean=mean, std=std).to_dict(),
        problems=problems,
    )


def _detect_geometry(path: Path, pre_config: Any) -> tuple[Any, tuple[int, int], Any]:
    """(crop, frame shape, FOV) of one video, detected on its first frame as ``xrcam run`` does."""
    from xrcam.io.readers import open_video
    from xrcam.preprocess import Preprocessor

    with open_video(path) as reader:
        pre = Preprocessor.for_video(reader, pre_config)
    return pre.crop, pre.frame_shape, pre.fov


def _load_video(
    path: Path, config: TrainConfig, pre_config: Any, geometry: tuple[Any, tuple[int, int], Any]
) -> torch.Tensor:
    """Kept frames of one video, preprocessed without normalisation: (F, 1, S, S) float16 grey in [0, 1]."""
    from xrcam.io.readers import open_video
    from xrcam.preprocess import Preprocessor

    crop, frame_shape, fov = geometry
    pre = Preprocessor(crop, frame_shape, pre_config, fov, path)
    with open_video(path) as reader:
        kept = list(pre.frame_indices(reader.num_frames))
        if config.max_frames_per_video is not None and len(kept) > config.max_frames_per_video:
            pick = np.linspace(0, len(kept) - 1, config.max_frames_per_video).round().astype(int)
            kept = [kept[i] for i in sorted(set(pick.tolist()))]
        wanted = set(kept)
        raw = [frame for index, frame in reader.read(step=config.frame_step) if index in wanted]
    if not raw:
        raise XrcamInputError(path, "no frames to train on")
    chunks = [pre(np.stack(raw[i : i + 64]))[:, :1].to(torch.float16) for i in range(0, len(raw), 64)]
    return torch.cat(chunks)


# ------------------------------------------------------------------------------------- augmentation


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    rotation_degrees: float = 180.0,
    contrast: float = 0.2,
) -> torch.Tensor:
    """Random horizontal/vertical flips, rotation and contrast of grey [0, 1] frames, per sample, batched.

    Rotation samples bilinearly with reflection padding, so no black corners appear inside the square
    crop. Contrast blends each frame with its mean grey by a factor from [1 - c, 1 + c] and clips to
    [0, 1] (as torchvision's ``adjust_contrast``). Random numbers come from ``generator`` (on the
    CPU), so a run is reproducible on any device.
    """
    batch = images.shape[0]

    def draw() -> torch.Tensor:
        return torch.rand(batch, generator=generator).to(images.device)

    flip_h, flip_v = draw() < 0.5, draw() < 0.5
    out = torch.where(flip_h[:, None, None, None], images.flip(-1), images)
    out = torch.where(flip_v[:, None, None, None], out.flip(-2), out)
    if rotation_degrees > 0:
        angle = (draw() * 2 - 1) * math.radians(rotation_degrees)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if contrast > 0:
        factor = (1 + (draw() * 2 - 1) * contrast).to(out.dtype)[:, None, None, None]
        mean = out.mean(dim=(-3, -2, -1), keepdim=True)
        out = (mean + factor * (out - mean)).clamp(0.0, 1.0)
    return out


# ---------------------------------------------------------------------------------------- training


class _Ranks:
    """This process's place in a ``torch.distributed`` group (or a group of one)."""

    def __init__(self) -> None:
        dist = torch.distributed
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def fit(
    data: TrainData,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train until ``config.epochs`` or early stopping, then evaluate the best checkpoint on the test split.

    Resumes from ``out_dir/last.pt`` when it exists (same model, seed and data settings required).
    ``on_epoch`` receives each epoch's metrics row (Ray Train reports it). Under ``torch.distributed``
    every rank calls this; rank 0 writes the files and ``out_dir`` must be shared by all ranks.
    """
    from xrcam.models import load_model, save_checkpoint

    out = Path(out_dir)
    ranks = _Ranks()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
    ranks.barrier()

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = load_model(
        config.model,
        num_classes=len(data.classes),
        checkpoint=config.init_weights,
        dropout=config.dropout,
        ignore_classifier=True,
        device=device,
    )
    optimizer = torch.optim.Adamax(model.parameters(), lr=config.lr)
    state = _resume(out, config, data, model, optimizer)
    if ranks.main:
        _write_split(out / SPLIT_FILE, data.split_rows)
        _truncate_metrics(out / METRICS_FILE, state["epoch"])
    train_model: nn.Module = model
    if ranks.active:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    per_rank_batch = max(1, math.ceil(config.batch_size / ranks.size))

    while state["epoch"] < config.epochs and state["bad_epochs"] < config.patience:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        train_loss, train_acc = _train_epoch(
            train_model,
            optimizer,
            data.frames["train"],
            config,
            epoch,
            per_rank_batch,
            ranks,
            device,
            progress,
        )
        _recalibrate_batchnorm(model, data.frames["train"], config, epoch, per_rank_batch, device)
        val_loss, val_acc, _ = _evaluate(model, data.frames["val"], per_rank_batch, ranks, device)
        improved = val_acc > state["best_val_accuracy"] or (
            val_acc == state["best_val_accuracy"] and val_loss < state["best_val_loss"]
        )
        if improved:
            state.update(best_epoch=epoch, best_val_accuracy=val_acc, best_val_loss=val_loss, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "best": improved,
            "seconds": round(time.monotonic() - started, 3),
        }
        if ranks.main:
            if improved:
                save_checkpoint(model, out / MODEL_FILE, _sidecar(data, config, state, test=None))
            _append_metrics(out / METRICS_FILE, row)
            _save_last(out / LAST_FILE, model, optimizer, config, state, data.classes)
            log.info("epoch %d: %s", epoch, row)
            if progress:
                from tqdm.auto import tqdm

                tqdm.write(
                    f"epoch {epoch}: train loss {train_loss:.4f} acc {train_acc:.3f} | "
                    f"val loss {val_loss:.4f} acc {val_acc:.3f}{' (best)' if improved else ''}"
                )
        ranks.barrier()
        if on_epoch is not None:
            on_epoch(row)

    if state["best_epoch"] == 0:
        raise XrcamConfigError(f"{out}: no epoch was trained (epochs={config.epochs}); raise --epochs")
    best = load_model(
        config.model,
        num_classes=len(data.classes),
        checkpoint=out / MODEL_FILE,
        dropout=config.dropout,
        device=device,
    )
    test_loss, test_acc, test_n = _evaluate(best, data.frames["test"], per_rank_batch, ranks, device)
    test = {"accuracy": test_acc, "loss": test_loss, "frames": test_n}
    if ranks.main:
        save_checkpoint(best, out / MODEL_FILE, _sidecar(data, config, state, test=test))
    ranks.barrier()
    return read_result(out)


def read_result(out_dir: str | Path) -> TrainResult:
    """The summary of the run in ``out_dir``, from ``model.pt``'s sidecar (any process can read it)."""
    from xrcam.models import read_checkpoint_sidecar

    checkpoint = Path(out_dir) / MODEL_FILE
    sidecar = read_checkpoint_sidecar(checkpoint)
    if sidecar is None or "metrics" not in sidecar:
        raise XrcamConfigError(f"{checkpoint}: no training sidecar beside it; train into this folder first")
    metrics = sidecar["metrics"]
    return TrainResult(
        out_dir=Path(out_dir),
        checkpoint=checkpoint,
        **{f.name: metrics[f.name] for f in dataclasses.fields(TrainResult) if f.name in metrics},
    )


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    frames: FrameSet,
    config: TrainConfig,
    epoch: int,
    batch_size: int,
    ranks: _Ranks,
    device: torch.device,
    progress: bool,
) -> tuple[float, float]:
    """One pass over this rank's share of the training frames; returns (mean loss, accuracy) over all ranks.

    Order, augmentation and dropout are seeded from (seed, epoch, rank), so a resumed run repeats
    exactly what an uninterrupted one would have done.
    """
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(len(frames), generator=generator)
    # every rank runs the same number of steps (DDP needs it): pad by wrapping, then deal out
    per_rank = math.ceil(len(order) / ranks.size)
    order = order.repeat(math.ceil(per_rank * ranks.size / len(order)))[: per_rank * ranks.size]
    mine = order[ranks.rank :: ranks.size]
    aug_generator = torch.Generator().manual_seed((config.seed * 100_003 + epoch) * 1_000 + ranks.rank)

    def augmentation(grey: torch.Tensor) -> torch.Tensor:
        return augment(
            grey, aug_generator, rotation_degrees=config.rotation_degrees, contrast=config.contrast
        )

    torch.manual_seed((config.seed * 100_003 + epoch) * 1_000 + ranks.rank + 500)  # dropout

    model.train()
    loss_sum = correct = seen = 0.0
    batches = range(0, len(mine), batch_size)
    bar = None
    if progress and ranks.main:
        from tqdm.auto import tqdm

        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False)
        batches = bar
    for start in batches:
        index = mine[start : start + batch_size]
        images = frames.inputs(index, device, augmentation)
        labels = frames.labels[index].to(device)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * len(index)
        correct += (logits.argmax(1) == labels).sum().item()
        seen += len(index)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    if bar is not None:
        bar.close()
    loss_sum, correct, seen = ranks.sum([loss_sum, correct, seen], device)
    return loss_sum / seen, correct / seen


@torch.no_grad()
def _recalibrate_batchnorm(
    model: nn.Module, frames: FrameSet, config: TrainConfig, epoch: int, batch_size: int, device: torch.device
) -> None:
    """Recompute batch-norm running statistics as plain averages over (up to) ``BN_FRAMES`` training frames.

    Why: from random weights and with few steps per epoch, the exponential running averages lag far
    behind the weights, so eval-mode accuracy swings while train accuracy is already high, and early
    stopping would judge noise. One forward pass over unaugmented training frames with the current
    weights ("precise BN") fixes the statistics the checkpoint is used with. All ranks use the same
    frames, so their statistics agree. Dropout stays off during the pass, as it is at evaluation.
    """
    norms = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches of this pass
        m.train()
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch + 7)
    index = (
        torch.randperm(len(frames), generator=generator)[:BN_FRAMES].sort().values
    )  # all, in order, if few
    for start in range(0, len(index), batch_size):
        model(frames.inputs(index[start : start + batch_size], device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def _evaluate(
    model: nn.Module, frames: FrameSet, batch_size: int, ranks: _Ranks, device: torch.device
) -> tuple[float, float, int]:
    """(mean loss, accuracy, frames) over the whole split, each rank scoring its share (eval mode)."""
    was_training = model.training
    model.eval()
    loss_sum = correct = 0.0
    mine = torch.arange(ranks.rank, len(frames), ranks.size)
    for start in range(0, len(mine), batch_size):
        index = mine[start : start + batch_size]
        labels = frames.labels[index].to(device)
        logits = model(frames.inputs(index, device))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
    model.train(was_training)
    loss_sum, correct, count = ranks.sum([loss_sum, correct, len(mine)], device)
    return loss_sum / count, correct / count, int(count)


# ------------------------------------------------------------------------------------------- files


def _sidecar(
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


def _fresh_state() -> dict[str, Any]:
    return {
        "epoch": 0,
        "best_epoch": 0,
        "best_val_accuracy": -1.0,
        "best_val_loss": math.inf,
        "bad_epochs": 0,
    }


def _resume(
    out: Path, config: TrainConfig, data: TrainData, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load ``last.pt`` into model and optimizer if present; return the loop state to continue from."""
    path = out / LAST_FILE
    if not path.exists():
        return _fresh_state()
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
    return {k: saved["state"][k] for k in _fresh_state()}


def _save_last(
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


def _write_split(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video_id", "patient", "label", "split", "frames"])
        writer.writeheader()
        writer.writerows(rows)


def _read_split(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        return {row["video_id"]: row["split"] for row in csv.DictReader(handle)}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows past the resumed epoch (written after the last saved state), keep the rest."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["epoch"]) <= epochs_done]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _append_metrics(path: Path, row: dict[str, Any]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
