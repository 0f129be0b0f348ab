"""The one CLI convention (docs/cli.md), through the real ``xrcam`` group as a user meets it.

Every command gets ``--config FILE`` (TOML), ``XRCAM_*`` environment variables shown in ``--help``, and the
exit-code table 0 done / 1 failures or domain error / 2 usage. Values are checked by parsing each real
command (``make_context``: the options as the command would receive them) without running its work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from workflows.cli import main
from workflows.commands.conventions import EXIT_CODES, PER_COMMAND_ONLY, apply, envvars

LEAVES = [
    ("synth",),
    ("train",),
    ("run",),
    ("reduce",),
    ("report",),
    ("evaluate",),
    ("submit", "slurm"),
    ("submit", "ray"),
    ("status",),
    ("demo",),
]

# per command: (option key, TOML value, environment value, value the command receives from the env)
PROBES = {
    ("synth",): ("seed", 5, "6", 6),
    ("train",): ("epochs", 3, "4", 4),
    ("run",): ("frame_step", 3, "4", 4),
    ("reduce",): ("chunk_frames", 8, "9", 9),
    ("report",): ("frames", 2, "3", 3),
    ("evaluate",): ("sample_frames", 3, "4", 4),
    ("submit", "slurm"): ("nodes", 2, "3", 3),
    ("submit", "ray"): ("job_name", "a", "b", "b"),
    ("status",): ("lines", 5, "6", 6),
    ("demo",): ("epochs", 2, "3", 3),
}


@pytest.fixture(autouse=True)
def _no_xrcam_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("XRCAM_") or name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            monkeypatch.delenv(name)


@pytest.fixture
def base(tmp_path):
    """Command-line arguments that satisfy each command's required parameters."""
    archive = tmp_path / "archive"
    archive.mkdir()
    (tmp_path / "results").mkdir()
    return {
        ("synth",): [str(tmp_path / "synth")],
        ("train",): [str(archive), "--out", str(tmp_path / "ckpt")],
        ("run",): [str(archive), "--out", str(tmp_path / "results")],
        ("reduce",): [str(tmp_path / "results")],
        ("report",): [str(tmp_path / "results")],
        ("evaluate",): [str(archive)],
        ("submit", "slurm"): [str(archive), "--out", str(tmp_path / "results")],
        ("submit", "ray"): [str(archive), "--out", str(tmp_path / "results"), "--address", "http://h:8265"],
        ("status",): ["123"],
        ("demo",): [],
    }


def _command(path: tuple[str, ...]) -> tuple[click.Command, click.Context]:
    ctx = click.Context(main, info_name="xrcam")
    command = main.get_command(ctx, path[0])
    for name in path[1:]:
        ctx = click.Context(command, info_name=path[0], parent=ctx)
        command = command.get_command(ctx, name)
    return command, ctx


def _parsed(path: tuple[str, ...], args: list[str]) -> dict:
    """The values the real command would be called with (its work is not run)."""
    command, parent = _command(path)
    with command.make_context(path[-1], list(args), parent=parent) as ctx:
        return dict(ctx.params)


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_help_shows_config_and_every_options_environment_variable(path):
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "--config FILE" in result.output
    command, _ = _command(path)
    for param in command.params:
        if isinstance(param, click.Option):
            own = envvars(path, param)[0]
            assert own.startswith("XRCAM_" + "_".join(path).upper() + "_")
            assert own in result.output, (own, result.output)


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_toml_config_and_environment_reach_an_option(path, base, tmp_path, monkeypatch):
    key, in_file, in_env, from_env = PROBES[path]
    table = ".".join(f'"{p}"' for p in path)
    config = _toml(
        tmp_path / "x.toml", f"[{table}]\n{key.replace('_', '-')} = {in_file!r}\n".replace("'", '"')
    )
    args = [*base[path], "--config", str(config)]
    params = _parsed(path, args)
    if "config" in params:  # run reads its own --config (RunSettings.resolve) until it adopts the central one
        from workflows.settings import RunSettings

        given = {k: v for k, v in params.items() if k not in ("config", "progress")}
        given = {k: (str(v) if isinstance(v, Path) else v) for k, v in given.items()}
        assert getattr(RunSettings.resolve(params["config"], **given), key) == in_file
    else:
        assert params[key] == in_file
    monkeypatch.setenv("_".join(("XRCAM", *path, key)).upper(), in_env)
    assert _parsed(path, args)[key] == from_env  # the environment overrides the file


def test_precedence_file_then_shared_env_then_command_env_then_command_line(base, tmp_path, monkeypatch):
    config = _toml(tmp_path / "c.toml", "epochs = 2\nseed = 9\n[train]\nepochs = 3\n")
    args = [*base[("train",)], "--config", str(config)]
    assert _parsed(("train",), args)["epochs"] == 3  # the [train] table beats shared top-level keys
    assert _parsed(("train",), args)["seed"] == 9
    assert _parsed(("synth",), [*base[("synth",)], "--config", str(config)])["seed"] == 9  # shared key
    monkeypatch.setenv("XRCAM_EPOCHS", "4")
    assert _parsed(("train",), args)["epochs"] == 4
    monkeypatch.setenv("XRCAM_TRAIN_EPOCHS", "5")
    assert _parsed(("train",), args)["epochs"] == 5
    assert _parsed(("train",), [*args, "--epochs", "6"])["epochs"] == 6
    monkeypatch.setenv("XRCAM_CONFIG", str(config))  # the file itself from the environment
    assert _parsed(("train",), base[("train",)])["seed"] == 9


def test_one_cluster_address_variable_for_every_command_that_joins_ray(base, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")  # Ray's variable no longer decides for us
    assert _parsed(("reduce",), base[("reduce",)])["address"] is None
    monkeypatch.setenv("XRCAM_ADDRESS", "10.0.0.5:6379")
    for path in (("run",), ("reduce",), ("train",)):
        assert _parsed(path, base[path])["address"] == "10.0.0.5:6379", path
    # the Jobs API URL of `submit ray` / `status` is another thing and another variable
    assert _parsed(("status",), base[("status",)])["address"] is None


def test_options_that_differ_between_commands_have_no_shared_variable(base, monkeypatch):
    assert {"workers", "out", "classes"} <= PER_COMMAND_ONLY
    monkeypatch.setenv("XRCAM_WORKERS", "3")  # e.g. meant for `run`: must not turn `train` distributed
    assert _parsed(("train",), base[("train",)])["workers"] is None
    monkeypatch.setenv("XRCAM_TRAIN_WORKERS", "2")
    assert _parsed(("train",), base[("train",)])["workers"] == 2


def test_relative_paths_in_a_config_are_relative_to_the_file(tmp_path, base):
    (tmp_path / "conf").mkdir()
    config = _toml(tmp_path / "conf" / "t.toml", '[train]\nout = "ckpt"\n')
    params = _parsed(("train",), [str(tmp_path / "archive"), "--config", str(config)])
    assert params["out"] == tmp_path / "conf" / "ckpt"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[train]\nepochs = "ten"\n', ["'epochs'", "ten", "not a valid integer"]),
        ("[train]\nepochs = 0\n", ["'epochs'", "0"]),
        ("[train]\nepoch = 3\n", ["unknown key", "'epoch'", "epochs"]),
        ("no_such_option = 1\n", ["unknown key", "'no_such_option'"]),
        ("[train\n", ["cannot read it as TOML"]),
    ],
)
def test_a_bad_config_is_a_usage_error_naming_the_key(tmp_path, base, text, words):
    config = _toml(tmp_path / "bad.toml", text)
    result = CliRunner().invoke(main, ["train", *base[("train",)], "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)


def test_exit_code_table(tmp_path, base):
    assert set(EXIT_CODES) == {0, 1, 2}
    runner = CliRunner()
    done = runner.invoke(main, ["submit", "slurm", *base[("submit", "slurm")], "--dry-run"])
    assert done.exit_code == 0, done.output
    assert runner.invoke(main, ["train", "--no-such-option"]).exit_code == 2
    assert runner.invoke(main, ["no-such-command"]).exit_code == 2


def test_an_xrcam_error_is_one_line_exit_1_not_a_traceback():
    from xrcam.errors import XrcamError

    @click.command()
    def failing() -> None:
        raise XrcamError("archive/x.mkt: frame 3 is damaged;\n  re-export it")

    @click.command()
    def finished_with_failures() -> None:
        raise click.exceptions.Exit(1)

    runner = CliRunner()
    result = runner.invoke(apply(failing, ("failing",)), [])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: archive/x.mkt: frame 3 is damaged; re-export it"
    assert runner.invoke(apply(finished_with_failures, ("f",)), []).exit_code == 1


def test_an_os_error_is_one_line_naming_the_path_exit_1_not_a_traceback():
    import errno

    @click.command()
    def writing() -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/data/results/report.html")

    result = CliRunner().invoke(apply(writing, ("writing",)), [])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: /data/results/report.html: permission denied; choose a folder you can write to or fix its "
        "permissions"
    )


def test_a_real_domain_error_exits_1_with_one_line(tmp_path):
    """An empty archive given to `xrcam train`: the library's XrcamError, through the installed CLI."""
    empty = tmp_path / "empty"
    empty.mkdir()
    exe = Path(sys.executable).parent / "xrcam"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRCAM_")}
    proc = subprocess.run(
        [str(exe), "train", str(empty), "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("Error: ")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_toml_array_fills_a_comma_separated_option(base, tmp_path):
    config = _toml(tmp_path / "a.toml", '[train]\nclasses = ["meningioma", "glioblastoma"]\n')
    params = _parsed(("train",), [*base[("train",)], "--config", str(config)])
    assert params["classes"] == ("meningioma", "glioblastoma")


def test_run_and_train_share_the_one_classes_option(base, tmp_path):
    """One definition (``conventions.classes_option``): the same parsing; run's help says it is required
    for a checkpoint without a sidecar and is never guessed from folder names."""
    config = _toml(tmp_path / "c.toml", 'classes = ["meningioma", "glioblastoma"]\n')
    for path in (("run",), ("train",)):
        assert _parsed(path, [*base[path], "--classes", " b, a ,"])["classes"] == ("b", "a")
        assert _parsed(path, [*base[path], "--config", str(config)])["classes"] == (
            "meningioma",
            "glioblastoma",
        )
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    assert "required for a checkpoint without one (never guessed from folder names)" in help_text
    assert "all registered, xrcam.list_methods()" in help_text


def test_a_new_option_is_written_in_one_place(tmp_path, monkeypatch):
    """An option declared in a command file gets its TOML key, variables and help line from the convention."""

    @click.command()
    @click.option("--window-size", type=int, default=3, help="A new option.")
    def fresh(window_size: int) -> None:
        click.echo(f"window {window_size}")

    command = apply(fresh, ("fresh",))
    runner = CliRunner()
    help_text = runner.invoke(command, ["--help"]).output
    assert (
        "XRCAM_FRESH_WINDOW_SIZE" in help_text
        and "XRCAM_WINDOW_SIZE" in help_text
        and "--config" in help_text
    )
    config = _toml(tmp_path / "f.toml", "[fresh]\nwindow-size = 5\n")
    assert runner.invoke(command, ["--config", str(config)]).output.strip() == "window 5"
    monkeypatch.setenv("XRCAM_FRESH_WINDOW_SIZE", "7")
    assert runner.invoke(command, ["--config", str(config)]).output.strip() == "window 7"
    bad = _toml(tmp_path / "b.toml", '[fresh]\nwindow-size = "wide"\n')
    result = runner.invoke(command, ["--config", str(bad)])
    assert result.exit_code == 2 and "'window-size'" in result.output


@pytest.mark.parametrize("path", LEAVES, ids=" ".join)
def test_no_command_declares_variables_of_its_own(path):
    """Beyond the convention's names, only Ray's own Jobs API variable is declared (submit ray, status)."""
    command, _ = _command(path)
    for param in command.params:
        if isinstance(param, click.Option):
            extra = [name for name in param.envvar if not name.startswith("XRCAM_")]
            assert set(extra) <= {"RAY_API_SERVER_ADDRESS"}, (param.name, extra)
