"""Data-parallel training on Ray Train: the same loop as single-process training, on N workers.

The driver reads and preprocesses the archive once and puts the tensors in Ray's object store; each
Ray Train worker (``TorchTrainer``, one process per GPU or CPU slot, on any node) gets them from there
and runs :func:`xrcam.training.fit`, which notices the ``torch.distributed`` group that Ray Train set up
and trains under DDP. Rank 0 writes the checkpoint folder, so with several nodes ``out_dir`` must be on
a file system every node sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch

from xrcam.errors import XrcamError
from xrcam.training import TrainConfig, TrainData, TrainResult, fit, read_result

__all__ = ["train_distributed"]


def train_distributed(
    data: TrainData,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    workers: int,
    use_gpu: bool | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on ``workers`` Ray Train workers (Ray started or joined first: ``workflows.ray_session``).

    Returns the run's summary.

    ``use_gpu=None`` uses GPUs when the cluster has one per worker. ``config.batch_size`` stays the
    global batch: each worker takes ``batch_size / workers`` samples per step.
    """
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    out = Path(out_dir).resolve()
    trainer = ray.train.torch.TorchTrainer(
        _worker_loop,
        train_loop_config={
            "data": ray.put(data),
            "out_dir": str(out),
            "config": config,
            "progress": progress,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name="train", storage_path=str(out / "ray")),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:  # surface our own errors (e.g. a refused resume) as they are
        for failure in (getattr(exc, "worker_failures", None) or {}).values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, XrcamError):
                raise cause from exc
        raise
    return read_result(out)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: fetch the shared tensors, train, report each epoch's metrics."""
    data = loop_config["data"]
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    fit(
        data,
        loop_config["out_dir"],
        loop_config["config"],
        device=ray.train.torch.get_device(),
        progress=loop_config["progress"],
        on_epoch=lambda row: ray.train.report({k: float(v) for k, v in row.items()}),
    )
