"""Training: patient-level split, early stopping, exact resume, checkpoints usable as trained, Ray Train path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xrcam.errors import XrcamConfigError
from xrcam.synth import SynthConfig, write_archive
from xrcam.training import SPLITS, TrainConfig, augment, fit, prepare_data

# tiny: 3 patients per class -> 4/1/1 patients, 4 kept frames per video, 32-px crops
TINY = dict(model="resnet18", image_size=32, batch_size=8, epochs=1, seed=0)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    write_archive(
        root, SynthConfig(patients=3, videos=1, frames=8, size=(64, 64), bit_depth=16, seed=0), "mkt"
    )
    return root


@pytest.fixture(scope="module")
def data(archive):
    return prepare_data(archive, TrainConfig(**TINY))


def _metrics(out: Path) -> list[dict[str, str]]:
    with (out / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_puts_every_patient_in_exactly_one_set(archive, data, tmp_path):
    for seed in range(4):
        rows = prepare_data(archive, TrainConfig(**{**TINY, "seed": seed})).split_rows
        split_of: dict[str, set[str]] = {}
        for row in rows:
            split_of.setdefault(row["patient"], set()).add(row["split"])
        assert all(len(splits) == 1 for splits in split_of.values()), split_of
        assert {next(iter(s)) for s in split_of.values()} == set(SPLITS)
    # the frames of each split are exactly the frames of its videos
    for split in SPLITS:
        expected = sum(int(r["frames"]) for r in data.split_rows if r["split"] == split)
        assert len(data.frames[split]) == expected > 0

    fit(data, tmp_path, TrainConfig(**TINY), progress=False)
    with (tmp_path / "split.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert {(r["video_id"], r["patient"], r["split"]) for r in written} == {
        (r["video_id"], r["patient"], r["split"]) for r in data.split_rows
    }
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    by_split = sidecar["split"]["videos"]
    assert sorted(v for s in SPLITS for v in by_split[s]) == sorted(r["video_id"] for r in data.split_rows)
    # the .mkt metadata's patient_id never reaches the outputs
    text = "".join(p.read_text() for p in tmp_path.iterdir() if p.suffix in (".csv", ".json"))
    assert "PID-" not in text and "patient_id" not in text


def test_a_video_without_field_of_view_is_skipped_and_reported(archive, tmp_path):
    import shutil

    from xrcam.io.mkt import write_mkt

    root = tmp_path / "archive"
    shutil.copytree(archive, root)
    black = root / "glioblastoma" / "P04" / "black.mkt"  # a train patient
    write_mkt(black, np.zeros((4, 64, 64), dtype=np.uint16))
    data = prepare_data(root, TrainConfig(**TINY))
    assert any(str(black) in problem and "field of view" in problem for problem in data.problems)
    assert "glioblastoma/P04/black.mkt" not in {r["video_id"] for r in data.split_rows}
    assert sum(len(f) for f in data.frames.values()) == 24  # the six good videos, 4 kept frames each


def test_early_stopping_stops_when_validation_cannot_improve(data, tmp_path):
    # lr=0: the weights never change, so validation is identical every epoch after the first
    result = fit(
        data, tmp_path, TrainConfig(**{**TINY, "epochs": 10, "lr": 0.0, "patience": 2}), progress=False
    )
    rows = _metrics(tmp_path)
    assert result.stopped_early
    assert result.epochs_run == 3 and result.best_epoch == 1
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [r["best"] for r in rows] == ["True", "False", "False"]
    assert len({r["val_loss"] for r in rows}) == 1


def test_resume_continues_the_epoch_counter_and_matches_an_uninterrupted_run(data, tmp_path):
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    fit(data, resumed, TrainConfig(**TINY), progress=False)
    assert [r["epoch"] for r in _metrics(resumed)] == ["1"]
    result = fit(data, resumed, TrainConfig(**{**TINY, "epochs": 2}), progress=False)
    assert result.epochs_run == 2
    fit(data, straight, TrainConfig(**{**TINY, "epochs": 2}), progress=False)

    rows_resumed, rows_straight = _metrics(resumed), _metrics(straight)
    assert [r["epoch"] for r in rows_resumed] == ["1", "2"]
    drop_time = [{k: v for k, v in r.items() if k != "seconds"} for r in rows_resumed + rows_straight]
    assert drop_time[:2] == drop_time[2:]
    a = torch.load(resumed / "last.pt", weights_only=True)
    b = torch.load(straight / "last.pt", weights_only=True)
    assert a["state"]["epoch"] == b["state"]["epoch"] == 2
    for key, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][key], rtol=0, atol=1e-6, msg=key)


def test_resume_refuses_changed_model_settings(data, tmp_path):
    from xrcam.errors import XrcamConfigError

    fit(data, tmp_path, TrainConfig(**TINY), progress=False)
    with pytest.raises(XrcamConfigError, match="seed"):
        fit(data, tmp_path, TrainConfig(**{**TINY, "epochs": 2, "seed": 1}), progress=False)


def test_checkpoint_loads_with_load_model_and_reproduces_training_logits(archive, data, tmp_path):
    import xrcam
    from xrcam.io.readers import open_video
    from xrcam.models import read_checkpoint_sidecar
    from xrcam.preprocess import PreprocessConfig, Preprocessor

    result = fit(data, tmp_path, TrainConfig(**TINY), progress=False)
    sidecar = read_checkpoint_sidecar(result.checkpoint)
    model = xrcam.load_model(
        sidecar["model"], num_classes=len(sidecar["classes"]), checkpoint=result.checkpoint
    )
    assert sidecar["classes"] == data.classes and sidecar["metrics"]["best_epoch"] == 1

    # the weights training ended with (last.pt, epoch 1 = best) give the same logits
    trained = xrcam.load_model("resnet18", num_classes=2)
    trained.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    test = data.frames["test"]
    with torch.no_grad():
        logits = model(test.inputs())
        torch.testing.assert_close(logits, trained.eval()(test.inputs()))
        loss = torch.nn.functional.cross_entropy(logits, test.labels).item()
    assert loss == pytest.approx(sidecar["metrics"]["test_loss"], rel=1e-5)
    accuracy = (logits.argmax(1) == test.labels).float().mean().item()
    assert accuracy == pytest.approx(sidecar["metrics"]["test_accuracy"])

    # the sidecar's preprocessing alone reproduces the training frames (what `xrcam run` relies on)
    first_test = next(r for r in data.split_rows if r["split"] == "test")
    config = PreprocessConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in sidecar["preprocessing"].items()}
    )
    with open_video(archive / first_test["video_id"]) as reader:
        pre = Preprocessor.for_video(reader, config)
        frames = [frame for _, frame in reader.read(step=config.frame_step)]
    images = pre(np.stack(frames))
    torch.testing.assert_close(images, test.inputs(slice(0, len(frames))), rtol=0, atol=2e-3)


def test_augment_flips_rotates_and_keeps_the_mean_grey_under_contrast():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 24, 24) * 0.2 + 0.4  # contrast up to 1.5x stays inside [0, 1]: no clipping
    flipped = augment(x, generator, rotation_degrees=0, contrast=0)
    for a, b in zip(flipped, x, strict=True):
        assert any(torch.equal(a, v) for v in (b, b.flip(-1), b.flip(-2), b.flip(-1).flip(-2)))
    assert not torch.equal(flipped, x)  # 16 samples: some flip is drawn
    contrasted = augment(x, generator, rotation_degrees=0, contrast=0.5)
    torch.testing.assert_close(contrasted.mean((1, 2, 3)).sort().values, x.mean((1, 2, 3)).sort().values)
    assert not torch.allclose(contrasted.std((1, 2, 3)).sort().values, x.std((1, 2, 3)).sort().values)
    rotated = augment(x, torch.Generator().manual_seed(1), rotation_degrees=180, contrast=0)
    assert rotated.shape == x.shape and rotated.min() >= x.min() - 1e-6 and rotated.max() <= x.max() + 1e-6


def test_classes_set_the_logit_order_and_must_cover_the_archive(archive, data):
    labels = list(data.classes)
    reversed_order = prepare_data(archive, TrainConfig(**TINY, classes=tuple(reversed(labels))))
    assert reversed_order.classes == labels[::-1]
    first = data.frames["train"]
    flipped = reversed_order.frames["train"]
    assert torch.equal(flipped.images, first.images)
    assert torch.equal(flipped.labels, len(labels) - 1 - first.labels)  # the same frames, swapped indices
    with pytest.raises(XrcamConfigError, match=f"{labels[1]}.*not among the classes"):
        prepare_data(archive, TrainConfig(**TINY, classes=(labels[0], "other")))


def test_cli_defaults_are_train_configs():
    from click.testing import CliRunner

    from workflows.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    defaults = TrainConfig()
    for option, value in (
        ("epochs", defaults.epochs),
        ("batch-size", defaults.batch_size),
        ("lr", defaults.lr),
    ):
        block = result.output.split(f"\n  --{option} ", 1)[1].split("\n  --", 1)[0]
        assert f"default: {value}" in " ".join(block.split()), block


def test_address_needs_workers_only_when_given_on_the_command_line(archive, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from workflows.cli import main

    refused = CliRunner().invoke(main, ["train", str(archive), "--out", str(tmp_path), "--address", "h:1"])
    assert refused.exit_code == 2 and "--address needs --workers" in refused.output
    monkeypatch.setenv("XRCAM_ADDRESS", "h:1")  # set once for run/reduce: plain training ignores it
    tiny = [
        "--model",
        "resnet18",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--no-progress",
    ]
    # --device cuda stops a CPU-only machine right after the option checks (a GPU one just trains)
    result = CliRunner().invoke(
        main, ["train", str(archive), "--out", str(tmp_path), "--device", "cuda", *tiny]
    )
    assert "--address needs --workers" not in result.output
    if not torch.cuda.is_available():
        assert result.exit_code == 1 and "no CUDA device" in result.output, result.output
    else:
        assert result.exit_code == 0, result.output


def test_cli_trains_and_prints_test_accuracy(archive, tmp_path):
    from click.testing import CliRunner

    from workflows.cli import main

    args = ["train", str(archive), "--out", str(tmp_path), "--model", "resnet18", "--image-size", "32"]
    result = CliRunner().invoke(main, [*args, "--epochs", "1", "--batch-size", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    assert (tmp_path / "model.pt").exists() and (tmp_path / "last.pt").exists()
    again = CliRunner().invoke(
        main, [*args, "--epochs", "1", "--batch-size", "8", "--no-progress", "--seed", "3"]
    )
    assert again.exit_code != 0 and "seed" in again.output  # resuming with another split is refused


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_two_cpu_workers(ray_local, data, tmp_path):
    import xrcam
    from workflows.train_ray import train_distributed
    from xrcam.errors import XrcamConfigError

    result = train_distributed(data, tmp_path, TrainConfig(**TINY), workers=2, use_gpu=False, progress=False)
    assert result.epochs_run == 1 and result.best_epoch == 1
    assert result.test_frames == len(data.frames["test"])
    assert [r["epoch"] for r in _metrics(tmp_path)] == ["1"]
    sidecar = json.loads((tmp_path / "model.pt.json").read_text())
    assert sidecar["metrics"]["test_accuracy"] == pytest.approx(result.test_accuracy)
    xrcam.load_model("resnet18", num_classes=2, checkpoint=tmp_path / "model.pt")
    with pytest.raises(XrcamConfigError, match="seed"):  # a worker's own error reaches the caller
        changed = TrainConfig(**{**TINY, "epochs": 2, "seed": 5})
        train_distributed(data, tmp_path, changed, workers=2, use_gpu=False, progress=False)
