"""The training loop: one process or data-parallel ranks, AdaMax, early stopping, precise batch norm.

* Augmentation is batched torch on the preprocessed tensors (:mod:`xrcam.training.augmentation`).
* Batch-norm statistics are recomputed after every epoch (see :func:`_recalibrate_batchnorm`), so
  validation judges the weights rather than lagging running averages.
* One loop serves one process and data-parallel training: when ``torch.distributed`` is initialised
  (Ray Train does that in ``workflows/train_ray.py``), the model is wrapped in DDP, each rank takes its
  share of every batch and the metrics are summed over ranks. This package never imports Ray.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xrcam.errors import XrcamConfigError
from xrcam.training.augmentation import augment
from xrcam.training.config import TrainConfig
from xrcam.training.data import FrameSet, TrainData
from xrcam.training.outputs import (
    LAST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    TrainResult,
    append_metrics,
    read_result,
    resume,
    save_last,
    sidecar,
    truncate_metrics,
    write_split,
)

__all__ = ["BN_FRAMES", "fit"]

log = logging.getLogger(__name__)

BN_FRAMES = 512  # training frames used to recompute batch-norm statistics after each epoch


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
    state = resume(out, config, data, model, optimizer)
    if ranks.main:
        write_split(out / SPLIT_FILE, data.split_rows)
        truncate_metrics(out / METRICS_FILE, state["epoch"])
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
                save_checkpoint(model, out / MODEL_FILE, sidecar(data, config, state, test=None))
            append_metrics(out / METRICS_FILE, row)
            save_last(out / LAST_FILE, model, optimizer, config, state, data.classes)
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
        save_checkpoint(best, out / MODEL_FILE, sidecar(data, config, state, test=test))
    ranks.barrier()
    return read_result(out)


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
