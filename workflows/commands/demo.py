"""``xrcam demo``: the whole story on a generated synthetic archive, as a user would type it."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import click

#: The demo's archive: the synth ``blobs`` design (the bodies are the only class cue, many independent
#: layouts) at the paper's scale, 230-px FOV squares in 576x578 Cellvizio-like .mkt frames, with dark
#: vessel distractors in both classes; 40 patients per class, so the 80/10/10 patient split leaves
#: 4 test patients per class. The crops are resized to IMAGE_SIZE for training and scoring.
SYNTH_ARGS = ("--design blobs --format mkt --size 576 578 --crop 230 --patients 40 --videos 1 --frames 16 "
              "--layout-every 2 --distractors")  # fmt: skip
IMAGE_SIZE = 128


def _steps(
    out: Path, model: str, epochs: int, workers: int, seed: int, redo: bool = False
) -> list[list[str]]:
    """The user-level commands of the demo; ``--force``/resume make a second demo run cheap. ``redo``:
    the run overwrites the results (a store of an older xrcam cannot be resumed)."""
    archive, ckpt, results = str(out / "archive"), str(out / "checkpoint"), str(out / "results")
    return [
        ["synth", archive, *SYNTH_ARGS.split(), "--seed", str(seed), "--force"],
        ["train", archive, "--out", ckpt, "--model", model, "--epochs", str(epochs), "--patience", str(epochs),
         "--image-size", str(IMAGE_SIZE), "--seed", str(seed)],
        ["run", archive, "--out", results, "--checkpoint", str(Path(ckpt) / "model.pt"),
         "--workers", str(workers), "--split", "test", *(["--overwrite"] if redo else [])],
        ["reduce", results],
        ["report", results],
    ]  # fmt: skip


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-output"))
@click.option("--model", default="resnet18", show_default=True, help="timm backbone, trained from scratch.")
@click.option("--epochs", default=3, show_default=True, help="Training epochs.")
@click.option("--workers", default=1, show_default=True, help="Ray workers for `xrcam run`.")
@click.option("--seed", default=0, show_default=True, help="Seeds the archive, the split and the training.")
def command(out: Path, model: str, epochs: int, workers: int, seed: int) -> None:
    """Generate a synthetic pCLE archive, train, explain, reduce and report — end to end.

    Runs on a local Ray bound to 127.0.0.1 and needs no data, weights or network. Every step is a
    plain ``xrcam`` command, printed before it runs, so the demo doubles as a worked example. The
    archive is the localisation benchmark (``xrcam synth --design blobs``): the psammoma-like bodies
    are the only cue that separates the classes, so a map that finds them is right for the right
    reason. At the end it prints the per-layer mIoU of all seven methods on the test patients (the
    analogue of the paper's Table 1) and per layer set (Table 2), each with its 95 % CI over patients
    and beside the reference rows (random, centre prior, oracle, intensity): a method that does not
    beat random and centre has localised nothing. Then the test accuracy and where the HTML report is.
    Running it again resumes every step instead of recomputing it.

    Example: xrcam demo demo-output --seed 0
    """
    from workflows.cli import main
    from workflows.store import STORE_FORMAT, stored_format

    started, cpu = time.monotonic(), _cpu_seconds()
    found = stored_format(out / "results")
    redo = found not in (None, STORE_FORMAT)
    if redo:
        click.echo(
            f"{out / 'results'} was written by an older xrcam (results format {found}): the demo redoes it."
        )
    finished_with_failures = []  # exit status 1: the step finished, some videos failed (they are listed)
    for args in _steps(out, model, epochs, workers, seed, redo=redo):
        click.secho(f"\n$ xrcam {shlex.join(args)}", bold=True)
        if main.main(args=args, prog_name="xrcam", standalone_mode=False):
            finished_with_failures.append(f"xrcam {args[0]}")
    _print_summary(out)
    click.echo(
        f"\nDemo finished in {time.monotonic() - started:.0f} s "
        f"({_cpu_seconds() - cpu:.0f} CPU-seconds in this process and its finished child processes)."
    )
    if finished_with_failures:
        click.echo(f"Finished with failures (see above): {', '.join(finished_with_failures)}.", err=True)
        raise click.exceptions.Exit(1)


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _print_summary(out: Path) -> None:
    from workflows import results as results_api
    from workflows.commands.reduce import echo_tables

    results = out / "results"
    res = results_api.open(results)
    click.secho("\n=== Demo summary ===", bold=True)
    titles = {
        "table1": "Table 1: mIoU % [95 % CI over patients] per layer, test patients",
        "table2": "Table 2: mIoU % [95 % CI over patients] per layer set, test patients",
    }
    echo_tables({title: res.table(name) for name, title in titles.items()})
    sidecar = json.loads((out / "checkpoint" / "model.pt.json").read_text())
    click.echo(f"\nClassifier test accuracy: {sidecar['metrics']['test_accuracy']:.1%}")
    click.echo(f"Report: {results / 'report.html'}")
