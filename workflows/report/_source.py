"""TEMPORARY read adapter with the shape of ``workflows.results`` (TEAM interface 8).

The report reads results only through the methods below, which mirror the public read API that
``workflows/results.py`` will provide (``settings``, ``classes``, ``video_keys``, ``video(key)``,
``metrics(**filters)``, ``table(name)``, ``frames(key, positions)``, ``maps(...)``, ``masks(...)``).
When that module lands this file is deleted and :func:`open_results` becomes ``workflows.results.open``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xrcam.errors import XrcamConfigError, XrcamError

_TABLE_FILES = {
    "table1": "table1_layer_miou",
    "table2": "table2_layerset_miou",
    "table3": "table3_dropout_miou",
    "table4": "table4_axioms",
    "accuracy_per_class": "accuracy_per_class",
    "accuracy_per_patient": "accuracy_per_patient",
}


def _scoring():
    try:
        from xrcam import scoring
    except ImportError:  # before H1's xrcam.scoring is committed
        from xrcam import postprocess as scoring
    return scoring


class _Results:
    def __init__(self, root: Path):
        import zarr

        from workflows.reduce import REDUCE_NAME, SUMMARY_DIR

        self.root = root
        if not (root / REDUCE_NAME).is_file() or not (root / SUMMARY_DIR).is_dir():
            raise XrcamConfigError(f"{root}: not reduced yet; run `xrcam reduce {root}` first")
        self._group = zarr.open_group(str(root / "maps.zarr"), mode="r")
        self.settings: dict[str, Any] = dict(self._group.attrs["settings"])
        self.reduced: dict[str, Any] = json.loads((root / REDUCE_NAME).read_text())
        self.classes: list[str] = list(self.settings.get("classes") or [])
        self.methods: list[str] = list(self.settings.get("methods") or [])
        self.layers: list[str] = list(self.settings.get("layers") or [])
        self.reduce_settings = self.reduced
        self.video_keys: list[str] = sorted(self._group["videos"].group_keys())
        self._summary = root / SUMMARY_DIR
        self._readers: dict[str, Any] = {}

    # ---- per video
    def video(self, key: str):
        import xarray as xr

        if key not in self.video_keys:
            raise XrcamConfigError(
                f"{self.root}: no video {key!r}; choose one of {', '.join(self.video_keys[:5])} ..."
            )
        return xr.open_zarr(str(self.root / "maps.zarr"), group=f"videos/{key}", consolidated=False)

    def gt_masks(self, key: str, positions: Sequence[int]) -> np.ndarray:
        group = self._group["videos"][key]
        gt = np.asarray(group["gt_mask"].get_orthogonal_selection(list(positions))) > 0
        has = np.asarray(group["has_gt_mask"].get_orthogonal_selection(list(positions))).astype(bool)
        return gt & has[:, None, None]

    def metrics(self, **filters):
        from workflows.reduce import read_metrics

        spec = [(k, "in" if isinstance(v, list | tuple) else "==", v) for k, v in filters.items()]
        return read_metrics(self.root, filters=spec or None)

    def table(self, name: str):
        import pandas as pd

        path = self._summary / f"{_TABLE_FILES.get(name, name)}.parquet"
        return pd.read_parquet(path) if path.exists() else None

    def frames(self, key: str, positions: Sequence[int]) -> np.ndarray:
        group = self._group["videos"][key]
        index = np.asarray(group["frame_index"][:])[list(positions)]
        return _FrameSource(group, self.settings).grey([int(i) for i in index])

    def maps(self, key: str, positions: Sequence[int], layer_set: str, methods=None) -> dict[str, np.ndarray]:
        import torch

        from workflows.reduce import agg_name

        sc = _scoring()
        group = self._group["videos"][key]
        size = int(group["gt_mask"].shape[1])
        index = list(positions)
        layers = list(sc.parse_layer_set(layer_set))
        out = {}
        for method in methods or self.settings["methods"]:
            name = agg_name(method, layer_set)
            if "+" in layer_set and name in group:
                out[method] = np.asarray(group[name].get_orthogonal_selection(index), dtype=np.float32)
                continue
            norm = {
                layer: sc.normalize(
                    torch.from_numpy(np.asarray(group[f"{method}_{layer}"].get_orthogonal_selection(index))),
                    size,
                    method=method,
                )
                for layer in layers
            }
            out[method] = (norm[layers[0]] if len(layers) == 1 else sc.aggregate(norm, layers)).numpy()
        return out

    def masks(
        self, key: str, positions: Sequence[int], layer_set: str, methods=None
    ) -> dict[str, np.ndarray]:
        from workflows.reduce import mask_name

        group = self._group["videos"][key]
        return {
            m: np.asarray(group[mask_name(m, layer_set)].get_orthogonal_selection(list(positions))) > 0
            for m in methods or self.settings["methods"]
        }


def open_results(path: str | Path):
    """``workflows.results.open`` where it exists; else this adapter (until that module is committed)."""
    try:
        from workflows import results
    except ImportError:
        results = None
    if results is not None:
        return results.open(path)
    path = Path(path)
    if not (path / "maps.zarr").is_dir():
        raise XrcamConfigError(f"{path}: no maps.zarr here; is this the --out folder of `xrcam run`?")
    return _Results(path)


class _FrameSource:
    """Rereads frames of one video from the archive and crops/scales them as ``xrcam run`` did."""

    def __init__(self, group, settings: dict[str, Any]):
        self.size = int(group["gt_mask"].shape[1])
        self.reader = self.pre = None
        path = Path(str(group.attrs.get("path", "")))
        if not path.exists():
            path = Path(str(settings.get("archive", ""))) / str(group.attrs.get("video_id", ""))
        try:
            from xrcam.io import open_video
            from xrcam.preprocess import Crop, PreprocessConfig, Preprocessor

            known = {"percentiles", "mean", "std"}
            options = {
                k: tuple(v) for k, v in (settings.get("preprocessing") or {}).items() if k in known and v
            }
            crop = Crop(*(int(v) for v in group.attrs["crop"]))
            config = PreprocessConfig(
                crop=crop, size=None if self.size == crop.size else self.size, **options
            )
            self.reader = open_video(path)
            self.pre = Preprocessor(crop, self.reader.frame_shape, config, path=path)
        except (XrcamError, OSError, ValueError, TypeError, KeyError) as exc:
            raise XrcamConfigError(f"cannot reread the frames of {path}: {exc}") from exc

    def grey(self, frames: Sequence[int]) -> np.ndarray:
        raw = {}
        try:
            for index in sorted(set(frames)):
                for i, frame in self.reader.read(start=index, stop=index + 1, step=1):
                    raw[i] = frame
        finally:
            self.reader.close()
        x = self.pre(np.stack([raw[i] for i in frames]))[:, 0]
        mean, std = self.pre.config.mean[0], self.pre.config.std[0]
        return (x * std + mean).clamp(0, 1).numpy().astype(np.float32)
