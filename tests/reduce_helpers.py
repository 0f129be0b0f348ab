"""Results folders for the reduction and report tests, written directly with the store module.

Maps are synthetic (a blob where the ground truth is, plus method-dependent noise), so the tests need
no explanations; with ``archive`` the store points at a real synthetic archive, so frames can be reread.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from workflows.store import ResultStore, VideoLayout

CLASSES = ["glioblastoma", "meningioma"]
METHODS = ("gradcam", "relevancecam", "xrelevancecam")
LAYERS = ("layer1", "layer2", "layer3", "layer4")


def stage_shapes(size: int) -> dict[str, tuple[int, int]]:
    return {layer: (-(-size // s),) * 2 for layer, s in zip(LAYERS, (4, 8, 16, 32), strict=True)}


def blob(shape, centres, sigma) -> np.ndarray:
    """Gaussian blobs (B, h, w) at relative centres (B, 2) with relative width ``sigma``."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    cy = np.asarray(centres)[:, 0, None, None] * shape[0]
    cx = np.asarray(centres)[:, 1, None, None] * shape[1]
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (sigma * shape[0]) ** 2))


def _settings(root: Path, archive: Path | None, chunk: int) -> dict:
    return {
        "archive": str(archive or root / "archive"),
        "model": "resnet18",
        "classes": CLASSES,
        "methods": list(METHODS),
        "layers": list(LAYERS),
        "rules": "reference",
        "clrp": "unit",
        "preprocessing": {"frame_step": 2, "crop": None},
        "chunk_frames": chunk,
    }


def _write_video(store, rng, layout: VideoLayout, gt: np.ndarray, has_gt: np.ndarray, centres: np.ndarray):
    """Create and write one video as a single work shard (the random draws are those of store format 1)."""
    frames = gt.shape[0]
    layout = replace(layout, shard_frames=-(-frames // store.chunk_frames) * store.chunk_frames)
    store.create_video(layout)
    logits = rng.normal(size=(frames, 2)).astype(np.float32)
    logits[:, layout.label_index] += 1.0  # mostly right, sometimes wrong
    maps = {
        layer: np.empty((len(METHODS), frames, *shape), np.float16)
        for layer, shape in layout.map_shapes.items()
    }
    for m, _method in enumerate(METHODS):
        for layer, shape in layout.map_shapes.items():
            noise = rng.normal(scale=0.1 * (m + 1), size=(frames, *shape))
            maps[layer][m] = (blob(shape, centres, 0.15) + noise).astype(np.float16)
    store.write_shard(
        layout.key, 0, logits=logits, gt_mask=gt.astype(np.uint8), has_gt_mask=has_gt, maps=maps
    )
    store.mark_done(layout.key, 0, frames)


def build_store(root: Path, videos: int = 3, frames: int = 10, chunk: int = 4, size: int = 32, seed: int = 0):
    """A results folder of ``videos`` synthetic videos (no archive behind it)."""
    rng = np.random.default_rng(seed)
    store = ResultStore.open(root, _settings(root, None, chunk))
    for v in range(videos):
        label_index = v % 2
        layout = VideoLayout(
            video_id=f"{CLASSES[label_index]}/p{v}/video{v}.mkt",
            path=str(root / "archive" / f"video{v}.mkt"),
            patient=f"p{v}",
            label=CLASSES[label_index],
            label_index=label_index,
            crop=(3, 4, size),
            frame_step=2,
            num_source_frames=2 * frames,
            num_classes=2,
            map_shapes=stage_shapes(size),
        )
        centres = rng.uniform(0.3, 0.7, size=(frames, 2))
        gt = blob((size, size), centres, 0.12) > 0.5
        has_gt = np.arange(frames) % 3 != 2
        gt[~has_gt] = False
        if label_index == 1:
            gt[0] = False  # an annotated frame whose ground truth is empty: reported, not averaged
        _write_video(store, rng, layout, gt, has_gt, centres)
    return store


def build_store_over_archive(root: Path, archive: Path, chunk: int = 4, seed: int = 0):
    """A results folder for a real (synthetic) archive: real crops and ground truth, synthetic maps."""
    from xrcam.archive import discover_archive, load_masks
    from xrcam.io import open_video
    from xrcam.preprocess import Preprocessor

    rng = np.random.default_rng(seed)
    store = ResultStore.open(root, _settings(root, archive, chunk))
    for entry in discover_archive(archive).entries:
        with open_video(entry.path) as reader:
            pre = Preprocessor.for_video(reader)
            num_source = reader.num_frames
        size = pre.crop.size
        kept = list(range(0, num_source, 2))
        masks = load_masks(entry)
        has_gt = np.array([i in masks for i in kept])
        gt = np.stack([pre.crop_mask(masks[i]) if i in masks else np.zeros((size, size), bool) for i in kept])
        centres = []
        for m in gt:  # blob at the ground truth's centroid where there is one
            ys, xs = np.nonzero(m)
            centres.append((ys.mean() / size, xs.mean() / size) if len(ys) else rng.uniform(0.3, 0.7, 2))
        layout = VideoLayout(
            video_id=entry.video_id,
            path=str(entry.path),
            patient=entry.patient,
            label=entry.label,
            label_index=CLASSES.index(entry.label),
            crop=tuple(pre.crop),
            frame_step=2,
            num_source_frames=num_source,
            num_classes=2,
            map_shapes=stage_shapes(size),
        )
        _write_video(store, rng, layout, gt, has_gt, np.array(centres))
    return store
