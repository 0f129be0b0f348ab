"""``xrcam demo``: the whole story on a generated synthetic archive, as a user would type it."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import click


def _steps(out: Path, model: str, epochs: int, workers: int) -> list[list[str]]:
    archive, ckpt, results = out / "archive", out / "checkpoint", out / "results"
    return [
        [
            "synth",
            str(archive),
            "--format",
            "mkt",
            "--patients",
            "5",
            "--videos",
            "2",
            "--frames",
            "24",
            "--seed",
            "0",
        ],
        ["train", str(archive), "--out", str(ckpt), "--model", model, "--epochs", str(epochs), "--seed", "0"],
        [
            "run",
            str(archive),
            "--out",
            str(results),
            "--checkpoint",
            str(ckpt / "model.pt"),
            "--workers",
            str(workers),
            "--split",
            "test",
        ],
        ["reduce", str(results)],
        ["report", str(results)],
    ]


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--model", default="resnet18", show_default=True, help="timm backbone to fine-tune.")
@click.option(
    "--epochs", default=8, show_default=True, help="Training epochs (early stopping may end sooner)."
)
@click.option("--workers", default=2, show_default=True, help="Ray workers for `xrcam run`.")
@click.pass_context
def command(ctx: click.Context, out: Path, model: str, epochs: int, workers: int) -> None:
    """Generate a synthetic pCLE archive, train, explain, reduce and report — end to end.

    Runs on a local Ray bound to 127.0.0.1 and needs no data, weights or network. Every step is a
    plain ``xrcam`` command, printed before it runs, so the demo doubles as a worked example.
    At the end it prints the per-layer mIoU of all seven methods on the test patients (the
    analogue of the paper's Table 1), the mIoU per layer set (Table 2) and where the report is.
    """
    from workflows.cli import main

    started = time.monotonic()
    for args in _steps(out, model, epochs, workers):
        click.secho(f"\n$ xrcam {shlex.join(args)}", bold=True)
        main.main(args=args, prog_name="xrcam", standalone_mode=False)
    _print_tables(out / "results")
    click.echo(
        f"\nDemo finished in {time.monotonic() - started:.0f} s. Report: {out / 'results' / 'report.html'}"
    )


def _print_tables(results: Path) -> None:
    import pandas as pd

    for title, name in (
        ("Table 1: mIoU per layer", "table1_layer_miou"),
        ("Table 2: mIoU per layer set", "table2_layerset_miou"),
    ):
        path = results / "summary" / f"{name}.parquet"
        click.secho(f"\n{title} ({path})", bold=True)
        with pd.option_context("display.width", 140, "display.precision", 3):
            click.echo(pd.read_parquet(path).to_string())
