"""Reduction of a results folder: per-layer maps -> aggregated maps, masks, a Parquet metrics dataset, tables.

``xrcam run`` stores each method's raw maps at each stage's own resolution. Reduction derives what the
paper evaluates (SPEC §5-6), one video at a time and one chunk of frames at a time so memory stays
bounded whatever the archive size:

- per layer set (``"4"``, ``"4+3"``, ...): the aggregated map on the crop grid, written back into the
  video's group as ``agg_<method>_<set-id>`` (float16, multi-layer sets only: a single layer's map is
  the stored ``<method>_<layer>`` array, normalised on read) and the mask as ``mask_<method>_<set-id>``
  (uint8 0/1, bit-shuffled so it compresses like a bit-packed array) for every set;
- one Parquet row per (video, frame, method, layer set) in ``RESULTS/metrics/<method>/part-0.parquet``;
- the dataset-wide tables in ``RESULTS/summary/`` shaped like the paper's Tables 1, 2 and 4, plus
  classification accuracy per class and per patient.

Videos run in parallel as Ray tasks (each task is the only writer of its video's group); the driver
streams their rows into one Parquet writer per method. A rerun replaces everything it wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xrcam import __version__
from xrcam.errors import XrcamConfigError

__all__ = [
    "DEFAULT_LAYER_SETS",
    "axiom_table",
    "METRICS_DIR",
    "SUMMARY_DIR",
    "REDUCE_NAME",
    "METRIC_SCHEMA",
    "ReduceSettings",
    "layer_set_id",
    "agg_name",
    "mask_name",
    "parse_threshold",
    "reduce_video",
    "reduce_results",
    "summarise",
    "miou_table",
    "read_metrics",
]

log = logging.getLogger(__name__)

#: Single layers (the paper's Table 1) and the aggregation sets of its Table 2.
DEFAULT_LAYER_SETS = ("1", "2", "3", "4", "4+3", "4+3+2", "4+3+2+1")
METRICS_DIR = "metrics"
SUMMARY_DIR = "summary"
REDUCE_NAME = "reduce.json"
_METADATA_KEY = b"xrcam"

#: One row per (video, frame, method, layer set). Strings are plain ``string`` columns (no dictionary
#: encoding in the schema), so ``pd.read_parquet(path, filters=[("method", "==", ...)])`` just works.
METRIC_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("video_key", pa.string()),
        ("patient", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int64()),
        ("frame", pa.int64()),  # original frame index in the source video
        ("position", pa.int64()),  # row in the video's arrays (frame axis of maps.zarr)
        ("method", pa.string()),
        ("layer_set", pa.string()),  # "4", "4+3", ... (stage numbers, deepest first as given)
        ("num_layers", pa.int64()),
        ("prediction", pa.string()),
        ("predicted_index", pa.int64()),
        ("probability", pa.float32()),  # probability of the predicted class
        ("correct", pa.bool_()),
        ("has_gt_mask", pa.bool_()),
        ("gt_empty", pa.bool_()),  # annotated frame whose ground truth is empty: reported, never averaged
        ("gt_area", pa.int64()),  # pixels on the crop grid
        ("mask_area", pa.int64()),  # pixels of the saliency mask on the crop grid
        ("mask_fraction", pa.float32()),  # mask_area / crop pixels
        ("iou", pa.float32()),  # NaN where the frame has no ground truth (or both masks are empty)
        # axiom metrics of single-layer rows, for the frames `xrcam evaluate --axioms` sampled; NaN elsewhere
        ("conservation", pa.float32()),
        ("sensitivity", pa.float32()),
    ]
)


@dataclass(frozen=True)
class ReduceSettings:
    """What reduction computes; recorded in every output so a table says how it was made."""

    layer_sets: tuple[str, ...] = DEFAULT_LAYER_SETS
    threshold: str = "mean+std"  # "mean+std", "fraction:<f>" or "otsu"
    chunk_frames: int | None = None  # frames per step; default: the store's chunk length

    def __post_init__(self) -> None:
        from xrcam.postprocess import format_layer_set

        sets = tuple(format_layer_set(s) for s in self.layer_sets)  # validates, canonical "4+3" spelling
        if not sets or len(set(sets)) != len(sets):
            raise XrcamConfigError(f"layer sets must be given once each, got {list(self.layer_sets)}")
        object.__setattr__(self, "layer_sets", sets)
        rule, fraction = parse_threshold(self.threshold)
        object.__setattr__(self, "threshold", f"fraction:{fraction:g}" if rule == "fraction" else rule)
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise XrcamConfigError(f"chunk_frames must be a positive integer, got {self.chunk_frames}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_sets"] = list(self.layer_sets)
        return data


def parse_threshold(text: str) -> tuple[str, float]:
    """``"meanstd"``/``"mean+std"``, ``"fraction:0.5"``, ``"otsu"`` -> (rule, fraction) for postprocess."""
    from xrcam.postprocess import THRESHOLD_RULES

    rule, _, value = text.strip().lower().partition(":")
    rule = {"meanstd": "mean+std", "mean_std": "mean+std"}.get(rule, rule)
    if rule not in THRESHOLD_RULES or (value and rule != "fraction"):
        raise XrcamConfigError(
            f"unknown threshold {text!r}: use meanstd, fraction:<0..1> (e.g. fraction:0.5) or otsu"
        )
    try:
        fraction = float(value) if value else 0.5
    except ValueError:
        raise XrcamConfigError(
            f"threshold {text!r}: the fraction must be a number, e.g. fraction:0.5"
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise XrcamConfigError(f"threshold {text!r}: the fraction must be between 0 and 1")
    return rule, fraction


def layer_set_id(layer_set: str) -> str:
    """Array-name form of a layer set: ``"4+3+2+1"`` -> ``"4-3-2-1"`` (Zarr names avoid '+')."""
    from xrcam.postprocess import format_layer_set

    return format_layer_set(layer_set).replace("+", "-")


def agg_name(method: str, layer_set: str) -> str:
    """Array name of a method's aggregated maps, e.g. ``agg_xrelevancecam_4-3-2-1``."""
    return f"agg_{method}_{layer_set_id(layer_set)}"


def mask_name(method: str, layer_set: str) -> str:
    """Array name of a method's saliency masks, e.g. ``mask_xrelevancecam_4-3``."""
    return f"mask_{method}_{layer_set_id(layer_set)}"


# ------------------------------------------------------------------------------------------ one video
def _codec(dtype: str):
    from zarr.codecs import BloscCodec, BloscShuffle

    # 0/1 bytes bit-shuffled compress like bit-packed masks while xarray still sees plain (y, x) images
    shuffle = BloscShuffle.bitshuffle if dtype == "uint8" else BloscShuffle.shuffle
    return BloscCodec(cname="zstd", clevel=1 if dtype == "float16" else 3, shuffle=shuffle)


def _create_outputs(
    group, methods: Sequence[str], settings: ReduceSettings, frames: int, size: int, chunk: int
):
    """(Re)create the reduction arrays of one video; returns ``{(kind, method, set): array}``.

    Arrays of an earlier reduction with other layer sets are deleted, so the group holds exactly
    what the recorded settings describe.
    """
    wanted = {mask_name(m, s) for m in methods for s in settings.layer_sets}
    wanted |= {agg_name(m, s) for m in methods for s in settings.layer_sets if "+" in s}
    for name in list(group.array_keys()):
        if name.startswith(("agg_", "mask_")) and name not in wanted:
            del group[name]
    arrays = {}
    rule, fraction = parse_threshold(settings.threshold)
    for method in methods:
        for layer_set in settings.layer_sets:
            attrs = {"method": method, "layer_set": layer_set, "threshold": rule}
            if rule == "fraction":
                attrs["fraction"] = fraction
            names = [("mask", mask_name(method, layer_set), "uint8", 0)]
            if "+" in layer_set:
                names.insert(0, ("agg", agg_name(method, layer_set), "float16", np.nan))
            for kind, name, dtype, fill in names:
                arrays[kind, method, layer_set] = group.create_array(
                    name,
                    shape=(frames, size, size),
                    chunks=(min(chunk, max(frames, 1)), size, size),
                    dtype=dtype,
                    fill_value=fill,
                    compressors=_codec(dtype),
                    dimension_names=("frame", "y", "x"),
                    attributes=attrs
                    if kind == "mask"
                    else {k: v for k, v in attrs.items() if k == "layer_set"},
                    overwrite=True,
                )
    return arrays


def _return_large_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so freed chunk-sized tensors go back to the OS.

    By default glibc raises the threshold each time a large block is freed, after which multi-MB
    temporaries come from the heap and stay there, fragmented: a 100-frame video then grew the process
    by ~0.7 GB. A fixed threshold keeps the resident size at the working set of one chunk.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _layers_needed(store, settings: ReduceSettings) -> list[str]:
    """The explained layers the layer sets use, in store order; an error names any that were not run."""
    from xrcam.postprocess import parse_layer_set

    needed = {layer for s in settings.layer_sets for layer in parse_layer_set(s)}
    missing = sorted(needed - set(store.layers))
    if missing:
        raise XrcamConfigError(
            f"{store.root}: layer sets {list(settings.layer_sets)} need {missing}, but the run explained only "
            f"{store.layers}; drop those sets (--layer-sets) or rerun `xrcam run` with those layers"
        )
    return [layer for layer in store.layers if layer in needed]


def reduce_video(
    results: str | Path,
    key: str,
    settings: ReduceSettings | Mapping[str, Any],
    *,
    torch_threads: int | None = None,
) -> pa.Table:
    """Reduce one video of ``results``: write its aggregated maps and masks, return its metric rows.

    A plain function (no Ray) so tests and a single process can call it; :func:`reduce_results` runs
    it as a Ray task per video. Frames are processed ``chunk_frames`` at a time.
    """
    import torch

    from workflows.store import ResultStore, map_name
    from xrcam.postprocess import aggregate, iou, make_masks, normalize

    if not isinstance(settings, ReduceSettings):
        settings = ReduceSettings(**{**settings, "layer_sets": tuple(settings["layer_sets"])})
    if torch_threads:
        torch.set_num_threads(torch_threads)
    _return_large_buffers_to_the_os()
    store = ResultStore.open(results)
    group = store.video(key)
    if group is None:
        raise XrcamConfigError(f"{store.root}: no video group {key!r} in {store.root / 'maps.zarr'}")
    attrs = group.attrs.asdict()
    methods, classes = store.methods, list(store.settings.get("classes") or [])
    layers = _layers_needed(store, settings)
    rule, fraction = parse_threshold(settings.threshold)
    frames, size = group["gt_mask"].shape[0], group["gt_mask"].shape[1]
    chunk = settings.chunk_frames or store.chunk_frames
    outputs = _create_outputs(group, methods, settings, frames, size, store.chunk_frames)

    parts: dict[tuple[str, str], list[pa.Table]] = {(m, s): [] for m in methods for s in settings.layer_sets}
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        predicted = np.asarray(group["predicted"][start:stop])
        valid = predicted >= 0  # frames a failed shard never wrote are left out of the rows
        has_gt = np.asarray(group["has_gt_mask"][start:stop]).astype(bool)
        gt_np = np.asarray(group["gt_mask"][start:stop])[has_gt] > 0  # IoU is only scored on annotated frames
        gt = torch.from_numpy(gt_np)
        gt_area = np.zeros(stop - start, dtype=np.int64)
        gt_area[has_gt] = np.count_nonzero(gt_np.reshape(len(gt_np), size * size), axis=1)
        base = _frame_columns(group, attrs, classes, start, stop, has_gt, gt_area)
        for method in methods:
            normalised = {
                layer: normalize(
                    torch.from_numpy(np.asarray(group[map_name(method, layer)][start:stop])),
                    size,
                    method=method,
                )
                for layer in layers
            }
            for layer_set in settings.layer_sets:
                combined = aggregate(normalised, layer_set)
                masks = make_masks(combined, rule, fraction=fraction)
                scores = np.full(stop - start, np.nan, dtype=np.float32)
                if has_gt.any():
                    scores[has_gt] = iou(masks[torch.from_numpy(has_gt)], gt).numpy()
                if ("agg", method, layer_set) in outputs:
                    outputs["agg", method, layer_set][start:stop] = combined.numpy().astype(np.float16)
                mask_bytes = masks.numpy().view(np.uint8)  # bool -> 0/1 bytes without a copy
                outputs["mask", method, layer_set][start:stop] = mask_bytes
                area = np.count_nonzero(mask_bytes.reshape(stop - start, size * size), axis=1)
                rows = {
                    **base,
                    "method": [method] * (stop - start),
                    "layer_set": [layer_set] * (stop - start),
                    "num_layers": np.full(stop - start, layer_set.count("+") + 1),
                    "mask_area": area,
                    "mask_fraction": (area / float(size * size)).astype(np.float32),
                    "iou": scores.astype(np.float32),
                    "conservation": np.full(stop - start, np.nan, dtype=np.float32),
                    "sensitivity": np.full(stop - start, np.nan, dtype=np.float32),
                }
                parts[method, layer_set].append(pa.table(rows, schema=METRIC_SCHEMA).filter(pa.array(valid)))
    group.attrs.update({"reduced": {"xrcam_version": __version__, **settings.to_dict()}})
    # rows ordered method, layer set, frame: the same whatever the chunk length
    tables = [t for key in parts for t in parts[key]]
    return pa.concat_tables(tables) if tables else METRIC_SCHEMA.empty_table()


def _frame_columns(group, attrs, classes, start, stop, has_gt, gt_area) -> dict[str, Any]:
    """Columns shared by every method and layer set of a chunk of frames."""
    n = stop - start
    predicted = np.asarray(group["predicted"][start:stop])
    probabilities = np.asarray(group["probabilities"][start:stop])
    safe = np.clip(predicted, 0, probabilities.shape[1] - 1)
    label_index = int(attrs["label_index"])
    return {
        "video_id": [attrs["video_id"]] * n,
        "video_key": [group.basename] * n,
        "patient": [attrs["patient"]] * n,
        "label": [attrs["label"]] * n,
        "label_index": np.full(n, label_index),
        "frame": np.asarray(group["frame_index"][start:stop]),
        "position": np.arange(start, stop),
        "prediction": [classes[i] if 0 <= i < len(classes) else str(i) for i in predicted.tolist()],
        "predicted_index": predicted,
        "probability": probabilities[np.arange(n), safe].astype(np.float32),
        "correct": predicted == label_index,
        "has_gt_mask": has_gt,
        "gt_empty": has_gt & (gt_area == 0),
        "gt_area": gt_area.astype(np.int64),
    }


# ------------------------------------------------------------------------------------ all videos
class _MethodWriters:
    """One streaming Parquet writer per method under ``folder/<method>/part-0.parquet``.

    Rows are buffered up to ``rows_per_group`` per method so row groups are neither tiny nor large.
    """

    def __init__(
        self, folder: Path, methods: Sequence[str], metadata: Mapping[str, Any], rows_per_group: int = 65536
    ):
        self.folder = folder
        self.schema = METRIC_SCHEMA.with_metadata({_METADATA_KEY: json.dumps(metadata, default=str).encode()})
        self.rows_per_group = rows_per_group
        self.buffers: dict[str, list[pa.Table]] = {m: [] for m in methods}
        self.writers: dict[str, pq.ParquetWriter] = {}

    def write(self, table: pa.Table) -> None:
        import pyarrow.compute as pc

        for method in self.buffers:
            part = table.filter(pc.equal(table["method"], method))
            if part.num_rows:
                self.buffers[method].append(part)
                if sum(t.num_rows for t in self.buffers[method]) >= self.rows_per_group:
                    self._flush(method)

    def _flush(self, method: str) -> None:
        if method not in self.writers:
            (self.folder / method).mkdir(parents=True, exist_ok=True)
            self.writers[method] = pq.ParquetWriter(
                self.folder / method / "part-0.parquet", self.schema, compression="zstd"
            )
        if self.buffers[method]:
            self.writers[method].write_table(pa.concat_tables(self.buffers[method]).cast(self.schema))
        self.buffers[method] = []

    def close(self) -> None:
        for method in self.buffers:
            self._flush(method)  # every method gets a file, even an empty one: the dataset stays complete
        for writer in self.writers.values():
            writer.close()


def _replace(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder in for the old one, so readers never see a half-written dataset."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


AXIOMS_NAME = "axioms.parquet"  # per-frame axiom metrics written by `xrcam evaluate --axioms --out RESULTS`


def _read_axioms(results: Path):
    """Per-frame axiom metrics keyed like the metric rows, or None when ``xrcam evaluate`` wrote none."""
    path = results / AXIOMS_NAME
    if not path.exists():
        return None
    import pandas as pd

    df = pd.read_parquet(path)
    needed = {"video_id", "frame", "method", "layer", "conservation", "sensitivity"}
    if not needed <= set(df.columns):
        log.warning("%s lacks %s; axiom columns stay empty", path, sorted(needed - set(df.columns)))
        return None
    df = df.assign(
        layer_set=df["layer"].astype(str).str.removeprefix("layer"), frame=df["frame"].astype("int64")
    )
    keys = ["video_id", "frame", "method", "layer_set"]
    return df.groupby(keys, as_index=False)[["conservation", "sensitivity"]].mean()


def _with_axioms(table: pa.Table, axioms) -> pa.Table:
    """Fill the axiom columns of the rows that ``axioms`` covers (row order is kept)."""
    if axioms is None or not table.num_rows:
        return table
    keys = ["video_id", "frame", "method", "layer_set"]
    rows = table.drop_columns(["conservation", "sensitivity"]).to_pandas()
    merged = rows.merge(axioms, on=keys, how="left", validate="many_to_one")
    return pa.Table.from_pandas(merged, schema=METRIC_SCHEMA, preserve_index=False)


def _failure(key: str, exc: BaseException) -> dict[str, str]:
    cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the worker's exception
    return {"video_key": key, "error_type": type(cause).__name__, "message": str(cause).splitlines()[0][:500]}


def _serial(results: Path, keys: Sequence[str], settings: ReduceSettings) -> Iterator[tuple[str, Any]]:
    """(video_key, rows or a failure record) per video, in this process."""
    for key in keys:
        try:
            yield key, reduce_video(results, key, settings)
        except Exception as exc:  # noqa: BLE001 - as on Ray: a damaged video is recorded, the rest carries on
            yield key, _failure(key, exc)


def _on_ray(
    results: Path, keys: Sequence[str], settings: ReduceSettings, address: str | None, workers: int
) -> Iterator[tuple[str, Any]]:
    """Run :func:`reduce_video` as one Ray task per video, at most ``2 * workers`` in flight.

    Results are taken in submission order, so rows are written in the same order on every run.
    A task that fails (after one retry) becomes a failure record; the other videos carry on.
    """
    from workflows.driver import start_ray

    started = start_ray(address, num_cpus=workers)
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=1)(reduce_video)
        plain = settings.to_dict()
        pending: deque = deque()
        todo = iter(keys)

        def submit() -> None:
            for key in todo:
                pending.append((key, task.remote(str(results), key, plain, torch_threads=1)))
                return

        for _ in range(2 * workers):
            submit()
        while pending:
            key, ref = pending.popleft()
            submit()
            try:
                yield key, ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
                yield key, _failure(key, exc)
    finally:
        if started:
            ray.shutdown()


def reduce_results(
    results: str | Path,
    settings: ReduceSettings | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    on_video: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Reduce every complete video of ``results``, then write the metrics dataset and summary tables.

    ``workers=0`` runs in this process without Ray; otherwise videos are Ray tasks on the cluster at
    ``address`` or on a local Ray (127.0.0.1, no dashboard) with ``workers`` CPUs (default: all cores).
    ``on_video(done, total)`` is called after each video. Returns the summary also written to
    ``RESULTS/reduce.json``.
    """
    from workflows.store import ResultStore

    results = Path(results)
    settings = settings or ReduceSettings()
    store = ResultStore.open(results)
    _layers_needed(store, settings)  # a wrong layer set is one clear error, not a failure per video
    keys = store.video_keys()
    complete = [k for k in keys if store.video(k).attrs.get("complete")]
    incomplete = sorted(set(keys) - set(complete))
    if incomplete:
        log.warning(
            "%d video(s) are not complete and are left out; resume `xrcam run` first", len(incomplete)
        )
    metadata = {
        "xrcam_version": __version__,
        "run_settings": store.settings,
        "reduce_settings": settings.to_dict(),
    }
    if workers is None:
        workers = os.cpu_count() or 1
    tables = (
        _serial(results, complete, settings)
        if workers == 0
        else _on_ray(results, complete, settings, address, max(1, min(workers, len(complete) or 1)))
    )
    axioms = _read_axioms(results)
    tmp = results / f".{METRICS_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    writers = _MethodWriters(tmp, store.methods, metadata)
    rows, failures = 0, []
    try:
        for done, (key, table) in enumerate(tables, start=1):
            if isinstance(table, dict):
                log.error("video %s could not be reduced: %s", key, table["message"])
                failures.append(table)
            else:
                writers.write(_with_axioms(table, axioms))
                rows += table.num_rows
            if on_video:
                on_video(done, len(complete))
    finally:
        writers.close()
    _replace(tmp, results / METRICS_DIR)
    tables_written = summarise(results)
    summary = {
        **metadata,
        "videos": len(complete) - len(failures),
        "incomplete_videos": incomplete,
        "failed_videos": failures,
        "rows": rows,
        "metrics": str(results / METRICS_DIR),
        "summary_tables": {name: str(path) for name, path in tables_written.items()},
    }
    (results / REDUCE_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def read_metrics(results: str | Path, columns: Sequence[str] | None = None, filters=None):
    """The metrics dataset as a pandas DataFrame (a thin ``pd.read_parquet`` over ``RESULTS/metrics``)."""
    import pandas as pd

    path = Path(results) / METRICS_DIR
    if not path.is_dir():
        raise XrcamConfigError(f"{path}: no metrics yet; run `xrcam reduce {results}` first")
    return pd.read_parquet(path, columns=list(columns) if columns else None, filters=filters)


# ------------------------------------------------------------------------------------ summary tables
def _layer_label(layer_set: str) -> str:
    return f"layer {layer_set}"


def _write_table(df, path: Path, metadata: Mapping[str, Any]) -> Path:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata, default=str).encode()}
    )
    pq.write_table(table, path)
    return path


def _dataset_metadata(results: Path) -> dict[str, Any]:
    for part in sorted((results / METRICS_DIR).glob("*/part-0.parquet")):
        raw = (pq.read_schema(part).metadata or {}).get(_METADATA_KEY)
        if raw:
            return json.loads(raw)
    return {}


def miou_table(results: str | Path):
    """Long table: one row per (method, layer set) with mIoU (fraction) and the frame counts behind it."""
    import pandas as pd

    from xrcam.metrics import mean_iou

    results = Path(results)
    metadata = _dataset_metadata(results)
    methods = list(metadata.get("run_settings", {}).get("methods", []))
    layer_sets = list(metadata.get("reduce_settings", {}).get("layer_sets", []))
    records = []
    for method in methods:  # one method in memory at a time
        df = read_metrics(
            results,
            columns=["layer_set", "iou", "correct", "has_gt_mask", "gt_empty"],
            filters=[("method", "==", method)],
        )
        for layer_set in layer_sets:
            rows = df[df["layer_set"] == layer_set]
            score = mean_iou(
                rows["iou"].to_numpy(dtype=np.float64),
                correct=rows["correct"].to_numpy(dtype=bool, copy=True),
                has_gt=rows["has_gt_mask"].to_numpy(dtype=bool, copy=True),
                gt_empty=rows["gt_empty"].to_numpy(dtype=bool, copy=True),
            )
            records.append(
                {
                    "method": method,
                    "layer_set": layer_set,
                    "miou": score.miou,
                    "frames": score.frames,
                    "empty_gt": score.empty_gt,
                    "misclassified": score.misclassified,
                }
            )
    return pd.DataFrame.from_records(
        records, columns=["method", "layer_set", "miou", "frames", "empty_gt", "misclassified"]
    )


def _paper_table(long, layer_sets: Sequence[str], model: str, *, average: bool):
    """Wide table, one row per method, one column per layer set, mIoU in percent (as the paper prints it)."""
    import pandas as pd

    wide = long.pivot(index="method", columns="layer_set", values="miou").reindex(
        index=list(dict.fromkeys(long["method"])), columns=list(layer_sets)
    )
    wide = wide * 100.0
    wide.columns = [_layer_label(s) for s in layer_sets]
    if average:
        wide["average"] = wide.mean(axis=1)
    frames = long[long["layer_set"].isin(layer_sets)].groupby("method")["frames"].max()
    out = wide.reset_index()
    out.insert(1, "model", model)
    out["frames"] = out["method"].map(frames).fillna(0).astype("int64")
    return pd.DataFrame(out)


def axiom_table(axioms, layers=None):
    """The paper's Table 4: rows (method, axiom), one column per layer plus the average (lower is better).

    ``axioms`` holds per-frame or already averaged rows ``method, layer, conservation, sensitivity``;
    ``layers`` fixes the column order (default: layer1, layer2, ... as found).
    """
    import pandas as pd

    long = axioms.melt(
        id_vars=["method", "layer"],
        value_vars=["conservation", "sensitivity"],
        var_name="axiom",
        value_name="value",
    )
    wide = long.pivot_table(
        index=["method", "axiom"], columns="layer", values="value", aggfunc="mean", sort=False
    )
    layers = list(layers) if layers is not None else sorted(wide.columns, key=lambda name: (len(name), name))
    wide = wide.reindex(columns=layers)
    wide.columns = [_layer_label(str(c).removeprefix("layer")) for c in layers]
    wide["average"] = wide.mean(axis=1)
    return pd.DataFrame(wide.reset_index())


def _read_axiom_table(results: Path):
    """Table 4 from ``RESULTS/axioms.parquet`` (written by ``xrcam evaluate``), or None when absent."""
    path = results / AXIOMS_NAME
    if not path.exists():
        return None
    import pandas as pd

    df = pd.read_parquet(path)
    needed = {"method", "layer", "conservation", "sensitivity"}
    if not needed <= set(df.columns):
        log.warning("%s lacks columns %s; Table 4 is left out", path, sorted(needed - set(df.columns)))
        return None
    return axiom_table(df)


def _accuracy_tables(results: Path, method: str, layer_set: str):
    """Frame-level classification accuracy per class and per patient (any one method/set: one row per frame)."""
    df = read_metrics(
        results,
        columns=["label", "patient", "correct"],
        filters=[("method", "==", method), ("layer_set", "==", layer_set)],
    )
    per_class = df.groupby("label", sort=True)["correct"].agg(frames="size", correct="sum").reset_index()
    per_class["accuracy"] = per_class["correct"] / per_class["frames"]
    per_patient = (
        df.groupby(["patient", "label"], sort=True)["correct"].agg(frames="size", correct="sum").reset_index()
    )
    per_patient["accuracy"] = per_patient["correct"] / per_patient["frames"]
    return per_class, per_patient


def summarise(results: str | Path) -> dict[str, Path]:
    """Write the dataset-wide tables under ``RESULTS/summary/`` from the metrics dataset.

    ``table1_layer_miou`` (per-layer mIoU %, the paper's Table 1), ``table2_layerset_miou`` (mIoU % per
    layer set, Table 2), ``miou`` (long form, fractions and frame counts), ``table4_axioms`` (when
    ``RESULTS/axioms.parquet`` exists), ``accuracy_per_class`` and ``accuracy_per_patient``.
    """
    results = Path(results)
    metadata = _dataset_metadata(results)
    run = metadata.get("run_settings", {})
    layer_sets = list(metadata.get("reduce_settings", {}).get("layer_sets", []))
    methods = list(run.get("methods", []))
    model = str(run.get("model", ""))
    tmp = results / f".{SUMMARY_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    long = miou_table(results)
    frames = {"miou": long}
    singles = [s for s in layer_sets if "+" not in s]
    table1_sets = sorted(singles, key=int)
    if table1_sets:
        frames["table1_layer_miou"] = _paper_table(long, table1_sets, model, average=True)
    table2_sets = [s for s in layer_sets if s == "4" or "+" in s]
    if table2_sets:
        frames["table2_layerset_miou"] = _paper_table(long, table2_sets, model, average=False)
    axioms = _read_axiom_table(results)
    if axioms is not None:
        frames["table4_axioms"] = axioms
    if methods and layer_sets:
        frames["accuracy_per_class"], frames["accuracy_per_patient"] = _accuracy_tables(
            results, methods[0], layer_sets[0]
        )
    for name, df in frames.items():
        _write_table(df, tmp / f"{name}.parquet", {**metadata, "table": name})
    _replace(tmp, results / SUMMARY_DIR)
    return {name: results / SUMMARY_DIR / f"{name}.parquet" for name in frames}
