"""`xrcam run` on a real local Ray (127.0.0.1): completeness, failures, resume, a killed worker, no patient ids.

One small archive for the whole module: four 16-bit .mkt videos whose metadata carries a patient id, a
garbage .mkt file (rejected at discovery) and an 8-bit frame folder with one truncated frame (fails in
its worker). Runs share the session's Ray (``ray_local``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import xrcam
from workflows import results
from workflows.cli import main
from workflows.driver import run
from workflows.settings import RunSettings
from workflows.store import ResultStore
from xrcam.io.readers import open_video
from xrcam.models import save_checkpoint
from xrcam.preprocess import PreprocessConfig, Preprocessor
from xrcam.synth import SynthConfig, generate_archive, write_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CLASSES = ["glioblastoma", "meningioma"]
MKT = SynthConfig(patients=2, videos=1, frames=8, size=(80, 80), bit_depth=16, seed=1)
OPTIONS = [
    "--chunk-frames",
    "2",
    "--shard-chunks",
    "1",
    "--workers",
    "2",
    "--batch-size",
    "2",
    "--no-progress",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("run")
    archive = root / "archive"
    write_archive(archive, MKT, fmt="mkt")
    (archive / "meningioma" / "P01" / "broken.mkt").write_bytes(b"\x00" * 40)
    frames = root / "frames"
    written = write_archive(
        frames, SynthConfig(patients=1, videos=1, frames=8, size=(80, 80), seed=2), fmt="png"
    )
    source = next(r for r in written.records if r.label == "glioblastoma")
    folder = archive / "glioblastoma" / "P09" / "V01"
    shutil.copytree(frames / source.path, folder)
    frame6 = folder / "frame_000006.png"
    frame6.write_bytes(frame6.read_bytes()[: frame6.stat().st_size // 2])  # header intact, pixels cut off
    torch.manual_seed(0)
    model = xrcam.load_model("resnet18", num_classes=2)
    checkpoint = save_checkpoint(model, root / "model.pt", {"model": "resnet18", "classes": CLASSES})
    patient_ids = [video.patient_id for video in generate_archive(MKT)]
    assert len(set(patient_ids)) == 4
    return {
        "root": root,
        "archive": archive,
        "checkpoint": checkpoint,
        "patient_ids": patient_ids,
        "ray": ray_local,
    }


@pytest.fixture(scope="module")
def first_run(setup, tmp_path_factory):
    """`xrcam -vv run` through the CLI, with log records captured."""
    import logging

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep(logging.DEBUG)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)  # what -vv asks for (basicConfig is a no-op under pytest)
    out = setup["root"] / "results"
    try:
        args = [
            "-vv",
            "run",
            str(setup["archive"]),
            "--out",
            str(out),
            "--checkpoint",
            str(setup["checkpoint"]),
        ]
        result = CliRunner().invoke(main, args + OPTIONS)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    return {"out": out, "result": result, "records": records}


def test_every_frame_once_maps_match_and_failures_are_recorded(setup, first_run):
    result, out = first_run["result"], first_run["out"]
    assert result.exit_code == 1, result.output  # something failed: the exit status says so
    assert "Results:" in result.output and "results.open(" in result.output
    failures = pd.read_parquet(out / "failures.parquet")
    assert sorted(failures.columns) == ["error_type", "frame", "message", "path", "shard", "video_id"]
    by_video = {row.video_id: row for row in failures.itertuples()}  # video_id: the store's key
    assert set(by_video) == {"meningioma__P01__broken.mkt", "glioblastoma__P09__V01"}
    assert by_video["meningioma__P01__broken.mkt"].shard == -1  # rejected at discovery
    frame_failure = by_video["glioblastoma__P09__V01"]
    assert (frame_failure.shard, frame_failure.error_type) == (
        1,
        "XrcamInputError",
    )  # frame 6 = kept position 3
    assert "frame_000006.png" in frame_failure.message
    assert frame_failure.frame == 6  # the frame column names it too (interface 9)

    res = results.open(out)  # the read API the run's summary prints
    keys = res.video_keys
    assert len(keys) == 5
    model = xrcam.load_model("resnet18", num_classes=2, checkpoint=setup["checkpoint"])
    explainer = xrcam.create_explainer(model, methods=["gradcam", "xrelevancecam"])
    for key in keys:
        ds = res.video(key)
        written = ~np.isnan(ds["logits"].values).any(axis=1)
        frame_index = np.where(written, ds["frame"].values, -1).tolist()  # -1: never written
        if key == "glioblastoma__P09__V01":
            assert ds.attrs["complete"] is False
            assert frame_index == [0, 2, -1, -1]  # shard 0 written, shard 1 failed
            continue
        assert ds.attrs["complete"] is True
        assert frame_index == [0, 2, 4, 6]  # every kept frame exactly once
        with open_video(ds.attrs["path"]) as reader:
            pre = Preprocessor.for_video(reader, PreprocessConfig(frame_step=2))
            frames = np.stack([frame for _, frame in reader.read(0, None, 2)])
        exp = explainer(pre(frames))
        np.testing.assert_array_equal(ds["predicted"].values, exp.logits.argmax(1).numpy())
        for method in ("gradcam", "xrelevancecam"):
            for layer in ("layer1", "layer4"):
                expected = exp.maps[method][layer].numpy()
                stored = ds[layer].sel(cam=method).values.astype(np.float32)
                np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    ds = res.video(keys[0])
    assert ds.sizes["frame"] == 4 and "layer2" in ds
    summary = json.loads((out / "run.json").read_text())
    assert summary["shards_processed"] == 9 and summary["frames_processed"] == 18
    assert summary["videos"] == 5 and summary["videos_complete"] == 4  # the failed video is not complete


def test_patient_ids_reach_no_log_store_attribute_or_table(setup, first_run):
    out = first_run["out"]
    assert any(
        "shard 1 of meningioma/P01/V01.mkt done" in line for line in first_run["records"]
    )  # debug was on
    texts = {"driver log": "\n".join(first_run["records"]), "command output": first_run["result"].output}
    for folder in (out, setup["ray"]):  # every file of the results and of Ray's session (worker logs too)
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000 and not path.is_socket():
                texts[str(path)] = path.read_bytes().decode("latin-1")
    worker_logs = [
        text for name, text in texts.items() if "worker" in name and name.endswith((".out", ".err"))
    ]
    assert any(
        "shard 0 of meningioma/P01/V01.mkt: frames" in text for text in worker_logs
    )  # worker debug lines seen
    for patient_id in setup["patient_ids"]:
        leaks = [name for name, text in texts.items() if patient_id in text]
        assert not leaks, f"patient id found in {leaks}"
    # the archive's patient folder names (pseudonyms) are what the store records
    assert ResultStore.open(out).video("meningioma__P01__V01.mkt").attrs["patient"] == "P01"


def test_rerun_recomputes_nothing_and_other_settings_are_refused(setup, first_run):
    out = first_run["out"]
    chunks = {p: p.read_bytes() for p in (out / "maps.zarr").rglob("*") if p.is_file() and "c" in p.parts}
    # the same run, its settings now from a TOML file and the environment (relative paths: the file's folder)
    config = setup["root"] / "run.toml"
    config.write_text(
        f'archive = "archive"\nout = "results"\ncheckpoint = "{setup["checkpoint"].name}"\n'
        "chunk-frames = 2\nshard_chunks = 1\nbatch-size = 64\n"
    )
    result = CliRunner().invoke(
        main,
        ["run", "--config", str(config), "--batch-size", "2", "--no-progress"],
        env={"XRCAM_RUN_WORKERS": "1"},
    )
    assert result.exit_code == 1, result.output  # the broken shard is tried again and fails again
    summary = json.loads((out / "run.json").read_text())
    assert summary["settings"]["batch_size"] == 2 and summary["settings"]["workers"] == 1  # options win
    assert summary["shards_processed"] == 0 and summary["shards_skipped"] == 9  # nothing recomputed
    assert len(summary["failures"]) == 2
    assert {p: p.read_bytes() for p in chunks} == chunks

    args = ["run", str(setup["archive"]), "--out", str(out), "--checkpoint", str(setup["checkpoint"])]
    refused = CliRunner().invoke(main, args + OPTIONS + ["--frame-step", "1"])
    assert refused.exit_code != 0
    assert "preprocessing.frame_step: store has 2, this run asks for 1" in refused.output
    assert "--overwrite" in refused.output


def test_killed_worker_is_replaced_and_the_store_equals_an_uninterrupted_run(setup, first_run):
    killed: list[int] = []

    def kill_first_worker(manifest):
        if not killed:  # the worker already holds its next shard: SIGKILL it mid-shard
            killed.append(manifest["pid"])
            os.kill(manifest["pid"], signal.SIGKILL)

    out = setup["root"] / "killed"
    settings = RunSettings.resolve(
        None,
        archive=str(setup["archive"]),
        out=str(out),
        checkpoint=str(setup["checkpoint"]),
        chunk_frames=2,
        shard_chunks=1,
        workers=2,
        batch_size=2,
    )
    summary = run(settings, progress=False, on_manifest=kill_first_worker)
    assert killed and summary.worker_restarts >= 1
    assert summary.shards_processed == 9 and len(summary.failures) == 2
    reference, redone = ResultStore.open(first_run["out"]), ResultStore.open(out)
    assert redone.video_keys() == reference.video_keys()
    assert sorted(redone.group.array_keys()) == sorted(reference.group.array_keys())
    for name in reference.group.array_keys():  # cam, class and the grid coordinates the root holds
        np.testing.assert_array_equal(reference.group[name][:], redone.group[name][:], err_msg=name)
    for key in reference.video_keys():
        a, b = reference.video(key), redone.video(key)
        assert sorted(a.array_keys()) == sorted(b.array_keys())
        for name in a.array_keys():
            np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=f"{key}/{name}")


def test_an_unreadable_checkpoint_is_refused_before_any_worker_starts(setup):
    broken = setup["root"] / "broken" / "model.pt"
    broken.parent.mkdir()
    broken.write_bytes(b"not a checkpoint")
    shutil.copy(f"{setup['checkpoint']}.json", f"{broken}.json")
    args = ["run", str(setup["archive"]), "--out", str(setup["root"] / "never"), "--checkpoint", str(broken)]
    result = CliRunner().invoke(main, args + OPTIONS)
    assert result.exit_code == 1
    assert "model.pt: not a readable PyTorch checkpoint" in result.output
    assert "Traceback" not in result.output
    assert not (setup["root"] / "never").exists()
