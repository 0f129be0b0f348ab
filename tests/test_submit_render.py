"""The SLURM batch script as rendered: directives, quoting, per-job Ray ports and temp dirs, cleanup.

The script's functions are exercised by sourcing the rendered file in bash (sourcing only defines
them; sbatch executes it), so these tests run the shell code a job runs, without SLURM.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from workflows.cli import main
from workflows.submit import SlurmJob, SubmitError, default_bin_dir, render_sbatch, run_commands

ODD = 'it\'s a "b" $HOME `x` ;&'  # every character a careless shell line would trip on


def _job(tmp_path: Path, **kw) -> SlurmJob:
    return SlurmJob(archive=tmp_path / "my archive", results=tmp_path / "my results", **kw)


def _script(tmp_path: Path, **kw) -> Path:
    path = tmp_path / "job.sbatch"
    path.write_text(render_sbatch(_job(tmp_path, **kw)))
    return path


def _bash(script: Path, code: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["bash", "-c", f"source {shlex.quote(str(script))}\n{code}"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return done.stdout


def _ports(script: Path, job_ids: list[int]) -> dict[int, dict[str, int]]:
    code = "\n".join(f"xrcam_ray_ports {j}; echo {j}; set | grep '^RAY_.*_PORT='" for j in job_ids)
    ports: dict[int, dict[str, int]] = {}
    current: dict[str, int] = {}
    for line in _bash(script, code).splitlines():
        if "=" in line:
            name, value = line.split("=")
            current[name] = int(value)
        else:
            current = ports.setdefault(int(line), {})
    return ports


def _used(ports: dict[str, int]) -> set[int]:
    fixed = {v for k, v in ports.items() if k not in ("RAY_MIN_WORKER_PORT", "RAY_MAX_WORKER_PORT")}
    return fixed | set(range(ports["RAY_MIN_WORKER_PORT"], ports["RAY_MAX_WORKER_PORT"] + 1))


def test_rendered_script_is_valid_bash_with_spaces_and_quotes_in_paths(tmp_path):
    job = SlurmJob(
        archive=tmp_path / f"arch {ODD}",
        results=tmp_path / f"res {ODD}" / "out",
        run_args=["--model", "resnet18", "--label", ODD],
        log_dir=tmp_path / "logs here",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = _bash(
        script,
        'printf "%s\\n" "$XRCAM_ARCHIVE" "$XRCAM_RESULTS" "$XRCAM_LOG_DIR" "$XRCAM_BIN" "${XRCAM_RUN_ARGS[@]}"',
    )
    assert out.splitlines() == [
        str(tmp_path / f"arch {ODD}"),
        str(tmp_path / f"res {ODD}" / "out"),
        str(tmp_path / "logs here"),
        str(default_bin_dir()),
        "--model",
        "resnet18",
        "--label",
        ODD,
    ]
    assert f'#SBATCH --output="{tmp_path}/logs here/xrcam-%j.out"' in script.read_text()


def test_double_quote_in_log_folder_is_refused_not_mangled(tmp_path):
    with pytest.raises(SubmitError, match="double quotes"):
        render_sbatch(SlurmJob(archive=tmp_path, results=tmp_path / "r", log_dir=tmp_path / 'a"b'))
    with pytest.raises(SubmitError, match="file-name pattern"):
        render_sbatch(SlurmJob(archive=tmp_path, results=tmp_path / "r", log_dir=tmp_path / "100%"))


def test_ports_are_valid_distinct_within_a_job_and_disjoint_between_nearby_jobs(tmp_path):
    script = _script(tmp_path)
    job_ids = [1, 2, 3, 87, 88, 89, 4_194_303, 4_194_304, 67_108_863]
    ports = _ports(script, job_ids)
    for job_id in job_ids:
        p = ports[job_id]
        assert len(p) == 11
        fixed = [v for k, v in p.items() if "WORKER" not in k]
        assert len(set(fixed)) == len(fixed)
        assert all(1024 < v < 32768 for v in p.values()), p  # below Linux's ephemeral port range
        assert p["RAY_MAX_WORKER_PORT"] - p["RAY_MIN_WORKER_PORT"] >= 200
        assert not set(fixed) & set(range(p["RAY_MIN_WORKER_PORT"], p["RAY_MAX_WORKER_PORT"] + 1))
    # any 88 consecutive job ids get pairwise disjoint port blocks
    window = _ports(script, list(range(4_194_250, 4_194_250 + 88)))
    blocks = [_used(p) for p in window.values()]
    assert len(set().union(*blocks)) == sum(len(b) for b in blocks)
    # the same id always gets the same ports: a requeued job finds its own layout again
    assert _ports(script, [4_194_303])[4_194_303] == ports[4_194_303]


def test_ray_temp_dir_is_short_per_job_and_avoids_long_tmpdir(tmp_path):
    script = _script(tmp_path)
    assert (
        _bash(script, "xrcam_ray_tmp 12345", {"TMPDIR": "/scratch/u"}).strip() == "/scratch/u/xrcam-ray-12345"
    )
    long_tmp = "/local/scratch/slurm-tmp/a-rather-long-user-name/job-12345"
    assert _bash(script, "xrcam_ray_tmp 12345", {"TMPDIR": long_tmp}).strip() == "/tmp/xrcam-ray-12345"
    assert _bash(script, "xrcam_ray_tmp 7", {"TMPDIR": "/tmp/a b"}).strip() == "/tmp/xrcam-ray-7"
    # Ray adds /session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store (up to ~68 characters)
    assert len(_bash(script, "xrcam_ray_tmp 4294967295", {"TMPDIR": "/tmp/x" * 5}).strip()) + 68 < 108


def test_gpu_cpu_and_scheduling_directives(tmp_path):
    text = _script(
        tmp_path,
        nodes=3,
        gpus_per_node=4,
        cpus_per_task=16,
        partition="gpu",
        time="02:00:00",
        account="proj 1",
        job_name="xr",
        extra_sbatch=["--mem=64G", "--exclusive"],
    ).read_text()
    for line in [
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=02:00:00",
        '#SBATCH --account="proj 1"',
        "#SBATCH --job-name=xr",
        "#SBATCH --mem=64G",
        "#SBATCH --exclusive",
    ]:
        assert line in text.splitlines(), line
    # Ray takes the GPUs and CPUs SLURM granted on each node, not a number baked in at submit time
    assert text.count('--num-gpus="${SLURM_GPUS_ON_NODE:-0}"') == 2
    assert "#SBATCH --requeue" not in text
    cpu_only = _script(tmp_path).read_text()
    assert "--gpus" not in "\n".join(line for line in cpu_only.splitlines() if line.startswith("#SBATCH"))


def test_requeue_asks_slurm_to_requeue_and_to_warn_before_the_time_limit(tmp_path):
    text = _script(tmp_path, requeue=True).read_text()
    assert "#SBATCH --requeue" in text.splitlines()
    assert any(line.startswith("#SBATCH --signal=B:USR1@") for line in text.splitlines())
    assert "XRCAM_REQUEUE=1" in text.splitlines()


def test_bad_extra_sbatch_and_missing_environment_are_refused(tmp_path):
    with pytest.raises(SubmitError, match="one sbatch option"):
        render_sbatch(_job(tmp_path, extra_sbatch=["mem=4G"]))
    with pytest.raises(SubmitError, match="without '/'"):
        render_sbatch(_job(tmp_path, job_name="a/b"))
    with pytest.raises(SubmitError, match="--venv"):
        render_sbatch(_job(tmp_path, bin_dir=tmp_path))


def test_cleanup_ends_only_this_jobs_ray_processes(tmp_path):
    """The stop path kills processes carrying this job's tag and leaves another job's alone."""
    script = _script(tmp_path)
    ray_tmp = tmp_path / "xrcam-ray-11"
    (ray_tmp / "session").mkdir(parents=True)
    ours = subprocess.Popen(["sleep", "300"], env={**os.environ, "XRCAM_RAY_TAG": "xrcam-ray-11"})
    theirs = subprocess.Popen(["sleep", "300"], env={**os.environ, "XRCAM_RAY_TAG": "xrcam-ray-111"})
    untagged = subprocess.Popen(["sleep", "300"])
    try:
        _bash(script, f"xrcam_kill_own_ray xrcam-ray-11 {shlex.quote(str(ray_tmp))}")
        assert ours.wait(timeout=10) == -signal.SIGTERM
        assert theirs.poll() is None and untagged.poll() is None
        assert not ray_tmp.exists()
    finally:
        for proc in (ours, theirs, untagged):
            proc.kill()
            proc.wait()


def test_submit_slurm_dry_run_prints_the_script_and_forwards_run_options(tmp_path):
    archive = tmp_path / "a b"
    archive.mkdir()
    result = CliRunner().invoke(
        main,
        ["submit", "slurm", str(archive), "--out", str(tmp_path / "r s"), "--gpus-per-node", "2", "--dry-run"]
        + ["--", "--model", "resnet18", "--workers", "3"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("#!/bin/bash\n")
    assert "#SBATCH --gpus-per-node=2" in result.output
    assert "XRCAM_RUN_ARGS=(--model resnet18 --workers 3)" in result.output
    assert not (tmp_path / "r s").exists()  # a dry run writes nothing


def test_ray_entrypoint_quotes_paths_and_chains_reduce(tmp_path):
    fake = tmp_path / "fake xrcam"
    fake.write_text('#!/bin/bash\nprintf "%s|" "$@"; echo\n')
    fake.chmod(0o755)
    line = run_commands(str(fake), f"/data/{ODD}", "/res ults", ["--label", ODD])
    done = subprocess.run(
        ["bash", "-c", line],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "RAY_ADDRESS": "h:1"},
    )
    assert done.stdout.splitlines() == [
        f"run|/data/{ODD}|--out|/res ults|--label|{ODD}|--address|h:1|",
        "reduce|/res ults|--address|h:1|",
    ]
    assert "reduce" not in run_commands("xrcam", "a", "b", reduce=False)


def test_default_environment_is_the_running_one_unresolved():
    assert default_bin_dir() == Path(sys.executable).absolute().parent
    assert (default_bin_dir() / "xrcam").exists()


def test_submit_module_does_not_import_ray():
    code = "import sys, workflows.submit; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_without_slurm_commands_submit_and_status_say_where_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch, squeue, ... here
    archive = tmp_path / "archive"
    archive.mkdir()
    submitted = CliRunner().invoke(main, ["submit", "slurm", str(archive), "--out", str(tmp_path / "out")])
    assert submitted.exit_code == 1
    assert "sbatch is not on PATH" in submitted.output
    assert (tmp_path / "out" / "slurm" / "xrcam.sbatch").is_file()  # kept, to sbatch by hand
    status = CliRunner().invoke(main, ["status", "123"])
    assert status.exit_code == 1 and "squeue is not on PATH" in status.output
