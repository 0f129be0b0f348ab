"""Fine-tuning a backbone on an archive, as in the paper (§4.1): AdaMax, early stopping, four augmentations.

One concept per module:

* :mod:`~xrcam.training.config`: :class:`TrainConfig`, the settings and their defaults (the CLI reads them);
* :mod:`~xrcam.training.data`: archive -> patient split -> grey float16 frame tensors, read once
  (:func:`prepare_data`, :class:`TrainData`, :class:`FrameSet`);
* :mod:`~xrcam.training.augmentation`: flips, rotation and contrast, batched torch (:func:`augment`);
* :mod:`~xrcam.training.loop`: :func:`fit`, one process or data-parallel ranks (DDP when
  ``torch.distributed`` is initialised, as Ray Train does in ``workflows/train_ray.py``), batch-norm
  recalibration after every epoch, early stopping; this package never imports Ray;
* :mod:`~xrcam.training.outputs`: the run folder: ``model.pt`` and its JSON sidecar, ``last.pt``
  (resume), ``split.csv``, ``metrics.csv``; :func:`read_result`.

Example::

    from xrcam.training import TrainConfig, prepare_data, fit
    data = prepare_data("archive/", TrainConfig(model="resnet18", image_size=96))
    result = fit(data, "ckpt/", TrainConfig(model="resnet18", image_size=96, epochs=5))
    print(result.test_accuracy)
"""

from __future__ import annotations

import importlib
from typing import Any

# public names, imported on first use: ``xrcam.training.config`` (the CLI reads its defaults) must not pull
# in torch, so ``xrcam train --help`` stays instant
_LAZY = {
    "SPLITS": "xrcam.archive",
    "augment": "xrcam.training.augmentation",
    "TrainConfig": "xrcam.training.config",
    "FrameSet": "xrcam.training.data",
    "TrainData": "xrcam.training.data",
    "prepare_data": "xrcam.training.data",
    "BN_FRAMES": "xrcam.training.loop",
    "fit": "xrcam.training.loop",
    "LAST_FILE": "xrcam.training.outputs",
    "METRIC_COLUMNS": "xrcam.training.outputs",
    "METRICS_FILE": "xrcam.training.outputs",
    "MODEL_FILE": "xrcam.training.outputs",
    "SPLIT_FILE": "xrcam.training.outputs",
    "TrainResult": "xrcam.training.outputs",
    "read_result": "xrcam.training.outputs",
}

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
    "BN_FRAMES",
    "LAST_FILE",
    "METRICS_FILE",
    "METRIC_COLUMNS",
    "MODEL_FILE",
    "SPLIT_FILE",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xrcam.training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
