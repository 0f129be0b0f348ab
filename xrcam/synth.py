"""A deterministic synthetic pCLE archive, for tests, the demo and the localisation benchmark.

Each video shows tissue texture inside a circular field of view (centre and radius vary per video,
some off-centre) on a black background with a small vendor-like text mark in a corner, slow probe
drift between frames, and noise. ``meningioma`` frames carry dark round psammoma-body-like blobs with
an exact ground-truth mask per frame; ``glioblastoma`` frames have none. Two designs (``design=``):

- ``"blobs"`` (the localisation benchmark, a known answer): both classes draw their texture from ONE
  distribution and every frame gets its own gain, so the bodies are the only class cue. The blob
  layout (2-5 bodies of radius 6-11 % of the crop, covering 5-15 % of it) is redrawn every
  ``layout_every`` frames and each body slides in between, so a video shows many independent
  layouts. ``crop=`` fixes the side of the FOV's inscribed square (the paper's crops are 230 px, e.g.
  in 576x578 frames). Options: ``distractors`` (dark, sinuous, non-round vessel-like bands in both
  classes, as dark as the bodies, so "dark" alone is no cue) and ``rims`` (bright calcified rims and
  faint concentric lamellae on the bodies, inside the mask). Two classes only.
- ``"texture"`` (the default, kept as a negative control): the classes also differ in texture
  (meningioma cell-like texture +0.08 brighter background, glioblastoma a denser, brighter cell
  texture) and the blobs are fixed per video, so a classifier can be right for the wrong reason
  (the texture) and its maps then miss the bodies. ``classes=3``/``4`` add ``fibrous`` and
  ``sparse`` textures without blobs, for multi-class tests.

Everything follows from ``seed``: each video draws from its own generator seeded with
``(seed, class, patient, video)``, so any video can be regenerated alone (:func:`generate_video`).
Masks are written for every ``mask_every``-th frame of meningioma videos (default every frame).
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xrcam.preprocess import FieldOfView, inscribed_square

__all__ = [
    "CLASS_NAMES",
    "DESIGNS",
    "FORMATS",
    "SynthConfig",
    "SynthVideo",
    "SynthRecord",
    "SynthArchive",
    "generate_video",
    "generate_archive",
    "write_archive",
]

CLASS_NAMES = ("meningioma", "glioblastoma", "fibrous", "sparse")
#: Generator designs: ``blobs`` (the localisation benchmark) and ``texture`` (the shortcut control).
DESIGNS = ("blobs", "texture")
# format name -> file suffix of one video ("" = a folder of frames with this frame suffix)
FORMATS = {"mkt": ".mkt", "avi": ".avi", "mp4": ".mp4", "png": "", "jpg": "", "tif": "", "tiff-stack": ".tif"}
_FRAME_SUFFIX = {"png": ".png", "jpg": ".jpg", "tif": ".tif"}
_BIT_DEPTHS = {"mkt": (16,), "mp4": (8,), "jpg": (8,)}
_FULL_SCALE = {8: 255, 16: 16000}  # 16-bit frames stay below 2**15 so signed .mkt readers agree
_FRAME_RATE = 12


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: ``patients`` per class, ``videos`` per patient, ``frames`` per video.

    ``design`` (:data:`DESIGNS`) picks what separates the classes; ``crop`` (blobs design) fixes the
    side of the FOV's inscribed square in pixels, ``layout_every`` the frames per blob layout,
    ``distractors`` adds dark vessels to both classes, ``rims`` bright rims and rings to the bodies.
    """

    classes: int = 2
    patients: int = 3
    videos: int = 2
    frames: int = 16
    size: tuple[int, int] = (160, 160)
    bit_depth: int = 8
    seed: int = 0
    mask_every: int = 1
    design: str = "texture"
    crop: int | None = None  # blobs design: inscribed-square side; None: FOV radius 40-46 % of the frame
    layout_every: int = 4
    distractors: bool = False
    rims: bool = False

    def __post_init__(self):
        if self.design not in DESIGNS:
            raise ValueError(f"unknown design {self.design!r}; choose one of {', '.join(DESIGNS)}")
        classes = len(CLASS_NAMES) if self.design == "texture" else 2
        if not 1 <= self.classes <= classes:
            raise ValueError(f"classes must be 1..{classes} for the {self.design} design, got {self.classes}")
        if min(self.patients, self.videos, self.frames, self.mask_every, self.layout_every) < 1:
            raise ValueError("patients, videos, frames, mask_every and layout_every must all be >= 1")
        if min(self.size) < 32:
            raise ValueError(f"size must be at least 32x32 pixels, got {self.size}")
        if self.bit_depth not in _FULL_SCALE:
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.crop is not None and not 24 <= self.crop <= (min(self.size) - 4) / math.sqrt(2):
            raise ValueError(
                f"crop must be 24..{math.floor((min(self.size) - 4) / math.sqrt(2))} px for frames of "
                f"{self.size[0]}x{self.size[1]} (the FOV must fit in the frame), got {self.crop}"
            )
        if self.design == "texture" and (self.crop is not None or self.distractors or self.rims):
            raise ValueError("crop, distractors and rims belong to the blobs design (design='blobs')")


@dataclass
class SynthVideo:
    """One generated video in memory: what the files must read back as."""

    label: str
    patient: str
    name: str
    frames: np.ndarray  # (T, H, W) uint8 or uint16
    masks: dict[int, np.ndarray]  # frame index -> (H, W) bool, meningioma only
    fov: FieldOfView  # the true circle
    patient_id: str = field(repr=False)  # fake identifier written only into .mkt metadata

    def relpath(self, fmt: str) -> str:
        """Path of this video inside the archive for format ``fmt``."""
        return f"{self.label}/{self.patient}/{self.name}{FORMATS[fmt]}"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise low-passed by a Gaussian of ``sigma`` px (FFT), scaled to unit std."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    field_ = np.fft.irfft2(
        np.fft.rfft2(noise) * np.exp(-2 * (math.pi * sigma) ** 2 * (fx**2 + fy**2)), s=shape
    )
    return field_ / (field_.std() + 1e-12)


def _cells(rng: np.random.Generator, shape: tuple[int, int], density: float, sigma: float) -> np.ndarray:
    """Bright round cells: random impulses blurred by a Gaussian of ``sigma`` px, peak ~1."""
    impulses = np.zeros(shape)
    n = rng.poisson(density * shape[0] * shape[1])
    np.add.at(
        impulses, (rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)), rng.uniform(0.6, 1.0, n)
    )
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (math.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(impulses) * kernel, s=shape) * (2 * math.pi * sigma**2)


def _texture(rng: np.random.Generator, label: str, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Tissue intensity in [0, 1] for one class, on the drift canvas."""
    base = 0.30 + 0.06 * _smooth_noise(rng, shape, 12 * scale)
    if label == "glioblastoma":
        cells = _cells(rng, shape, 0.018 / scale**2, 1.4 * scale)
        tissue = base + 0.55 * cells
    elif label == "fibrous":
        angle = rng.uniform(0, math.pi)
        yy, xx = np.mgrid[: shape[0], : shape[1]]
        stripes = np.sin(
            (xx * math.cos(angle) + yy * math.sin(angle)) / (2.5 * scale)
            + 2 * _smooth_noise(rng, shape, 6 * scale)
        )
        tissue = base + 0.2 * stripes + 0.3 * _cells(rng, shape, 0.004 / scale**2, 1.4 * scale)
    elif label == "sparse":
        tissue = base + 0.6 * _cells(rng, shape, 0.003 / scale**2, 3.0 * scale)
    else:  # meningioma
        cells = _cells(rng, shape, 0.012 / scale**2, 1.4 * scale)
        tissue = base + 0.08 + 0.45 * cells
    return np.clip(tissue, 0.0, 1.0)


@functools.lru_cache(maxsize=1)
def _text_mark() -> np.ndarray:
    """A small vendor-like text mark (bool bitmap) drawn with PIL's default font."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (40, 16))
    ImageDraw.Draw(image).text((1, 0), "pCLE", fill=255, font=ImageFont.load_default())
    bitmap = np.asarray(image) > 127
    rows, cols = np.flatnonzero(bitmap.any(1)), np.flatnonzero(bitmap.any(0))
    return bitmap[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _place_mark(fov_mask: np.ndarray, fov: FieldOfView) -> np.ndarray:
    """The text mark in the image corner farthest from the FOV centre, never touching the FOV."""
    h, w = fov_mask.shape
    mark = _text_mark()
    out = np.zeros((h, w), dtype=bool)
    mh, mw = mark.shape
    if mh + 4 > h // 3 or mw + 4 > w // 2:
        return out
    y = 2 if fov.cy >= (h - 1) / 2 else h - mh - 2
    x = 2 if fov.cx >= (w - 1) / 2 else w - mw - 2
    out[y : y + mh, x : x + mw] = mark
    yy, xx = np.ogrid[:h, :w]
    clear = (xx - fov.cx) ** 2 + (yy - fov.cy) ** 2 > (fov.radius + 3) ** 2
    return out & clear


def _draw_fov(rng: np.random.Generator, shape: tuple[int, int], radius: float) -> FieldOfView:
    """The FOV circle of ``radius``: centre jittered, one video in three clearly off-centre."""
    h, w = shape
    room = max(min(h, w) / 2 - radius - 1, 0.0)
    shift = room * (rng.uniform(0.5, 1.0) if rng.random() < 1 / 3 else rng.uniform(0.0, 0.3))
    angle = rng.uniform(0, 2 * math.pi)
    return FieldOfView(
        (w - 1) / 2 + shift * math.cos(angle), (h - 1) / 2 + shift * math.sin(angle), float(radius)
    )


def _draw_drift(rng: np.random.Generator, frames: int, m: int) -> tuple[np.ndarray, int]:
    """Slow bounded probe drift: ``(T, 2)`` integer offsets in [0, 2A] (each axis a slow sinusoid,
    under ~0.6 px per frame) and the canvas padding that holds them."""
    amplitude = max(2.0, 0.08 * m)
    t = np.arange(frames)
    omega = rng.uniform(0.3, 0.6) / amplitude
    phases = rng.uniform(0, 2 * math.pi, 2)
    offsets = np.rint(amplitude * (1 + np.sin(omega * t[:, None] + phases[None, :]))).astype(int)
    return offsets, int(math.ceil(2 * amplitude)) + 1


def _finish(config: SynthConfig, frames: np.ndarray, disk: np.ndarray, fov: FieldOfView, rng) -> np.ndarray:
    """Background outside the FOV, noise, the vendor mark, quantisation to the bit depth."""
    level = np.where(disk, 0.0, 0.012).astype(np.float32)  # dark background outside the FOV
    sigma = np.where(disk, 0.02, 0.006).astype(np.float32)
    frames = frames * disk + level
    frames = np.abs(frames + sigma * rng.standard_normal(frames.shape, dtype=np.float32))
    frames[:, _place_mark(disk, fov)] = 0.75
    scale_max = _FULL_SCALE[config.bit_depth]
    dtype = np.uint8 if config.bit_depth == 8 else np.uint16
    return np.rint(np.clip(frames, 0.0, 1.0) * scale_max).astype(dtype)


def generate_video(config: SynthConfig, class_index: int, patient_index: int, video_index: int) -> SynthVideo:
    """Generate one video (frames, masks, true FOV) from its own seed; independent of the others."""
    label = CLASS_NAMES[class_index]
    patient_rng = np.random.default_rng([config.seed, class_index, patient_index])
    rng = np.random.default_rng([config.seed, class_index, patient_index, video_index + 1])
    gain = patient_rng.uniform(0.85, 1.15)
    patient_id = f"PID-{patient_rng.integers(10**7, 10**8)}"
    render = _texture_video if config.design == "texture" else _blobs_video
    frames, masks, fov = render(config, label, rng, gain)
    number = class_index * config.patients + patient_index + 1
    width = max(2, len(str(config.classes * config.patients)))
    return SynthVideo(
        label, f"P{number:0{width}d}", f"V{video_index + 1:02d}", frames, masks, fov, patient_id
    )


def _texture_video(config: SynthConfig, label: str, rng: np.random.Generator, gain: float):
    """The ``texture`` design: class-specific textures, one fixed blob layout per video."""
    h, w = config.size
    m = min(h, w)
    scale = m / 128  # texture and blob sizes follow the frame size
    radius = m * rng.uniform(0.40, 0.46)
    fov = _draw_fov(rng, (h, w), radius)
    yy, xx = np.ogrid[:h, :w]
    disk = (xx - fov.cx) ** 2 + (yy - fov.cy) ** 2 <= fov.radius**2
    offsets, pad = _draw_drift(rng, config.frames, m)
    canvas = (h + pad, w + pad)
    tissue = _texture(rng, label, canvas, scale) * gain

    blobs = np.zeros(canvas, dtype=bool)
    if label == "meningioma":
        side = math.floor(radius * math.sqrt(2))
        cy0, cx0 = fov.cy + offsets[0, 0], fov.cx + offsets[0, 1]  # crop centre on the canvas at frame 0
        cyy, cxx = np.ogrid[: canvas[0], : canvas[1]]
        for _ in range(rng.integers(2, 6)):
            r = m * rng.uniform(0.035, 0.09)
            reach = max(side / 2 - r, 1.0)
            by, bx = cy0 + rng.uniform(-reach, reach), cx0 + rng.uniform(-reach, reach)
            blobs |= (cxx - bx) ** 2 + (cyy - by) ** 2 <= r**2
        tissue = np.where(blobs, tissue * rng.uniform(0.12, 0.22), tissue)

    windows = [(slice(oy, oy + h), slice(ox, ox + w)) for oy, ox in offsets]
    tissue = tissue.astype(np.float32)
    frames = _finish(config, np.stack([tissue[win] for win in windows]), disk, fov, rng)
    masks = {}
    if label == "meningioma":
        masks = {int(i): blobs[windows[i]] & disk for i in range(0, config.frames, config.mask_every)}
    return frames, masks, fov


# blobs design: bodies per layout, radius (fraction of the crop side), mask coverage of the crop, darkening
_BODIES = (2, 5)
_BODY_RADIUS = (0.06, 0.11)
_COVERAGE = (0.05, 0.15)
_DARK = (0.12, 0.22)
_BODY_SPEED = 0.6  # px per frame, each body's own slide (the probe drift comes on top)


def _shared_texture(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Tissue in [0, 1] from ONE distribution for every class (blobs design); parameters drawn per video.

    The ranges span both classes of the texture design (meningioma's sparser, darker cells and
    glioblastoma's denser, brighter ones), so texture says nothing about the class.
    """
    base = 0.30 + rng.uniform(0.0, 0.08) + 0.06 * _smooth_noise(rng, shape, 12 * scale)
    cells = _cells(rng, shape, rng.uniform(0.010, 0.020) / scale**2, rng.uniform(1.2, 1.6) * scale)
    return np.clip(base + rng.uniform(0.40, 0.55) * cells, 0.0, 1.0)


def _vessel(rng: np.random.Generator, side: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A dark, sinuous, non-round vessel-like band across the crop (crop-local bool mask)."""
    p0 = rng.uniform(0.2 * side, 0.8 * side, 2)
    theta = rng.uniform(0, math.pi)
    length = side * rng.uniform(0.7, 1.3)
    amp, wavelength, phase = (
        side * rng.uniform(0.03, 0.10),
        side * rng.uniform(0.4, 0.9),
        rng.uniform(0, 2 * math.pi),
    )
    half_width = side * rng.uniform(0.015, 0.03)
    s = np.linspace(-length / 2, length / 2, 128)
    lateral = amp * np.sin(2 * math.pi * s / wavelength + phase)
    py = p0[0] + s * math.sin(theta) + lateral * math.cos(theta)
    px = p0[1] + s * math.cos(theta) - lateral * math.sin(theta)
    nearest = np.full(np.broadcast_shapes(yy.shape, xx.shape), np.inf, dtype=np.float32)
    for y, x in zip(py, px, strict=True):
        np.minimum(nearest, (yy - y) ** 2 + (xx - x) ** 2, out=nearest)
    return nearest <= half_width**2


def _layout(rng: np.random.Generator, side: int, steps: int, yy: np.ndarray, xx: np.ndarray):
    """One blob layout: centres, radii, velocities and darkening of 2-5 bodies whose union covers
    5-15 % of the crop on each of its ``steps`` frames (drawn again until it does, bounded)."""
    for _ in range(200):
        n = int(rng.integers(_BODIES[0], _BODIES[1] + 1))
        radii = side * rng.uniform(*_BODY_RADIUS, n)
        velocity = rng.uniform(-_BODY_SPEED, _BODY_SPEED, (n, 2))
        reach = np.maximum(side / 2 - radii - np.abs(velocity).max(1) * steps - 1, 1.0)
        centres = side / 2 - 0.5 + rng.uniform(-1, 1, (n, 2)) * reach[:, None]
        coverage = [_bodies(centres + k * velocity, radii, yy, xx).any(0).mean() for k in (0, steps - 1)]
        if _COVERAGE[0] <= min(coverage) and max(coverage) <= _COVERAGE[1]:
            break
    return centres, radii, velocity, rng.uniform(*_DARK, n)


def _bodies(centres: np.ndarray, radii: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """``(n, side, side)`` squared-distance-inside masks of the bodies (crop-local)."""
    d2 = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    return d2 <= radii[:, None, None] ** 2


def _blobs_video(config: SynthConfig, label: str, rng: np.random.Generator, gain: float):
    """The ``blobs`` design: one texture distribution, the bodies are the only class cue.

    Blob layouts are redrawn every ``layout_every`` frames (the probe reaching new tissue) and each
    body slides in between, so a video shows many independent layouts; every frame has its own gain.
    """
    h, w = config.size
    m = min(h, w)
    if config.crop is None:
        radius = m * rng.uniform(0.40, 0.46)
    else:  # floor(radius * sqrt(2)) == crop
        radius = (config.crop + rng.uniform(0.05, 0.9)) / math.sqrt(2)
    fov = _draw_fov(rng, (h, w), radius)
    crop = inscribed_square(fov, (h, w))
    side = crop.size
    scale = side / 78  # the texture design's scale at its own crop of ~78 px in 128-px frames
    disk = fov.mask((h, w))
    offsets, pad = _draw_drift(rng, config.frames, round(side / 0.6))
    tissue = (_shared_texture(rng, (h + pad, w + pad), scale) * gain).astype(np.float32)
    frames = np.stack([tissue[oy : oy + h, ox : ox + w] for oy, ox in offsets])
    frames *= rng.uniform(0.85, 1.15, (config.frames, 1, 1)).astype(np.float32)  # per-frame gain
    yy, xx = np.mgrid[:side, :side].astype(np.float32)
    region = (slice(crop.y, crop.y + side), slice(crop.x, crop.x + side))
    truth = np.zeros((config.frames, h, w), dtype=bool)
    # own streams for the vessels and the rims: switching either on leaves the bodies where they were
    vessel_rng, rim_rng = (np.random.default_rng(rng.integers(2**63)) for _ in range(2))
    for t0 in range(0, config.frames, config.layout_every):
        t1 = min(config.frames, t0 + config.layout_every)
        local = frames[t0:t1, region[0], region[1]]  # a view: edits land in frames
        if config.distractors:  # in both classes, as dark as the bodies
            for _ in range(int(vessel_rng.integers(1, 3))):
                vessel = _vessel(vessel_rng, side, yy, xx)
                local[:, vessel] *= np.float32(vessel_rng.uniform(*_DARK))
        if label != "meningioma":
            continue
        centres, radii, velocity, dark = _layout(rng, side, t1 - t0, yy, xx)
        rim = rim_rng.uniform(0.25, 0.4, len(radii)) if config.rims else None
        for k in range(t1 - t0):
            c = centres + k * velocity
            inside = _bodies(c, radii, yy, xx)
            image = local[k]
            for b in range(len(radii)):
                image[inside[b]] *= np.float32(dark[b])
                if rim is not None:  # bright calcified rim and faint concentric lamellae
                    d = np.sqrt((yy - c[b, 0]) ** 2 + (xx - c[b, 1]) ** 2)
                    ring = inside[b] & (d > 0.78 * radii[b])
                    image[ring] += np.float32(rim[b])
                    core = inside[b] & ~ring
                    image[core] += np.float32(0.06) * (1 + np.cos(2 * math.pi * d[core] / (0.3 * radii[b])))
            truth[t0 + k, region[0], region[1]] = inside.any(0)
    frames = _finish(config, np.clip(frames, 0.0, 1.0), disk, fov, rng)
    masks = {}
    if label == "meningioma":
        masks = {int(i): truth[i] & disk for i in range(0, config.frames, config.mask_every)}
    return frames, masks, fov


def _indices(config: SynthConfig) -> Iterator[tuple[int, int, int]]:
    for c in range(config.classes):
        for p in range(config.patients):
            for v in range(config.videos):
                yield c, p, v


def generate_archive(config: SynthConfig) -> list[SynthVideo]:
    """Every video of the archive, in memory (what the written files must read back as)."""
    return [generate_video(config, *i) for i in _indices(config)]


@dataclass(frozen=True)
class SynthRecord:
    """One written video: its path (relative to the root), patient, label, masks folder, counts."""

    path: str
    patient: str
    label: str
    mask_path: str | None
    num_frames: int
    num_masks: int


@dataclass(frozen=True)
class SynthArchive:
    root: Path
    manifest: Path
    records: list[SynthRecord]


def _write_video(video: SynthVideo, path: Path, fmt: str) -> None:
    frames = video.frames
    if fmt == "mkt":
        from xrcam.io.mkt import write_mkt

        h, w = frames.shape[1:]
        meta = {"framerate": _FRAME_RATE, "fovx": f"{2 * video.fov.radius:.1f}", "fovy": f"{2 * video.fov.radius:.1f}",
                "patient_id": video.patient_id}  # fmt: skip
        write_mkt(path, frames, meta)
    elif fmt in ("avi", "mp4"):
        import av

        lossless = fmt == "avi"
        deep = frames.dtype == np.uint16
        with av.open(str(path), "w") as container:
            options = {} if lossless else {"crf": "12"}
            stream = container.add_stream(
                "ffv1" if lossless else "libx264", rate=_FRAME_RATE, options=options
            )
            stream.height, stream.width = frames.shape[1:]
            stream.pix_fmt = ("gray16le" if deep else "gray") if lossless else "yuv420p"
            for frame in frames:
                image = av.VideoFrame.from_ndarray(frame, format="gray16le" if deep else "gray")
                container.mux(stream.encode(image))
            container.mux(stream.encode())
    elif fmt == "tiff-stack":
        import tifffile

        tifffile.imwrite(path, frames, photometric="minisblack")
    else:
        path.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(frames):
            _write_image(path / f"frame_{index:06d}{_FRAME_SUFFIX[fmt]}", frame)


def _write_image(path: Path, image: np.ndarray) -> None:
    if path.suffix == ".tif":
        import tifffile

        tifffile.imwrite(path, image, photometric="minisblack")
        return
    from PIL import Image

    Image.fromarray(image).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def write_archive(out: str | Path, config: SynthConfig | None = None, fmt: str = "png") -> SynthArchive:
    """Write the archive as ``out/<class>/<patient>/<video>`` in format ``fmt`` plus ``out/manifest.csv``.

    Masks of meningioma frames go to ``<video>.masks/frame_NNNNNN.png`` (uint8 0/255) beside each
    video. ``mkt`` needs ``bit_depth=16``; ``mp4`` and ``jpg`` need ``bit_depth=8`` (and mp4 even sizes).
    """
    config = config or SynthConfig()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if config.bit_depth not in _BIT_DEPTHS.get(fmt, (8, 16)):
        raise ValueError(f"{fmt} holds {_BIT_DEPTHS[fmt][0]}-bit frames; use bit depth {_BIT_DEPTHS[fmt][0]}")
    if fmt == "mp4" and any(s % 2 for s in config.size):
        raise ValueError(f"mp4 (H.264, yuv420p) needs even frame sizes, got {config.size}")
    root = Path(out)
    records = []
    for indices in _indices(config):
        video = generate_video(config, *indices)
        rel = video.relpath(fmt)
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_video(video, path, fmt)
        mask_rel = None
        if video.masks:
            mask_rel = f"{video.label}/{video.patient}/{video.name}.masks"
            (root / mask_rel).mkdir(exist_ok=True)
            for index, mask in video.masks.items():
                _write_image(root / mask_rel / f"frame_{index:06d}.png", mask.astype(np.uint8) * 255)
        records.append(
            SynthRecord(rel, video.patient, video.label, mask_rel, len(video.frames), len(video.masks))
        )
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "patient", "label", "mask_path"])
        writer.writerows([r.path, r.patient, r.label, r.mask_path or ""] for r in records)
    return SynthArchive(root, manifest, records)
