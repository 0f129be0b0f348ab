"""The report's sections: numbers from the results read API turned into HTML and figures.

Every function takes the opened results (``res``, the read API of TEAM interface 8) and returns
HTML. All text that comes from the data (video ids, patients, class names, methods) passes through
:func:`esc`; pictures are embedded ``data:`` URIs from :mod:`workflows.report.figures`.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from xrcam.explain import method_title
from xrcam.uncertainty import bootstrap_ci

PRIMARY = "xrelevancecam"
REFERENCES = ("oracle", "intensity", "centre", "random")  # ceiling first, chance last
INVERTED_PREFIX = "inverted_"
# display names of the reference rows; a method's comes from its registration (xrcam.explain.method_title)
NAMES = {
    "oracle": "oracle (GT pooled to the grid: ceiling)",
    "intensity": "inverted intensity (darkness)",
    "centre": "centre prior",
    "random": "random map (chance)",
}
SHORT = {
    "oracle": "oracle (ceiling)",
    "intensity": "inverted intensity",
    "centre": "centre prior",
    "random": "random (chance)",
}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def label(name: str) -> str:
    """Display name of a method (its registered title) or reference row; other names unchanged."""
    if name.startswith(INVERTED_PREFIX):
        return f"{label(name.removeprefix(INVERTED_PREFIX))} inverted (sign check)"
    return NAMES[name] if name in NAMES else method_title(name)


def short_label(name: str) -> str:
    """A name short enough for a chart legend."""
    return SHORT.get(name, label(name))


def is_reference(name: str) -> bool:
    return name in REFERENCES or name.startswith(INVERTED_PREFIX)


def layer_title(layer_set: str) -> str:
    return f"layer {layer_set}" if "+" not in layer_set else f"layers {layer_set}"


def pct(value: float, digits: int = 1) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.{digits}f}"


# ------------------------------------------------------------------------------------------ mIoU cells
def scored(metrics: pd.DataFrame) -> pd.DataFrame:
    """The rows an mIoU averages (paper §4.2): annotated, non-empty ground truth, correctly classified."""
    keep = metrics["has_gt_mask"] & ~metrics["gt_empty"] & metrics["correct"] & metrics["iou"].notna()
    return metrics[keep]


def miou_cells(metrics: pd.DataFrame, layer_sets: Sequence[str], *, average: bool = False) -> pd.DataFrame:
    """mIoU (%) with its 95 % bootstrap-over-patients CI per (row, layer set) [+ "average"].

    Index (method, column); columns miou, lo, hi (percent), frames, patients.
    """
    rows = []
    df = scored(metrics)
    df = df[df["layer_set"].isin(layer_sets)]
    for method, part in df.groupby("method", sort=False):
        for layer_set, cell in part.groupby("layer_set", sort=False):
            mean, lo, hi = bootstrap_ci(cell["iou"].to_numpy(), cell["patient"].to_numpy())
            rows.append(
                (method, layer_set, 100 * mean, 100 * lo, 100 * hi, len(cell), cell["patient"].nunique())
            )
        if average and part["layer_set"].nunique() == len(layer_sets):
            per_frame = part.groupby(["video_key", "position"]).agg(
                iou=("iou", "mean"), patient=("patient", "first"), n=("iou", "size")
            )
            per_frame = per_frame[per_frame["n"] == len(layer_sets)]
            mean, lo, hi = bootstrap_ci(per_frame["iou"].to_numpy(), per_frame["patient"].to_numpy())
            rows.append(
                (
                    method,
                    "average",
                    100 * mean,
                    100 * lo,
                    100 * hi,
                    len(per_frame),
                    per_frame["patient"].nunique(),
                )
            )
    cells = pd.DataFrame(rows, columns=["method", "column", "miou", "lo", "hi", "frames", "patients"])
    return cells.set_index(["method", "column"])


def cells_from_long(table: pd.DataFrame) -> pd.DataFrame:
    """The same cells from a long mIoU table of the results API (``miou_pct``, ``ci_lo_pct``, ...)."""
    cells = pd.DataFrame(
        {
            "method": table["method"].astype(str),
            "column": table["layer_set"].astype(str),
            "miou": table["miou_pct"].astype(float),
            "lo": table["ci_lo_pct"].astype(float),
            "hi": table["ci_hi_pct"].astype(float),
            "frames": table["n_frames"].astype(int),
            "patients": table["n_patients"].astype(int),
        }
    )
    return cells.set_index(["method", "column"])


def ordered_rows(names: Iterable[str], methods: Sequence[str]) -> tuple[list[str], list[str]]:
    """(methods in run order, reference rows: REFERENCES order, then the sign checks)."""
    names = list(dict.fromkeys(names))
    own = [m for m in methods if m in names] + [n for n in names if n not in methods and not is_reference(n)]
    refs = [r for r in REFERENCES if r in names] + sorted(n for n in names if n.startswith(INVERTED_PREFIX))
    return own, refs


def miou_table(cells: pd.DataFrame, rows: Sequence[str], refs: Sequence[str], columns: Sequence[str]) -> str:
    """A paper table: method rows (best per column marked), then the reference rows, each cell with its CI."""
    best = {}
    for column in columns:
        values = [cells.loc[(m, column), "miou"] for m in rows if (m, column) in cells.index]
        values = [v for v in values if np.isfinite(v)]
        best[column] = max(values) if values else None
    head = "".join(f"<th>{esc(layer_title(c) if c != 'average' else 'average')}</th>" for c in columns)
    out = [
        f'<table class="paper"><thead><tr><th>method</th>{head}<th>frames / patients</th></tr></thead><tbody>'
    ]

    def row(name: str, css: str) -> str:
        tds, count = [], ""
        for column in columns:
            if (name, column) not in cells.index:
                tds.append("<td>–</td>")
                continue
            cell = cells.loc[(name, column)]
            text = "–" if not np.isfinite(cell["miou"]) else f"{cell['miou']:.1f}"
            ci = (
                f'<span class="ci">[{cell["lo"]:.1f}, {cell["hi"]:.1f}]</span>'
                if np.isfinite(cell["lo"]) and np.isfinite(cell["hi"])
                else ""
            )
            mark = css != "ref" and best[column] is not None and np.isclose(cell["miou"], best[column])
            tds.append(f'<td class="best">{text}{ci}</td>' if mark else f'<td class="num">{text}{ci}</td>')
            if column != "average":
                count = f"{int(cell['frames'])} / {int(cell['patients'])}"
        tag = '<span class="tag">reference</span> ' if css == "ref" else ""
        return f'<tr class="{css}"><th scope="row">{tag}{esc(label(name))}</th>{"".join(tds)}<td class="num">{count}</td></tr>'

    out += [row(m, "method") for m in rows]
    if refs:
        out.append(
            f'<tr class="refhead"><td colspan="{len(columns) + 2}">reference rows (not methods): '
            "a method that does not beat random and centre has not localised anything; the oracle is the ceiling</td></tr>"
        )
        out += [row(r, "ref") for r in refs]
    out.append("</tbody></table>")
    return "".join(out)


def number(value: float, digits: int = 3) -> str:
    """Fixed point, or scientific where fixed point would hide the value (axiom errors span 1e-8..1e3)."""
    if value is None or not np.isfinite(value):
        return "–"
    if value != 0 and not 10**-digits <= abs(value) < 1e4:
        return f"{value:.2e}"
    return f"{value:.{digits}f}"


def header(column) -> str:
    """``n_frames`` -> "frames", ``accuracy_pct`` -> "accuracy (%)", ``layer_1`` -> "layer 1"."""
    text = str(column).removeprefix("n_")
    text = text[:-4] + " (%)" if text.endswith("_pct") else text
    return text.replace("_", " ")


def plain_table(
    df: pd.DataFrame, *, best: str | None = None, group: str | None = None, digits: int = 3
) -> str:
    """A DataFrame as an HTML table; with ``best`` ("min"/"max") the best numeric value per column
    (per ``group`` value, e.g. per axiom) is marked."""
    numeric = [c for c in df.columns if pd.api.types.is_float_dtype(df[c])]
    marked = {}
    if best:
        for c in numeric:
            values = df[c].astype(float)
            marked[c] = (
                values.groupby(df[group]).transform(best)
                if group
                else pd.Series(values.agg(best), index=df.index)
            )
    head = "".join(f"<th>{esc(header(c))}</th>" for c in df.columns)
    body = []
    for i, r in df.iterrows():
        tds = []
        for c in df.columns:
            v = r[c]
            if c in numeric:
                text = number(v, 1 if str(c).endswith("_pct") else digits)
                is_best = c in marked and np.isfinite(v) and np.isclose(v, marked[c].loc[i])
                tds.append(f'<td class="best">{text}</td>' if is_best else f'<td class="num">{text}</td>')
            elif c == "method":
                tds.append(f"<td>{esc(label(str(v)))}</td>")
            else:
                tds.append(f"<td>{esc(v)}</td>")
        body.append(f"<tr>{''.join(tds)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# ------------------------------------------------------------------------------------------ verdicts
def frame_numbers(ds) -> np.ndarray:
    """Source frame number of each stored row of a video (the ``frame`` coordinate)."""
    return np.asarray(ds["frame"].values)


def probabilities(ds) -> np.ndarray:
    """(frames, classes) class probabilities: the softmax of the stored logits, as the read API and the
    metric rows derive it (:func:`workflows.store.predictions`)."""
    from workflows.store import predictions

    return predictions(np.asarray(ds["logits"].values))[1].astype(np.float64)


@dataclass
class Verdict:
    key: str
    video_id: str
    patient: str
    label: str
    predicted: str
    probability: float  # mean over frames of P(predicted class)
    agreement: float  # fraction of frames whose prediction is the video's
    frames: int
    miou: float  # the primary method's mIoU over this video's scored frames at the focus set (0-1)
    anchor: str
    prob_sums: np.ndarray  # per class: the sum over frames of its probability
    votes: np.ndarray  # per class: the frames predicted as it
    shown: bool = True  # has its own section (the link target exists)


def verdicts(res, metrics_primary: pd.DataFrame, classes: Sequence[str]) -> list[Verdict]:
    """Per video: the class with the highest mean probability over frames, and how the frames agree."""
    out = []
    ok = scored(metrics_primary)
    miou = ok.groupby("video_key")["iou"].mean()
    for i, key in enumerate(res.video_keys):
        ds = res.video(key)
        probs = probabilities(ds)
        attrs = ds.attrs
        if probs.size == 0:
            continue
        mean = probs.mean(axis=0)
        top = int(mean.argmax())
        name = classes[top] if top < len(classes) else str(top)
        out.append(
            Verdict(
                key=key,
                video_id=str(attrs.get("video_id", key)),
                patient=str(attrs.get("patient", "")),
                label=str(attrs.get("label", "")),
                predicted=name,
                probability=float(mean[top]),
                agreement=float((probs.argmax(axis=1) == top).mean()),
                frames=int(probs.shape[0]),
                miou=float(miou.get(key, np.nan)),
                anchor=f"video-{i}",
                prob_sums=probs.sum(axis=0),
                votes=np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]),
            )
        )
    return out


def link(v: Verdict) -> str:
    return f'<a href="#{esc(v.anchor)}">{esc(v.video_id)}</a>' if v.shown else esc(v.video_id)


def verdict_tables(items: Sequence[Verdict], focus: str, classes: Sequence[str] = ()) -> str:
    """Per-patient and per-video verdict tables; each video links to its section."""
    patients: dict[str, list[Verdict]] = {}
    for v in items:
        patients.setdefault(v.patient, []).append(v)
    rows = []
    for patient, vs in patients.items():
        frames = sum(v.frames for v in vs)
        mean = sum(v.prob_sums for v in vs) / frames
        top = int(mean.argmax())
        names = classes or [str(i) for i in range(len(mean))]
        predicted = names[top] if top < len(names) else str(top)
        agree = sum(v.votes for v in vs)[top] / frames
        truth = vs[0].label
        wrong = ' class="wrong"' if predicted != truth else ""
        rows.append(
            f"<tr{wrong}><td>{esc(patient)}</td><td>{esc(truth)}</td><td>{esc(predicted)}</td>"
            f'<td class="num">{mean[top]:.2f}</td><td class="num">{100 * agree:.0f} %</td>'
            f'<td class="num">{len(vs)}</td><td class="num">{frames}</td></tr>'
        )
    patient_html = (
        "<table><thead><tr><th>patient</th><th>true class</th><th>predicted</th><th>mean probability</th>"
        "<th>frames agreeing</th><th>videos</th><th>frames</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    rows = []
    for v in items:
        wrong = ' class="wrong"' if v.predicted != v.label else ""
        rows.append(
            f"<tr{wrong}><td>{link(v)}</td><td>{esc(v.patient)}</td>"
            f'<td>{esc(v.label)}</td><td>{esc(v.predicted)}</td><td class="num">{v.probability:.2f}</td>'
            f'<td class="num">{100 * v.agreement:.0f} %</td><td class="num">{v.frames}</td><td class="num">{pct(v.miou)}</td></tr>'
        )
    video_html = (
        "<table><thead><tr><th>video</th><th>patient</th><th>true class</th><th>predicted</th>"
        "<th>mean probability</th><th>frames agreeing</th><th>frames</th>"
        f"<th>mIoU {esc(label(PRIMARY))}, {esc(layer_title(focus))} (%)</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    return (
        "<h3>Per patient</h3><p>As per video (below), over all frames of the patient's videos.</p>"
        + patient_html
        + "<h3>Per video</h3>"
        "<p>A video's verdict is the class with the highest probability averaged over its frames; "
        "<em>mean probability</em> is that average, <em>frames agreeing</em> the share of frames predicted "
        "as that class. Rows in red are wrong. Click a video for its timeline.</p>" + video_html
    )


# ------------------------------------------------------------------------------------------ samples
def pick_samples(
    frame_rows: pd.DataFrame, per_class: int, classes: Sequence[str]
) -> list[tuple[str, pd.Series]]:
    """(why, row) per sample: per class, best / typical / worst by IoU, else by P(true class).

    ``frame_rows``: one metrics row per frame (the primary method at the focus set) with ``p_true``.
    Picks prefer patients not yet shown, so the grid covers several patients.
    """
    out = []
    if per_class <= 0:
        return out
    for cls in [c for c in classes if c in set(frame_rows["label"])] + sorted(
        set(frame_rows["label"]) - set(classes)
    ):
        pool = frame_rows[frame_rows["label"] == cls]
        with_iou = pool[pool["has_gt_mask"] & ~pool["gt_empty"] & pool["iou"].notna()]
        if len(with_iou):
            ranked, key, what = with_iou.sort_values("iou", ascending=False), "iou", "IoU"
        else:
            ranked, key, what = pool.sort_values("p_true", ascending=False), "p_true", "P(true class)"
        names = ["best", "typical", "worst"] if per_class == 3 else None
        targets = np.unique(
            np.linspace(0, len(ranked) - 1, num=min(per_class, len(ranked))).round().astype(int)
        )
        used_patients: set[str] = set()
        used_rows: set[int] = set()
        for j, t in enumerate(targets):
            order = np.argsort(np.abs(np.arange(len(ranked)) - t), kind="stable")
            choice = next(
                (k for k in order if k not in used_rows and ranked.iloc[k]["patient"] not in used_patients),
                next((k for k in order if k not in used_rows), None),
            )
            if choice is None or abs(choice - t) > max(2, len(ranked) // 4):
                choice = next((k for k in order if k not in used_rows), None)
            if choice is None:
                continue
            used_rows.add(choice)
            r = ranked.iloc[choice]
            used_patients.add(r["patient"])
            name = names[j] if names and len(targets) == 3 else f"rank {choice + 1} of {len(ranked)}"
            value = f"{pct(r['iou'])} %" if key == "iou" else f"{r[key]:.2f}"
            out.append((f"{cls}, {name} by {what} = {value}", r))
    return out


def strip_positions(count: int, n: int) -> list[int]:
    return sorted(set(np.linspace(0, count - 1, num=min(n, count)).round().astype(int).tolist()))


def focus_set(layer_sets: Sequence[str]) -> str:
    multi = [s for s in layer_sets if "+" in s]
    return max(multi, key=lambda s: s.count("+")) if multi else layer_sets[-1]


def gt_of(res, key: str, positions: Sequence[int]) -> list[np.ndarray | None]:
    """Ground truth per position; None where the frame has none (drawn as "no ground truth")."""
    return [g if g.any() else None for g in np.asarray(res.gt_masks(key, list(positions)))]
