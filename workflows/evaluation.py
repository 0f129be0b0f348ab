"""The engine of ``xrcam evaluate``: explain an archive in one process and score the maps.

Single process, no Ray: evaluation runs on a sample of an archive (``max_frames`` annotated frames for
mIoU, ``sample_frames`` frames for the axiom metrics and the sanity check), so it is a quick, local
companion to ``xrcam run`` + ``xrcam reduce``. Frames come from :func:`xrcam.frames.read_batches`,
scores from :func:`xrcam.scoring.score_batch` (with the same reference rows and sign check as
``xrcam reduce``) and the tables from :mod:`workflows.tables` (the same Table 1/2 definitions, with
95 % bootstrap CIs over patients); this module only picks frames, batches them and adds what needs
the model (Table 3's dropout passes, Table 4's axioms, the cascading randomisation).

Example::

    run = RunSettings.resolve(archive="archive/", out="eval/", checkpoint="ckpt/model.pt")
    tables = evaluate(run, EvalOptions(axioms=True, sanity=True, max_frames=200))
    write_tables(tables, "eval/")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workflows import tables as tables_lib
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
    relu: bool | None = None  # None: each method family's default (xrcam.scoring.default_relu)
    axioms: bool = False
    sanity: bool = False
    mc_samples: int = 0  # > 1: also mIoU with dropout active, maps averaged over this many passes
    max_frames: int | None = None  # annotated frames scored for mIoU (evenly spaced); None: all
    sample_frames: int = 8  # frames for the axiom metrics and the sanity check
    chunk_size: int = 64  # channel ablations per forward pass of the axiom metrics
    seed: int = 0  # seeds the sanity check's re-initialisation and the random reference
    references: tuple[str, ...] = ("random", "centre", "oracle", "intensity")  # reference rows, as reduce

    def __post_init__(self) -> None:
        from xrcam.references import REFERENCES
        from xrcam.scoring import format_layer_set, parse_threshold

        object.__setattr__(self, "layer_sets", tuple(format_layer_set(s) for s in self.layer_sets))
        unknown = [r for r in self.references if r not in REFERENCES]
        if unknown:
            raise XrcamConfigError(f"unknown reference rows {unknown}; choose from {list(REFERENCES)}")
        parse_threshold(self.threshold)  # the spelling of `xrcam reduce --threshold`
        for name in ("sample_frames", "chunk_size"):
            if getattr(self, name) < 1:
                raise XrcamConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.mc_samples < 0 or self.mc_samples == 1:
            raise XrcamConfigError(f"mc_samples must be 0 (off) or at least 2, got {self.mc_samples}")
        if self.max_frames is not None and self.max_frames < 1:
            raise XrcamConfigError(f"max_frames must be a positive integer, got {self.max_frames}")


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


def _read(plan: _Frames, run: RunSettings, batch_size: int):
    """Batches (:class:`xrcam.frames.FrameBatch`) of the planned frames, read with the one frame reader."""
    from xrcam.frames import read_batches

    step = run.frame_step
    positions = sorted({i // step for i in set(plan.scored) | set(plan.sampled)})
    yield from read_batches(
        plan.entry,
        run.preprocess_config(),
        positions=positions,
        batch_size=batch_size,
        masks=bool(plan.scored),
    )


def evaluate(
    run: RunSettings, options: EvalOptions, echo: Callable[[str], None] = log.info
) -> dict[str, Any]:
    """Evaluate ``run``'s model on ``run.archive``; returns pandas DataFrames by table name."""
    import pandas as pd
    import torch

    import xrcam
    from xrcam.archive import discover_archive
    from xrcam.scoring import parse_layer_set

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
        run.model,
        num_classes=len(classes),
        checkpoint=run.checkpoint,
        dropout=run.dropout,
        seed=None if run.checkpoint else run.random_init,  # the weights `xrcam run --random-init` explains
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
    scorer = _Scorer(classes, methods, sets, options)
    rows: list[dict[str, Any]] = []
    samples: list[tuple[Any, int, Any, int]] = []  # (entry, frame, image, label index)
    for plan in plans:
        label_index = classes.index(plan.entry.label) if plan.entry.label in classes else -1
        for batch in _read(plan, run, run.batch_size):
            indices = batch.indices
            for i, index in enumerate(indices):
                if index in plan.sampled:
                    samples.append((plan.entry, index, batch.x[i], label_index))
            scored = [i for i, index in enumerate(indices) if index in plan.scored]
            if not scored:
                continue
            x = batch.x[scored].to(device)
            truth = torch.from_numpy(batch.gt[scored]).to(device)
            grey = batch.grey[scored].to(device)
            for dropout, explainer in explainers.items():
                rows.extend(
                    scorer(
                        explainer(x),
                        truth,
                        grey,
                        plan.entry,
                        [indices[i] for i in scored],
                        label_index,
                        dropout,
                    )
                )
    tables: dict[str, Any] = {}
    if rows:
        tables.update(_miou_tables(pd.DataFrame.from_records(rows), methods, sets, options, run.model))
    else:
        echo("no annotated frames in the selected videos: mIoU tables are left out")
    if samples and options.axioms:
        tables["axioms"] = _axioms(model, samples, methods, layers, run, options, device, echo)
        tables["table4_axioms"] = tables_lib.axiom_table(tables["axioms"], layers)
    if samples and options.sanity:
        tables["sanity"] = _sanity(model, samples, methods, layers, run, options, device, echo)
    return tables


@dataclass(frozen=True)
class _Scorer:
    """Turns one explained batch into per-frame rows (frame x method/reference x layer set), scored by
    :func:`xrcam.scoring.score_batch` exactly as ``xrcam reduce`` scores them."""

    classes: list[str]
    methods: list[str]
    sets: list[str]
    options: EvalOptions

    def __call__(
        self, exp, truth, grey, entry, indices: list[int], label_index: int, dropout: str
    ) -> list[dict]:
        import zlib

        from xrcam.scoring import default_relu, score_batch

        predicted = exp.logits.argmax(dim=1).cpu().tolist()
        size = tuple(truth.shape[-2:])
        pixels = float(np.prod(size))
        gt_area = truth.flatten(1).sum(dim=1).cpu().tolist()
        relu = self.options.relu
        inverted = [m for m in self.methods if not (default_relu(m) if relu is None else relu)]
        references = self.options.references if dropout == "off" else ()
        seeds = [zlib.crc32(f"{self.options.seed}:{entry.video_id}:{int(i)}".encode()) for i in indices]
        scores = score_batch(
            {m: exp.maps[m] for m in self.methods},
            size=size,
            layer_sets=self.sets,
            gt=truth,
            threshold=self.options.threshold,
            relu=relu,
            inverted=inverted if dropout == "off" else (),
            references=references,
            frames=grey,
            frame_seeds=seeds,
        )
        ious, areas = scores.iou.cpu().numpy(), scores.mask_area.cpu().numpy()
        rows = []
        for m, name in enumerate(scores.methods):
            for k, layer_set in enumerate(self.sets):
                for i, index in enumerate(indices):
                    rows.append(
                        {
                            "video_id": entry.video_id,
                            "patient": entry.patient,
                            "label": entry.label,
                            "frame": int(index),
                            "dropout": dropout,
                            "method": name,
                            "layer_set": layer_set,
                            "is_reference": name not in self.methods,
                            "prediction": self.classes[predicted[i]]
                            if predicted[i] < len(self.classes)
                            else "",
                            "correct": predicted[i] == label_index,
                            "has_gt_mask": True,
                            "gt_empty": gt_area[i] == 0,
                            "gt_area": int(gt_area[i]),
                            "gt_fraction": gt_area[i] / pixels,
                            "mask_area": float(areas[k, m, i]),
                            "mask_fraction": float(areas[k, m, i]) / pixels,
                            "iou": float(ious[k, m, i]),
                        }
                    )
        return rows


def _miou_tables(iou, methods, sets, options: EvalOptions, model: str) -> dict[str, Any]:
    """Tables 1-3 with the definitions ``xrcam reduce`` uses (:mod:`workflows.tables`), CIs included."""
    import pandas as pd

    long = tables_lib.miou_long(iou, group_by=("dropout", "method", "layer_set"), seed=options.seed)
    off = long[long["dropout"] == "off"].drop(columns=["dropout"])
    out = {"iou": iou, "miou": long}
    if tables_lib.table1_sets(sets):
        out["table1_layer_miou"] = tables_lib.miou_table(off, tables_lib.table1_sets(sets), model, methods)
    if tables_lib.table2_sets(sets):
        out["table2_layerset_miou"] = tables_lib.miou_table(off, tables_lib.table2_sets(sets), model, methods)
    if options.mc_samples:
        columns = tables_lib.table1_sets(sets) + [s for s in sets if "+" in s][-1:]
        both = long[long["layer_set"].isin(columns) & long["method"].isin(methods)]
        order = {m: i for i, m in enumerate(methods)}
        both = both.sort_values(
            ["method", "dropout", "layer_set"],
            key=lambda c: (
                c.map(order)
                if c.name == "method"
                else (
                    c.map({"on": 0, "off": 1})
                    if c.name == "dropout"
                    else c.map({s: i for i, s in enumerate(columns)})
                )
            ),
        )
        both.insert(1, "model", model)
        out["table3_dropout_miou"] = pd.DataFrame(both.reset_index(drop=True))
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

    ``axioms.parquet`` (per frame: :data:`workflows.tables.AXIOM_COLUMNS`) is what ``xrcam reduce``
    reads to add Table 4 and the axiom columns when ``out`` is a results folder. The tables only
    evaluate makes (:data:`workflows.tables.EVALUATE_TABLES`: Table 3) go where every summary table
    goes, ``out/summary/``, so ``workflows.results.open(out).table("table3")`` finds them.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        if name in tables_lib.EVALUATE_TABLES:
            path = tables_lib.write_evaluate_table(out, name, df, {"evaluate_settings": settings or {}})
            df.to_csv(path.with_suffix(".csv"), index=False)
            written += [path, path.with_suffix(".csv")]
            continue
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
