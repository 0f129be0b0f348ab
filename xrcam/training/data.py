"""Data preparation: archive -> patient split -> preprocessed grey float16 frame tensors, read once.

Frames are read and preprocessed **once** into an in-memory grey float16 tensor set (every
``frame_step``-th frame, cropped to the FOV square, resized to one common size): decoding and FOV
detection are then off the training loop, so an epoch is pure tensor work and fast on CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xrcam.archive import SPLITS
from xrcam.errors import XrcamConfigError, XrcamInputError
from xrcam.training.config import TrainConfig

__all__ = ["FrameSet", "TrainData", "prepare_data"]

log = logging.getLogger(__name__)


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
    classes = _class_order(config, archive.classes)
    if len(classes) < 2:
        raise XrcamConfigError(f"training needs at least two classes, the archive has {classes}")
    assignment = split_patients(entries, fractions=tuple(config.fractions), seed=config.seed)

    from xrcam.models import load_model, model_normalisation
    from xrcam.preprocess import PreprocessConfig

    mean, std = model_normalisation(load_model(config.model, num_classes=len(classes)))
    # frames are stored grey in [0, 1] (identity normalisation); the model's mean/std apply per batch
    pre_config = PreprocessConfig(frame_step=config.frame_step, mean=(0.0,) * 3, std=(1.0,) * 3)
    geometry = {}  # video_id -> its detected crop and frame count
    for entry in entries:
        try:
            geometry[entry.video_id] = _detect_geometry(entry.path, pre_config)
        except XrcamInputError as exc:
            problems.append(str(exc))
            log.warning("skipping video: %s", exc)
    if not geometry:
        raise XrcamInputError(getattr(archive, "root", "archive"), "no video with a usable field of view")
    # one tensor set needs one size: the median crop side unless --image-size says otherwise
    size = config.image_size or int(np.median([crop.size for crop, _ in geometry.values()]))
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
            images = _load_video(entry, config, pre_config, geometry[entry.video_id])
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


def _class_order(config: TrainConfig, labels: list[str]) -> list[str]:
    """The logit order: ``config.classes`` when given (every archive label must be one), else sorted labels."""
    if not config.classes:
        return list(labels)
    classes = [str(c) for c in config.classes]
    if len(set(classes)) != len(classes):
        raise XrcamConfigError(f"classes {classes} name a class twice")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise XrcamConfigError(
            f"the archive has label(s) {', '.join(unknown)} that are not among the classes {', '.join(classes)}; "
            "add them to --classes"
        )
    return classes


def _detect_geometry(path: Path, pre_config: Any) -> tuple[Any, int]:
    """(crop, number of frames) of one video, the crop detected on its first frame as ``xrcam run`` does."""
    from xrcam.frames import open_preprocessor
    from xrcam.io.readers import open_video

    with open_video(path) as reader:
        return open_preprocessor(reader, pre_config).crop, reader.num_frames


def _load_video(entry: Any, config: TrainConfig, pre_config: Any, geometry: tuple[Any, int]) -> torch.Tensor:
    """Kept frames of one video, preprocessed without normalisation: (F, 1, S, S) float16 grey in [0, 1].

    Read by :func:`xrcam.frames.read_batches`, the reader ``xrcam run`` explains with, so training sees
    exactly the crops a run would.
    """
    from xrcam.frames import read_batches

    crop, num_frames = geometry
    positions = None  # every kept frame
    kept = -(-num_frames // config.frame_step)
    if config.max_frames_per_video is not None and kept > config.max_frames_per_video:
        pick = np.linspace(0, kept - 1, config.max_frames_per_video).round().astype(int)
        positions = sorted(set(pick.tolist()))
    batches = read_batches(entry, pre_config, positions=positions, batch_size=64, crop=crop, masks=False)
    chunks = [batch.x[:, :1].to(torch.float16) for batch in batches]
    if not chunks:
        raise XrcamInputError(entry.path, "no frames to train on")
    return torch.cat(chunks)
