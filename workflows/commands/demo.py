"""``xrcam demo``: the whole story on a generated synthetic archive, as a user would type it."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import click


def _steps(out: Path, model: str, epochs: int, workers: int) -> list[list[str]]:
    """The user-level commands of the demo; ``--force``/resume make a second demo run cheap."""
    archive, ckpt, results = str(out / "archive"), str(out / "checkpoint"), str(out / "results")
    return [
        ["synth", archive, *"--format mkt --patients 5 --videos 2 --frames 24 --seed 0 --force".split()],
        ["train", archive, "--out", ckpt, "--model", model, "--epochs", str(epochs), "--seed", "0"],
        ["run", archive, "--out", results, "--checkpoint", str(Path(ckpt) / "model.pt"),
         "--workers", str(workers), "--split", "test"],
        ["reduce", results],
        ["report", results],
    ]  # fmt: skip


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--model", default="resnet18", show_default=True, help="timm backbone to fine-tune.")
@click.option(
    "--epochs", default=8, show_default=True, help="Training epochs (early stopping may end sooner)."
)
@click.option("--workers", default=1, show_default=True, help="Ray workers for `xrcam run`.")
def command(out: Path, model: str, epochs: int, workers: int) -> None:
    """Generate a synthetic pCLE archive, train, explain, reduce and report — end to end.

    Runs on a local Ray bound to 127.0.0.1 and needs no data, weights or network. Every step is a
    plain ``xrcam`` command, printed before it runs, so the demo doubles as a worked example.
    At the end it prints, from the Parquet summary tables, the per-layer mIoU of all seven methods
    on the test patients (the analogue of the paper's Table 1), the mIoU per layer set (Table 2),
    the classifier's test accuracy and where the HTML report is. Running it again resumes every
    step instead of recomputing it.

    Example: xrcam demo demo-output --epochs 8
    """
    from workflows.cli import main

    started = time.monotonic()
    for args in _steps(out, model, epochs, workers):
        click.secho(f"\n$ xrcam {shlex.join(args)}", bold=True)
        main.main(args=args, prog_name="xrcam", standalone_mode=False)
    _print_summary(out)
    click.echo(f"\nDemo finished in {time.monotonic() - started:.0f} s.")


def _print_summary(out: Path) -> None:
    from workflows.commands.reduce import echo_tables

    results = out / "results"
    click.secho("\n=== Demo summary ===", bold=True)
    echo_tables(
        {
            "Table 1: mIoU (%) per layer, test patients": results / "summary" / "table1_layer_miou.parquet",
            "Table 2: mIoU (%) per layer set, test patients": results
            / "summary"
            / "table2_layerset_miou.parquet",
        }
    )
    sidecar = json.loads((out / "checkpoint" / "model.pt.json").read_text())
    click.echo(f"\nClassifier test accuracy: {sidecar['metrics']['test_accuracy']:.1%}")
    click.echo(f"Report: {results / 'report.html'}")
