"""Training settings: the one place their defaults are written (``xrcam train`` reads them from here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; the defaults are the paper's (§4.1)."""

    model: str = "skresnext50_32x4d"
    classes: tuple[str, ...] | None = None  # class names in logit order; default: the sorted archive labels
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
