"""Reduction of a results folder: raw per-stage maps -> metrics (Parquet) and the paper's tables.

``xrcam run`` stores each method's raw maps at each stage's own resolution. Reduction scores them with
the one scoring core (:func:`xrcam.scoring.score_stacks`: upsample, normalise, aggregate over each
layer set, threshold, IoU - batched over frames and methods), one video at a time and one store chunk
at a time so memory stays bounded whatever the archive size, and writes (see :mod:`workflows.tables`):

- one row per (video, frame, method, layer set) in ``RESULTS/metrics/method=<m>/``; reference rows
  (``random``, ``centre``, ``oracle``, ``intensity``, ``inverted_<method>``, ``is_reference``) on the
  annotated frames;
- the per-frame agreement of every method with XRelevanceCAM in ``RESULTS/agreement/``;
- the dataset-wide tables in ``RESULTS/summary/`` (Tables 1, 2, 4, accuracy, agreement).

Nothing is written back into ``maps.zarr``: aggregated maps and masks are derived on read by the same
core (:mod:`workflows.results`). Videos run in parallel as Ray tasks; the driver streams their rows
into the Parquet writers. A rerun replaces everything it wrote.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xrcam import __version__
from xrcam.errors import XrcamConfigError

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

__all__ = [
    "DEFAULT_LAYER_SETS",
    "ReduceSettings",
    "parse_threshold",
    "reduce_video",
    "reduce_results",
    "DEFAULT_REFERENCES",
]

log = logging.getLogger(__name__)

#: Single layers (the paper's Table 1) and the aggregation sets of its Table 2.
DEFAULT_LAYER_SETS = ("1", "2", "3", "4", "4+3", "4+3+2", "4+3+2+1")

#: Reference rows scored by default (checked against ``xrcam.references.REFERENCES`` on use; spelled
#: here so that ``xrcam reduce --help`` shows them without importing torch).
DEFAULT_REFERENCES = ("random", "centre", "oracle", "intensity")

_SCORE_BATCH = 8  # frames scored at once: (layers x methods x 8) crop-sized float32 maps in memory


def parse_threshold(text: str) -> tuple[str, float]:
    """``"mean+std"``, ``"fraction:0.5"``, ``"otsu"`` -> (rule, fraction) (:func:`xrcam.scoring.parse_threshold`)."""
    from xrcam.scoring import parse_threshold as parse

    return parse(text)


@dataclass(frozen=True)
class ReduceSettings:
    """What reduction computes; recorded in every output so a table says how it was made.

    ``references``: reference rows beside the methods (SPEC §5), on the annotated frames; ``intensity``
    re-reads the frames from the archive. ``inverted``: methods whose negated map is scored as
    ``inverted_<method>`` (the sign check); ``None`` = every relevance-family method that was run
    (their maps are not rectified, so their sign matters). ``agreement``: write the per-frame method
    agreement table. ``seed`` seeds the random reference.
    """

    layer_sets: tuple[str, ...] = DEFAULT_LAYER_SETS
    threshold: str = "mean+std"  # "mean+std", "fraction:<f>" or "otsu"
    chunk_frames: int | None = None  # frames read per step; default: one shard of the video
    references: tuple[str, ...] = DEFAULT_REFERENCES
    inverted: tuple[str, ...] | None = None
    agreement: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        from xrcam.scoring import format_layer_set, format_threshold

        sets = tuple(format_layer_set(s) for s in self.layer_sets)  # validates, canonical "4+3" spelling
        if not sets or len(set(sets)) != len(sets):
            raise XrcamConfigError(f"layer sets must be given once each, got {list(self.layer_sets)}")
        object.__setattr__(self, "layer_sets", sets)
        object.__setattr__(self, "threshold", format_threshold(self.threshold))
        if self.chunk_frames is not None and self.chunk_frames < 1:
            raise XrcamConfigError(f"chunk_frames must be a positive integer, got {self.chunk_frames}")
        from xrcam.references import REFERENCES as known

        unknown = [r for r in self.references if r not in known]
        if unknown:
            raise XrcamConfigError(f"unknown reference rows {unknown}; choose from {list(known)}")
        object.__setattr__(self, "references", tuple(self.references))
        if self.inverted is not None:
            object.__setattr__(self, "inverted", tuple(self.inverted))

    def inverted_for(self, methods: Sequence[str]) -> list[str]:
        from xrcam.scoring import default_relu

        if self.inverted is None:
            return [m for m in methods if not default_relu(m)]
        missing = [m for m in self.inverted if m not in methods]
        if missing:
            raise XrcamConfigError(f"inverted rows for {missing}, but the run explained only {list(methods)}")
        return list(self.inverted)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layer_sets"] = list(self.layer_sets)
        data["references"] = list(self.references)
        data["inverted"] = None if self.inverted is None else list(self.inverted)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReduceSettings:
        data = dict(data)
        for name in ("layer_sets", "references", "inverted"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)


def _layers_needed(store, settings: ReduceSettings) -> list[str]:
    """The explained layers the layer sets use, in store order; an error names any that were not run."""
    from xrcam.scoring import parse_layer_set

    needed = {layer for s in settings.layer_sets for layer in parse_layer_set(s)}
    missing = sorted(needed - set(store.layers))
    if missing:
        raise XrcamConfigError(
            f"{store.root}: layer sets {list(settings.layer_sets)} need {missing}, but the run explained only "
            f"{store.layers}; drop those sets (--layer-sets) or rerun `xrcam run` with those layers"
        )
    return [layer for layer in store.layers if layer in needed]


# ------------------------------------------------------------------------------------------ one video
def reduce_video(
    results: str | Path,
    key: str,
    settings: ReduceSettings | Mapping[str, Any],
    *,
    torch_threads: int | None = None,
    axioms=None,
) -> dict[str, Any]:
    """Score one video of ``results``: ``{"metrics": {method: pa.Table}, "agreement": pa.Table}``.

    A plain function (no Ray, no process-wide tuning) so tests and a single process can call it;
    :func:`reduce_results` runs it as a Ray task per video. Frames are read ``chunk_frames`` at a time
    (default: one shard) and scored :data:`_SCORE_BATCH` at a time, so memory is bounded by the
    shard, not the video.
    """
    import numpy as np
    import pyarrow as pa
    import torch

    from workflows import tables
    from workflows.store import ResultStore
    from xrcam.scoring import release_scratch, score_stacks

    if not isinstance(settings, ReduceSettings):
        settings = ReduceSettings.from_dict(settings)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    store = ResultStore.open(results, mode="r")
    layout = store.layout(key)
    if layout is None:
        raise XrcamConfigError(f"{store.root}: no video {key!r} in {store.maps_path}")
    methods, classes = store.methods, store.classes
    layers = _layers_needed(store, settings)
    inverted = settings.inverted_for(methods)
    against = tables.REFERENCE_AGAINST if settings.agreement and tables.REFERENCE_AGAINST in methods else None
    frames, size = layout.num_frames, layout.size
    # one shard per step: one file per array (a chunk per step re-reads every array's shard index)
    chunk = settings.chunk_frames or store.shard_frames(layout)
    sets = list(settings.layer_sets)
    config = store.preprocess_config() if "intensity" in settings.references else None

    parts: dict[tuple[str, int], list[dict]] = {}  # (name, layer set index) -> column chunks in frame order
    agreement: dict[tuple[int, int], list[pa.Table]] = {}  # (method, layer set) -> chunks in frame order
    for start in range(0, frames, chunk):
        stop = min(start + chunk, frames)
        arrays = store.read_frame_arrays(key, slice(start, stop))
        stacks = store.read_stacks(key, slice(start, stop), layers=layers)
        logits = arrays["logits"]
        valid = ~np.isnan(logits).any(axis=1)  # frames a failed shard never wrote are left out
        base = _frame_columns(layout, key, classes, start, arrays, size)
        annotated = np.flatnonzero(arrays["has_gt_mask"] & valid)
        grey = (
            _grey_frames(layout, config, start + annotated) if config is not None and len(annotated) else None
        )
        for b in range(0, stop - start, _SCORE_BATCH):
            rows = np.arange(b, min(b + _SCORE_BATCH, stop - start))
            rows = rows[valid[rows]]
            if not len(rows):
                continue
            batch_stacks = {layer: torch.from_numpy(s[:, rows]) for layer, s in stacks.items()}
            gt = torch.from_numpy(arrays["gt_mask"][rows])
            has_gt = arrays["has_gt_mask"][rows]
            scores = score_stacks(
                batch_stacks,
                methods,
                size=size,
                layer_sets=sets,
                gt=gt,
                threshold=settings.threshold,
                agreement_with=against,
            )
            iou = scores.iou.numpy()
            iou[:, :, ~has_gt] = np.nan
            _collect(parts, base, rows, scores.methods, sets, iou, scores.mask_area.numpy(), size, False)
            if against is not None:
                for part_key, table in _agreement_rows(
                    base, rows, methods, sets, scores.agreement, against
                ).items():
                    agreement.setdefault(part_key, []).append(table)
            sub = np.flatnonzero(has_gt)
            if len(sub) and (settings.references or inverted):
                picked = rows[sub]
                ref_stacks = {layer: s[:, sub] for layer, s in batch_stacks.items()}
                position = np.searchsorted(annotated, picked)
                ref = score_stacks(
                    ref_stacks,
                    methods,
                    score_methods=False,
                    size=size,
                    layer_sets=sets,
                    gt=gt[sub],
                    threshold=settings.threshold,
                    inverted=inverted,
                    references=settings.references,
                    frames=None if grey is None else torch.from_numpy(grey[position]),
                    frame_seeds=[
                        _frame_seed(settings.seed, layout.video_id, int(f)) for f in base["frame"][picked]
                    ],
                )
                # score_methods=False: only the inverted and reference rows come back
                _collect(
                    parts, base, picked, ref.methods, sets, ref.iou.numpy(), ref.mask_area.numpy(), size, True
                )
    release_scratch()  # the scoring core's reused batch buffers: held per video, not per process
    by_name: dict[str, list[dict]] = {}
    for (name, _k), chunks in sorted(parts.items(), key=lambda item: item[0][1]):  # layer set, then frame
        by_name.setdefault(name, []).extend(chunks)
    metrics = {name: _with_axioms(_metric_table(chunks), axioms, name) for name, chunks in by_name.items()}
    return {
        "metrics": metrics,
        "agreement": pa.concat_tables([t for k in sorted(agreement) for t in agreement[k]])
        if agreement
        else tables.AGREEMENT_SCHEMA.empty_table(),
    }


def _frame_seed(seed: int, video_id: str, frame: int) -> int:
    """The random reference's seed for one frame: the same draws whatever the chunking or order."""
    import zlib

    return zlib.crc32(f"{seed}:{video_id}:{frame}".encode())


def _grey_frames(layout, config, positions: np.ndarray) -> np.ndarray:
    """The grey crops the run explained at ``positions`` (for the intensity reference)."""
    import numpy as np

    from xrcam.frames import read_batches

    out = {}
    for batch in read_batches(
        layout.path, config, positions=positions.tolist(), crop=layout.crop, masks=False
    ):
        for row, p in enumerate(batch.positions):
            out[p] = batch.grey[row].numpy()
    return np.stack([out[int(p)] for p in positions])


def _frame_columns(
    layout, key: str, classes: list[str], start: int, arrays, size: int
) -> dict[str, np.ndarray]:
    """Columns shared by every method and layer set of a chunk of frames (numpy, one entry per frame)."""
    import numpy as np

    from workflows.store import predictions

    n = len(arrays["logits"])
    predicted, probabilities = predictions(arrays["logits"])  # rows never written are not emitted
    gt = arrays["gt_mask"]
    has_gt = arrays["has_gt_mask"]
    gt_area = np.where(has_gt, np.count_nonzero(gt.reshape(n, -1), axis=1), 0).astype(np.int64)
    label_index = int(layout.label_index)
    names = np.asarray(classes + [""], dtype=object)
    return {
        "video_id": np.full(n, layout.video_id, dtype=object),
        "video_key": np.full(n, key, dtype=object),
        "patient": np.full(n, layout.patient, dtype=object),
        "label": np.full(n, layout.label, dtype=object),
        "label_index": np.full(n, label_index, dtype=np.int64),
        "frame": arrays["frame"].astype(np.int64),
        "position": np.arange(start, start + n, dtype=np.int64),
        "prediction": names[np.where(predicted < len(classes), predicted, len(classes))],
        "predicted_index": predicted,
        "probability": probabilities[np.arange(n), predicted].astype(np.float32),
        "correct": predicted == label_index,
        "has_gt_mask": has_gt,
        "gt_empty": has_gt & (gt_area == 0),
        "gt_area": gt_area,
        "gt_fraction": (gt_area / float(size * size)).astype(np.float32),
    }


def _collect(parts, base, rows, names, sets, iou, area, size, is_reference) -> None:
    """Append the rows of ``names`` x ``sets`` for frames ``rows`` (indices into ``base``) as numpy
    columns; :func:`_metric_table` makes one Arrow table of them per name (one per batch and layer set
    cost more than the scoring of small crops)."""
    import numpy as np

    frame_cols = {name: values[rows] for name, values in base.items()}
    n = len(rows)
    for m, name in enumerate(names):
        for k, layer_set in enumerate(sets):
            columns = {
                **frame_cols,
                "layer_set": np.full(n, layer_set, dtype=object),
                "num_layers": np.full(n, layer_set.count("+") + 1, dtype=np.int64),
                "is_reference": np.full(n, is_reference),
                "mask_area": area[k, m].astype(np.float32),
                "mask_fraction": (area[k, m] / float(size * size)).astype(np.float32),
                "iou": iou[k, m].astype(np.float32),
            }
            parts.setdefault((name, k), []).append(columns)


def _metric_table(chunks: list[dict[str, np.ndarray]]) -> pa.Table:
    """One metrics table from :func:`_collect`'s column chunks, in their order (axiom columns empty)."""
    import numpy as np
    import pyarrow as pa

    from workflows import tables

    columns = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
    empty = np.full(len(columns["iou"]), np.nan, dtype=np.float32)
    columns.update(conservation=empty, sensitivity=empty)
    return pa.table(columns, schema=tables.METRIC_SCHEMA)


def _agreement_rows(base, rows, methods, sets, agreement, against) -> dict[tuple[int, int], pa.Table]:
    import numpy as np
    import pyarrow as pa

    from workflows import tables

    mask_iou, rank = agreement["mask_iou"].numpy(), agreement["rank_corr"].numpy()
    blocks = {}
    n = len(rows)
    for m, method in enumerate(methods):
        if method == against:
            continue
        for k, layer_set in enumerate(sets):
            blocks[m, k] = pa.table(
                {
                    "video_id": base["video_id"][rows],
                    "video_key": base["video_key"][rows],
                    "patient": base["patient"][rows],
                    "frame": base["frame"][rows],
                    "position": base["position"][rows],
                    "method": np.full(n, method, dtype=object),
                    "layer_set": np.full(n, layer_set, dtype=object),
                    "against": np.full(n, against, dtype=object),
                    "mask_iou": mask_iou[k, m].astype(np.float32),
                    "rank_corr": rank[k, m].astype(np.float32),
                },
                schema=tables.AGREEMENT_SCHEMA,
            )
    return blocks


def _axiom_lookup(results: Path):
    """Per-frame axiom metrics keyed like the metric rows, or None when ``xrcam evaluate`` wrote none."""
    from workflows import tables

    df = tables.read_axioms(results)
    if df is None:
        return None
    df = df.assign(
        layer_set=df["layer"].astype(str).str.removeprefix("layer"), frame=df["frame"].astype("int64")
    )
    keys = ["video_id", "frame", "method", "layer_set"]
    return df.groupby(keys, as_index=False)[["conservation", "sensitivity"]].mean()


def _with_axioms(table: pa.Table, axioms, method: str) -> pa.Table:
    """Fill the axiom columns of the rows of ``method`` that ``axioms`` covers (row order is kept)."""
    import pyarrow as pa

    from workflows import tables

    if axioms is None or not table.num_rows:
        return table
    mine = axioms[axioms["method"] == method].drop(columns=["method"])
    if mine.empty:
        return table
    keys = ["video_id", "frame", "layer_set"]
    rows = table.drop_columns(["conservation", "sensitivity"]).to_pandas()
    merged = rows.merge(mine, on=keys, how="left", validate="many_to_one")
    return pa.Table.from_pandas(merged, schema=tables.METRIC_SCHEMA, preserve_index=False)


# ------------------------------------------------------------------------------------ all videos
def _failure(key: str, exc: BaseException) -> dict[str, str]:
    cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the worker's exception
    return {"video_key": key, "error_type": type(cause).__name__, "message": str(cause).splitlines()[0][:500]}


def _in_order(keys: Sequence[str], start: Callable[[str], Any], ahead: int) -> Iterator[tuple[str, Any]]:
    """``(key, start(key))`` for every key, in order; each key is started while the ``ahead`` keys
    before it are still being waited for, so work is in flight without holding every video's rows."""
    pending: deque = deque()
    for key in keys:
        pending.append((key, start(key)))
        if len(pending) > ahead:
            yield pending.popleft()
    yield from pending


def _in_process(
    results: Path, keys: Sequence[str], settings: ReduceSettings, axioms, threads: int
) -> Iterator[tuple[str, Any]]:
    """(video_key, rows or a failure record) per video, scored in this process by ``threads`` threads.

    No Ray on one machine: scoring is torch code that releases the GIL, so threads use every core
    without a Ray start-up (seconds, more than the scoring of many videos) or moving rows between
    processes. Each video is scored by one thread with one intra-op thread, as a Ray task is: the
    scoring is a stream of memory-bound ops on batch-sized tensors, where a second intra-op thread
    gains less than a second video does. Videos are queued ``2 * threads`` ahead of the one awaited
    (:func:`_in_order`: memory stays bounded per video); results come in submission order, so rows
    are written in the same order on every run. The caller's torch thread count is restored afterwards.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)

    def one(key: str) -> dict[str, Any]:
        try:
            return reduce_video(results, key, settings, axioms=axioms)
        except Exception as exc:  # noqa: BLE001 - as on Ray: a damaged video is recorded, the rest carries on
            return _failure(key, exc)

    try:
        if threads <= 1:
            for key in keys:
                yield key, one(key)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads, thread_name_prefix="xrcam-reduce") as pool:
            for key, future in _in_order(keys, lambda key: pool.submit(one, key), 2 * threads):
                yield key, future.result()
    finally:
        torch.set_num_threads(before)


def _on_ray(
    results: Path, keys: Sequence[str], settings: ReduceSettings, address: str | None, workers: int, axioms
) -> Iterator[tuple[str, Any]]:
    """Run :func:`reduce_video` as one Ray task per video, ``2 * workers`` ahead of the one awaited.

    Results are taken in submission order, so rows are written in the same order on every run. A task
    that fails (after one retry) becomes a failure record; the other videos carry on. Worker processes
    get the process-wide settings of :mod:`workflows.ray_session`'s start-up hook.
    """
    from workflows.ray_session import ray_session

    with ray_session(address, num_cpus=workers):
        import ray

        task = ray.remote(num_cpus=1, max_retries=1)(reduce_video)
        plain = settings.to_dict()
        shared = ray.put(axioms)

        def start(key: str):
            return task.remote(str(results), key, plain, torch_threads=1, axioms=shared)

        for key, ref in _in_order(keys, start, 2 * workers):
            try:
                yield key, ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
                yield key, _failure(key, exc)


def reduce_results(
    results: str | Path,
    settings: ReduceSettings | None = None,
    *,
    address: str | None = None,
    workers: int | None = None,
    on_video: Callable[[int, int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Reduce every complete video of ``results``, then write the metrics dataset and summary tables.

    ``workers`` videos are reduced at a time (default: all cores): as Ray tasks on the cluster at
    ``address`` (else ``XRCAM_ADDRESS``) when one is given, otherwise by threads of this process (no
    local Ray: see :func:`_in_process`); ``workers=0`` reduces one video at a time in this process
    even with an address. Holds the results folder's lock throughout. ``on_start(total)`` is called
    once the videos to reduce are known, ``on_video(done, total)`` after each video. Returns the
    summary also written to ``RESULTS/reduce.json``.
    """
    from workflows import tables
    from workflows.lock import results_lock
    from workflows.store import ResultStore

    results = Path(results)
    settings = settings or ReduceSettings()
    store = ResultStore.open(results, mode="r")
    _layers_needed(store, settings)  # a wrong layer set is one clear error, not a failure per video
    settings.inverted_for(store.methods)
    with results_lock(results, "reduce"):
        keys = store.video_keys()
        complete = [k for k in keys if store.is_complete(k)]
        incomplete = sorted(set(keys) - set(complete))
        if not complete:  # all-NaN tables would look like results
            raise XrcamConfigError(
                f"{results}: no complete video to reduce ({len(incomplete)} incomplete); run or resume "
                f"`xrcam run` into this folder first"
            )
        if incomplete:
            log.warning(
                "%d video(s) are not complete and are left out; resume `xrcam run` first", len(incomplete)
            )
        if on_start:
            on_start(len(complete))
        metadata = {
            "xrcam_version": __version__,
            "run_settings": store.settings,
            "reduce_settings": settings.to_dict(),
        }
        if workers is None:
            workers = os.cpu_count() or 1
        parallel = max(1, min(workers, len(complete)))
        axioms = _axiom_lookup(results)
        names = list(store.methods)
        names += [f"inverted_{m}" for m in settings.inverted_for(store.methods)] + list(settings.references)
        from workflows.ray_session import resolve_address

        # the summary tables need pandas (~0.35 s to import): a thread imports it while the videos
        # are scored, instead of a scoring thread (pyarrow imports it for string columns) or after
        threading.Thread(target=importlib.import_module, args=("pandas",), daemon=True).start()
        videos = (
            _on_ray(results, complete, settings, address, parallel, axioms)
            if workers and resolve_address(address)
            else _in_process(results, complete, settings, axioms, parallel if workers else 1)
        )
        writer = tables.DatasetWriter(results, names, metadata)
        failures = []
        try:
            for done, (key, out) in enumerate(videos, start=1):
                if "metrics" not in out:
                    log.error("video %s could not be reduced: %s", key, out["message"])
                    failures.append(out)
                else:
                    writer.write(out["metrics"], out["agreement"])
                if on_video:
                    on_video(done, len(complete))
        finally:
            writer.close()
        written = tables.summarise(results)
        summary = {
            **metadata,
            "videos": len(complete) - len(failures),
            "incomplete_videos": incomplete,
            "failed_videos": failures,
            "rows": writer.rows,
            "metrics": str(results / tables.METRICS_DIR),
            "summary_tables": {name: str(path) for name, path in written.items()},
        }
        (results / tables.REDUCE_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
