"""``export_overlay_video``: one video's frames with a saliency map overlaid, labels and a colour bar burnt in.

Each frame is the crop the run explained, scaled up to a readable size (at least :data:`MIN_SIDE`
pixels), the map blended in :data:`workflows.report.figures.CMAP`, the ground-truth contour in cyan,
a header with the video, frame, true class, prediction and its probability, and a colour bar.
The frame rate is written exactly as given (``7.5``, ``30000/1001``) or refused: it is never rounded.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from workflows.report.figures import GT_COLOUR, blend, colorize
from workflows.report.options import OverlayOptions
from workflows.report.sections import frame_numbers, probabilities
from xrcam.errors import XrcamConfigError

__all__ = ["MIN_SIDE", "export_overlay_video", "parse_fps"]

MIN_SIDE = 384  # the map is drawn at least this many pixels wide
HEADER = 56
BAR = 84
_MAX_DENOMINATOR = 65535  # MPEG-4 Part 2 time bases cannot go beyond this


def parse_fps(value: str | float | int | Fraction) -> Fraction:
    """An exact frame rate from ``"7.5"``, ``"30000/1001"``, 12 or a Fraction; refuses what cannot be exact."""
    try:
        fps = value if isinstance(value, Fraction) else Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError) as exc:
        raise XrcamConfigError(
            f"frame rate {value!r} is not a number or a fraction such as 30000/1001"
        ) from exc
    if fps <= 0:
        raise XrcamConfigError(f"frame rate must be positive, got {value!r}")
    if fps.denominator > _MAX_DENOMINATOR:
        raise XrcamConfigError(
            f"frame rate {value!r} cannot be encoded exactly (time base denominator {fps.denominator} > "
            f"{_MAX_DENOMINATOR}); give it as a shorter fraction such as 30000/1001"
        )
    return fps


def _font(size: int) -> ImageFont.ImageFont:
    from matplotlib import font_manager

    try:
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except OSError:
        return ImageFont.load_default()


def _contour(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def _colour_bar(height: int, font) -> Image.Image:
    bar = Image.new("RGB", (BAR, height), "black")
    ramp = colorize(np.linspace(1.0, 0.0, height - 40))[:, None, :].repeat(18, axis=1)
    bar.paste(Image.fromarray(ramp), (10, 20))
    draw = ImageDraw.Draw(bar)
    for value in (1.0, 0.5, 0.0):
        y = 20 + round((1 - value) * (height - 41))
        draw.line([(28, y), (33, y)], fill="white")
        draw.text((36, y), f"{value:.1f}", fill="white", font=font, anchor="lm")
    draw.text((BAR // 2, height - 4), "saliency", fill="white", font=font, anchor="mb")
    return bar


def export_overlay_video(
    results: str | Path,
    video_key: str,
    out: str | Path,
    *,
    method: str = OverlayOptions.method,
    layer_set: str = OverlayOptions.layer_set,
    fps: str | float | Fraction = OverlayOptions.fps,
    chunk: int = 32,
) -> Path:
    """Write an MP4 of one video's frames with ``method``'s ``layer_set`` map overlaid (see module doc)."""
    import av

    from workflows.results import open as open_results

    rate = parse_fps(fps)
    res = open_results(results)
    methods = list(res.methods)
    if method not in methods:
        raise XrcamConfigError(
            f"{results}: method {method!r} was not run; choose one of {', '.join(methods)}"
        )
    if video_key not in res.video_keys:
        raise XrcamConfigError(
            f"{results}: no video {video_key!r}; choose one of {', '.join(res.video_keys[:5])}"
            + (" ..." if len(res.video_keys) > 5 else "")
        )
    ds = res.video(video_key)
    if layer_set not in set(res.metrics(method=method, video_key=video_key)["layer_set"]):
        raise XrcamConfigError(
            f"{results}: layer set {layer_set!r} was not reduced; run `xrcam reduce --layer-sets`"
        )
    classes = list(res.classes)
    size = int(ds.sizes["y"])
    scale = -(-MIN_SIDE // size)
    side = size * scale
    width, height = side + BAR, side + HEADER
    width += width % 2
    height += height % 2  # yuv420p needs even sides
    font, small = _font(17), _font(13)
    bar = _colour_bar(side, small)
    frame_index = frame_numbers(ds)
    probs = probabilities(ds)
    predicted = probs.argmax(axis=1)
    truth = str(ds.attrs.get("label", ""))
    name = str(ds.attrs.get("video_id", video_key))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    count = len(frame_index)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = 1 / rate
        for start in range(0, count, chunk):
            positions = list(range(start, min(start + chunk, count)))
            grey = np.asarray(res.frames(video_key, positions))
            maps = res.maps(video_key, positions, layer_set, [method])[method]
            gt = np.asarray(res.gt_masks(video_key, positions))
            for i, p in enumerate(positions):
                rgb = blend(grey[i], maps[i])
                picture = Image.fromarray(rgb).resize((side, side), Image.Resampling.BILINEAR)
                if gt[i].any():
                    edge = np.kron(_contour(gt[i]), np.ones((scale, scale), dtype=bool))
                    array = np.asarray(picture).copy()
                    array[edge] = tuple(int(GT_COLOUR[k : k + 2], 16) for k in (1, 3, 5))
                    picture = Image.fromarray(array)
                canvas = Image.new("RGB", (width, height), "black")
                canvas.paste(picture, (0, HEADER))
                canvas.paste(bar, (side, HEADER))
                draw = ImageDraw.Draw(canvas)
                guess = classes[int(predicted[p])] if int(predicted[p]) < len(classes) else str(predicted[p])
                draw.text((8, 6), f"{name}  frame {int(frame_index[p])}", fill="white", font=small)
                colour = "#7CFC00" if guess == truth else "#ff5a5a"
                draw.text(
                    (8, 26),
                    f"true {truth} | predicted {guess}, p = {probs[p, predicted[p]]:.2f}",
                    fill=colour,
                    font=font,
                )
                draw.text((width - 8, 6), f"{method} {layer_set}", fill="white", font=small, anchor="ra")
                frame = av.VideoFrame.from_ndarray(np.asarray(canvas), format="rgb24")
                frame.pts = p
                frame.time_base = stream.time_base
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(out)) as check:
        written = check.streams.video[0].average_rate
    if written is not None and Fraction(written) != rate:
        out.unlink(missing_ok=True)
        raise XrcamConfigError(
            f"the {codec} encoder would write {written} fps instead of {rate}; nothing written"
        )
    return out
