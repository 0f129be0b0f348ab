"""The Parquet side of a results folder: schemas, writers, readers and the summary tables.

Layout (next to ``maps.zarr``, see :mod:`workflows.store`)::

    RESULTS/failures.parquet                     what could not be explained (FAILURE_SCHEMA)
    RESULTS/metrics/method=<m>/part-0.parquet    one row per (video, frame, layer set) of method m;
                                                 reference rows too (method=random, centre, oracle,
                                                 intensity, inverted_<method>; is_reference=True);
                                                 one row group per video
    RESULTS/agreement/part-0.parquet             per frame and layer set: mask IoU and rank correlation
                                                 of every method against XRelevanceCAM
    RESULTS/summary/<table>.parquet              table1, table2, table4, miou, accuracy_per_class, ...
    RESULTS/axioms.parquet                       per-frame axiom metrics (``xrcam evaluate --out RESULTS``)
    RESULTS/reduce.json                          what ``xrcam reduce`` did, with which settings

Conventions: hive partitions by method (``pd.read_parquet(RESULTS/"metrics", filters=[("method",
"==", "gradcam")])`` reads one folder; DuckDB/Polars prune the same way), snake_case columns, one
unit per quantity: per-frame ``iou`` and ``mask_fraction`` are fractions in [0, 1], summary columns
ending in ``_pct`` are percent. Every mIoU cell carries its 95 % bootstrap CI over patients
(:func:`xrcam.uncertainty.bootstrap_ci`) and the numbers of frames and patients behind it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from xrcam.errors import XrcamConfigError

__all__ = [
    "FAILURES_NAME",
    "FAILURE_COLUMNS",
    "FAILURE_SCHEMA",
    "METRICS_DIR",
    "AGREEMENT_DIR",
    "SUMMARY_DIR",
    "EVALUATE_TABLES",
    "write_evaluate_table",
    "REDUCE_NAME",
    "AXIOMS_NAME",
    "METRIC_SCHEMA",
    "AGREEMENT_SCHEMA",
    "AXIOM_COLUMNS",
    "TABLES",
    "REFERENCE_AGAINST",
    "write_failures",
    "read_failures",
    "DatasetWriter",
    "read_metrics",
    "read_agreement",
    "read_axioms",
    "read_table",
    "table_names",
    "reduce_settings",
    "miou_long",
    "miou_table",
    "axiom_table",
    "accuracy_tables",
    "agreement_summary",
    "summarise",
    "paper_view",
    "remove_reduction",
]

log = logging.getLogger(__name__)

FAILURES_NAME = "failures.parquet"
METRICS_DIR = "metrics"
AGREEMENT_DIR = "agreement"
SUMMARY_DIR = "summary"
REDUCE_NAME = "reduce.json"
AXIOMS_NAME = "axioms.parquet"
_METADATA_KEY = b"xrcam"

#: Agreement rows compare every method against this one.
REFERENCE_AGAINST = "xrelevancecam"

# ------------------------------------------------------------------------------------------ failures
#: TEAM interface 9: one row per problem; ``shard`` -1 when the whole video was rejected, ``frame``
#: set for frame-level problems (e.g. a bad mask), null otherwise.
FAILURE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("video_id", pa.string()),
        ("shard", pa.int64()),
        ("frame", pa.int64()),
        ("error_type", pa.string()),
        ("message", pa.string()),
    ]
)
FAILURE_COLUMNS = tuple(FAILURE_SCHEMA.names)


def write_failures(root: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Replace ``RESULTS/failures.parquet`` with ``rows`` (an empty table when none)."""
    rows = list(rows)

    def column(name, cast):
        return [None if r.get(name) is None else cast(r[name]) for r in rows]

    table = pa.table(
        {
            "path": pa.array(column("path", str), pa.string()),
            "video_id": pa.array(column("video_id", str), pa.string()),
            "shard": pa.array([int(r.get("shard", -1)) for r in rows], pa.int64()),
            "frame": pa.array(column("frame", int), pa.int64()),
            "error_type": pa.array(column("error_type", str), pa.string()),
            "message": pa.array(column("message", str), pa.string()),
        },
        schema=FAILURE_SCHEMA,
    )
    path = Path(root) / FAILURES_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_failures(root: str | Path):
    import pandas as pd

    path = Path(root) / FAILURES_NAME
    if not path.exists():
        return FAILURE_SCHEMA.empty_table().to_pandas()
    return pd.read_parquet(path)


# ------------------------------------------------------------------------------------------ metrics
#: One row per (video, frame, method, layer set); ``method`` is the hive partition (not in the files).
METRIC_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("video_key", pa.string()),
        ("patient", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int64()),
        ("frame", pa.int64()),  # original frame index in the source video
        ("position", pa.int64()),  # row in the video's arrays (frame axis of maps.zarr)
        ("layer_set", pa.string()),  # "4", "4+3", ... (stage numbers, deepest first as given)
        ("num_layers", pa.int64()),
        ("is_reference", pa.bool_()),  # random/centre/oracle/intensity/inverted_<method>: not a method
        ("prediction", pa.string()),
        ("predicted_index", pa.int64()),
        ("probability", pa.float32()),  # probability of the predicted class
        ("correct", pa.bool_()),
        ("has_gt_mask", pa.bool_()),
        ("gt_empty", pa.bool_()),  # annotated frame whose ground truth is empty: reported, never averaged
        ("gt_area", pa.int64()),  # pixels on the crop grid
        ("gt_fraction", pa.float32()),  # gt_area / crop pixels, in [0, 1]
        ("mask_area", pa.float32()),  # pixels of the saliency mask (mean over draws for ``random``)
        ("mask_fraction", pa.float32()),  # mask_area / crop pixels, in [0, 1]
        ("iou", pa.float32()),  # in [0, 1]; NaN where the frame has no ground truth
        # axiom metrics of single-layer rows, for the frames `xrcam evaluate --axioms` sampled; NaN elsewhere
        ("conservation", pa.float32()),
        ("sensitivity", pa.float32()),
    ]
)

#: One row per (video, frame, method, layer set): agreement of ``method`` with REFERENCE_AGAINST.
AGREEMENT_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("video_key", pa.string()),
        ("patient", pa.string()),
        ("frame", pa.int64()),
        ("position", pa.int64()),
        ("method", pa.string()),
        ("layer_set", pa.string()),
        ("against", pa.string()),
        ("mask_iou", pa.float32()),  # IoU of the two saliency masks, in [0, 1]
        ("rank_corr", pa.float32()),  # Spearman correlation of the two maps (maps pooled to 32x32)
    ]
)

#: Columns of ``axioms.parquet`` (written by ``xrcam evaluate``, read by ``xrcam reduce``).
AXIOM_COLUMNS = ("video_id", "frame", "method", "layer", "conservation", "sensitivity")


def _with_metadata(schema: pa.Schema, metadata: Mapping[str, Any]) -> pa.Schema:
    return schema.with_metadata({_METADATA_KEY: json.dumps(metadata, default=str).encode()})


class DatasetWriter:
    """Streams per-video tables into ``metrics/method=<m>/part-0.parquet`` and ``agreement/``.

    Each :meth:`write` call (one video) becomes one row group per file it touches. Everything is
    written into a hidden temporary folder and swapped in by :meth:`close`, so readers never see a
    half-written dataset.
    """

    def __init__(self, root: str | Path, names: Sequence[str], metadata: Mapping[str, Any]):
        self.root = Path(root)
        self.names = list(names)
        self.metadata = dict(metadata)
        self.tmp = {d: self.root / f".{d}.tmp" for d in (METRICS_DIR, AGREEMENT_DIR)}
        for path in self.tmp.values():
            if path.exists():
                shutil.rmtree(path)
        self.schema = _with_metadata(METRIC_SCHEMA, metadata)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.agreement: pq.ParquetWriter | None = None
        self.rows = 0

    def _writer(self, name: str) -> pq.ParquetWriter:
        if name not in self.writers:
            folder = self.tmp[METRICS_DIR] / f"method={name}"
            folder.mkdir(parents=True, exist_ok=True)
            self.writers[name] = pq.ParquetWriter(folder / "part-0.parquet", self.schema, compression="zstd")
        return self.writers[name]

    def write(self, metrics: Mapping[str, pa.Table], agreement: pa.Table | None = None) -> None:
        """``metrics[method]``: one video's rows of that method (METRIC_SCHEMA); ``agreement`` likewise."""
        for name, table in metrics.items():
            if table.num_rows:
                self._writer(name).write_table(table.cast(self.schema), row_group_size=table.num_rows)
                self.rows += table.num_rows
        if agreement is not None and agreement.num_rows:
            if self.agreement is None:
                self.tmp[AGREEMENT_DIR].mkdir(parents=True, exist_ok=True)
                self.agreement = pq.ParquetWriter(
                    self.tmp[AGREEMENT_DIR] / "part-0.parquet",
                    _with_metadata(AGREEMENT_SCHEMA, self.metadata),
                    compression="zstd",
                )
            self.agreement.write_table(
                agreement.cast(self.agreement.schema), row_group_size=agreement.num_rows
            )

    def close(self) -> None:
        for name in self.names:
            self._writer(name)  # every name gets a file, even an empty one: the dataset stays complete
        for writer in self.writers.values():
            writer.close()
        if self.agreement is None:
            self.tmp[AGREEMENT_DIR].mkdir(parents=True, exist_ok=True)
            pq.write_table(
                _with_metadata(AGREEMENT_SCHEMA, self.metadata).empty_table(),
                self.tmp[AGREEMENT_DIR] / "part-0.parquet",
            )
        else:
            self.agreement.close()
        for name, tmp in self.tmp.items():
            _replace(tmp, self.root / name)


def _replace(tmp: Path, final: Path) -> None:
    """Swap a freshly written folder in for the old one."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def remove_reduction(root: str | Path) -> None:
    """Delete what ``xrcam reduce`` wrote (``xrcam run --overwrite`` starts from scratch)."""
    root = Path(root)
    for name in (METRICS_DIR, AGREEMENT_DIR, SUMMARY_DIR):
        if (root / name).exists():
            shutil.rmtree(root / name)
    (root / REDUCE_NAME).unlink(missing_ok=True)


def _filters(filters: Mapping[str, Any]) -> list[tuple] | None:
    out = []
    for column, value in filters.items():
        if isinstance(value, list | tuple | set | frozenset):
            out.append((column, "in", list(value)))
        else:
            out.append((column, "==", value))
    return out or None


def _need(path: Path, root: Path) -> Path:
    if not path.exists():
        raise XrcamConfigError(f"{path}: no metrics yet; run `xrcam reduce {root}` first")
    return path


def read_metrics(root: str | Path, columns: Sequence[str] | None = None, **filters: Any):
    """Per-frame metric rows as a pandas DataFrame; ``column=value`` filters are pushed down
    (``method=`` reads only that partition). ``method`` comes back as a plain string column."""
    import pandas as pd

    root = Path(root)
    path = _need(root / METRICS_DIR, root)
    df = pd.read_parquet(path, columns=list(columns) if columns else None, filters=_filters(filters))
    if "method" in df:
        df["method"] = df["method"].astype(str)
    return df


def read_agreement(root: str | Path, columns: Sequence[str] | None = None, **filters: Any):
    import pandas as pd

    root = Path(root)
    path = _need(root / AGREEMENT_DIR, root)
    return pd.read_parquet(path, columns=list(columns) if columns else None, filters=_filters(filters))


def read_axioms(root: str | Path):
    """Per-frame axiom metrics written by ``xrcam evaluate --axioms --out RESULTS``, or None."""
    path = Path(root) / AXIOMS_NAME
    if not path.exists():
        return None
    import pandas as pd

    df = pd.read_parquet(path)
    missing = set(AXIOM_COLUMNS) - set(df.columns)
    if missing:
        log.warning("%s lacks %s; axiom columns and Table 4 are left out", path, sorted(missing))
        return None
    return df


def _dataset_metadata(root: Path) -> dict[str, Any]:
    for part in sorted((root / METRICS_DIR).glob("method=*/part-0.parquet")):
        raw = (pq.read_schema(part).metadata or {}).get(_METADATA_KEY)
        if raw:
            return json.loads(raw)
    return {}


def reduce_settings(root: str | Path) -> dict[str, Any] | None:
    """The settings of the last reduction (from ``reduce.json``), or None before any."""
    path = Path(root) / REDUCE_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("reduce_settings")


# ------------------------------------------------------------------------------------------ tables
#: Summary tables by short name -> file stem under ``RESULTS/summary/``.
TABLES = {
    "table1": "table1_layer_miou",
    "table2": "table2_layerset_miou",
    "table3": "table3_dropout_miou",
    "table4": "table4_axioms",
    "miou": "miou",
    "accuracy_per_class": "accuracy_per_class",
    "accuracy_per_patient": "accuracy_per_patient",
    "agreement": "agreement_summary",
}


#: Summary tables that only ``xrcam evaluate`` makes (Monte-Carlo dropout needs the model); written
#: into the same ``RESULTS/summary/`` by :func:`write_evaluate_table` and kept by :func:`summarise`.
EVALUATE_TABLES = ("table3_dropout_miou",)


def write_evaluate_table(root: str | Path, name: str, df, metadata: Mapping[str, Any]) -> Path:
    """Write ``evaluate``'s summary table ``name`` (one of :data:`EVALUATE_TABLES`) beside reduce's."""
    if name not in EVALUATE_TABLES:
        raise XrcamConfigError(f"{name!r} is not a table evaluate adds to the summary; use {EVALUATE_TABLES}")
    folder = Path(root) / SUMMARY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return _write_table(df, folder / f"{name}.parquet", {**metadata, "table": name})


def table_names(root: str | Path) -> list[str]:
    folder = Path(root) / SUMMARY_DIR
    stems = {p.stem for p in folder.glob("*.parquet")}
    return [name for name, stem in TABLES.items() if stem in stems]


def read_table(root: str | Path, name: str):
    """A summary table by short name (:data:`TABLES`) or file stem."""
    import pandas as pd

    root = Path(root)
    stem = TABLES.get(name, name)
    path = root / SUMMARY_DIR / f"{stem}.parquet"
    if not path.exists():
        have = table_names(root)
        raise XrcamConfigError(
            f"{path}: no table {name!r} here; have {have or 'none'}"
            + ("" if have else f"; run `xrcam reduce {root}` first")
        )
    return pd.read_parquet(path)


def miou_long(rows, group_by: Sequence[str] = ("method", "layer_set"), *, n_boot: int = 1000, seed: int = 0):
    """One row per group (default method x layer set): mIoU % with its 95 % CI over patients.

    ``rows``: per-frame rows with ``iou, correct, has_gt_mask, gt_empty, patient, gt_fraction`` (and
    ``is_reference``, ``mask_fraction`` if present). The mIoU averages the frames that are annotated,
    correctly classified and have a non-empty ground truth (paper §4.2), reference rows included: the
    same frames for every row. Columns: ``miou_pct, ci_lo_pct, ci_hi_pct, n_frames, n_patients,
    n_empty_gt, n_misclassified, gt_coverage_pct`` (mean GT area / crop, the frames' coverage),
    ``mask_coverage_pct``.
    """
    import pandas as pd

    from xrcam.uncertainty import bootstrap_ci

    records = []
    group_by = list(group_by)
    for keys, df in rows.groupby(group_by, sort=False, observed=True):
        keys = keys if isinstance(keys, tuple) else (keys,)
        has_gt = df["has_gt_mask"].to_numpy(bool)
        correct = df["correct"].to_numpy(bool)
        empty = df["gt_empty"].to_numpy(bool)
        kept = has_gt & correct & ~empty
        ious = df["iou"].to_numpy(np.float64)[kept]
        patients = df["patient"].to_numpy()[kept]
        mean, lo, hi = bootstrap_ci(ious, patients, n_boot=n_boot, seed=seed) if kept.any() else (np.nan,) * 3
        gt_cov = float(df["gt_fraction"].to_numpy(np.float64)[kept].mean() * 100) if kept.any() else np.nan
        records.append(
            {
                **dict(zip(group_by, keys, strict=True)),
                "is_reference": bool(df["is_reference"].iloc[0]) if "is_reference" in df else False,
                "miou_pct": mean * 100,
                "ci_lo_pct": lo * 100,
                "ci_hi_pct": hi * 100,
                "n_frames": int(kept.sum()),
                "n_patients": int(len(np.unique(patients))),
                "n_empty_gt": int((has_gt & correct & empty).sum()),
                "n_misclassified": int((has_gt & ~correct).sum()),
                "gt_coverage_pct": gt_cov,
                "mask_coverage_pct": float(df["mask_fraction"].to_numpy(np.float64)[kept].mean() * 100)
                if "mask_fraction" in df and kept.any()
                else np.nan,
            }
        )
    return pd.DataFrame.from_records(records)


def table1_sets(layer_sets: Sequence[str]) -> list[str]:
    """Table 1's columns: the single stages, shallowest first."""
    return sorted((s for s in layer_sets if "+" not in s), key=int)


def table2_sets(layer_sets: Sequence[str]) -> list[str]:
    """Table 2's columns (paper §3.3): the deepest stage alone, then each aggregation set."""
    singles = [s for s in layer_sets if "+" not in s]
    deepest = [max(singles, key=int)] if singles else []
    return deepest + [s for s in layer_sets if "+" in s]


def miou_table(long, layer_sets: Sequence[str], model: str = "", order: Sequence[str] | None = None):
    """Table 1 or 2 in long ("tidy") form: the rows of ``long`` whose layer set is in ``layer_sets``,
    methods first (in ``order``), reference rows after them, with the model and the layer-set order."""
    import pandas as pd

    df = long[long["layer_set"].isin(list(layer_sets))].copy()
    if df.empty:
        return df
    methods = list(dict.fromkeys(order or [])) + [
        m for m in dict.fromkeys(df["method"]) if m not in (order or [])
    ]
    df["_m"] = df["method"].map({m: i for i, m in enumerate(methods)})
    df["_s"] = df["layer_set"].map({s: i for i, s in enumerate(layer_sets)})
    df = df.sort_values(["is_reference", "_m", "_s"]).drop(columns=["_m", "_s"])
    df.insert(1, "model", model)
    return pd.DataFrame(df.reset_index(drop=True))


def paper_view(table, value: str = "miou_pct", *, with_ci: bool = True):
    """A long mIoU table pivoted like the paper prints it: one row per method, one column per layer
    set (``layer_4+3``), ``value`` (with its CI as ``m [lo, hi]`` text when ``with_ci``)."""
    index = [c for c in ("method", "dropout") if c in table]
    sets = list(dict.fromkeys(table["layer_set"]))
    cell = table[value]
    if with_ci and "ci_lo_pct" in table:
        cell = table.apply(
            lambda r: (
                f"{r[value]:.1f} [{r['ci_lo_pct']:.1f}, {r['ci_hi_pct']:.1f}]"
                if np.isfinite(r[value])
                else "n/a"
            ),
            axis=1,
        )
    wide = table.assign(_cell=cell).pivot(index=index, columns="layer_set", values="_cell")
    wide = wide.reindex(
        columns=sets,
        index=list(dict.fromkeys(map(tuple, table[index].to_numpy())))
        if len(index) > 1
        else list(dict.fromkeys(table[index[0]])),
    )
    wide.columns = [f"layer_{s}" for s in sets]
    out = wide.reset_index()
    frames = table.groupby(index, sort=False)["n_frames"].max()
    out["n_frames"] = [frames.get(tuple(r) if len(index) > 1 else r[0], 0) for r in out[index].to_numpy()]
    return out


def axiom_table(axioms, layers: Sequence[str] | None = None):
    """The paper's Table 4: rows (method, axiom), one column per layer plus the average (lower is better).

    ``axioms`` holds per-frame or already averaged rows ``method, layer, conservation, sensitivity``;
    ``layers`` fixes the column order (default: layer1, layer2, ... as found). Columns ``layer_1`` ...
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
    wide.columns = [f"layer_{str(c).removeprefix('layer')}" for c in layers]
    wide["average"] = wide.mean(axis=1)
    frames = axioms.groupby(["method"])["frame"].size() // max(len(layers), 1) if "frame" in axioms else None
    out = pd.DataFrame(wide.reset_index())
    if frames is not None:
        out["n_frames"] = out["method"].map(frames).fillna(0).astype("int64")
    return out


def accuracy_tables(rows):
    """Frame-level classification accuracy per class and per patient, from one row per frame."""
    per_class = (
        rows.groupby("label", sort=True)["correct"].agg(n_frames="size", n_correct="sum").reset_index()
    )
    per_class["accuracy_pct"] = per_class["n_correct"] / per_class["n_frames"] * 100
    per_patient = (
        rows.groupby(["patient", "label"], sort=True)["correct"]
        .agg(n_frames="size", n_correct="sum")
        .reset_index()
    )
    per_patient["accuracy_pct"] = per_patient["n_correct"] / per_patient["n_frames"] * 100
    return per_class, per_patient


def agreement_summary(agreement):
    """Mean mask IoU (%) and rank correlation of each method with XRelevanceCAM per layer set."""
    if agreement.empty:
        return agreement.assign(mask_iou_pct=[], rank_corr_mean=[], n_frames=[])
    return (
        agreement.groupby(["method", "layer_set", "against"], sort=False)
        .agg(
            mask_iou_pct=("mask_iou", lambda s: float(np.nanmean(s)) * 100 if s.notna().any() else np.nan),
            rank_corr_mean=("rank_corr", lambda s: float(np.nanmean(s)) if s.notna().any() else np.nan),
            n_frames=("frame", "size"),
        )
        .reset_index()
    )


def _write_table(df, path: Path, metadata: Mapping[str, Any]) -> Path:
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), _METADATA_KEY: json.dumps(metadata, default=str).encode()}
    )
    pq.write_table(table, path)
    return path


def summarise(root: str | Path) -> dict[str, Path]:
    """Write the dataset-wide tables under ``RESULTS/summary/`` from the metrics dataset.

    ``table1_layer_miou`` (per-stage mIoU, the paper's Table 1), ``table2_layerset_miou`` (Table 2),
    ``miou`` (every method/reference x layer set), ``table4_axioms`` (when ``RESULTS/axioms.parquet``
    exists), ``accuracy_per_class``, ``accuracy_per_patient``, ``agreement_summary``.
    """
    root = Path(root)
    metadata = _dataset_metadata(root)
    run = metadata.get("run_settings", {})
    layer_sets = list(metadata.get("reduce_settings", {}).get("layer_sets", []))
    methods = list(run.get("methods", []))
    model = str(run.get("model", ""))
    tmp = root / f".{SUMMARY_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    columns = [
        "method",
        "layer_set",
        "patient",
        "iou",
        "correct",
        "has_gt_mask",
        "gt_empty",
        "gt_area",
        "gt_fraction",
        "mask_area",
        "mask_fraction",
        "is_reference",
    ]
    # annotated frames only: the mIoU never reads the others (counts of misclassified frames stay exact)
    scored = read_metrics(root, columns=columns, has_gt_mask=True)
    long = miou_long(scored)
    frames: dict[str, Any] = {"miou": long}
    if not long.empty:
        if table1_sets(layer_sets):
            frames["table1_layer_miou"] = miou_table(long, table1_sets(layer_sets), model, methods)
        if table2_sets(layer_sets):
            frames["table2_layerset_miou"] = miou_table(long, table2_sets(layer_sets), model, methods)
    axioms = read_axioms(root)
    if axioms is not None:
        frames["table4_axioms"] = axiom_table(axioms)
    if methods and layer_sets:
        one = read_metrics(
            root, columns=["label", "patient", "correct"], method=methods[0], layer_set=layer_sets[0]
        )
        frames["accuracy_per_class"], frames["accuracy_per_patient"] = accuracy_tables(one)
    if (root / AGREEMENT_DIR).exists():
        frames["agreement_summary"] = agreement_summary(read_agreement(root))
    for name, df in frames.items():
        _write_table(df, tmp / f"{name}.parquet", {**metadata, "table": name})
    for name in EVALUATE_TABLES:  # evaluate's tables survive a rerun of reduce
        kept = root / SUMMARY_DIR / f"{name}.parquet"
        if kept.exists():
            shutil.copy2(kept, tmp / kept.name)
    _replace(tmp, root / SUMMARY_DIR)
    return {name: root / SUMMARY_DIR / f"{name}.parquet" for name in frames}
