"""FOV detection, the inscribed-square crop, intensity scaling and mask alignment (SPEC §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xrcam.errors import XrcamInputError
from xrcam.io import open_video
from xrcam.preprocess import Crop, FieldOfView, PreprocessConfig, Preprocessor, detect_fov, inscribed_square
from xrcam.synth import SynthConfig, generate_archive, write_archive


def _disk_frame(shape, fov, rng, depth=8, blobs=True):
    """Textured disk on a noisy black background, dark holes near the rim and a bright mark in a corner."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    disk = (xx - fov.cx) ** 2 + (yy - fov.cy) ** 2 <= fov.radius**2
    image = np.where(disk, rng.uniform(0.35, 0.9, shape), np.abs(rng.normal(0.01, 0.01, shape)))
    if blobs:  # dark holes inside the FOV, one touching the rim
        for angle, dist in ((0.3, 0.85), (2.0, 0.3)):
            bx, by = (
                fov.cx + dist * fov.radius * math.cos(angle),
                fov.cy + dist * fov.radius * math.sin(angle),
            )
            image[(xx - bx) ** 2 + (yy - by) ** 2 <= (0.12 * fov.radius) ** 2] = 0.05
    corner = (slice(1, 9), slice(w - 26, w - 2)) if fov.cx < w / 2 else (slice(1, 9), slice(2, 26))
    mark = np.zeros(shape, dtype=bool)
    mark[corner] = rng.random((8, 24)) < 0.5
    image[mark & ~disk] = 0.8
    return np.rint(image * (255 if depth == 8 else 20000)).astype(np.uint8 if depth == 8 else np.uint16)


CIRCLES = [
    ((128, 128), FieldOfView(63.5, 63.5, 55.0)),
    ((128, 128), FieldOfView(58.2, 70.7, 48.3)),  # off-centre
    ((120, 160), FieldOfView(90.0, 60.0, 50.5)),  # off-centre, non-square frame
    ((96, 96), FieldOfView(47.5, 47.5, 30.0)),  # small radius
    ((200, 200), FieldOfView(95.3, 104.9, 92.8)),  # large radius
    ((578, 576), FieldOfView(287.5, 288.5, 270.0)),  # Cellvizio geometry
    ((128, 128), FieldOfView(60.0, 70.0, 68.0)),  # circle cut by the frame's edges
]


@pytest.mark.parametrize(("shape", "fov"), CIRCLES)
@pytest.mark.parametrize("depth", [8, 16])
def test_fov_crop_within_two_pixels(shape, fov, depth):
    frame = _disk_frame(shape, fov, np.random.default_rng(0), depth)
    found = detect_fov(frame)
    truth, crop = inscribed_square(fov, shape), inscribed_square(found, shape)
    assert abs(found.cx - fov.cx) <= 1 and abs(found.cy - fov.cy) <= 1 and abs(found.radius - fov.radius) <= 1
    assert max(abs(a - b) for a, b in zip(crop, truth, strict=True)) <= 2, (crop, truth)


def test_fov_on_generated_videos():
    config = SynthConfig(classes=2, patients=3, videos=2, frames=1, size=(128, 128))
    for video in generate_archive(config):
        crop, truth = (
            inscribed_square(detect_fov(video.frames[0]), (128, 128)),
            inscribed_square(video.fov, (128, 128)),
        )
        assert max(abs(a - b) for a, b in zip(crop, truth, strict=True)) <= 2, (
            video.relpath("png"),
            crop,
            truth,
        )


def test_inscribed_square_geometry():
    fov = FieldOfView(63.5, 63.5, 50.0)
    crop = inscribed_square(fov, (128, 128))
    assert crop == Crop(29, 29, 70)  # floor(50*sqrt(2)) = 70, centred on 63.5
    for r in (10.0, 33.3, 50.0, 115.2):
        fov = FieldOfView(130.2, 128.7, r)
        c = inscribed_square(fov, (260, 260))
        assert c.size == math.floor(r * math.sqrt(2))
        # every pixel of the crop, out to its outer edges, lies inside the circle
        corners = [(c.x - 0.5 + dx, c.y - 0.5 + dy) for dx in (0, c.size) for dy in (0, c.size)]
        assert max(math.hypot(x - fov.cx, y - fov.cy) for x, y in corners) <= r + 0.5 + 1e-9
    assert inscribed_square(FieldOfView(5.0, 5.0, 40.0), (64, 64)).fits((64, 64))


def test_crop_parse():
    assert Crop.parse("10,20,230") == Crop(10, 20, 230)
    for bad in ("10,20", "a,b,c", "-1,0,5", "0,0,0"):
        with pytest.raises(ValueError):
            Crop.parse(bad)


def _unnormalise(x: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return x * std + mean


def test_eight_bit_frames_scale_by_255_and_repeat_to_three_channels():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (5, 40, 50), dtype=np.uint8)
    config = PreprocessConfig()
    pre = Preprocessor(Crop(3, 4, 30), (40, 50), config)
    x = pre(frames)
    assert x.shape == (5, 3, 30, 30) and x.dtype == torch.float32
    raw = _unnormalise(x, config)
    expected = torch.from_numpy(frames[:, 4:34, 3:33] / 255.0).float()
    for c in range(3):
        torch.testing.assert_close(raw[:, c], expected, atol=1e-5, rtol=0)


def test_sixteen_bit_window_is_per_frame_percentiles_inside_the_fov():
    rng = np.random.default_rng(2)
    fov = FieldOfView(31.5, 31.5, 28.0)
    inside = fov.mask((64, 64))
    frames = rng.integers(100, 5000, (3, 64, 64)).astype(np.uint16)
    frames[:, ~inside] = 60000  # bright outside the FOV: must not enter the window
    frames[1] = np.minimum(frames[1].astype(np.int64) * 3, 60000).astype(np.uint16)
    config = PreprocessConfig(mean=(0, 0, 0), std=(1, 1, 1))
    pre = Preprocessor(inscribed_square(fov, (64, 64)), (64, 64), config, fov)
    x = pre(frames)
    c = pre.crop
    for i in range(3):
        values = np.sort(frames[i][inside].astype(np.float64))
        lo, hi = values[round(0.005 * (len(values) - 1))], values[round(0.995 * (len(values) - 1))]
        expected = np.clip((frames[i, c.y : c.y + c.size, c.x : c.x + c.size] - lo) / (hi - lo), 0, 1)
        np.testing.assert_allclose(x[i, 0].numpy(), expected, atol=1e-6)
        np.testing.assert_array_equal(x[i, 0].numpy(), x[i, 2].numpy())
    # each frame on its own gives the same result as in the batch
    torch.testing.assert_close(pre(frames[1]), x[1:2])


def test_output_size_resizes_frames_and_masks():
    pre = Preprocessor(Crop(0, 0, 40), (48, 48), PreprocessConfig(size=20))
    assert pre(np.zeros((2, 48, 48), np.uint8)).shape == (2, 3, 20, 20)
    mask = np.zeros((48, 48), bool)
    mask[:20, :20] = True
    small = pre.crop_mask(mask)
    assert small.shape == (20, 20) and small[:10, :10].all() and not small[10:, :].any()


def test_masks_stay_pixel_aligned_after_cropping():
    rng = np.random.default_rng(3)
    fov = FieldOfView(70.3, 58.8, 50.0)
    frame = _disk_frame((128, 144), fov, rng, blobs=False)
    frame[fov.mask((128, 144))] = 60
    mask = (rng.random((128, 144)) < 0.05) & fov.mask((128, 144))
    frame[mask] = 250  # the mask's pixels are the only bright ones inside the FOV
    pre = Preprocessor(inscribed_square(detect_fov(frame), (128, 144)), (128, 144), PreprocessConfig())
    bright = _unnormalise(pre(frame), pre.config)[0, 0].numpy() > 0.8
    cropped = pre.crop_mask(mask)
    assert cropped.shape == (pre.crop.size, pre.crop.size) and cropped.sum() > 50
    np.testing.assert_array_equal(bright, cropped)
    both = pre.crop_mask(np.stack([mask, mask]))
    assert both.shape == (2, pre.crop.size, pre.crop.size) and (both[1] == cropped).all()


def test_for_video_uses_frame_zero_and_agrees_with_generator(tmp_path):
    config = SynthConfig(classes=1, patients=1, videos=1, frames=9, size=(96, 112), bit_depth=16)
    write_archive(tmp_path, config, "mkt")
    video = generate_archive(config)[0]
    with open_video(tmp_path / video.relpath("mkt")) as reader:
        pre = Preprocessor.for_video(reader)
        assert pre.crop == inscribed_square(detect_fov(video.frames[0]), (96, 112))
        assert list(pre.frame_indices(reader.num_frames)) == [0, 2, 4, 6, 8]
        frames = np.stack([f for _, f in reader.read(0, None, 2)])
    x = pre(frames)
    assert x.shape == (5, 3, pre.crop.size, pre.crop.size) and torch.isfinite(x).all()
    # blobs are dark in the model input, where the cropped mask says
    m = pre.crop_mask(video.masks[0])
    assert x[0, 0][torch.from_numpy(m)].mean() < x[0, 0][torch.from_numpy(~m)].mean() - 1.0


def test_manual_crop_overrides_detection(tmp_path):
    config = SynthConfig(classes=1, patients=1, videos=1, frames=2, size=(64, 64))
    write_archive(tmp_path, config, "png")
    with open_video(tmp_path / generate_archive(config)[0].relpath("png")) as reader:
        pre = Preprocessor.for_video(reader, PreprocessConfig(crop=Crop(5, 6, 30)))
        assert pre.crop == Crop(5, 6, 30) and pre.fov is None
        with pytest.raises(XrcamInputError, match="does not fit"):
            Preprocessor.for_video(reader, PreprocessConfig(crop=Crop(40, 0, 30)))


def test_config_records_settings():
    d = PreprocessConfig(crop=Crop(1, 2, 3)).to_dict()
    assert d["frame_step"] == 2 and d["crop"] == [1, 2, 3] and d["percentiles"] == (0.5, 99.5)
    with pytest.raises(ValueError):
        PreprocessConfig(frame_step=0)
