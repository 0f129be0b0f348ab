"""`xrcam run` on a real local Ray (127.0.0.1): the faults and mistakes of issue #12, through the CLI.

In-process runs (click's CliRunner) share the session's Ray (``ray_local``); the runs that need a Ray of
their own (fault injection through the environment, a SIGKILLed driver) are ``xrcam`` subprocesses.
The archive is tiny (two 8-frame 64x64 videos, resnet18) so each run takes seconds of work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import xrcam
from workflows.cli import main
from workflows.driver import RESERVE_BYTES
from workflows.ray_guard import MARKER_ENVVAR
from workflows.store import ResultStore, video_key
from xrcam.io.readers import open_video
from xrcam.preprocess import PreprocessConfig, Preprocessor
from xrcam.synth import SynthConfig, write_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[1]
SMALL = ["--chunk-frames", "2", "--shard-chunks", "1", "--batch-size", "2", "--no-progress"]
FEW = ["--methods", "gradcam,xrelevancecam", "--layers", "layer3,layer4"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    write_archive(root / "archive", SynthConfig(patients=1, videos=1, frames=8, size=(64, 64), seed=4), "png")
    return root / "archive"


def _direct_logits(model, path: str, frame_step: int = 2) -> np.ndarray:
    with open_video(path) as reader:
        pre = Preprocessor.for_video(reader, PreprocessConfig(frame_step=frame_step))
        frames = np.stack([frame for _, frame in reader.read(0, None, frame_step)])
    with torch.no_grad():
        return model(pre(frames)).numpy()


def _cli(args, env=None):
    return CliRunner().invoke(main, args, env=env)


def _stored_logits(store: ResultStore, key: str) -> np.ndarray:
    return np.asarray(store.video(key)["logits"][:], dtype=np.float32)


def test_a_refused_typo_leaves_nothing_and_the_corrected_seeded_run_uses_one_set_of_weights(
    archive, ray_local, tmp_path
):
    out = tmp_path / "results"
    base = ["run", str(archive), "--out", str(out), "--model", "resnet18", "--random-init", "5", *SMALL]
    started = time.perf_counter()
    refused = _cli([*base, "--methods", "gradcam,xrelevancecamm", "--workers", "2"])
    assert refused.exit_code == 1 and "unknown method(s) ['xrelevancecamm']" in refused.output
    assert not out.exists()  # nothing recorded the typo
    print(f"refused after {time.perf_counter() - started:.1f} s")

    done = _cli([*base, *FEW, "--workers", "2"])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "run.json").read_text())
    assert summary["workers"] == 2 and summary["videos_complete"] == 2 and summary["shards_processed"] == 4
    store = ResultStore.open(out)
    assert store.settings["random_init"] == 5 and store.settings["checkpoint"] is None
    model = xrcam.load_model("resnet18", num_classes=2, seed=5)
    for key in store.video_keys():
        stored = _stored_logits(store, key)
        # every shard, whichever of the two workers explained it, agrees with the one seeded model
        np.testing.assert_allclose(stored, _direct_logits(model, store.video(key).attrs["path"]), atol=1e-4)
    other = xrcam.load_model("resnet18", num_classes=2, seed=6)
    key = store.video_keys()[0]
    assert not np.allclose(_stored_logits(store, key), _direct_logits(other, store.video(key).attrs["path"]))


@pytest.fixture(scope="module")
def byo(archive, tmp_path_factory, ray_local):
    """A torchvision-layout checkpoint of a training script (no sidecar), an unknown label, a bad mask,
    a broken file, and a results folder whose name needs shell quoting."""
    torchvision = pytest.importorskip("torchvision")
    root = tmp_path_factory.mktemp("byo")
    shutil.copytree(archive, root / "archive")
    data = root / "archive"
    glio = next((data / "glioblastoma").iterdir())  # <patient> folder
    shutil.copytree(glio, data / "astrocytoma" / "P05")  # a label the model lacks
    (data / "meningioma" / "P01" / "broken.mkt").write_bytes(b"\x00" * 40)  # rejected at discovery
    mask_dir = next((data / "meningioma" / "P01").glob("*.masks"))
    bad_mask = sorted(mask_dir.iterdir())[0]
    from PIL import Image

    Image.new("L", (10, 12)).save(bad_mask)  # wrong size: a frame-level problem, the video is kept
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=2).eval()
    checkpoint = root / "resnet18_torchvision.pth"
    torch.save(
        {
            "model": {f"module.{k}": v for k, v in reference.state_dict().items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
            "epoch": 3,
            "args": argparse.Namespace(model="resnet18", lr=0.1),
        },
        checkpoint,
    )
    out = root / "res ults 'x'"
    args = ["run", str(data), "--out", str(out), "--checkpoint", str(checkpoint), "--model", "resnet18"]
    args += ["--classes", "glioblastoma,meningioma", "--skip-unknown-labels", "--workers", "1", *FEW, *SMALL]
    result = _cli(args)
    return {
        "out": out,
        "result": result,
        "reference": reference,
        "bad_mask": bad_mask,
        "glio": f"glioblastoma/{glio.name}/V01",
    }


def test_a_torchvision_training_checkpoint_with_classes_from_the_command_line(byo):
    result, out = byo["result"], byo["out"]
    assert result.exit_code == 1, result.output  # failures were recorded: the exit status says so
    store = ResultStore.open(out)
    assert store.settings["classes"] == ["glioblastoma", "meningioma"]
    key = video_key(byo["glio"])
    expected = _direct_logits(byo["reference"], store.video(key).attrs["path"])
    np.testing.assert_allclose(_stored_logits(store, key), expected, atol=1e-4)


def test_unknown_labels_and_frame_problems_in_failures_agree_with_the_store(byo):
    out = byo["out"]
    store = ResultStore.open(out)
    failures = pd.read_parquet(out / "failures.parquet")
    assert {"path", "video_id", "shard", "frame", "error_type", "message"} <= set(failures.columns)
    rows = {row.video_id: row for row in failures.itertuples()}
    assert set(rows) == {
        video_key("astrocytoma/P05/V01"),
        video_key("meningioma/P01/broken.mkt"),
        video_key("meningioma/P01/V01"),
    }
    unknown = rows[video_key("astrocytoma/P05/V01")]
    assert (unknown.shard, unknown.error_type) == (-1, "UnknownLabel") and "'astrocytoma'" in unknown.message
    assert rows[video_key("meningioma/P01/broken.mkt")].shard == -1
    mask = rows[video_key("meningioma/P01/V01")]
    assert mask.shard >= 0 and not pd.isna(mask.frame) and mask.path == str(byo["bad_mask"])
    assert mask.frame == int(byo["bad_mask"].stem.split("_")[1])
    # shard -1 exactly for the videos the store does not hold; every other row names a stored video
    for row in failures.itertuples():
        assert (row.shard == -1) == (row.video_id not in store.video_keys()), row
    assert store.is_complete(video_key("meningioma/P01/V01"))  # a bad mask does not make it incomplete
    summary = json.loads((out / "run.json").read_text())
    assert summary["videos"] == 2 and summary["videos_complete"] == 2


def test_the_printed_next_command_can_be_pasted(byo):
    [line] = [line for line in byo["result"].output.splitlines() if line.startswith("Next: ")]
    assert shlex.split(line.removeprefix("Next: ")) == ["xrcam", "reduce", str(byo["out"])]


def test_a_full_disk_stops_the_run_with_a_sentence_and_the_rerun_resumes(archive, ray_local, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = disk / "results"
        args = ["run", str(archive), "--model", "resnet18", "--random-init", "0"]
        args += ["--workers", "1", *SMALL]  # all methods and stages: the larger store
        calibration = _cli([*args, "--out", str(disk / "calibration")])  # what the whole run takes here
        assert calibration.exit_code == 0, calibration.output
        needed = shutil.disk_usage(disk).used
        shutil.rmtree(disk / "calibration")
        args += ["--out", str(out)]
        filler = disk / "filler"
        with open(filler, "wb") as fh:  # room for the run's reserve, its metadata and part of its shards
            fh.write(b"\0" * (shutil.disk_usage(disk).free - RESERVE_BYTES - 3 * needed // 4))
        result = _cli(args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        message = result.output.strip().splitlines()[-1]
        assert message.startswith(f"Error: {out}: the disk is full"), result.output
        assert "free space and rerun the same command to resume" in message
        assert message.endswith("(what finished is recorded in run.json)")  # the run's reserve made room
        summary = json.loads((out / "run.json").read_text())
        assert "disk is full" in summary["stopped"] and summary["videos_complete"] < 2
        assert not (out / ".xrcam-reserve").exists()
        assert pd.read_parquet(out / "failures.parquet").empty  # a full disk is not a video's failure
        filler.unlink()  # free space, rerun: it resumes and completes
        again = _cli(args)
        assert again.exit_code == 0, again.output
        summary = json.loads((out / "run.json").read_text())
        assert summary["videos_complete"] == 2 and summary["stopped"] is None
        assert summary["shards_skipped"] + summary["shards_processed"] == summary["shards"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _xrcam(args, env_extra=None, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _seeded(archive: Path, out: Path, *extra: str) -> list[str]:
    """`xrcam run` arguments: resnet18 with seeded random weights, one worker, small shards."""
    return [
        "run",
        str(archive),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--random-init",
        "0",
        "--workers",
        "1",
        *extra,
        *SMALL,
    ]


def test_a_worker_killed_while_starting_is_replaced_and_a_failing_constructor_aborts(archive, tmp_path):
    marker = tmp_path / "killed-once"
    out = tmp_path / "results"
    args = _seeded(archive, out, *FEW)
    proc = _xrcam(args, {"XRCAM_TEST_WORKER_START": f"kill-once:{marker}"})
    stdout, stderr = proc.communicate(timeout=420)
    assert proc.returncode == 0, stdout + stderr
    assert marker.exists()  # the first worker really was SIGKILLed while starting
    summary = json.loads((out / "run.json").read_text())
    assert summary["worker_restarts"] >= 1 and summary["videos_complete"] == 2 and not summary["failures"]
    assert "Token authentication" not in stderr  # Ray's notice is not shown on a local run
    assert not _alive(_marked(proc.pid))  # a normal end leaves no Ray process either
    assert "Traceback" not in stderr

    proc = _xrcam(_seeded(archive, tmp_path / "other", *FEW), {"XRCAM_TEST_WORKER_START": "raise"})
    stdout, stderr = proc.communicate(timeout=420)
    assert proc.returncode == 1, stdout + stderr
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if line.startswith("Error: ")]
    assert "the workers could not start" in line and "XRCAM_TEST_WORKER_START=raise" in line


def _marked(driver_pid: int) -> list[int]:
    """Processes carrying the orphan guard's marker of the driver ``driver_pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(item.startswith(f"{MARKER_ENVVAR}={driver_pid}-".encode()) for item in environ):
            found.append(int(entry.name))
    return found


def test_a_killed_driver_leaves_no_ray_processes_and_the_rerun_finishes(archive, tmp_path, ray_local):
    out = tmp_path / "results"
    args = _seeded(archive, out)  # all methods: slow enough to be killed mid-run
    proc = _xrcam(args)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # wait until its workers run
        if any(
            b"ray::_Worker" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _alive(_marked(proc.pid))
        ):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    assert _marked(proc.pid), "the local Ray's processes carry no marker"
    time.sleep(2)  # mid-run
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while _alive(_marked(proc.pid)) and time.monotonic() < deadline:
        time.sleep(1)
    left = _alive(_marked(proc.pid))
    assert not left, f"left behind: {[Path(f'/proc/{p}/cmdline').read_bytes()[:80] for p in left]}"
    # the killed run's stale lock is taken over, and the rerun finishes the store
    again = _cli(args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "run.json").read_text())["videos_complete"] == 2
    store, model = ResultStore.open(out), xrcam.load_model("resnet18", num_classes=2, seed=0)
    for key in store.video_keys():  # the resumed store holds what one uninterrupted run computes
        expected = _direct_logits(model, store.video(key).attrs["path"])
        np.testing.assert_allclose(_stored_logits(store, key), expected, atol=1e-4)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_videos_whose_ids_once_shared_a_key_and_a_video_listed_twice(archive, ray_local, tmp_path):
    """`a/b__c` and `a__b/c` are two videos with two groups; `P07/../P07/b__c` is the first one again."""
    data = tmp_path / "data"
    source = next((archive / "meningioma").iterdir()) / "V01"
    shutil.copytree(source, data / "meningioma" / "P07" / "b__c")
    shutil.copytree(source, data / "meningioma" / "P07__b" / "c")
    shutil.copytree(next((archive / "glioblastoma").iterdir()) / "V01", data / "glioblastoma" / "P08" / "V01")
    manifest = data / "manifest.csv"
    manifest.write_text(
        "path,patient,label\n"
        "meningioma/P07/b__c,P07,meningioma\n"
        "meningioma/P07__b/c,P07__b,meningioma\n"
        "meningioma/P07/../P07/b__c,P07,meningioma\n"
        "glioblastoma/P08/V01,P08,glioblastoma\n"
    )
    out = tmp_path / "results"
    args = ["run", str(manifest), "--out", str(out), "--model", "resnet18", "--random-init", "0"]
    result = _cli([*args, "--workers", "1", *FEW, *SMALL])
    assert result.exit_code == 1, result.output  # the repeated row is reported
    store = ResultStore.open(out)
    keys = {
        video_key("meningioma/P07/b__c"),
        video_key("meningioma/P07__b/c"),
        video_key("glioblastoma/P08/V01"),
    }
    assert len(keys) == 3 and set(store.video_keys()) == keys
    assert all(store.is_complete(key) for key in keys)
    summary = json.loads((out / "run.json").read_text())
    assert (summary["videos"], summary["videos_complete"], summary["frames"]) == (
        3,
        3,
        12,
    )  # 4 kept frames each
    [repeated] = summary["failures"]
    assert (
        repeated["shard"] == -1
        and "row 4 of manifest.csv lists the same video as row 2" in repeated["message"]
    )
