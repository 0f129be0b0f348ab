"""Bad input raises XrcamInputError naming the file (and frame); discovery reports it and carries on."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xrcam.archive import VideoEntry, discover_archive, load_masks
from xrcam.errors import XrcamInputError
from xrcam.io import open_video, read_image
from xrcam.io.mkt import write_mkt
from xrcam.preprocess import Crop, PreprocessConfig, Preprocessor, detect_fov
from xrcam.synth import SynthConfig, write_archive


def _raises_naming(path, call, match=None):
    with pytest.raises(XrcamInputError, match=match) as err:
        call()
    assert str(err.value).startswith(str(path)), str(err.value)
    assert err.value.path == str(path)
    return err.value


def _mkt(path, frames=3):
    return write_mkt(path, np.full((frames, 16, 16), 500, dtype=np.uint16), {"patient_id": "PID-123"})


def test_truncated_mkt(tmp_path):
    path = _mkt(tmp_path / "cut.mkt")
    data = path.read_bytes()
    path.write_bytes(data[: 16 + 2 * (512 + 32) + 100])  # third frame cut short, block lost
    error = _raises_naming(path, lambda: open_video(path), "truncated")
    assert "2 whole frames" in str(error)
    (tmp_path / "short.mkt").write_bytes(data[:9])
    _raises_naming(tmp_path / "short.mkt", lambda: open_video(tmp_path / "short.mkt"), "truncated")


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".mkt", ".tif"])
def test_zero_byte_video(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    _raises_naming(path, lambda: open_video(path))


@pytest.mark.parametrize("suffix", [".avi", ".mp4", ".tif"])
def test_undecodable_video(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _raises_naming(path, lambda: open_video(path))


def test_unreadable_image_in_a_frame_folder(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"frame_{i}.png")
    broken = tmp_path / "frame_1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _raises_naming(broken, lambda: open_video(tmp_path), "unreadable image")
    _raises_naming(broken, lambda: read_image(broken), "unreadable image")


def test_frames_of_mixed_sizes(tmp_path):
    for i, shape in enumerate([(8, 8), (8, 8), (8, 9)]):
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / f"frame_{i}.png")
    error = _raises_naming(tmp_path / "frame_2.png", lambda: open_video(tmp_path), "mixed sizes")
    assert error.frame == 2 and "(frame 2)" in str(error)


def test_mask_size_differs_from_its_frame(tmp_path):
    write_archive(tmp_path, SynthConfig(classes=1, patients=1, videos=1, frames=2, size=(48, 48)), "png")
    masks = tmp_path / "meningioma" / "P01" / "V01.masks"
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(masks / "frame_000001.png")
    entry = VideoEntry("meningioma/P01/V01", tmp_path / "meningioma/P01/V01", "P01", "meningioma", masks)
    error = _raises_naming(masks / "frame_000001.png", lambda: load_masks(entry), "mask is 48x40")
    assert error.frame == 1
    with open_video(entry.path) as reader:
        pre = Preprocessor.for_video(reader)
    _raises_naming(entry.path, lambda: pre.crop_mask(np.zeros((40, 48), bool), frame=1), "mask is 48x40")
    # discovery reports it and keeps the video without ground truth
    archive = discover_archive(tmp_path)
    assert [e.mask_path for e in archive.entries] == [None]
    assert any(p.path == masks / "frame_000001.png" and "48x40" in p.problem for p in archive.problems)


@pytest.mark.parametrize("content", ["black", "uniform", "noise"])
def test_frame_without_fov(tmp_path, content):
    rng = np.random.default_rng(0)
    frame = {
        "black": np.zeros((64, 64)),
        "uniform": np.full((64, 64), 3000.0),
        "noise": rng.normal(20, 5, (64, 64)).clip(0),
    }[content].astype(np.uint16)
    path = write_mkt(tmp_path / "blank.mkt", np.stack([frame, frame]), {})
    error = _raises_naming(path, lambda: detect_fov(frame, path, 0), "no circular field of view")
    assert error.frame == 0 and "--crop" in str(error)
    with open_video(path) as reader:
        _raises_naming(path, lambda: Preprocessor.for_video(reader), "no circular field of view")
        assert Preprocessor.for_video(reader, PreprocessConfig(crop=Crop(0, 0, 32))).crop.size == 32


def test_frame_of_wrong_size_given_to_the_preprocessor(tmp_path):
    pre = Preprocessor(Crop(0, 0, 8), (16, 16), path=tmp_path / "v.avi")
    _raises_naming(tmp_path / "v.avi", lambda: pre(np.zeros((2, 16, 15), np.uint8)), "15x16")


def test_discovery_reports_bad_files_and_keeps_the_rest(tmp_path):
    write_archive(
        tmp_path, SynthConfig(classes=2, patients=1, videos=1, frames=2, size=(48, 48), bit_depth=16), "mkt"
    )
    patient = tmp_path / "glioblastoma" / "P02"
    (patient / "zero.avi").write_bytes(b"")
    (patient / "junk.mp4").write_bytes(b"not a video at all" * 50)
    cut = _mkt(patient / "cut.mkt")
    cut.write_bytes(cut.read_bytes()[:700])
    frames = patient / "mixed"
    frames.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(frames / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(frames / "b.png")
    archive = discover_archive(tmp_path)
    assert sorted(e.video_id for e in archive.entries) == [
        "glioblastoma/P02/V01.mkt",
        "meningioma/P01/V01.mkt",
    ]
    reported = {p.path.name: p.problem for p in archive.problems}
    assert set(reported) == {"zero.avi", "junk.mp4", "cut.mkt", "b.png"}
    assert (
        "truncated" in reported["cut.mkt"]
        and "empty" in reported["zero.avi"]
        and "mixed" in reported["b.png"]
    )
    assert all(str(p).startswith(str(p.path)) for p in archive.problems)
    mixed = next(p for p in archive.problems if p.path.name == "b.png")
    assert mixed.video == frames and mixed.frame == 1 and "(frame 1)" in str(mixed)
