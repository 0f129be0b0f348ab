"""The synthetic generator: deterministic, two distinguishable classes, realistic pCLE framing."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from workflows.cli import main
from xrcam.preprocess import inscribed_square
from xrcam.synth import SynthConfig, generate_archive, generate_video, write_archive

CONFIG = SynthConfig(classes=2, patients=3, videos=2, frames=6, size=(96, 96), seed=11)


@pytest.fixture(scope="module")
def videos():
    return generate_archive(CONFIG)


def test_deterministic_from_the_seed(videos):
    again = generate_archive(CONFIG)
    for a, b in zip(videos, again, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.masks.keys() == b.masks.keys() and all((a.masks[i] == b.masks[i]).all() for i in a.masks)
        assert a.fov == b.fov and a.patient_id == b.patient_id
    other = generate_archive(SynthConfig(**{**CONFIG.__dict__, "seed": 12}))
    assert not np.array_equal(videos[0].frames, other[0].frames)
    # any video can be regenerated alone
    np.testing.assert_array_equal(generate_video(CONFIG, 1, 2, 1).frames, videos[-1].frames)


def test_layout_names_and_pseudonyms(videos):
    assert [v.label for v in videos] == ["meningioma"] * 6 + ["glioblastoma"] * 6
    assert sorted({v.patient for v in videos}) == ["P01", "P02", "P03", "P04", "P05", "P06"]
    assert {v.name for v in videos} == {"V01", "V02"}
    for v in videos:
        assert v.patient_id.startswith("PID-") and v.patient not in v.patient_id and len(v.patient_id) > 8
        assert v.frames.shape == (6, 96, 96) and v.frames.dtype == np.uint8


def test_masks_mark_dark_blobs_inside_the_crop(videos):
    for v in videos:
        if v.label == "glioblastoma":
            assert v.masks == {}
            continue
        assert sorted(v.masks) == list(range(6))
        crop = inscribed_square(v.fov, (96, 96))
        for i, mask in v.masks.items():
            inside = np.zeros_like(mask)
            inside[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size] = True
            assert mask[inside].sum() >= 0.8 * mask.sum() > 0
            tissue = v.fov.mask((96, 96)) & ~mask
            assert v.frames[i][mask].mean() < 0.5 * v.frames[i][tissue].mean()


def test_mask_every_k(videos):
    config = SynthConfig(classes=1, patients=1, videos=1, frames=7, size=(64, 64), mask_every=3)
    assert sorted(generate_video(config, 0, 0, 0).masks) == [0, 3, 6]


def test_probe_drifts_slowly(videos):
    total = []
    for v in videos[:6]:
        centroids = np.array([np.argwhere(v.masks[i]).mean(axis=0) for i in sorted(v.masks)])
        steps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
        assert steps.max() <= 2.5
        total.append(np.linalg.norm(centroids[-1] - centroids[0]))
    assert max(total) > 0.5


def test_black_background_with_a_mark_outside_the_fov(videos):
    marks = 0
    for v in videos:
        outside = ~v.fov.mask((96, 96))
        bright = v.frames[0] > 150
        assert np.median(v.frames[0][outside]) < 10 < np.median(v.frames[0][~outside])
        marks += bool((bright & outside).any())
        yy, xx = np.nonzero(bright & outside)
        assert (np.hypot(xx - v.fov.cx, yy - v.fov.cy) > v.fov.radius).all()
    assert marks == len(videos)
    radii = {v.fov.radius for v in videos}
    centres = [np.hypot(v.fov.cx - 47.5, v.fov.cy - 47.5) for v in videos]
    assert len(radii) == len(videos) and max(centres) > 2


def test_sixteen_bit_and_more_classes():
    config = SynthConfig(classes=4, patients=1, videos=1, frames=2, size=(64, 64), bit_depth=16)
    videos = generate_archive(config)
    assert [v.label for v in videos] == ["meningioma", "glioblastoma", "fibrous", "sparse"]
    for v in videos:
        assert v.frames.dtype == np.uint16 and 1000 < v.frames.max() < 2**15


def test_write_archive_manifest(tmp_path):
    config = SynthConfig(classes=2, patients=1, videos=2, frames=3, size=(64, 64))
    archive = write_archive(tmp_path, config, "tiff-stack")
    rows = list(csv.DictReader(open(archive.manifest)))
    assert [r["path"] for r in rows] == [r.path for r in archive.records]
    assert set(rows[0]) == {"path", "patient", "label", "mask_path"}
    for row in rows:
        assert (tmp_path / row["path"]).is_file()
        if row["label"] == "meningioma":
            assert len(list((tmp_path / row["mask_path"]).glob("frame_*.png"))) == 3
        else:
            assert row["mask_path"] == ""


def test_format_and_depth_checks(tmp_path):
    with pytest.raises(ValueError, match="16-bit"):
        write_archive(tmp_path, SynthConfig(bit_depth=8), "mkt")
    with pytest.raises(ValueError, match="8-bit"):
        write_archive(tmp_path, SynthConfig(bit_depth=16), "jpg")
    with pytest.raises(ValueError, match="even"):
        write_archive(tmp_path, SynthConfig(size=(65, 64)), "mp4")
    with pytest.raises(ValueError):
        SynthConfig(classes=5)


def test_cli_writes_and_reports(tmp_path):
    out = tmp_path / "arch"
    args = [
        "synth",
        str(out),
        "--format",
        "mkt",
        "--patients",
        "1",
        "--videos",
        "1",
        "--frames",
        "3",
        "--size",
        "64",
        "80",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "meningioma/P01/V01.mkt: 3 frames, 3 masks" in result.output
    assert (
        "Wrote 2 videos (1 meningioma, 1 glioblastoma) of 64x80 16-bit mkt, 6 frames, 3 masks, 2 patients"
        in result.output
    )
    assert (out / "meningioma" / "P01" / "V01.mkt").is_file() and (out / "manifest.csv").is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code != 0 and "--force" in again.output
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--format", "mp4", "--bit-depth", "16"])
    assert bad.exit_code != 0 and "8-bit" in bad.output


# ------------------------------------------------------------------ the blobs design (localisation benchmark)

BLOBS = SynthConfig(patients=3, videos=1, frames=8, size=(128, 128), seed=4, design="blobs", crop=72)


@pytest.fixture(scope="module")
def blob_videos():
    return generate_archive(BLOBS)


def _crop_of(v, shape=(128, 128)):
    c = inscribed_square(v.fov, shape)
    return (slice(c.y, c.y + c.size), slice(c.x, c.x + c.size)), c.size


def test_blobs_design_crop_and_coverage(blob_videos):
    again = generate_archive(BLOBS)
    for a, b in zip(blob_videos, again, strict=True):
        np.testing.assert_array_equal(a.frames, b.frames)
    for v in blob_videos:
        region, side = _crop_of(v)
        assert side == 72
        if v.label == "glioblastoma":
            assert v.masks == {}
            continue
        for i, mask in v.masks.items():
            assert mask[region].sum() == mask.sum()  # every body lies inside the crop
            assert 0.05 <= mask[region].mean() <= 0.15
            tissue = v.fov.mask((128, 128)) & ~mask
            assert v.frames[i][mask].mean() < 0.5 * v.frames[i][tissue].mean()


def test_blobs_design_many_layouts_that_slide(blob_videos):
    v = blob_videos[0]
    m = v.masks
    overlap = lambda a, b: (m[a] & m[b]).sum() / (m[a] | m[b]).sum()  # noqa: E731
    assert overlap(0, 1) > 0.5  # one layout: the bodies slide a little
    assert not np.array_equal(m[0], m[1]) or not np.array_equal(m[1], m[2])
    assert overlap(0, 4) < 0.3 and overlap(3, 4) < 0.3  # layout_every=4: frame 4 shows new bodies


def test_blobs_design_texture_is_no_class_cue():
    """Tissue outside the bodies has one distribution in both classes (unlike the texture design):
    its contrast (std / mean, gain-free) separates the classes of the texture design, not these."""
    separation = {}
    for design in ("blobs", "texture"):
        config = SynthConfig(patients=10, videos=1, frames=1, size=(96, 96), seed=2, design=design)
        contrast = {"meningioma": [], "glioblastoma": []}
        for v in generate_archive(config):
            region, _ = _crop_of(v, (96, 96))
            tissue = v.frames[0][region].astype(float)
            tissue = tissue[~v.masks[0][region]] if v.masks else tissue.ravel()
            contrast[v.label].append(tissue.std() / tissue.mean())
        a, b = (np.array(x) for x in contrast.values())
        separation[design] = abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2)
    assert separation["texture"] > 2 and separation["blobs"] < 1.2


def test_blobs_design_distractors_in_both_classes_and_rims():
    plain = SynthConfig(patients=1, videos=1, frames=2, size=(128, 128), seed=1, design="blobs", crop=72)
    for c in (0, 1):
        base, vessels = (generate_video(cfg, c, 0, 0) for cfg in (plain, replace(plain, distractors=True)))
        region, _ = _crop_of(base)
        dark = [(v.frames[0][region] < 0.5 * np.median(v.frames[0][region])).mean() for v in (base, vessels)]
        assert dark[1] > dark[0] + 0.02  # dark bands, outside the ground truth
        if c == 0:
            np.testing.assert_array_equal(base.masks[0], vessels.masks[0])
            rims = generate_video(replace(plain, rims=True), 0, 0, 0)
            mask = rims.masks[0]
            assert rims.frames[0][mask].max() > base.frames[0][mask].max()


def test_design_checks_and_cli(tmp_path):
    with pytest.raises(ValueError, match="design"):
        SynthConfig(design="stripes")
    with pytest.raises(ValueError, match="blobs design"):
        SynthConfig(distractors=True)
    with pytest.raises(ValueError, match="classes"):
        SynthConfig(design="blobs", classes=3)
    with pytest.raises(ValueError, match="crop"):
        SynthConfig(design="blobs", size=(96, 96), crop=90)
    out = tmp_path / "b"
    args = ["synth", str(out), "--design", "blobs", "--patients", "1", "--videos", "1", "--frames", "2",
            "--size", "96", "96", "--crop", "60", "--distractors"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "2 masks" in result.output
    bad = CliRunner().invoke(main, ["synth", str(tmp_path / "t"), "--rims"])
    assert bad.exit_code == 1 and "blobs design" in bad.output
