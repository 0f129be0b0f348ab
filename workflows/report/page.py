"""``build_report``: one self-contained HTML page of a reduced results folder.

Sections, in reading order: what was run (archive, model) and the headline numbers; the paper's
Tables 1 and 2 (and 3, 4 where they were computed) with 95 % confidence intervals and the reference
rows, each beside its chart; sample frames per class (best / typical / worst); the frames where
XRelevanceCAM and the gradient family disagree most; the classification verdict per patient and
per video, each video linking to its timeline and overlay strip; the settings. No JavaScript, no
external file: styles are inline and pictures are embedded WebP/PNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from workflows.report import figures
from workflows.report.options import ReportOptions
from workflows.report.sections import (
    PRIMARY,
    cells_from_long,
    esc,
    focus_set,
    frame_numbers,
    gt_of,
    is_reference,
    label,
    layer_title,
    miou_cells,
    miou_table,
    ordered_rows,
    pct,
    pick_samples,
    plain_table,
    probabilities,
    short_label,
    strip_positions,
    verdict_tables,
    verdicts,
)
from workflows.results import open as open_results
from xrcam.errors import XrcamConfigError, XrcamError

__all__ = ["ReportOptions", "build_report"]

log = logging.getLogger(__name__)


_CSS = """
body { font: 16px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1180px; color: #1d1d1d; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; } .subtitle { color: #555; margin-top: 0; }
h2 { font-size: 1.35em; margin-top: 2.2em; border-bottom: 2px solid #d8dde6; padding-bottom: 0.15em; }
h3 { font-size: 1.1em; margin-top: 1.6em; }
nav { background: #f5f7fa; padding: 0.5em 1em; border-radius: 4px; } nav a { margin-right: 1.2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.93em; }
th, td { border: 1px solid #cfd5de; padding: 0.3em 0.65em; text-align: left; vertical-align: top; }
thead th { background: #eef2f7; } tbody th { font-weight: normal; }
td.num, td.best { text-align: right; } td.best { font-weight: bold; background: #e3f4e3; }
.ci { display: block; font-size: 0.8em; color: #666; font-weight: normal; white-space: nowrap; }
tr.ref th, tr.ref td { background: #f6f6f6; color: #555; font-style: italic; }
tr.refhead td { background: #fff; color: #555; font-size: 0.88em; text-align: left; border-top: 2px solid #999; }
.tag { font-style: normal; font-size: 0.75em; background: #777; color: #fff; border-radius: 3px; padding: 0 0.35em; }
tr.wrong td { color: #b00020; }
.note { color: #7a4a00; background: #fff6e5; padding: 0.45em 0.9em; border-left: 4px solid #e0a030; }
figure { margin: 1em 0 2em; } figcaption { font-size: 0.92em; color: #333; margin-top: 0.3em; max-width: 60em; }
figure.sample { border-top: 1px solid #e3e3e3; padding-top: 0.6em; } figure.sample figcaption { margin: 0 0 0.4em; }
img { max-width: 100%; height: auto; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dt { font-weight: bold; } dd { margin: 0; font-family: ui-monospace, monospace; font-size: 0.9em; word-break: break-all; }
section.video { border-top: 1px solid #e3e3e3; margin-top: 1.5em; }
.glance { font-size: 1.02em; }
"""


def _frames(res, key: str, positions: Sequence[int], size: int, notes: list[str]) -> np.ndarray:
    """The crops the run explained; mid-grey (and a note) when they cannot be reread."""
    try:
        return np.asarray(res.frames(key, positions), dtype=np.float32)
    except XrcamError as exc:
        note = f"Frames could not be reread ({exc}); maps are drawn on grey."
        if note not in notes:
            notes.append(note)
        return np.full((len(positions), size, size), 0.5, dtype=np.float32)


def _title(settings) -> tuple[str, str]:
    path = Path(str(settings.get("archive") or ""))
    archive = (
        f"{path.parent.name}/{path.name}" if path.suffix else path.name
    ) or "archive"  # a manifest: its folder too
    model = str(settings.get("model") or "model")
    checkpoint = settings.get("checkpoint")
    sub = f"model {model}" + (
        f", checkpoint {Path(str(checkpoint)).name}" if checkpoint else ", no checkpoint"
    )
    sha = settings.get("checkpoint_sha256")
    if sha:
        sub += f" (sha256 {str(sha)[:12]}…)"
    return f"xrcam report: {archive} · {model}", sub


def _layer_sets(metrics: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(Table 1 columns: single stages, shallow first; Table 2 columns: deepest stage, then its sets)."""
    sets = list(dict.fromkeys(metrics["layer_set"]))
    singles = sorted([s for s in sets if "+" not in s], key=lambda s: int(s) if s.isdigit() else s)
    multi = sorted([s for s in sets if "+" in s], key=lambda s: s.count("+"))
    table2 = ([multi[0].split("+")[0]] if multi and multi[0].split("+")[0] in singles else []) + multi
    return singles, table2


def _table(res, name: str):
    """A summary table of the results, or None where it was not computed."""
    try:
        return res.table(name)
    except XrcamError:
        return None


def _cells(res, name: str, metrics, columns, average: bool):
    """mIoU cells of Table 1/2 from the results' own table (with its CIs); the per-frame average over
    the layers (Table 1's last column) is bootstrapped here from the same per-frame rows."""
    table = _table(res, name)
    if table is None:
        return miou_cells(metrics, [])  # no cells: the table was not computed
    cells = cells_from_long(table[table["layer_set"].astype(str).isin(columns)])
    if average:
        extra = miou_cells(metrics, columns, average=True)
        extra = extra[extra.index.get_level_values(1) == "average"]
        cells = pd.concat([cells, extra])
    return cells


def _localisation(res, metrics, methods, singles, table2, notes) -> str:
    parts = [
        '<h2 id="localisation">Localisation: the paper\'s Tables 1 and 2</h2>'
        "<p>mIoU (%) of each method's saliency mask with the ground truth, over the annotated, correctly "
        "classified frames (paper §4.2). Under each value: its 95 % confidence interval by bootstrap over "
        "patients (the split unit). Best method per column in bold. Grey rows are references, not methods.</p>"
    ]
    cells = {}
    for name, columns, average, title, xlabel in (
        ("table1", singles, True, "Table 1: mIoU (%) per layer", "stage (1 = shallowest)"),
        ("table2", table2, False, "Table 2: mIoU (%) per layer set (aggregated maps)", "layer set"),
    ):
        if not columns:
            continue
        c = _cells(res, name, metrics, columns, average)
        cells[name] = c
        rows, refs = ordered_rows(c.index.get_level_values(0), methods)
        shown = (
            [*columns, "average"]
            if average and any((m, "average") in c.index for m in rows)
            else list(columns)
        )
        parts.append(f"<h3>{esc(title)}</h3>")
        parts.append(miou_table(c, rows, refs, shown))
        chart = figures.bar_chart(
            c,
            list(columns),
            rows,
            [r for r in refs if not r.startswith("inverted_")],
            title=title.split(": ", 1)[1] + ", 95 % CI over patients",
            xlabel=xlabel,
            labels={n: short_label(n) for n in [*rows, *refs]},
        )
        parts.append(
            f'<figure><img alt="{esc(title)} chart" src="{figures.data_uri(chart, "chart")}">'
            f"<figcaption>{esc(title)} as bars; whiskers: 95 % CI over patients; grey lines across each group: "
            "the reference rows (random and centre are chance, the oracle is the ceiling).</figcaption></figure>"
        )
    if cells and all(not (c["frames"] > 0).any() for c in cells.values()):
        notes.append(
            "No frame is both annotated and correctly classified, so every mIoU is empty; check the "
            "checkpoint (classification below) and that the archive has ground-truth masks."
        )
    table3 = _table(res, "table3")
    if table3 is not None:
        parts.append("<h3>Table 3: mIoU (%) with Monte-Carlo dropout on and off</h3>")
        parts.append(plain_table(table3, best="max", digits=2))
    return "".join(parts), cells


def _sample_section(res, metrics, methods, singles, focus, classes, options, notes) -> str:
    if options.frames <= 0:
        return ""
    primary = PRIMARY if PRIMARY in methods else methods[0]
    rows = metrics[(metrics["method"] == primary) & (metrics["layer_set"] == focus)].copy()
    if not len(rows):
        return '<h2 id="samples">Sample frames</h2><p>No frames to show.</p>'
    label_index = {c: i for i, c in enumerate(classes)}
    p_true = []
    probs_cache = {}
    for key, pos, lab in zip(rows["video_key"], rows["position"], rows["label"], strict=True):
        if key not in probs_cache:
            probs_cache[key] = probabilities(res.video(key))
        p_true.append(float(probs_cache[key][int(pos), label_index.get(lab, 0)]))
    rows["p_true"] = p_true
    samples = pick_samples(rows, options.frames, classes)
    columns = [*singles, focus] if focus not in singles else list(singles)
    titles = [layer_title(c) for c in columns]
    parts = [
        '<h2 id="samples">Sample frames</h2>'
        f"<p>Per class, the best, a typical and the worst frame by {esc(label(primary))}'s IoU at "
        f"{esc(layer_title(focus))} (classes without ground truth: by the probability of the true class), "
        "from different patients where possible. Each row is a method, each column a layer or the aggregated "
        "layer set; the map (colour bar: normalised saliency, 0 = the map's minimum, 1 = its maximum) is "
        "blended over the frame. Cyan: ground-truth contour; white dashes: the method's mask; the number in "
        "a tile is that mask's IoU (%) with the ground truth.</p>"
    ]
    current = None
    for why, r in samples:
        if r["label"] != current:
            current = r["label"]
            parts.append(f"<h3>{esc(current)}</h3>")
        key, pos = r["video_key"], int(r["position"])
        ds = res.video(key)
        size = int(ds.sizes["y"])
        grey = _frames(res, key, [pos], size, notes)[0]
        gt = gt_of(res, key, [pos])[0]
        maps, masks, ious = {}, {}, {}
        here = metrics[(metrics["video_key"] == key) & (metrics["position"] == pos)]
        iou_of = {(m, s): v for m, s, v in zip(here["method"], here["layer_set"], here["iou"], strict=True)}
        for column in columns:
            column_maps, column_masks = res.maps_and_masks(key, [pos], column, methods)
            for m in column_maps:
                maps[m, column], masks[m, column] = column_maps[m][0], column_masks[m][0]
            for m in methods:
                ious[m, column] = iou_of.get((m, column), np.nan) if gt is not None else np.nan
        fig = figures.frame_grid(
            grey, gt, maps, masks, ious, methods, columns, titles, labels={m: label(m) for m in methods}
        )
        caption = (
            f"{why}. Video {r['video_id']} (patient {r['patient']}), frame {int(r['frame'])}: "
            f"true class {r['label']}, predicted {r['prediction']} with probability {float(r['probability']):.2f}"
            f" (P(true class) = {float(r['p_true']):.2f})."
        )
        parts.append(
            f'<figure class="sample" data-label="{esc(r["label"])}"><figcaption>{esc(caption)}</figcaption>'
            f'<img alt="{esc(caption)}" src="{figures.data_uri(fig)}"></figure>'
        )
    return "".join(parts)


def _gallery_section(res, methods, focus, options, notes, progress: bool) -> str:
    from tqdm import tqdm

    from xrcam.explain import list_methods

    gradient = [m for m in methods if m in list_methods("gradient")]
    shown = [PRIMARY, *gradient, *[m for m in methods if m != PRIMARY and m not in gradient]]
    head = '<h2 id="disagreement">Where the methods disagree</h2>'
    if options.gallery <= 0:
        return ""
    if PRIMARY not in methods or not gradient:
        return (
            head + f"<p>Needs {esc(label(PRIMARY))} and at least one gradient-family method in the run.</p>"
        )
    scores = []
    for key in tqdm(res.video_keys, desc="disagreement", unit="video", disable=not progress, leave=False):
        ds = res.video(key)
        frame_index = frame_numbers(ds)
        candidates = strip_positions(int(ds.sizes["frame"]), 64)  # long videos: 64 evenly spaced frames
        for start in range(0, len(candidates), 32):
            positions = candidates[start : start + 32]
            maps = res.maps(key, positions, focus, [PRIMARY, *gradient])
            family = np.mean([maps[m] for m in gradient], axis=0)
            delta = np.abs(maps[PRIMARY] - family).mean(axis=(1, 2))
            scores += [(float(d), key, p, int(frame_index[p])) for d, p in zip(delta, positions, strict=True)]
    scores.sort(key=lambda s: -s[0])
    chosen, seen = [], set()
    for s in scores:  # one frame per video first, then the next largest
        if s[1] not in seen and len(chosen) < options.gallery:
            chosen.append(s)
            seen.add(s[1])
    chosen += [s for s in scores if s not in chosen][: options.gallery - len(chosen)]
    items = []
    for delta, key, pos, frame in chosen:
        ds = res.video(key)
        grey = _frames(res, key, [pos], int(ds.sizes["y"]), notes)[0]
        maps = {m: a[0] for m, a in res.maps(key, [pos], focus, shown).items()}
        caption = f"{ds.attrs.get('video_id', key)}\nframe {frame}, Δ = {delta:.2f}"
        items.append((caption, grey, gt_of(res, key, [pos])[0], maps))
    if not items:
        return head + "<p>No frames.</p>"
    fig = figures.disagreement_gallery(items, shown, labels={m: label(m) for m in shown})
    text = (
        f"The {len(items)} frames where {label(PRIMARY)}'s map differs most from the mean map of the gradient "
        f"family ({', '.join(label(m) for m in gradient)}) at {layer_title(focus)}; Δ is the mean absolute "
        "difference of the normalised maps (0: identical, 1: opposite). Cyan: ground-truth contour."
    )
    return (
        head + f'<figure><img alt="method disagreement gallery" src="{figures.data_uri(fig)}">'
        f"<figcaption>{esc(text)}</figcaption></figure>"
    )


def _video_sections(res, metrics, items, methods, focus, cells, options, notes, progress: bool) -> str:
    from tqdm import tqdm

    from xrcam.explain import list_methods

    primary = PRIMARY if PRIMARY in methods else methods[0]
    gradient = [m for m in methods if m in list_methods("gradient")]
    best_gradient = None
    if gradient and cells is not None:
        values = {m: cells.loc[(m, focus), "miou"] for m in gradient if (m, focus) in cells.index}
        values = {m: v for m, v in values.items() if np.isfinite(v)}
        best_gradient = max(values, key=values.get) if values else gradient[0]
    shown_methods = [primary] + ([best_gradient] if best_gradient and best_gradient != primary else [])
    at_focus = metrics[metrics["layer_set"] == focus]
    parts = ['<h2 id="videos">Videos</h2>']
    if len(items) > options.videos:
        parts.append(
            f"<p>The first {options.videos} of {len(items)} videos (<code>--videos</code> shows more).</p>"
        )
    for v in tqdm(items[: options.videos], desc="videos", unit="video", disable=not progress, leave=False):
        ds = res.video(v.key)
        count = int(ds.sizes["frame"])
        frame_index = frame_numbers(ds)
        probs = probabilities(ds)
        truth = int(ds.attrs.get("label_index", 0))
        ious = {}
        annotated = bool(at_focus[at_focus["video_key"] == v.key]["has_gt_mask"].any())
        for m in shown_methods:
            part = at_focus[(at_focus["video_key"] == v.key) & (at_focus["method"] == m)]
            values = np.full(count, np.nan)
            ok = part[part["has_gt_mask"] & ~part["gt_empty"]]
            values[ok["position"].to_numpy(dtype=int)] = ok["iou"].to_numpy(dtype=float)
            ious[m] = values
        positions = strip_positions(count, options.strip)
        size = int(ds.sizes["y"])
        grey = _frames(res, v.key, positions, size, notes)
        maps = res.maps(v.key, positions, focus, [primary])[primary]
        gts = gt_of(res, v.key, positions)
        strip = [(int(frame_index[p]), grey[i], maps[i], gts[i]) for i, p in enumerate(positions)]
        fig = figures.video_figure(
            frame_index,
            probs[:, truth],
            v.label,
            ious,
            strip,
            iou_title=f"IoU per frame at {layer_title(focus)} (gaps: no ground truth)",
            labels={m: label(m) for m in shown_methods},
        )
        verdict = "right" if v.predicted == v.label else "WRONG"
        summary = (
            f"Patient {v.patient}; true class {v.label}; predicted {v.predicted} ({verdict}), mean probability "
            f"{v.probability:.2f}, {100 * v.agreement:.0f} % of {v.frames} frames agreeing; "
            + (
                f"mIoU of {label(primary)} at {layer_title(focus)}: {pct(v.miou)} %."
                if np.isfinite(v.miou)
                else "none of its annotated frames was classified correctly (no mIoU)."
                if annotated
                else "no ground truth in this video."
            )
        )
        caption = (
            "Top: the classifier's probability of the true class along the video (dashed: 0.5). "
            + ("Middle: IoU per frame. " if any(np.isfinite(x).any() for x in ious.values()) else "")
            + f"Bottom: {label(primary)}'s map ({layer_title(focus)}) on {len(strip)} evenly spaced frames, cyan: ground truth."
        )
        parts.append(
            f'<section class="video" id="{esc(v.anchor)}"><h3>{esc(v.video_id)}</h3><p>{esc(summary)}</p>'
            f'<figure><img alt="timeline of {esc(v.video_id)}" src="{figures.data_uri(fig)}">'
            f'<figcaption>{esc(caption)}</figcaption></figure><p><a href="#classification">back to the verdicts</a></p></section>'
        )
    return "".join(parts)


def _settings_section(res, layer_sets) -> str:
    s = res.settings
    rows = {
        "archive": s.get("archive"),
        "model": s.get("model"),
        "checkpoint": s.get("checkpoint"),
        "checkpoint sha256": s.get("checkpoint_sha256"),
        "classes": ", ".join(res.classes),
        "methods": ", ".join(s.get("methods") or []),
        "layers": ", ".join(s.get("layers") or []),
        "LRP rules / CLRP start": f"{s.get('rules')} / {s.get('clrp')}",
        "preprocessing": s.get("preprocessing"),
        "layer sets": ", ".join(layer_sets),
        "videos": len(res.video_keys),
    }
    items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in rows.items() if v not in (None, ""))
    return f'<h2 id="settings">Settings</h2><dl>{items}</dl>'


def build_report(
    results: str | Path,
    out: str | Path | None = None,
    *,
    options: ReportOptions | None = None,
    progress: bool = False,
) -> Path:
    """Write ``out`` (default ``RESULTS/report.html``) from a results folder that ``xrcam reduce`` has reduced."""
    options = options or ReportOptions()
    results = Path(results)
    out = Path(out) if out else results / "report.html"
    res = open_results(results)
    settings = res.settings
    methods = list(res.methods)
    classes = list(res.classes)
    metrics = res.metrics()
    if not len(metrics):
        raise XrcamConfigError(f"{results}: no video was reduced; see `xrcam reduce {results}`'s failures")
    notes: list[str] = []
    singles, table2 = _layer_sets(metrics)
    layer_sets = [*singles, *[s for s in table2 if s not in singles]]
    focus = focus_set(layer_sets)
    title, subtitle = _title(settings)

    localisation, cells = _localisation(res, metrics, methods, singles, table2, notes)
    primary = PRIMARY if PRIMARY in methods else (methods[0] if methods else PRIMARY)
    items = verdicts(res, metrics[(metrics["method"] == primary) & (metrics["layer_set"] == focus)], classes)
    for i, v in enumerate(items):
        v.shown = i < options.videos
    samples = _sample_section(res, metrics, methods, singles, focus, classes, options, notes)
    gallery = _gallery_section(res, methods, focus, options, notes, progress)
    videos = _video_sections(
        res, metrics, items, methods, focus, cells.get("table2"), options, notes, progress
    )

    per_frame = metrics[(metrics["method"] == primary) & (metrics["layer_set"] == focus)]
    accuracy = float(per_frame["correct"].mean()) if len(per_frame) else float("nan")
    right = sum(v.predicted == v.label for v in items)
    glance = [
        f"{len(res.video_keys)} videos of {per_frame['patient'].nunique()} patients, {len(per_frame)} frames explained "
        f"with {len(methods)} methods.",
        f"Frame accuracy {pct(accuracy)} %; {right} of {len(items)} video verdicts right.",
    ]
    t1 = cells.get("table1")
    if t1 is not None and singles:
        first = singles[0]
        bits = []
        for name in [primary, "random", "centre", "oracle"]:
            if (name, first) in t1.index and np.isfinite(t1.loc[(name, first), "miou"]):
                c = t1.loc[(name, first)]
                bits.append(f"{label(name)} {c['miou']:.1f} % [{c['lo']:.1f}, {c['hi']:.1f}]")
        if bits:
            glance.append(f"mIoU at {layer_title(first)} (95 % CI): " + "; ".join(bits) + ".")
        chance = [t1.loc[(r, first), "hi"] for r in ("random", "centre") if (r, first) in t1.index]
        if chance and (primary, first) in t1.index and np.isfinite(t1.loc[(primary, first), "lo"]):
            above = t1.loc[(primary, first), "lo"] > max(chance)
            glance.append(
                f"{label(primary)} at {layer_title(first)} is "
                + (
                    "above chance: its CI lies above the random and centre rows' CIs."
                    if above
                    else "not distinguishable from chance: its CI overlaps the random or centre row's."
                )
            )
        if not any(is_reference(n) for n in t1.index.get_level_values(0)):
            notes.append(
                "This results folder has no reference rows (random, centre, oracle): chance level is not shown."
            )

    classification = ['<h2 id="classification">Classification</h2>']
    per_class = _table(res, "accuracy_per_class")
    if per_class is not None:
        classification.append("<h3>Per class (frames)</h3>" + plain_table(per_class, digits=3))
    classification.append(verdict_tables(items, focus, classes))
    table4 = _table(res, "table4")
    axioms = (
        '<h2 id="axioms">Table 4: axiom metrics</h2><p>Conservation and sensitivity errors per layer '
        "(paper §4.8; lower is better, best per axiom in bold).</p>"
        + plain_table(table4, best="min", group="axiom")
        if table4 is not None
        else '<h2 id="axioms">Table 4: axiom metrics</h2><p class="note">Table 4 needs '
        "<code>xrcam evaluate --axioms --out RESULTS</code> before reducing.</p>"
    )
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in [
            ("localisation", "Tables 1–2"),
            ("samples", "Sample frames"),
            ("disagreement", "Disagreement"),
            ("classification", "Verdicts"),
            ("axioms", "Table 4"),
            ("videos", "Videos"),
            ("settings", "Settings"),
        ]
    )
    body = [
        f'<h1>{esc(title)}</h1><p class="subtitle">{esc(subtitle)}; results folder {esc(results.name)}</p>',
        "".join(f'<p class="note">{esc(n)}</p>' for n in notes),
        '<div class="glance"><p>' + "<br>".join(esc(g) for g in glance) + "</p></div>",
        f"<nav>{nav}</nav>",
        localisation,
        samples,
        gallery,
        "".join(classification),
        axioms,
        videos,
        _settings_section(res, layer_sets),
    ]
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out
