"""Frames -> model input, as in the paper's §4.1 (SPEC §2).

1. Find the circular field of view (FOV) on the video's first frame and crop the largest square
   inscribed in it, so every shard of a video gets the same crop (or use a manual :class:`Crop`).
2. Keep every ``frame_step``-th frame (the caller reads ``range(0, num_frames, frame_step)``).
3. Scale intensities: 8-bit by /255; 16-bit per frame by the 0.5–99.5 percentile window of the pixels
   inside the FOV. Repeat grey to 3 channels and apply the model's mean/std.
4. Masks go through the same crop, so maps and ground truth stay aligned pixel for pixel.

Coordinates: pixel ``(row, col)`` has its centre at ``(y, x) = (row, col)``; a pixel is inside a circle
when its centre is. The square of side ``floor(r*sqrt(2))`` centred on the circle then has all its
pixels (their full extent, not only their centres) inside the circle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from xrcam.errors import XrcamInputError

if TYPE_CHECKING:
    import torch

    from xrcam.io.readers import VideoReader

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Crop",
    "FieldOfView",
    "PreprocessConfig",
    "Preprocessor",
    "detect_fov",
    "inscribed_square",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Crop(NamedTuple):
    """A square crop: top-left pixel ``(x, y)`` and side ``size``, in pixels of the source frame."""

    x: int
    y: int
    size: int

    @classmethod
    def parse(cls, text: str) -> Crop:
        """Parse ``"x,y,size"`` (the CLI's ``--crop`` value)."""
        try:
            x, y, size = (int(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"crop must be 'x,y,size' in whole pixels, got {text!r}") from None
        if x < 0 or y < 0 or size < 1:
            raise ValueError(f"crop needs x >= 0, y >= 0 and size >= 1, got {text!r}")
        return cls(x, y, size)

    def fits(self, frame_shape: tuple[int, int]) -> bool:
        return (
            self.x >= 0
            and self.y >= 0
            and self.y + self.size <= frame_shape[0]
            and self.x + self.size <= frame_shape[1]
        )


class FieldOfView(NamedTuple):
    """The circular field of view: centre ``(cx, cy)`` in pixel-centre coordinates and ``radius``."""

    cx: float
    cy: float
    radius: float

    def mask(self, frame_shape: tuple[int, int]) -> np.ndarray:
        """Boolean (H, W) mask of the pixels whose centre is inside the circle."""
        yy, xx = np.ogrid[: frame_shape[0], : frame_shape[1]]
        return (xx - self.cx) ** 2 + (yy - self.cy) ** 2 <= self.radius**2


def inscribed_square(fov: FieldOfView, frame_shape: tuple[int, int]) -> Crop:
    """The largest square inside the circle (side ``floor(r*sqrt(2))``), centred on it, kept in the frame."""
    height, width = frame_shape
    size = min(math.floor(fov.radius * math.sqrt(2)), height, width)
    x = min(max(round(fov.cx - (size - 1) / 2), 0), width - size)
    y = min(max(round(fov.cy - (size - 1) / 2), 0), height - size)
    return Crop(int(x), int(y), int(size))


def _median3(image: np.ndarray) -> np.ndarray:
    """3x3 median filter (edge-replicated): removes speckle noise and keeps the FOV's edge in place."""
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    stack = np.stack([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
    return np.median(stack, axis=0)


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle through points (Kåsa fit)."""
    a = np.stack([x, y, np.ones_like(x)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(a, -(x**2 + y**2), rcond=None)
    cx, cy = -d / 2, -e / 2
    return float(cx), float(cy), float(math.sqrt(max(cx**2 + cy**2 - f, 0.0)))


def detect_fov(
    frame: np.ndarray, path: str | Path = "<frame>", frame_index: int | None = None
) -> FieldOfView:
    """Find the circular FOV of one grey frame.

    The background level comes from the four corners, the tissue level from the centre; pixels above
    a threshold between the two are "on". Because the FOV is convex, the outermost "on" pixel of each
    row and column lies on its rim, whatever dark structures are inside; a robust circle fit through
    those rim points ignores rows crossed by a vendor mark outside the FOV. Raises
    :class:`XrcamInputError` (naming ``path`` and the frame) when there is no such circle.
    """
    hint = "; pass a manual crop (--crop x,y,size) for this video"
    image = _median3(np.asarray(frame, dtype=np.float32))
    h, w = image.shape
    ch, cw = max(h // 8, 2), max(w // 8, 2)
    corners = np.concatenate(
        [c.ravel() for c in (image[:ch, :cw], image[:ch, -cw:], image[-ch:, :cw], image[-ch:, -cw:])]
    )
    centre = image[h // 2 - h // 8 : h // 2 + h // 8 + 1, w // 2 - w // 8 : w // 2 + w // 8 + 1]
    background, tissue = float(np.median(corners)), float(np.median(centre))
    spread = float(np.median(np.abs(corners - background))) * 1.4826
    if tissue - background <= max(6 * spread, 1e-3 * max(float(image.max()), 1.0)):
        raise XrcamInputError(
            path,
            "no circular field of view found: the centre is not brighter than the corners" + hint,
            frame=frame_index,
        )
    on = image > background + 0.3 * (tissue - background)

    xs, ys = [], []
    rows = np.flatnonzero(on.any(axis=1))
    left = on[rows].argmax(axis=1)
    right = w - 1 - on[rows, ::-1].argmax(axis=1)
    cols = np.flatnonzero(on.any(axis=0))
    top = on[:, cols].argmax(axis=0)
    bottom = h - 1 - on[::-1, cols].argmax(axis=0)
    for keep, px, py in ((left > 0, left - 0.5, rows), (right < w - 1, right + 0.5, rows),
                         (top > 0, cols, top - 0.5), (bottom < h - 1, cols, bottom + 0.5)):  # fmt: skip
        xs.append(np.asarray(px, dtype=np.float64)[keep])
        ys.append(np.asarray(py, dtype=np.float64)[keep])
    x, y = np.concatenate(xs), np.concatenate(ys)
    if x.size < 12:
        raise XrcamInputError(
            path, "no circular field of view found: too few rim points" + hint, frame=frame_index
        )

    # initial circle from the convex row extents (holes inside the FOV do not matter)
    widths = (right - left + 1).astype(np.float64)
    cx, cy = float(np.average((left + right) / 2, weights=widths)), float(np.average(rows, weights=widths))
    r = math.sqrt(widths.sum() / math.pi)
    keep = np.abs(np.hypot(x - cx, y - cy) - r) < 0.2 * r
    for _ in range(6):
        if keep.sum() < 12:
            break
        cx, cy, r = _fit_circle(x[keep], y[keep])
        residual = np.abs(np.hypot(x - cx, y - cy) - r)
        keep = residual <= max(1.5, 3 * 1.4826 * float(np.median(residual[keep])))
    if keep.sum() < max(12, 0.5 * x.size) or r < 4:
        raise XrcamInputError(
            path,
            "no circular field of view found: the bright region is not a circle" + hint,
            frame=frame_index,
        )
    return FieldOfView(cx, cy, r)


@dataclass(frozen=True)
class PreprocessConfig:
    """Preprocessing settings; recorded with every output (``to_dict``).

    ``crop``: manual crop (skips FOV detection). ``size``: resize the crop to ``size``x``size``
    (None keeps the crop's own size, as the paper does). ``mean``/``std``: the model's normalisation.
    """

    frame_step: int = 2
    crop: Crop | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    size: int | None = None

    def __post_init__(self):
        if self.frame_step < 1:
            raise ValueError(f"frame_step must be >= 1, got {self.frame_step}")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["crop"] = None if self.crop is None else list(self.crop)
        return out


class Preprocessor:
    """The preprocessing of one video: a fixed crop plus per-frame intensity scaling.

    Build it with :meth:`for_video`; call it on batches of raw frames; use :meth:`crop_mask` on
    ground-truth masks.
    """

    def __init__(
        self,
        crop: Crop,
        frame_shape: tuple[int, int],
        config: PreprocessConfig | None = None,
        fov: FieldOfView | None = None,
        path: str | Path = "<video>",
    ):
        self.config = config or PreprocessConfig()
        self.frame_shape = tuple(frame_shape)
        self.path = Path(path)
        self.fov = fov
        if not crop.fits(self.frame_shape):
            raise XrcamInputError(
                self.path,
                f"crop {crop.x},{crop.y},{crop.size} does not fit the {frame_shape[1]}x{frame_shape[0]} frames",
            )
        self.crop = crop
        # pixels whose intensities set the 16-bit window: the FOV, or the crop when it was given by hand
        window = fov.mask(self.frame_shape) if fov is not None else np.zeros(self.frame_shape, dtype=bool)
        if fov is None or window.sum() < 2:
            window[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size] = True
        self._window = np.flatnonzero(window)

    @classmethod
    def for_video(cls, reader: VideoReader, config: PreprocessConfig | None = None) -> Preprocessor:
        """Detect the FOV on frame 0 of ``reader`` (unless ``config.crop`` is given) and build the preprocessor."""
        config = config or PreprocessConfig()
        if config.crop is not None:
            return cls(config.crop, reader.frame_shape, config, None, reader.path)
        index, first = next(reader.read(0, 1))
        fov = detect_fov(first, reader.path, index)
        return cls(inscribed_square(fov, reader.frame_shape), reader.frame_shape, config, fov, reader.path)

    @property
    def output_size(self) -> int:
        return self.config.size or self.crop.size

    def frame_indices(self, num_frames: int) -> range:
        """The frames kept: every ``frame_step``-th, from the first."""
        return range(0, num_frames, self.config.frame_step)

    def _check(self, array: np.ndarray, what: str, frame: int | None) -> np.ndarray:
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3 or array.shape[1:] != self.frame_shape:
            h, w = self.frame_shape
            raise XrcamInputError(
                self.path,
                f"{what} is {'x'.join(map(str, array.shape[:0:-1]))} but the video's frames are {w}x{h}",
                frame=frame,
            )
        return array

    def __call__(self, frames: np.ndarray, device: str | torch.device | None = None) -> torch.Tensor:
        """(B, H, W) or (H, W) uint8/uint16 frames -> float32 (B, 3, S, S), model-normalised."""
        import torch
        import torch.nn.functional as F

        array = self._check(np.asarray(frames), "frame", None)
        c = self.crop
        patch = torch.from_numpy(array[:, c.y : c.y + c.size, c.x : c.x + c.size].astype(np.float32)).to(
            device
        )
        if array.dtype == np.uint8:
            x = patch / 255.0
        elif array.dtype == np.uint16:
            lo, hi = self._percentile_window(array, device)
            x = ((patch - lo) / (hi - lo).clamp_min(1e-6)).clamp_(0.0, 1.0)
        else:
            raise TypeError(f"frames must be uint8 or uint16, got {array.dtype}")
        x = x[:, None]
        if self.output_size != c.size:
            x = F.interpolate(
                x, size=(self.output_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )
        mean = torch.tensor(self.config.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).contiguous()

    def _percentile_window(self, array: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame low/high percentiles (nearest rank) of the window pixels, shaped (B, 1, 1).

        Exact and one pass per frame: a 65536-bin histogram whose cumulative count gives the k-th
        smallest value.
        """
        import torch

        values = array.reshape(len(array), -1)[:, self._window]
        n = values.shape[1]
        cdf = np.stack([np.bincount(row, minlength=1 << 16) for row in values]).cumsum(axis=1)
        lo_q, hi_q = self.config.percentiles
        bounds = [(cdf < 1 + round(q / 100 * (n - 1))).sum(axis=1) for q in (lo_q, hi_q)]
        lo, hi = (torch.from_numpy(b.astype(np.float32)).to(device).view(-1, 1, 1) for b in bounds)
        return lo, hi

    def crop_mask(self, mask: np.ndarray, frame: int | None = None) -> np.ndarray:
        """(H, W) or (B, H, W) mask -> bool (S, S) or (B, S, S), cropped (and resized) like the frames."""
        array = np.asarray(mask)
        batched = array.ndim == 3
        array = self._check(array, "mask", frame)
        c = self.crop
        out = array[:, c.y : c.y + c.size, c.x : c.x + c.size] > 0
        if self.output_size != c.size:
            import torch
            import torch.nn.functional as F

            t = torch.from_numpy(out.astype(np.float32))[:, None]
            out = F.interpolate(t, size=(self.output_size,) * 2, mode="nearest-exact")[:, 0].numpy() > 0.5
        return out if batched else out[0]
