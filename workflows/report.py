"""A self-contained HTML report of a reduced results folder, and an overlay video of one video.

The report needs no network and no JavaScript: CSS is inline and every image is a base64 PNG drawn
with Pillow (bar charts included), so it can be mailed or archived as one file. It shows the run's
settings, the paper-shaped tables written by :mod:`workflows.reduce`, mIoU bar charts per layer and
per layer set, and for a sample of annotated frames a grid like the paper's Figs. 2-3: each method's
map per layer as a colour overlay, then its masks with the ground-truth contour.

The store keeps no pixels of the source frames, so frames are reread from the archive (the video's
``path`` attribute) through :mod:`xrcam.io` and cropped and scaled by :mod:`xrcam.preprocess` exactly
as ``xrcam run`` did. When the archive is gone the maps are drawn on grey and the report says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from xrcam.errors import XrcamConfigError, XrcamError

__all__ = ["build_report", "export_overlay_video", "bar_chart", "colorize", "overlay"]

log = logging.getLogger(__name__)

TILE = 112  # pixels per map tile in the frame grids
GT_COLOUR = (0, 230, 0)
MASK_COLOUR = (255, 0, 200)
# Anchors of a blue -> cyan -> yellow -> red heat map (low to high saliency), linearly interpolated.
_HEAT = np.array(
    [(0, 0, 128), (0, 64, 255), (0, 220, 255), (120, 255, 120), (255, 230, 0), (255, 80, 0), (160, 0, 0)],
    dtype=np.float32,
)
_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
]


# ------------------------------------------------------------------------------------------ images
def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB heat-map colours (shape + (3,)); NaN counts as 0."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0) * (len(_HEAT) - 1)
    low = np.minimum(v.astype(np.int64), len(_HEAT) - 2)
    t = (v - low)[..., None]
    return ((1 - t) * _HEAT[low] + t * _HEAT[low + 1]).round().astype(np.uint8)


def overlay(grey: np.ndarray, saliency: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heat map of ``saliency`` (S, S) in [0, 1] over a grey frame (S, S) in [0, 1] -> RGB uint8."""
    base = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=-1)
    return ((1 - alpha) * base + alpha * colorize(saliency)).round().astype(np.uint8)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (the mask minus its 4-neighbour erosion)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _mask_tile(grey: np.ndarray, mask: np.ndarray, gt: np.ndarray | None) -> np.ndarray:
    """A saliency mask filled over the frame, with the ground-truth contour on top."""
    rgb = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=-1)
    m = mask.astype(bool)
    rgb[m] = 0.45 * rgb[m] + 0.55 * np.array(MASK_COLOUR)
    if gt is not None:
        edge = _contour(gt)
        edge = edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1)  # two pixels wide: visible once scaled down
        rgb[edge] = GT_COLOUR
    return rgb.round().astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _tile(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).resize((TILE, TILE), Image.Resampling.BILINEAR)


def bar_chart(df, title: str, ylabel: str = "mIoU (%)") -> Image.Image:
    """Grouped bars: one group per column of ``df`` (layers or layer sets), one bar per row (method)."""
    groups, series = list(df.columns), list(df.index)
    width, height, left, top, bottom = 880, 400, 60, 60, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(15), _font(12)
    draw.text((left, 10), title, fill="black", font=font)
    values = df.to_numpy(dtype=np.float64)
    peak = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    magnitude = 10.0 ** np.floor(np.log10(max(peak, 1e-9) / 5))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude * 5 >= peak)  # 5 round ticks
    top_value = step * 5
    plot_w, plot_h = width - left - 170, height - top - bottom
    for i in range(6):  # y grid and labels
        y = top + plot_h - plot_h * i / 5
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f"{step * i:g}", fill="black", font=small, anchor="rm")
    draw.text((left, top - 6), ylabel, fill="black", font=small, anchor="lb")
    group_w = plot_w / max(len(groups), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, _name in enumerate(series):
            value = values[s, g]
            if not np.isfinite(value):
                continue
            h = plot_h * value / top_value
            draw.rectangle(
                [x0 + s * bar_w, top + plot_h - h, x0 + (s + 1) * bar_w - 1, top + plot_h],
                fill=_PALETTE[s % len(_PALETTE)],
            )
        draw.text(
            (left + (g + 0.5) * group_w, top + plot_h + 8), str(group), fill="black", font=small, anchor="mt"
        )
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")
    if not np.isfinite(values).any():
        draw.text(
            (left + plot_w / 2, top + plot_h / 2),
            "no frame to average: mIoU needs annotated, correctly classified frames",
            fill=(160, 60, 0),
            font=small,
            anchor="mm",
        )
    for s, name in enumerate(series):  # legend
        y = top + 4 + s * 20
        draw.rectangle([width - 160, y, width - 146, y + 12], fill=_PALETTE[s % len(_PALETTE)])
        draw.text((width - 140, y + 6), str(name), fill="black", font=small, anchor="lm")
    return image


# ------------------------------------------------------------------------------------------ frames
class _FrameSource:
    """Rereads frames of one video from the archive and crops/scales them as ``xrcam run`` did."""

    def __init__(self, group, settings: dict[str, Any]):
        self.group = group
        self.size = int(group["gt_mask"].shape[1])
        self.reader = self.pre = None
        self.problem: str | None = None
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
            self.problem = f"{path}: {exc}"

    def grey(self, frames: Sequence[int]) -> np.ndarray:
        """Cropped frames (B, S, S) in [0, 1]; mid-grey where the archive cannot be read."""
        if self.pre is None:
            return np.full((len(frames), self.size, self.size), 0.5, dtype=np.float32)
        raw = {}
        wanted = sorted(set(frames))
        steps = set(np.diff(wanted).tolist())
        if len(steps) == 1:  # evenly spaced (a run of kept frames): one sequential pass, no per-frame seek
            runs = [(wanted[0], wanted[-1] + 1, steps.pop())]
        else:
            runs = [(index, index + 1, 1) for index in wanted]
        for start, stop, step in runs:
            for i, frame in self.reader.read(start=start, stop=stop, step=step):
                raw[i] = frame
        x = self.pre(np.stack([raw[i] for i in frames]))[:, 0]  # every channel is the same grey
        mean, std = self.pre.config.mean[0], self.pre.config.std[0]
        return (x * std + mean).clamp(0, 1).numpy()

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _frame_maps(group, methods, layers, layer_set: str, positions: Sequence[int]) -> dict:
    """Normalised maps per (method, layer) and the aggregate per method, on the crop grid."""
    import torch

    from workflows.reduce import agg_name
    from workflows.store import map_name
    from xrcam.postprocess import aggregate, normalize

    size = int(group["gt_mask"].shape[1])
    index = list(positions)
    out = {}
    for method in methods:
        norm = {
            layer: normalize(
                torch.from_numpy(group[map_name(method, layer)].get_orthogonal_selection(index)),
                size,
                method=method,
            )
            for layer in layers
        }
        out.update({(method, layer): norm[layer].numpy() for layer in layers})
        name = agg_name(method, layer_set)
        if name in group:
            out[method, layer_set] = group[name].get_orthogonal_selection(index).astype(np.float32)
        else:
            out[method, layer_set] = aggregate(norm, layer_set).numpy()
    return out


def _frame_masks(group, methods, columns, positions, maps, threshold: str) -> dict:
    """Masks per (method, layer set): the stored ones from ``xrcam reduce``, else computed with its rule."""
    import torch

    from workflows.reduce import mask_name, parse_threshold
    from xrcam.postprocess import format_layer_set, make_masks

    rule, fraction = parse_threshold(threshold)
    out = {}
    for method in methods:
        for column in columns:
            layer_set = format_layer_set(column)
            name = mask_name(method, layer_set)
            if name in group:
                out[method, column] = group[name].get_orthogonal_selection(list(positions)) > 0
            else:
                out[method, column] = make_masks(
                    torch.from_numpy(maps[method, column]), rule, fraction=fraction
                ).numpy()
    return out


def _labelled_grid(
    rows: list[str], columns: list[str], tiles: dict[tuple[int, int], np.ndarray], title: str
) -> Image.Image:
    """Tiles on a grid with row labels on the left and column labels on top."""
    label_w, head_h, gap = 110, 44, 4
    width = label_w + len(columns) * (TILE + gap)
    height = head_h + len(rows) * (TILE + gap)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(12)
    draw.text((4, 4), title, fill="black", font=font)
    for c, name in enumerate(columns):
        draw.text(
            (label_w + c * (TILE + gap) + TILE / 2, head_h - 6), name, fill="black", font=small, anchor="mb"
        )
    for r, name in enumerate(rows):
        draw.text((4, head_h + r * (TILE + gap) + TILE / 2), name, fill="black", font=small, anchor="lm")
    for (r, c), array in tiles.items():
        image.paste(_tile(array), (label_w + c * (TILE + gap), head_h + r * (TILE + gap)))
    return image


def _sample_frames(results: Path, metadata: dict, count: int) -> list[tuple[str, int, int]]:
    """``count`` (video_key, position, frame) spread over the annotated, correctly classified frames.

    Falls back to annotated frames, then to any frames, so a report always shows something.
    """
    from workflows.reduce import read_metrics

    methods = metadata["run_settings"]["methods"]
    layer_sets = metadata["reduce_settings"]["layer_sets"]
    df = read_metrics(
        results,
        columns=["video_key", "position", "frame", "has_gt_mask", "gt_empty", "correct"],
        filters=[("method", "==", methods[0]), ("layer_set", "==", layer_sets[0])],
    )
    for keep in (
        df.has_gt_mask & ~df.gt_empty & df.correct,
        df.has_gt_mask & ~df.gt_empty,
        df.index == df.index,
    ):
        pool = df[keep]
        if len(pool):
            break
    if count <= 0 or not len(pool):
        return []
    picks = np.unique(np.linspace(0, len(pool) - 1, num=min(count, len(pool))).round().astype(int))
    rows = pool.iloc[picks]
    return list(zip(rows.video_key, rows.position.astype(int), rows.frame.astype(int), strict=True))


def _frame_figures(results: Path, metadata: dict, samples, notes: list[str]) -> Iterator[tuple[str, str]]:
    """(caption, PNG data URI) per sampled frame: the Fig. 2 (maps) and Fig. 3 (masks) grids side by side."""
    from workflows.store import ResultStore

    store = ResultStore.open(results)
    settings = store.settings
    methods, layers = store.methods, store.layers
    layer_sets = metadata["reduce_settings"]["layer_sets"]
    multi = [s for s in layer_sets if "+" in s]
    agg_set = (
        max(multi, key=lambda s: s.count("+"))
        if multi
        else "+".join(x.removeprefix("layer") for x in reversed(layers))
    )
    columns = [*layers, agg_set]
    titles = [f"layer {layer.removeprefix('layer')}" for layer in layers] + [f"layers {agg_set}"]
    by_video: dict[str, list[tuple[int, int]]] = {}
    for key, position, frame in samples:
        by_video.setdefault(key, []).append((position, frame))
    for key, picks in by_video.items():
        group = store.video(key)
        source = _FrameSource(group, settings)
        if source.problem:
            notes.append(
                f"Frames of {group.attrs['video_id']} could not be reread ({source.problem}); maps are drawn on grey."
            )
        try:
            positions = [p for p, _ in picks]
            grey = source.grey([f for _, f in picks])
        finally:
            source.close()
        gt = np.asarray(group["gt_mask"].get_orthogonal_selection(positions)) > 0
        has_gt = np.asarray(group["has_gt_mask"].get_orthogonal_selection(positions))
        maps = _frame_maps(group, methods, layers, agg_set, positions)
        masks = _frame_masks(
            group, methods, columns, positions, maps, metadata["reduce_settings"]["threshold"]
        )
        for i, (_, frame) in enumerate(picks):
            truth = gt[i] if has_gt[i] else None
            head = {(0, 0): (np.repeat((grey[i] * 255)[..., None], 3, -1)).astype(np.uint8)}
            if truth is not None:
                head[0, 1] = _mask_tile(grey[i], np.zeros_like(truth), truth)
            map_tiles = {
                (r + 1, c): overlay(grey[i], maps[m, col][i])
                for r, m in enumerate(methods)
                for c, col in enumerate(columns)
            }
            mask_tiles = {
                (r + 1, c): _mask_tile(grey[i], masks[m, col][i], truth)
                for r, m in enumerate(methods)
                for c, col in enumerate(columns)
            }
            rows = ["frame, GT", *methods]
            left = _labelled_grid(rows, titles, {**head, **map_tiles}, "Saliency maps (colour overlay)")
            right = _labelled_grid(
                rows,
                titles,
                {(0, 0): head[0, 0], **({(0, 1): head[0, 1]} if truth is not None else {}), **mask_tiles},
                "Masks (magenta) and ground truth (green)",
            )
            figure = Image.new(
                "RGB", (left.width + right.width + 16, max(left.height, right.height)), "white"
            )
            figure.paste(left, (0, 0))
            figure.paste(right, (left.width + 16, 0))
            caption = f"{group.attrs['video_id']}, frame {frame} (label {group.attrs['label']}"
            caption += (
                f", predicted {settings['classes'][int(group['predicted'][positions[i]])]})"
                if settings.get("classes")
                else ")"
            )
            yield caption, _png(figure)


# ------------------------------------------------------------------------------------------ HTML
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1500px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f3f7; } td:first-child, th:first-child { text-align: left; }
td.best { font-weight: bold; background: #eef7ee; }
.note { color: #8a5300; background: #fff6e5; padding: 0.4em 0.8em; border-left: 3px solid #e0a030; }
figure { margin: 1em 0 2em; } figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
img { max-width: 100%; height: auto; } dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: bold; } dd { margin: 0; font-family: monospace; }
"""

_TITLES = {
    "table1_layer_miou": ("Table 1: mIoU (%) per layer", "max"),
    "table2_layerset_miou": ("Table 2: mIoU (%) per layer set", "max"),
    "table4_axioms": ("Table 4: axiom metrics (lower is better)", "min"),
    "accuracy_per_class": ("Classification accuracy per class", None),
    "accuracy_per_patient": ("Classification accuracy per patient", None),
}


def _html_table(df, best: str | None) -> str:
    """A plain HTML table; the best value of each numeric metric column is marked (as the paper does)."""
    metric_columns = [c for c in df.columns if c.startswith("layer") or c == "average"]
    marked: dict[str, Any] = {}
    if best:
        for column in metric_columns:
            values = df[column].astype("float64")
            if "axiom" in df.columns:  # Table 4: best per axiom, not across axioms
                marked[column] = values.groupby(df["axiom"]).transform(best)
            else:
                marked[column] = values.agg(best)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = []
    for i, row in df.iterrows():
        cells = []
        for column in df.columns:
            value = row[column]
            if isinstance(value, float | np.floating):
                text = (
                    "–"
                    if not np.isfinite(value)
                    else (f"{value:.3f}" if column == "accuracy" or "axiom" in df.columns else f"{value:.2f}")
                )
            else:
                text = html.escape(str(value))
            target = marked.get(column)
            is_best = (
                target is not None
                and np.isfinite(value)
                and np.isclose(value, target.loc[i] if hasattr(target, "loc") else target)
            )
            cells.append(f'<td class="best">{text}</td>' if is_best else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def build_report(results: str | Path, out: str | Path | None = None, *, frames: int = 4) -> Path:
    """Write ``out`` (default ``RESULTS/report.html``) from a results folder that ``xrcam reduce`` has reduced."""
    import pandas as pd

    from workflows.reduce import REDUCE_NAME, SUMMARY_DIR, _dataset_metadata

    results = Path(results)
    out = Path(out) if out else results / "report.html"
    summary_dir = results / SUMMARY_DIR
    if not (results / REDUCE_NAME).is_file() or not summary_dir.is_dir():
        raise XrcamConfigError(f"{results}: not reduced yet; run `xrcam reduce {results}` first")
    metadata = _dataset_metadata(results)
    reduced = json.loads((results / REDUCE_NAME).read_text())
    run = metadata.get("run_settings", {})
    notes: list[str] = []
    parts = [f"<h1>xrcam report: {html.escape(results.name)}</h1>"]

    settings = {
        "xrcam version": metadata.get("xrcam_version"),
        "model": run.get("model"),
        "checkpoint sha256": run.get("checkpoint_sha256"),
        "classes": ", ".join(run.get("classes") or []),
        "methods": ", ".join(run.get("methods") or []),
        "layers": ", ".join(run.get("layers") or []),
        "LRP rules / CLRP start": f"{run.get('rules')} / {run.get('clrp')}",
        "preprocessing": json.dumps(run.get("preprocessing")),
        "layer sets": ", ".join(metadata.get("reduce_settings", {}).get("layer_sets", [])),
        "mask threshold": metadata.get("reduce_settings", {}).get("threshold"),
        "videos / metric rows": f"{reduced.get('videos')} / {reduced.get('rows')}",
    }
    parts.append("<h2>Settings</h2><dl>")
    parts += [
        f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>"
        for k, v in settings.items()
        if v is not None
    ]
    parts.append("</dl>")
    if reduced.get("incomplete_videos"):
        notes.append(f"{len(reduced['incomplete_videos'])} incomplete video(s) were left out of every table.")

    tables = {
        name: pd.read_parquet(summary_dir / f"{name}.parquet")
        for name in _TITLES
        if (summary_dir / f"{name}.parquet").exists()
    }
    parts.append("<h2>Tables</h2>")
    for name, (title, best) in _TITLES.items():
        if name in tables:
            parts.append(f"<h3>{html.escape(title)}</h3>{_html_table(tables[name], best)}")
    miou_frames = tables.get("table2_layerset_miou", tables.get("table1_layer_miou"))
    if miou_frames is not None and not (miou_frames["frames"] > 0).any():
        notes.append(
            "No frame is both annotated and correctly classified, so every mIoU is empty; "
            "check the checkpoint (accuracy tables) and that the archive has ground-truth masks."
        )
    if "table4_axioms" not in tables:
        parts.append(
            '<p class="note">Table 4 (axiom metrics) needs <code>xrcam evaluate --axioms --out RESULTS</code> before reducing.</p>'
        )

    parts.append("<h2>mIoU plots</h2>")
    for name, title in (
        ("table1_layer_miou", "mIoU (%) per layer and method"),
        ("table2_layerset_miou", "mIoU (%) per layer set and method"),
    ):
        if name in tables:
            df = tables[name].set_index("method")
            df = df[[c for c in df.columns if c.startswith("layer")]]
            parts.append(
                f'<figure><img alt="{html.escape(title)}" src="{_png(bar_chart(df, title))}"></figure>'
            )

    parts.append("<h2>Sample frames</h2>")
    samples = _sample_frames(results, metadata, frames)
    figures = list(_frame_figures(results, metadata, samples, notes)) if samples else []
    if not figures:
        parts.append("<p>No frames to show.</p>")
    for caption, uri in figures:
        parts.append(
            f'<figure><img alt="{html.escape(caption)}" src="{uri}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    if notes:
        parts.insert(1, "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes))
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>xrcam report: {html.escape(results.name)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------------ video
def export_overlay_video(
    results: str | Path,
    video_key: str,
    out: str | Path,
    *,
    method: str = "xrelevancecam",
    layer_set: str = "4+3+2+1",
    fps: float = 10.0,
    chunk: int = 32,
) -> Path:
    """Write an MP4 of one video's cropped frames with ``method``'s ``layer_set`` saliency overlaid.

    Frames are reread from the archive and encoded chunk by chunk (H.264 when PyAV has it, else MPEG-4),
    so memory stays bounded for long videos.
    """
    import av

    from workflows.store import ResultStore
    from xrcam.postprocess import format_layer_set, parse_layer_set

    store = ResultStore.open(results)
    group = store.video(video_key)
    if group is None:
        raise XrcamConfigError(
            f"{results}: no video {video_key!r}; choose one of {', '.join(store.video_keys()[:5])} ..."
        )
    if method not in store.methods:
        raise XrcamConfigError(
            f"{results}: method {method!r} was not run; choose one of {', '.join(store.methods)}"
        )
    layer_set = format_layer_set(layer_set)
    layers = [layer for layer in store.layers if layer in parse_layer_set(layer_set)]
    source = _FrameSource(group, store.settings)
    if source.problem:
        raise XrcamConfigError(f"cannot reread the frames for the overlay video: {source.problem}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = source.size + source.size % 2  # yuv420p needs even sides
    frames = group["frame_index"][:]
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    try:
        with av.open(str(out), mode="w") as container:
            stream = container.add_stream(codec, rate=int(round(fps)))
            stream.width = stream.height = size
            stream.pix_fmt = "yuv420p"
            for start in range(0, len(frames), chunk):
                positions = list(range(start, min(start + chunk, len(frames))))
                grey = source.grey([int(frames[p]) for p in positions])
                maps = _frame_maps(group, [method], layers, layer_set, positions)[method, layer_set]
                for i in range(len(positions)):
                    rgb = overlay(grey[i], maps[i])
                    if size != source.size:
                        rgb = np.pad(rgb, ((0, 1), (0, 1), (0, 0)))
                    for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                        container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    finally:
        source.close()
    return out
