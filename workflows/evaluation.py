"""The engine of ``xrcam evaluate``: explain an archive in one process and score the maps.

Single process, no Ray: evaluation runs on a sample of an archive (``max_frames`` annotated frames for
mIoU, ``sample_frames`` frames for the axiom metrics and the sanity check), so it is a quick, local
companion to ``xrcam run`` + ``xrcam reduce``. Everything it computes comes from
:mod:`xrcam.postprocess` and :mod:`xrcam.metrics`; this module only picks frames, batches them and
shapes the tables like the paper's (Tables 1–4 and the cascading randomisation).

Example::

    run = RunSettings.resolve(archive="archive/", out="eval/", checkpoint="ckpt/model.pt")
    tables = evaluate(run, EvalOptions(axioms=True, sanity=True, max_frames=200))
    write_tables(tables, "eval/")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workflows.tables import axiom_table
from workflows.settings import RunSettings
from xrcam.errors import XrcamConfigError

__all__ = ["EvalOptions", "evaluate", "write_tables", "TABLE_ORDER"]

log = logging.getLogger(__name__)

#: Tables in the order they are printed; absent ones were not asked for (or had no frames).
TABLE_ORDER = (
    "table1_layer_miou",
    "table2_layerset_miou",
    "table3_dropout_miou",
    "table4_axioms",
    "sanity",
    "miou",
    "iou",
    "axioms",
)


@dataclass(frozen=True)
class EvalOptions:
    """What to evaluate; the model, archive and preprocessing come from :class:`RunSettings`."""

    layer_sets: tuple[str, ...] = ("4", "4+3", "4+3+2", "4+3+2+1")
    threshold: str = "mean+std"  # "mean+std", "fraction:<f>" or "otsu"
    relu: bool | None = None  # None: each method family's default (xrcam.postprocess.default_relu)
    axioms: bool = False
    sanity: bool = False
    mc_samples: int = 0  # > 1: also mIoU with dropout active, maps averaged over this many passes
    max_frames: int | None = None  # annotated frames scored for mIoU (evenly spaced); None: all
    sample_frames: int = 8  # frames for the axiom metrics and the sanity check
    chunk_size: int = 64  # channel ablations per forward pass of the axiom metrics
    seed: int = 0  # seeds the sanity check's re-initialisation

    def __post_init__(self) -> None:
        from xrcam.postprocess import format_layer_set

        object.__setattr__(self, "layer_sets", tuple(format_layer_set(s) for s in self.layer_sets))
        _parse_threshold(self.threshold)
        for name in ("sample_frames", "chunk_size"):
            if getattr(self, name) < 1:
                raise XrcamConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mc_samples < 0 or self.mc_samples == 1:
            raise XrcamConfigError(f"mc_samples must be 0 (off) or at least 2, got {self.mc_samples}")
        if self.max_frames is not None and self.max_frames < 1:
            raise XrcamConfigError(f"max_frames must be a positive integer, got {self.max_frames}")


def _parse_threshold(text: str) -> tuple[str, float]:
    """Same spelling as ``xrcam reduce --threshold``: ``mean+std``, ``fraction:0.5``, ``otsu``."""
    from workflows.reduce import parse_threshold

    return parse_threshold(text)


@dataclass
class _Frames:
    """The frames to read from one video and why."""

    entry: Any
    scored: list[int]  # annotated frames scored for mIoU
    sampled: list[int]  # frames for axioms / sanity


def _evenly(items: Sequence, limit: int | None) -> list:
    if limit is None or len(items) <= limit:
        return list(items)
    picks = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


def _select_entries(entries: list, run: RunSettings) -> list:
    """Videos of ``run.split`` (the checkpoint's own split when its sidecar records one)."""
    if run.split is None:
        return list(entries)
    videos = None
    if run.checkpoint:
        from xrcam.models import read_checkpoint_sidecar

        sidecar = read_checkpoint_sidecar(run.checkpoint) or {}
        videos = (sidecar.get("split") or {}).get("videos", {}).get(run.split)
    if videos is not None:
        wanted = set(videos)
        return [e for e in entries if e.video_id in wanted]
    from xrcam.archive import split_patients

    assignment = split_patients(entries, seed=0)
    return [e for e in entries if assignment.get(e.patient) == run.split]


def _plan(entries: list, run: RunSettings, options: EvalOptions) -> list[_Frames]:
    """Pick the annotated frames to score and the frames to sample, deterministically."""
    from xrcam.archive import mask_files
    from xrcam.io.readers import open_video

    annotated: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    for v, entry in enumerate(entries):
        with open_video(entry.path) as reader:
            indices = range(0, reader.num_frames, run.frame_step)
        kept.extend((v, i) for i in indices)
        if entry.mask_path is not None:
            marked = set(mask_files(entry.mask_path))
            annotated.extend((v, i) for i in indices if i in marked)
    scored = _evenly(annotated, options.max_frames)
    sampled = _evenly(kept, options.sample_frames) if (options.axioms or options.sanity) else []
    plans = [_Frames(entry, [], []) for entry in entries]
    for v, i in scored:
        plans[v].scored.append(i)
    for v, i in sampled:
        plans[v].sampled.append(i)
    return [p for p in plans if p.scored or p.sampled]


def _read(plan: _Frames, run: RunSettings, batch_size: int) -> Iterator[tuple[list[int], Any, np.ndarray]]:
    """Yield ``(indices, images, gt_masks)`` batches of the planned frames (empty masks where none)."""
    from xrcam.archive import load_masks
    from xrcam.io.readers import open_video
    from xrcam.preprocess import Preprocessor

    wanted = set(plan.scored) | set(plan.sampled)
    masks = load_masks(plan.entry) if plan.scored else {}
    with open_video(plan.entry.path) as reader:
        pre = Preprocessor.for_video(reader, run.preprocess_config())
        batch: list[tuple[int, np.ndarray]] = []
        for index, frame in reader.read(start=0, stop=max(wanted) + 1, step=run.frame_step):
            if index in wanted:
                batch.append((index, frame))
            if len(batch) == batch_size:
                yield _batch(pre, batch, masks)
                batch = []
        if batch:
            yield _batch(pre, batch, masks)


def _batch(pre, batch: list[tuple[int, np.ndarray]], masks: dict[int, np.ndarray]):
    indices = [i for i, _ in batch]
    images = pre(np.stack([f for _, f in batch]))
    gt = np.stack(
        [
            pre.crop_mask(masks[i], frame=i) if i in masks else np.zeros(images.shape[-2:], bool)
            for i in indices
        ]
    )
    return indices, images, gt


def evaluate(
    run: RunSettings, options: EvalOptions, echo: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Evaluate ``run``'s model on ``run.archive``; returns pandas DataFrames by table name."""
    import pandas as pd
    import torch

    import xrcam
    from xrcam.archive import discover_archive
    from xrcam.postprocess import parse_layer_set

    device = torch.device(run.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    archive = discover_archive(run.archive)
    for problem in archive.problems:
        echo(f"skipped: {problem}")
    entries = _select_entries(archive.entries, run)
    if not entries:
        raise XrcamConfigError(f"{run.archive}: no videos to evaluate (split={run.split or 'all'})")
    classes = list(run.classes) if run.classes else sorted({e.label for e in archive.entries})
    methods = list(run.methods or xrcam.list_methods())
    sets = list(dict.fromkeys([s.removeprefix("layer") for s in run.layers] + list(options.layer_sets)))
    layers = sorted({layer for s in sets for layer in parse_layer_set(s)}, key=lambda n: int(n[5:]))
    model = xrcam.load_model(
        run.model, num_classes=len(classes), checkpoint=run.checkpoint, dropout=run.dropout
    )
    model = model.to(device).eval()
    if options.mc_samples and not any(isinstance(m, torch.nn.Dropout) for m in model.modules()):
        raise XrcamConfigError(
            f"Monte-Carlo evaluation needs the dropout variant of {run.model}: "
            "pass --dropout 0.1 or a checkpoint trained with --dropout"
        )
    plans = _plan(entries, run, options)
    echo(
        f"{len(entries)} videos; {sum(len(p.scored) for p in plans)} annotated frames scored, "
        f"{sum(len(p.sampled) for p in plans)} sampled; methods {', '.join(methods)}; device {device}"
    )
    kwargs = {"methods": methods, "layers": tuple(layers), "rules": run.rules, "clrp": run.clrp}
    explainers = {"off": xrcam.create_explainer(model, **kwargs)}
    if options.mc_samples:
        explainers["on"] = xrcam.create_explainer(model, mc_samples=options.mc_samples, **kwargs)
    rule, fraction = _parse_threshold(options.threshold)
    scorer = _Scorer(classes, methods, sets, rule, fraction, options.relu)
    rows: list[dict[str, Any]] = []
    samples: list[tuple[Any, int, Any, int]] = []  # (entry, frame, image, label index)
    for plan in plans:
        label_index = classes.index(plan.entry.label) if plan.entry.label in classes else -1
        for indices, images, gt in _read(plan, run, run.batch_size):
            for i, index in enumerate(indices):
                if index in plan.sampled:
                    samples.append((plan.entry, index, images[i], label_index))
            scored = [i for i, index in enumerate(indices) if index in plan.scored]
            if not scored:
                continue
            x = images[scored].to(device)
            truth = torch.from_numpy(gt[scored]).to(device)
            for dropout, explainer in explainers.items():
                rows.extend(
                    scorer(
                        explainer(x), truth, plan.entry, [indices[i] for i in scored], label_index, dropout
                    )
                )
    tables: dict[str, Any] = {}
    if rows:
        tables.update(_miou_tables(pd.DataFrame.from_records(rows), methods, sets, options, run.model))
    else:
        echo("no annotated frames in the selected videos: mIoU tables are left out")
    if samples and options.axioms:
        tables["axioms"] = _axioms(model, samples, methods, layers, run, options, device, echo)
        tables["table4_axioms"] = axiom_table(tables["axioms"], layers)
    if samples and options.sanity:
        tables["sanity"] = _sanity(model, samples, methods, layers, run, options, device, echo)
    return tables


@dataclass(frozen=True)
class _Scorer:
    """Turns one explained batch into per-frame rows (frame x method x layer set)."""

    classes: list[str]
    methods: list[str]
    sets: list[str]
    rule: str
    fraction: float
    relu: bool | None

    def __call__(self, exp, truth, entry, indices: list[int], label_index: int, dropout: str) -> list[dict]:
        from xrcam.postprocess import aggregate, iou, make_masks, normalize

        predicted = exp.logits.argmax(dim=1).cpu().tolist()
        size = tuple(truth.shape[-2:])
        gt_area = truth.flatten(1).sum(dim=1).cpu().tolist()
        rows = []
        for method in self.methods:
            norm = {
                layer: normalize(m, size, method=method, relu=self.relu)
                for layer, m in exp.maps[method].items()
            }
            for layer_set in self.sets:
                masks = make_masks(aggregate(norm, layer_set), self.rule, fraction=self.fraction)
                scores = iou(masks, truth).cpu().tolist()
                area = masks.flatten(1).sum(dim=1).cpu().tolist()
                for i, index in enumerate(indices):
                    rows.append(
                        {
                            "video_id": entry.video_id,
                            "patient": entry.patient,
                            "label": entry.label,
                            "frame": int(index),
                            "dropout": dropout,
                            "method": method,
                            "layer_set": layer_set,
                            "prediction": self.classes[predicted[i]]
                            if predicted[i] < len(self.classes)
                            else "",
                            "correct": predicted[i] == label_index,
                            "has_gt_mask": True,
                            "gt_empty": gt_area[i] == 0,
                            "gt_area": int(gt_area[i]),
                            "mask_area": int(area[i]),
                            "mask_fraction": area[i] / float(np.prod(size)),
                            "iou": scores[i],
                        }
                    )
        return rows


def _miou_tables(iou, methods, sets, options: EvalOptions, model: str) -> dict[str, Any]:
    import pandas as pd

    from xrcam.metrics import mean_iou

    records = []
    for (dropout, method, layer_set), rows in iou.groupby(["dropout", "method", "layer_set"], sort=False):
        score = mean_iou(
            rows["iou"].to_numpy(np.float64),
            correct=rows["correct"].to_numpy(bool),
            has_gt=rows["has_gt_mask"].to_numpy(bool),
            gt_empty=rows["gt_empty"].to_numpy(bool),
        )
        records.append({"dropout": dropout, "method": method, "layer_set": layer_set, **asdict(score)})
    long = pd.DataFrame.from_records(records)
    off = long[long["dropout"] == "off"]
    singles = sorted((s for s in sets if "+" not in s), key=int)
    tables = {"iou": iou, "miou": long}
    if singles:
        tables["table1_layer_miou"] = _wide(off, methods, singles, model, average=True)
    aggregated = [s for s in options.layer_sets]
    if aggregated:
        tables["table2_layerset_miou"] = _wide(off, methods, aggregated, model, average=False)
    if options.mc_samples:
        columns = singles + [s for s in options.layer_sets if "+" in s][-1:]
        parts = []
        for dropout in ("on", "off"):
            wide = _wide(long[long["dropout"] == dropout], methods, columns, model, average=False)
            wide.insert(2, "dropout", dropout)
            parts.append(wide)
        both = pd.concat(parts, ignore_index=True)
        order = {m: i for i, m in enumerate(methods)}
        tables["table3_dropout_miou"] = both.sort_values(
            ["method", "dropout"],
            key=lambda c: c.map(order) if c.name == "method" else c.map({"on": 0, "off": 1}),
        ).reset_index(drop=True)
    return tables


def _wide(long, methods, layer_sets, model: str, *, average: bool):
    """One row per method, one column per layer set, mIoU in percent (as the paper prints it)."""
    wide = long.pivot(index="method", columns="layer_set", values="miou").reindex(
        index=methods, columns=layer_sets
    )
    wide = wide * 100.0
    wide.columns = [f"layer {s}" for s in layer_sets]
    if average:
        wide["average"] = wide.mean(axis=1)
    frames = long[long["layer_set"].isin(layer_sets)].groupby("method")["frames"].max()
    out = wide.reset_index()
    out.insert(1, "model", model)
    out["frames"] = out["method"].map(frames).fillna(0).astype("int64")
    return out


def _groups(samples) -> Iterator[list]:
    """Sampled frames grouped by image size (videos may have differently sized crops)."""
    by_shape: dict[tuple[int, ...], list] = {}
    for sample in samples:
        by_shape.setdefault(tuple(sample[2].shape), []).append(sample)
    yield from by_shape.values()


def _axioms(model, samples, methods, layers, run, options, device, echo):
    """Per-frame conservation and sensitivity of every method at every layer."""
    import pandas as pd
    import torch

    from xrcam.metrics import axiom_metrics

    echo(f"axiom metrics on {len(samples)} frames ({len(layers)} layers, chunks of {options.chunk_size})")
    records = []
    for group in _groups(samples):
        images = torch.stack([s[2] for s in group]).to(device)
        result = axiom_metrics(
            model, images, methods=methods, layers=layers, rules=run.rules, chunk_size=options.chunk_size
        )
        for method in methods:
            for layer in layers:
                r = result[method][layer]
                for i, (entry, index, _img, _label) in enumerate(group):
                    records.append(
                        {
                            "video_id": entry.video_id,
                            "frame": int(index),
                            "method": method,
                            "layer": layer,
                            "conservation": float(r.conservation[i]),
                            "sensitivity": float(r.sensitivity[i]),
                        }
                    )
    return pd.DataFrame.from_records(records)


def _sanity(model, samples, methods, layers, run, options, device, echo):
    """Cascading randomisation records averaged over the sampled frames (frame-weighted over size groups)."""
    import pandas as pd
    import torch

    from xrcam.metrics import cascading_randomization

    echo(f"sanity check on {len(samples)} frames: randomising layer4 down to layer1")
    parts = []
    for group in _groups(samples):
        images = torch.stack([s[2] for s in group]).to(device)
        records = cascading_randomization(
            model,
            images,
            methods=methods,
            layers=layers,
            seed=options.seed,
            relu=options.relu,
            rules=run.rules,
            clrp=run.clrp,
        )
        parts.append(pd.DataFrame.from_records(records))
    df = pd.concat(parts, ignore_index=True)
    keys = ["step", "randomized", "method", "layer"]
    df["_spearman"] = (df["spearman"] * df["spearman_frames"]).fillna(0.0)
    df["_ssim"] = df["ssim"] * df["frames"]
    out = (
        df.groupby(keys, sort=False)[["_spearman", "_ssim", "frames", "spearman_frames"]].sum().reset_index()
    )
    out["spearman"] = out["_spearman"] / out["spearman_frames"].where(out["spearman_frames"] > 0)
    out["ssim"] = out["_ssim"] / out["frames"]
    return out[keys + ["spearman", "ssim", "frames", "spearman_frames"]]


def write_tables(
    tables: dict[str, Any], out: str | Path, settings: dict[str, Any] | None = None
) -> list[Path]:
    """Write every table as Parquet and CSV into ``out`` (plus ``evaluate.json`` with the settings).

    ``axioms.parquet`` (per frame: method, layer, conservation, sensitivity) is what ``xrcam reduce``
    reads to add Table 4 when ``out`` is a results folder.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        for suffix, write in (
            (".parquet", lambda p, d=df: d.to_parquet(p, index=False)),
            (".csv", lambda p, d=df: d.to_csv(p, index=False)),
        ):
            path = out / f"{name}{suffix}"
            write(path)
            written.append(path)
    if settings is not None:
        path = out / "evaluate.json"
        path.write_text(json.dumps(settings, indent=2, default=str) + "\n")
        written.append(path)
    return written
