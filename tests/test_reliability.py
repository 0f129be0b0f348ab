"""`xrcam run` refuses bad runs up front, through the real CLI, without Ray and without touching --out.

Every refusal here happens in :func:`workflows.preflight.preflight` or at the results lock, before a
Ray session could start: the tests replace the driver's Ray entry point with one that fails the test,
and check that the results folder does not exist afterwards (or is unchanged). The corrected rerun of a
refused command is checked on a real Ray in ``test_reliability_ray.py``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import xrcam
from workflows.cli import main
from workflows.lock import LOCK_NAME
from xrcam.errors import XrcamStorageError, storage_error
from xrcam.models import save_checkpoint
from xrcam.synth import SynthConfig, write_archive

CLASSES = ["glioblastoma", "meningioma"]
ARCHIVE = SynthConfig(patients=1, videos=1, frames=4, size=(64, 64), seed=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    write_archive(root / "archive", ARCHIVE, fmt="png")
    model = xrcam.load_model("resnet18", num_classes=2, seed=0)
    with_sidecar = save_checkpoint(model, root / "model.pt", {"model": "resnet18", "classes": CLASSES})
    bare = root / "bare.pt"
    torch.save(model.state_dict(), bare)
    three = root / "three.pt"
    torch.save(xrcam.load_model("resnet18", num_classes=3, seed=0).state_dict(), three)
    r34 = root / "r34.pt"
    torch.save(xrcam.load_model("resnet34", num_classes=2, seed=0).state_dict(), r34)
    junk = root / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    return {
        "root": root,
        "archive": root / "archive",
        "checkpoint": with_sidecar,
        "bare": bare,
        "three": three,
        "r34": r34,
        "junk": junk,
    }


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the run gets as far as starting (or joining) Ray."""
    import workflows.driver

    def refuse(*args, **kwargs):
        raise AssertionError("the run started Ray although it should have been refused before")

    monkeypatch.setattr(workflows.driver, "_ray", refuse)


def _run(files, out: Path, *args: str, env: dict | None = None):
    argv = ["run", str(files["archive"]), "--out", str(out), "--no-progress", *args]
    return CliRunner().invoke(main, argv, env=env)


def _one_line_refusal(result, *fragments: str) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output and result.exception is None or isinstance(result.exception, SystemExit)
    message = output.strip().splitlines()[-1]
    assert message.startswith("Error: "), output
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


BAD_OPTIONS = {
    "misspelled method": (
        ["--checkpoint", "{checkpoint}", "--methods", "gradcam,xrelevancecamm"],
        ["unknown method(s) ['xrelevancecamm']", "available: "],
    ),
    "layer that is not a stage": (
        ["--checkpoint", "{checkpoint}", "--layers", "fc"],
        ["layers fc: not a stage of resnet18", "layer1, layer2, layer3, layer4"],
    ),
    "unknown model": (
        ["--random-init", "0", "--model", "vit_base_patch16_224"],
        ["'vit_base_patch16_224' is not supported", "skresnext50_32x4d"],
    ),
    "unknown LRP rules": (["--random-init", "0", "--rules", "bogus"], ["unknown LRP rule preset 'bogus'"]),
    "unknown CLRP start": (["--random-init", "0", "--clrp", "half"], ["clrp must be one of"]),
    "no weights": ([], ["no weights given", "--checkpoint", "--random-init SEED"]),
    "both checkpoint and random init": (
        ["--checkpoint", "{checkpoint}", "--random-init", "1"],
        ["--checkpoint and --random-init both given"],
    ),
    "unreadable checkpoint": (
        ["--checkpoint", "{junk}", "--classes", "glioblastoma,meningioma"],
        ["junk.pt: not a readable PyTorch checkpoint"],
    ),
    "checkpoint without sidecar or --classes": (
        ["--checkpoint", "{bare}", "--model", "resnet18"],
        ["bare.pt: no sidecar", "pass --classes with the 2 class names"],
    ),
    "checkpoint of another architecture": (
        ["--checkpoint", "{r34}", "--model", "resnet18", "--classes", "glioblastoma,meningioma"],
        ["do not fit resnet18", "unexpected: layer1.2.bn1.bias", "pass --model resnet34"],
    ),
    "checkpoint for another number of classes": (
        ["--checkpoint", "{three}", "--model", "resnet18", "--classes", "glioblastoma,meningioma"],
        ["checkpoint has 3 classes, model asks for 2"],
    ),
    "one class only": (
        ["--random-init", "0", "--model", "resnet18", "--classes", "glioblastoma"],
        ["classes must name at least two distinct classes"],
    ),
    "malformed crop": (["--random-init", "0", "--crop", "10,20"], ["crop must be 'x,y,size'"]),
    "crop outside the frames": (
        ["--random-init", "0", "--model", "resnet18", "--crop", "0,0,500"],
        ["crop 0,0,500 does not fit 2 video(s)", "64x64 pixels"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
def test_bad_options_are_refused_before_ray_and_leave_no_results_folder(files, no_ray, tmp_path, case):
    args, fragments = BAD_OPTIONS[case]
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    out = tmp_path / "results"
    result = _run(files, out, *args)
    _one_line_refusal(result, *fragments)
    assert not out.exists()


def test_a_wrong_value_type_in_the_config_names_the_key(files, no_ray, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[run]\narchive = "{files["archive"]}"\nout = "res"\nbatch-size = "eight"\n')
    result = CliRunner().invoke(main, ["run", "--config", str(config), "--random-init", "0"])
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    assert "batch-size" in result.output or "batch_size" in result.output
    assert "'eight'" in result.output
    assert not (tmp_path / "res").exists()


def test_library_settings_value_types_are_one_sentence(tmp_path):
    from workflows.settings import RunSettings
    from xrcam.errors import XrcamConfigError

    config = tmp_path / "run.toml"
    config.write_text('archive = "a"\nout = "b"\nbatch-size = "eight"\n')
    with pytest.raises(XrcamConfigError, match=r"run.toml: batch_size = 'eight' must be an integer"):
        RunSettings.resolve(config)
    config.write_text('archive = "a"\nout = "b"\nmethods = 3\n')
    with pytest.raises(XrcamConfigError, match=r"methods = 3 must be a list of names"):
        RunSettings.resolve(config)
    config.write_text('archive = "a"\nout = "b"\ncrop = [1, 2]\n')
    with pytest.raises(XrcamConfigError, match=r"crop must be 'x,y,size'"):
        RunSettings.resolve(config)
    config.write_text(
        'archive = "a"\nout = "b"\nbatch-size = "8"\ncrop = [1, 2, 30]\nmethods = ["gradcam"]\n'
    )
    settings = RunSettings.resolve(config)
    assert (settings.batch_size, settings.crop, settings.methods) == (8, (1, 2, 30), ("gradcam",))


def test_unknown_labels_are_refused_by_name(files, no_ray, tmp_path):
    out = tmp_path / "results"
    result = _run(
        files,
        out,
        "--checkpoint",
        str(files["bare"]),
        "--model",
        "resnet18",
        "--classes",
        "glioblastoma,astrocytoma",
    )
    _one_line_refusal(
        result,
        "label(s) meningioma of 1 video(s) (e.g. meningioma/P01/V01)",
        "not classes of the model (glioblastoma, astrocytoma)",
        "--skip-unknown-labels",
    )
    assert not out.exists()


def test_an_empty_archive_is_not_success(files, no_ray, tmp_path):
    empty = tmp_path / "empty"
    (empty / "glioblastoma").mkdir(parents=True)
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["run", str(empty), "--out", str(out), "--random-init", "0"])
    _one_line_refusal(result, "no videos found", "ROOT/<class>/<patient>/", "manifest")
    assert not out.exists()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,patient,label\n")
    result = CliRunner().invoke(main, ["run", str(manifest), "--out", str(out), "--random-init", "0"])
    _one_line_refusal(result, "no videos found")
    assert not out.exists()
    broken = tmp_path / "broken"
    (broken / "glioblastoma" / "P01").mkdir(parents=True)
    (broken / "glioblastoma" / "P01" / "V01.mkt").write_bytes(b"\0" * 40)
    result = CliRunner().invoke(main, ["run", str(broken), "--out", str(out), "--random-init", "0"])
    _one_line_refusal(result, "no usable videos: 1 rejected (first: ", "V01.mkt")
    assert not out.exists()


def test_a_second_run_into_a_held_results_folder_is_refused_naming_the_holder(files, no_ray, tmp_path):
    from test_reliability_lock import held_lock

    out = tmp_path / "results"
    with held_lock(out, "run") as pid:
        before = sorted(p.name for p in out.iterdir())
        result = _run(files, out, "--random-init", "0", "--model", "resnet18")
        _one_line_refusal(
            result, f"is in use by xrcam run (pid {pid} on {socket.gethostname()}", "wait for it"
        )
        assert sorted(p.name for p in out.iterdir()) == before == [LOCK_NAME]  # nothing else written


def test_a_stale_lock_of_a_killed_run_does_not_block(files, tmp_path, monkeypatch):
    """A lock left by a dead process is taken over; the run then gets as far as starting Ray."""
    import workflows.driver

    out = tmp_path / "results"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "command": "run"})
    )
    reached = []

    def stop_here(address):
        reached.append(json.loads((out / LOCK_NAME).read_text())["pid"])
        raise XrcamStorageError(out, "stopped by the test")

    monkeypatch.setattr(workflows.driver, "_ray", stop_here)
    result = _run(files, out, "--random-init", "0", "--model", "resnet18")
    assert reached == [os.getpid()], result.output
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_out_below_a_file_and_a_read_only_out_are_sentences(files, no_ray, tmp_path):
    (tmp_path / "file").write_text("x")
    result = _run(files, tmp_path / "file" / "results", "--random-init", "0", "--model", "resnet18")
    _one_line_refusal(result, str(tmp_path / "file"), "not a folder", "choose another output path")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(readonly)]).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        result = _run(files, readonly / "results", "--random-init", "0", "--model", "resnet18")
        _one_line_refusal(result, str(readonly / "results"), "read-only", "writable disk")
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_permission_denied_is_a_sentence(files, as_nobody):
    """`xrcam run` as user nobody into a folder owned by root: one sentence, exit 1."""
    import shutil

    base = as_nobody.base
    shutil.copytree(files["archive"], base / "archive")
    (base / "locked").mkdir(mode=0o755)
    out = base / "locked" / "results"
    result = as_nobody.run(
        "run", base / "archive", "--out", out, "--random-init", "0", "--model", "resnet18", "--no-progress"
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{out}: permission denied" in result.stderr
    assert not out.exists()


def _one_sentence(result, *fragments: str) -> str:
    """The last stderr line of a refused subprocess command: ``Error: ...`` with ``fragments``, exit 1."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_synth_into_a_folder_it_cannot_write_is_a_sentence(as_nobody):
    """`xrcam synth` as nobody below a root-owned folder, and into a read-only file system."""
    locked = as_nobody.base / "locked"
    locked.mkdir(mode=0o755)
    small = ["--patients", "1", "--videos", "1", "--frames", "2", "--size", "64", "64"]
    result = as_nobody.run("synth", locked / "archive", *small)
    _one_sentence(result, str(locked / "archive"), "permission denied", "choose a folder you can write to")
    assert not (locked / "archive").exists()
    readonly = as_nobody.base / "ro"
    readonly.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(readonly)]).returncode:
        return  # no mounts here: the permission case above stands alone
    try:
        result = CliRunner().invoke(main, ["synth", str(readonly / "archive"), *small])
        _one_line_refusal(result, str(readonly / "archive"), "read-only", "writable disk")
    finally:
        subprocess.run(["umount", str(readonly)], check=True)


def test_storage_errors_name_the_path_and_what_to_do():
    cases = {
        errno.ENOSPC: "disk is full",
        errno.EROFS: "read-only",
        errno.EACCES: "permission denied",
        errno.ENOTDIR: "is a file, not a folder",
    }
    for code, fragment in cases.items():
        error = storage_error(OSError(code, os.strerror(code)), "/data/results")
        assert str(error).startswith("/data/results: ") and fragment in str(error)
        assert "\n" not in str(error)
