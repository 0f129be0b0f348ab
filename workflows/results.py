"""The public read API of a results folder (``xrcam run`` + ``xrcam reduce``), beside the CLI.

Example::

    from workflows import results
    res = results.open("RESULTS")
    res.video_keys                       # one per video
    ds = res.video(res.video_keys[0])    # xr.Dataset: maps (layer, cam, frame, map_y, map_x), and per layer
                                         # at its own grid: ds["layer4"] (cam, frame, layer4_y, layer4_x)
    df = res.metrics(method="xrelevancecam", layer_set="4+3+2+1")   # per-frame rows
    res.table("table2")                  # mIoU % per method and layer set, with CIs and reference rows
    crops = res.frames(key, [0, 1])      # (2, S, S) float32 in [0, 1]: exactly what the run explained
    maps = res.maps(key, [0, 1], "4+3+2+1")   # {method: (2, S, S)} normalised aggregated maps

Maps, masks and frames are aligned pixel for pixel, so an overlay is
``plt.imshow(crops[0], cmap="gray"); plt.imshow(maps["xrelevancecam"][0], alpha=0.5)``.
Aggregated maps and masks are derived on read by :mod:`xrcam.scoring` (the same code ``xrcam reduce``
scored), so they are never out of step with the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Results", "open"]


def open(results: str | Path) -> Results:  # noqa: A001 - the API reads as results.open(PATH)
    """Open the results folder ``results`` for reading (the store must exist; metrics need a reduce)."""
    return Results(results)


class Results:
    """Read access to one results folder; every method reads lazily, nothing is loaded up front."""

    def __init__(self, root: str | Path):
        from workflows.store import ResultStore

        self.root = Path(root)
        self._store = ResultStore.open(self.root, mode="r")

    def __repr__(self) -> str:
        return f"<xrcam results {self.root}: {len(self.video_keys)} videos, methods {self.methods}>"

    # ----------------------------------------------------------------- settings and names
    @property
    def settings(self) -> dict[str, Any]:
        """The run's recorded settings (model, checkpoint hash, preprocessing, methods, layers, ...)."""
        return self._store.settings

    @property
    def reduce_settings(self) -> dict[str, Any] | None:
        """The settings of the last ``xrcam reduce`` (layer sets, threshold, ...), or None before it."""
        from workflows import tables

        return tables.reduce_settings(self.root)

    @property
    def classes(self) -> list[str]:
        return list(self.settings.get("classes") or [])

    @property
    def methods(self) -> list[str]:
        return self._store.methods

    @property
    def layers(self) -> list[str]:
        return self._store.layers

    @property
    def video_keys(self) -> list[str]:
        """The store's group names of the videos (``store.video_key(video_id)``), sorted."""
        return self._store.video_keys()

    def video_key(self, video_id: str) -> str:
        from workflows.store import video_key

        return video_key(video_id)

    # ----------------------------------------------------------------- xarray
    @cached_property
    def tree(self):
        """``xr.DataTree`` of ``maps.zarr``: one node per video (what ``xr.open_datatree`` gives)."""
        return self._store.open_datatree()

    def video(self, key: str):
        """One video as an ``xr.Dataset`` (lazy, dask-free: arrays load on access), with every coordinate
        ``tree[key]`` has: ``cam``, ``class``, ``layer``, ``frame`` and the grid (``y``, ``x``, ``map_y``,
        ``map_x``), wherever the store keeps it; and each layer's raw maps at its own resolution
        (``layer4``: ``(cam, frame, layer4_y, layer4_x)``), picked out of ``maps`` exactly."""
        return self._store.open_dataset(self._key(key))

    # ----------------------------------------------------------------- tables
    def metrics(self, columns: Sequence[str] | None = None, **filters: Any):
        """Per-frame metric rows as a pandas DataFrame; ``filters`` are ``column=value`` equalities
        (a list/tuple value means "one of"), pushed down to Parquet (``method=`` prunes partitions)."""
        from workflows import tables

        return tables.read_metrics(self.root, columns=columns, **filters)

    def agreement(self, columns: Sequence[str] | None = None, **filters: Any):
        """Per-frame method agreement rows (``mask_iou``, ``rank_corr`` of each method ``against``
        XRelevanceCAM per frame and layer set) as a DataFrame; ``filters`` as in :meth:`metrics`
        (e.g. ``res.agreement(method="gradcam", layer_set="4")``)."""
        from workflows import tables

        return tables.read_agreement(self.root, columns=columns, **filters)

    def table(self, name: str):
        """A summary table by name: ``table1``, ``table2``, ``table3``, ``table4``, ``accuracy_per_class``,
        ``accuracy_per_patient``, ``agreement``, ``miou`` (long form), ... (see :data:`tables.TABLES`)."""
        from workflows import tables

        return tables.read_table(self.root, name)

    @property
    def table_names(self) -> list[str]:
        from workflows import tables

        return tables.table_names(self.root)

    def failures(self):
        from workflows import tables

        return tables.read_failures(self.root)

    # ----------------------------------------------------------------- frames, maps, masks
    def _key(self, key: str) -> str:
        if key in self.video_keys:
            return key
        converted = self.video_key(key)  # a video id works too
        if converted in self.video_keys:
            return converted
        raise KeyError(
            f"{self.root}: no video {key!r}; have {self.video_keys[:5]}{'...' if len(self.video_keys) > 5 else ''}"
        )

    def _positions(self, key: str, positions: Sequence[int] | int | None) -> list[int]:
        n = self._store.num_frames(key)
        if positions is None:
            return list(range(n))
        if isinstance(positions, int | np.integer):
            positions = [int(positions)]
        out = [int(p) for p in positions]
        bad = [p for p in out if not 0 <= p < n]
        if bad:
            raise IndexError(f"video {key!r} has {n} stored frames; positions {bad} are out of range")
        return out

    def frames(self, key: str, positions: Sequence[int] | int | None = None) -> np.ndarray:
        """``(n, S, S)`` float32 in [0, 1]: the preprocessed grey crops the run explained at ``positions``
        (rows of the video's arrays; ``None``: all), re-read from the archive with the recorded settings."""
        from xrcam.frames import read_batches

        key = self._key(key)
        wanted = self._positions(key, positions)
        layout = self._store.layout(key)
        config = self._store.preprocess_config()
        by_position: dict[int, np.ndarray] = {}
        for batch in read_batches(
            layout.path, config, positions=wanted, crop=layout.crop, masks=False, batch_size=64
        ):
            grey = batch.grey.numpy()
            for row, p in enumerate(batch.positions):
                by_position[p] = grey[row]
        return np.stack([by_position[p] for p in wanted]).astype(np.float32)

    def gt_masks(self, key: str, positions: Sequence[int] | int | None = None) -> np.ndarray:
        """``(n, S, S)`` bool ground truth as the run stored it (all False where a frame has none)."""
        key = self._key(key)
        return self._store.read_gt(key, self._positions(key, positions))

    def _scores(self, key, positions, layer_set, methods, threshold):
        import torch

        from xrcam.scoring import score_batch

        key = self._key(key)
        wanted = self._positions(key, positions)
        methods = list(methods) if methods is not None else self.methods
        unknown = [m for m in methods if m not in self.methods]
        if unknown:
            raise KeyError(f"methods {unknown} were not run; have {self.methods}")
        raw = self._store.read_maps(key, wanted, methods=methods)
        size = self._store.layout(key).size
        if threshold is None:
            threshold = (self.reduce_settings or {}).get("threshold", "mean+std")
        raw_t = {m: {layer: torch.from_numpy(a) for layer, a in stages.items()} for m, stages in raw.items()}
        return score_batch(raw_t, size=size, layer_sets=[layer_set], threshold=threshold, keep_maps=True)

    def maps(
        self,
        key: str,
        positions: Sequence[int] | int | None,
        layer_set: str,
        methods: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{method: (n, S, S) float32}``: normalised maps aggregated over ``layer_set`` (e.g. ``"4+3"``),
        derived from the stored per-stage maps by :mod:`xrcam.scoring`, on the crop grid."""
        return self.maps_and_masks(key, positions, layer_set, methods)[0]

    def masks(
        self,
        key: str,
        positions: Sequence[int] | int | None,
        layer_set: str,
        methods: Sequence[str] | None = None,
        threshold: str | None = None,
    ) -> dict[str, np.ndarray]:
        """``{method: (n, S, S) bool}``: the saliency masks scored by ``xrcam reduce`` (its threshold
        unless ``threshold`` is given)."""
        return self.maps_and_masks(key, positions, layer_set, methods, threshold)[1]

    def maps_and_masks(
        self,
        key: str,
        positions: Sequence[int] | int | None,
        layer_set: str,
        methods: Sequence[str] | None = None,
        threshold: str | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(maps, masks)`` as :meth:`maps` and :meth:`masks` give them, from one scoring pass."""
        scores = self._scores(key, positions, layer_set, methods, threshold)
        maps = {m: scores.maps[0, i].numpy() for i, m in enumerate(scores.methods)}
        return maps, {m: scores.masks[0, i].numpy() for i, m in enumerate(scores.methods)}
