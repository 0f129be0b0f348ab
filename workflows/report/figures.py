"""The report's figures, drawn with matplotlib on its Agg canvas (no pyplot, no global backend switch).

Every saliency map is drawn in one perceptual colour map (:data:`CMAP`, inferno) blended over the
grey frame, with a colour bar on each figure, the ground-truth contour in :data:`GT_COLOUR` and the
method's mask contour dashed white. Charts carry axis titles and 95 % confidence intervals (bootstrap
over patients). Pictures are returned as ``data:`` URIs: WebP (or JPEG) for frame pictures, PNG for
line and bar charts, so the page stays small and self-contained.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image, features

__all__ = [
    "CMAP",
    "GT_COLOUR",
    "bar_chart",
    "blend",
    "colorize",
    "data_uri",
    "disagreement_gallery",
    "frame_grid",
    "new_figure",
    "video_figure",
]

CMAP = "inferno"
GT_COLOUR = "#00e5ff"  # cyan: stands out on every inferno colour and on grey
MASK_STYLE = {"colors": "white", "linewidths": 0.9, "linestyles": "--"}
ALPHA = 0.6  # weight of the colour map over the grey frame
DPI = 100
_STYLE = {
    "font.size": 11,
    "axes.titlesize": 11,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
}
_LUT = (colormaps[CMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
_REF_STYLES = {"oracle": "-", "intensity": "-.", "centre": "--", "random": ":"}
_COLOURS = colormaps["tab10"].colors


# ------------------------------------------------------------------------------------------ pixels
def colorize(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB of :data:`CMAP` (shape + (3,)); NaN counts as 0."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    return _LUT[(v * 255).round().astype(np.int64)]


def blend(grey: np.ndarray, saliency: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``saliency`` (S, S) in [0, 1] in :data:`CMAP` over the grey frame (S, S) in [0, 1] -> RGB uint8."""
    base = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=-1)
    return ((1 - alpha) * base + alpha * colorize(saliency)).round().astype(np.uint8)


def new_figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (the backend is set per figure; pyplot's state is never touched)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


PHOTO_DPI = 90  # frame pictures: tiles of about 95 px, the size of a typical crop
PHOTO_QUALITY = 62  # WebP quality: keeps the demo's page under 2 MB with 24 video sections


def data_uri(figure: Figure, kind: str = "photo", *, quality: int = PHOTO_QUALITY) -> str:
    """Render ``figure``; ``kind="photo"`` -> lossy WebP (JPEG where Pillow lacks WebP), ``"chart"`` -> PNG."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=DPI if kind == "chart" else PHOTO_DPI, facecolor="white")
    if kind == "chart":
        image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        out, mime = io.BytesIO(), "image/png"
        image.save(out, format="PNG", optimize=True)
    else:
        image = Image.open(buffer).convert("RGB")
        out = io.BytesIO()
        if features.check("webp"):
            image.save(out, format="WEBP", quality=quality, method=4)
            mime = "image/webp"
        else:
            image.save(out, format="JPEG", quality=quality, optimize=True)
            mime = "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _tile(ax, grey, saliency=None, gt=None, mask=None) -> None:
    """One map tile: the blend (or the plain frame), GT contour, mask contour; no ticks."""
    if saliency is None:
        ax.imshow(grey, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    else:
        ax.imshow(blend(grey, saliency), interpolation="bilinear")
    if gt is not None and gt.any():
        ax.contour(gt.astype(np.float32), levels=[0.5], colors=GT_COLOUR, linewidths=1.3)
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], **MASK_STYLE)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colour_bar(
    figure: Figure,
    rect: Sequence[float],
    *,
    label: str = "normalised saliency",
    ticks=(0, 0.25, 0.5, 0.75, 1),
) -> None:
    cax = figure.add_axes(rect)
    bar = figure.colorbar(ScalarMappable(Normalize(0, 1), CMAP), cax=cax)
    bar.set_label(label, fontsize=10)
    bar.set_ticks(list(ticks))


# ------------------------------------------------------------------------------------------ charts
def bar_chart(
    cells,
    columns: Sequence[str],
    methods: Sequence[str],
    references: Sequence[str],
    *,
    title: str,
    xlabel: str,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Grouped bars of mIoU (%) with 95 % CI error bars; reference rows as line segments over each group.

    ``cells``: DataFrame indexed by (row, column) with ``miou``, ``lo``, ``hi`` in percent.
    """
    import matplotlib

    labels = labels or {}
    with matplotlib.rc_context(_STYLE):
        figure = new_figure(10.5, 4.4)
        ax = figure.add_axes([0.07, 0.14, 0.68, 0.76])
        n = max(len(methods), 1)
        width = 0.8 / n
        x = np.arange(len(columns))
        top = 1.0
        for i, method in enumerate(methods):
            rows = [cells.loc[(method, c)] if (method, c) in cells.index else None for c in columns]
            mean = np.array([np.nan if r is None else r["miou"] for r in rows], dtype=float)
            lo = np.array([np.nan if r is None else r["lo"] for r in rows], dtype=float)
            hi = np.array([np.nan if r is None else r["hi"] for r in rows], dtype=float)
            pos = x - 0.4 + width * (i + 0.5)
            ax.bar(
                pos,
                np.nan_to_num(mean),
                width * 0.92,
                color=_COLOURS[i % 10],
                label=labels.get(method, method),
            )
            ok = np.isfinite(mean) & np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.errorbar(
                    pos[ok],
                    mean[ok],
                    yerr=[mean[ok] - lo[ok], hi[ok] - mean[ok]],
                    fmt="none",
                    ecolor="black",
                    elinewidth=1,
                    capsize=2,
                )
                top = max(top, float(np.nanmax(hi[ok])))
        for ref in references:
            style = _REF_STYLES.get(ref.split("_")[0], (0, (1, 1)))
            first = True
            for j, c in enumerate(columns):
                if (ref, c) in cells.index and np.isfinite(cells.loc[(ref, c)]["miou"]):
                    value = float(cells.loc[(ref, c)]["miou"])
                    top = max(top, value)
                    ax.hlines(
                        value,
                        j - 0.45,
                        j + 0.45,
                        colors="#555555",
                        linestyles=style,
                        linewidth=1.8,
                        label=f"reference: {labels.get(ref, ref)}" if first else None,
                    )
                    first = False
        ax.set_xticks(x, list(columns))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mIoU (%), bars: 95 % CI")
        ax.set_ylim(0, min(100.0, top * 1.12 + 1))
        ax.set_title(title, loc="left")
        ax.grid(axis="y", color="#dddddd")
        ax.set_axisbelow(True)
        if not len(cells) or not np.isfinite(cells["miou"].to_numpy(dtype=float)).any():
            ax.text(
                0.5,
                0.5,
                "no frame to average: mIoU needs annotated, correctly classified frames",
                transform=ax.transAxes,
                ha="center",
                color="#a04000",
            )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


# ------------------------------------------------------------------------------------------ frames
def frame_grid(
    grey: np.ndarray,
    gt: np.ndarray | None,
    maps: Mapping[tuple[str, str], np.ndarray],
    masks: Mapping[tuple[str, str], np.ndarray],
    ious: Mapping[tuple[str, str], float],
    methods: Sequence[str],
    columns: Sequence[str],
    column_titles: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """One frame, as the paper's Fig. 2: input (with GT contour) on the left, then methods x layers.

    Column titles sit above the first map row and method names left of each row, both laid out by
    the same grid, so headers and rows stay aligned. Each tile carries the IoU (%) of its mask.
    """
    import matplotlib

    labels = labels or {}
    tile, label_w, head, bar_w = 1.05, 1.25, 0.42, 0.95
    rows, cols = len(methods), len(columns)
    width = tile * 1.15 + label_w + cols * tile + bar_w
    height = head + rows * tile + 0.1
    with matplotlib.rc_context(_STYLE):
        figure = new_figure(width, height)
        W, H = width, height

        def box(x, y, w, h):  # inches from top-left -> figure fraction
            return [x / W, 1 - (y + h) / H, w / W, h / H]

        ax = figure.add_axes(box(0.12, head, tile, tile))
        _tile(ax, grey, None, gt)
        ax.set_title("input", fontsize=10)
        ax.text(
            0.5,
            -0.08,
            "cyan: ground\ntruth" if gt is not None and gt.any() else "no ground\ntruth",
            transform=ax.transAxes,
            ha="center",
            va="top",
            fontsize=8.5,
        )
        x0 = tile * 1.15 + label_w
        for c, title in enumerate(column_titles):
            figure.text((x0 + (c + 0.5) * tile) / W, 1 - (head - 0.08) / H, title, ha="center", va="bottom")
        for r, method in enumerate(methods):
            figure.text(
                (x0 - 0.08) / W,
                1 - (head + (r + 0.5) * tile) / H,
                labels.get(method, method),
                ha="right",
                va="center",
            )
            for c, column in enumerate(columns):
                ax = figure.add_axes(
                    box(x0 + c * tile + 0.02, head + r * tile + 0.02, tile - 0.04, tile - 0.04)
                )
                _tile(ax, grey, maps[method, column], gt, masks.get((method, column)))
                value = ious.get((method, column))
                if value is not None and np.isfinite(value):
                    ax.text(
                        0.03,
                        0.97,
                        f"{100 * value:.0f}",
                        transform=ax.transAxes,
                        ha="left",
                        va="top",
                        fontsize=8.5,
                        color="white",
                        bbox={"boxstyle": "square,pad=0.15", "fc": "black", "ec": "none", "alpha": 0.6},
                    )
        _colour_bar(figure, box(x0 + cols * tile + 0.12, head + 0.05, 0.16, min(rows * tile - 0.1, 3.2)))
    return figure


def video_figure(
    frame_index: np.ndarray,
    probability: np.ndarray,
    true_class: str,
    ious: Mapping[str, np.ndarray],
    strip: Sequence[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]],
    *,
    iou_title: str,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """A video's timeline (P(true class) and per-frame IoU along the video) above an overlay strip.

    ``strip``: (frame number, grey, map, gt) for a few evenly spaced frames; the charts' frame axis is
    laid out so that each strip tile sits under its own frame number.
    """
    import matplotlib

    labels = labels or {}
    n = max(len(strip), 1)
    left, tile = 0.8, min(1.1, 8.4 / n)
    width = left + n * tile + 1.0
    has_iou = any(np.isfinite(v).any() for v in ious.values())
    plot_h = 1.5
    height = 0.3 + plot_h * (2 if has_iou else 1) + 0.45 + tile + 0.1
    frames = [int(f) for f, *_ in strip] or [int(frame_index[0]), int(frame_index[-1])]
    step = (frames[-1] - frames[0]) / (len(frames) - 1) if len(frames) > 1 and frames[-1] > frames[0] else 1.0
    xlim = (frames[0] - step / 2, frames[-1] + step / 2)  # tile i is centred under frames[i]
    with matplotlib.rc_context(_STYLE):
        figure = new_figure(width, height)
        W, H = width, height

        def box(x, y, w, h):
            return [x / W, 1 - (y + h) / H, w / W, h / H]

        ax = figure.add_axes(box(left, 0.3, n * tile, plot_h - 0.25))
        ax.plot(frame_index, probability, marker="o", markersize=3, color="#1f77b4")
        ax.axhline(0.5, color="#999999", linestyle="--", linewidth=1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(*xlim)
        ax.set_ylabel(f"P({true_class})")
        ax.set_title(
            f"classifier probability of the true class ({true_class}) per frame", loc="left", fontsize=10
        )
        ax.grid(color="#eeeeee")
        ax.tick_params(labelbottom=not has_iou)
        if not has_iou:
            ax.set_xlabel("frame")
        if has_iou:
            ax2 = figure.add_axes(box(left, 0.42 + plot_h, n * tile, plot_h - 0.47), sharex=ax)
            for i, (method, values) in enumerate(ious.items()):
                ax2.plot(
                    frame_index,
                    100 * np.asarray(values, dtype=float),
                    marker="o",
                    markersize=3,
                    color=_COLOURS[i % 10],
                    label=labels.get(method, method),
                )
            ax2.set_ylim(-2, 102)
            ax2.set_ylabel("IoU (%)")
            ax2.set_xlabel("frame")
            ax2.set_title(iou_title, loc="left", fontsize=10)
            ax2.grid(color="#eeeeee")
            ax2.legend(loc="upper right", fontsize=8.5, framealpha=0.85, ncols=len(ious))
        y = 0.3 + plot_h * (2 if has_iou else 1) + 0.45
        for i, (frame, grey, saliency, gt) in enumerate(strip):
            ax = figure.add_axes(box(left + i * tile + 0.025, y, tile - 0.05, tile - 0.05))
            _tile(ax, grey, saliency, gt)
            ax.set_title(f"frame {frame}", fontsize=8.5, pad=2)
        _colour_bar(
            figure, box(left + n * tile + 0.12, y, 0.14, tile - 0.05), label="saliency", ticks=(0, 0.5, 1)
        )
    return figure


def disagreement_gallery(
    items: Sequence[tuple[str, np.ndarray, np.ndarray | None, Mapping[str, np.ndarray]]],
    methods: Sequence[str],
    *,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """Rows of (caption, grey, gt, {method: map}): the frames where the methods differ most."""
    import matplotlib

    labels = labels or {}
    tile, label_w, head = 1.05, 2.3, 0.42
    cols = 1 + len(methods)
    width = label_w + cols * tile + 1.0
    height = head + len(items) * tile + 0.1
    with matplotlib.rc_context(_STYLE):
        figure = new_figure(width, height)
        W, H = width, height

        def box(x, y, w, h):
            return [x / W, 1 - (y + h) / H, w / W, h / H]

        for c, title in enumerate(["input", *[labels.get(m, m) for m in methods]]):
            figure.text(
                (label_w + (c + 0.5) * tile) / W,
                1 - (head - 0.08) / H,
                title,
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
        for r, (caption, grey, gt, maps) in enumerate(items):
            figure.text(
                (label_w - 0.08) / W,
                1 - (head + (r + 0.5) * tile) / H,
                caption,
                ha="right",
                va="center",
                fontsize=9,
            )
            ax = figure.add_axes(box(label_w + 0.02, head + r * tile + 0.02, tile - 0.04, tile - 0.04))
            _tile(ax, grey, None, gt)
            for c, method in enumerate(methods):
                ax = figure.add_axes(
                    box(label_w + (c + 1) * tile + 0.02, head + r * tile + 0.02, tile - 0.04, tile - 0.04)
                )
                _tile(ax, grey, maps[method], gt)
        _colour_bar(
            figure, box(label_w + cols * tile + 0.12, head + 0.05, 0.16, min(len(items) * tile - 0.1, 3.2))
        )
    return figure
