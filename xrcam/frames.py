"""The one frame reader: exactly the preprocessed crops a run explained, from its recorded settings.

``xrcam run``'s workers, ``xrcam evaluate``, the report and :mod:`workflows.results` read frames
through :func:`read_batches`, so a map and the frame it is drawn on are aligned pixel for pixel and
scaled the same way (the FOV is detected on frame 0 as the run did, and 16-bit frames are scaled by
the percentile window inside that FOV, never over the crop square).

Frames are addressed by *position*: the row in the video's stored arrays, i.e. kept frame number
after ``frame_step`` (original frame index = ``position * frame_step``).

Example::

    config = PreprocessConfig(frame_step=2)
    for batch in read_batches(entry, config, positions=[0, 5, 9]):
        batch.x        # (B, 3, S, S) float32, model-normalised: what the explainer saw
        batch.grey     # (B, S, S) float32 in [0, 1]: the same crop before mean/std
        batch.gt       # (B, S, S) bool ground truth (all False where has_gt is False)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrcam.errors import XrcamInputError

__all__ = ["FrameBatch", "open_preprocessor", "read_batches"]


@dataclass
class FrameBatch:
    """One batch of preprocessed frames of one video."""

    positions: list[int]  # rows in the video's stored arrays
    indices: list[int]  # original frame indices in the source video
    x: torch.Tensor  # (B, 3, S, S) model input
    gt: np.ndarray  # (B, S, S) bool
    has_gt: np.ndarray  # (B,) bool
    mean: float  # the grey channel's normalisation, to undo it
    std: float

    @property
    def grey(self) -> torch.Tensor:
        """``(B, S, S)`` float32 in [0, 1]: the grey crop before the model's mean/std normalisation."""
        return (self.x[:, 0] * self.std + self.mean).clamp_(0.0, 1.0)


def open_preprocessor(reader, config, crop: Sequence[int] | None = None):
    """The video's :class:`~xrcam.preprocess.Preprocessor`, FOV detected on frame 0 as the run did.

    With ``crop`` (the ``x, y, size`` a store recorded) the detected crop must equal it, otherwise
    :class:`XrcamInputError` says the video changed since the run.
    """
    from xrcam.preprocess import Preprocessor

    pre = Preprocessor.for_video(reader, config)
    if crop is not None and tuple(int(v) for v in pre.crop) != tuple(int(v) for v in crop):
        raise XrcamInputError(
            reader.path,
            f"crop is now {tuple(pre.crop)} but the store was created with {tuple(crop)}: "
            "the video changed since; rerun with --overwrite",
        )
    return pre


def read_batches(
    video: Any,
    config,
    *,
    positions: Sequence[int] | None = None,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 32,
    crop: Sequence[int] | None = None,
    masks: bool = True,
) -> Iterator[FrameBatch]:
    """Batches of preprocessed frames of ``video`` (a :class:`~xrcam.archive.VideoEntry` or a path).

    Either ``positions`` (any kept positions, read in increasing order, each once) or the range
    ``start:stop`` of positions (``stop=None``: to the end). ``config``: the run's
    :class:`~xrcam.preprocess.PreprocessConfig`; ``crop``: the crop the store recorded (checked).
    Ground truth comes from the entry's mask folder when ``masks`` and the entry has one.
    A video that ends before the wanted positions raises :class:`XrcamInputError` naming the frame.
    """
    from xrcam.archive import load_masks
    from xrcam.io.readers import open_video

    path = Path(getattr(video, "path", video))
    step = int(config.frame_step)
    gt_masks = load_masks(video) if masks and getattr(video, "mask_path", None) else {}
    with open_video(path) as reader:
        pre = open_preprocessor(reader, config, crop)
        if positions is not None:
            wanted = sorted({int(p) for p in positions})
            if not wanted:
                return
            first, last = wanted[0], wanted[-1] + 1
        else:
            first = start
            last = stop if stop is not None else -(-reader.num_frames // step)
            wanted = None
        keep = set(wanted) if wanted is not None else None
        mean, std = float(config.mean[0]), float(config.std[0])
        pending: list[tuple[int, int, np.ndarray]] = []
        position = first

        def flush() -> FrameBatch:
            size = pre.output_size
            gt = np.zeros((len(pending), size, size), bool)
            has_gt = np.zeros(len(pending), bool)
            for row, (_, index, _) in enumerate(pending):
                if index in gt_masks:
                    gt[row] = pre.crop_mask(gt_masks[index], frame=index)
                    has_gt[row] = True
            x = pre(np.stack([f for _, _, f in pending]))
            return FrameBatch(
                [p for p, _, _ in pending], [i for _, i, _ in pending], x, gt, has_gt, mean, std
            )

        for index, frame in reader.read(start=first * step, stop=last * step, step=step):
            if index != position * step:
                raise XrcamInputError(path, f"reader returned frame {index}, expected {position * step}")
            if keep is None or position in keep:
                pending.append((position, int(index), frame))
                if len(pending) == batch_size:
                    yield flush()
                    pending = []
            position += 1
        if pending:
            yield flush()
        if position != last:
            raise XrcamInputError(
                path,
                f"video ended after {position * step} frames, its header says more",
                frame=position * step,
            )
