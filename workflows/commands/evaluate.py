"""``xrcam evaluate``: score explanation maps on an archive in one process (mIoU, axioms, sanity check)."""

from __future__ import annotations

from pathlib import Path

import click

from workflows.commands.conventions import classes_option
from workflows.settings import DEFAULT_LAYERS


def _csv(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(p.strip() for p in text.split(",") if p.strip())


@click.command()
@click.argument("archive", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--model", default=None, help="timm backbone [default: the checkpoint's, else skresnext50_32x4d]."
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Weights (model.pt from `xrcam train`); its sidecar sets model, classes, dropout, preprocessing.",
)
@click.option(
    "--random-init",
    type=click.IntRange(min=0),
    metavar="SEED",
    default=None,
    help="No checkpoint: score random weights drawn from SEED, the ones `xrcam run --random-init SEED` explained.",
)
@classes_option()
@click.option("--methods", default=None, help="Comma-separated methods [default: all registered].")
@click.option(
    "--layers",
    default=",".join(DEFAULT_LAYERS),
    show_default=True,
    help="Stages scored one by one (Table 1); stage numbers work too (1,2,3,4).",
)
@click.option(
    "--layer-sets",
    default="4,4+3,4+3+2,4+3+2+1",
    show_default=True,
    help="Comma-separated layer sets aggregated for Table 2 (stage numbers joined by '+').",
)
@click.option(
    "--threshold",
    default="mean+std",
    show_default=True,
    help="Mask rule: mean+std, fraction:<0..1> (of the map's max) or otsu.",
)
@click.option(
    "--relu",
    type=click.Choice(["auto", "on", "off"]),
    default="auto",
    show_default=True,
    help="ReLU before normalising; auto = on for the gradient family, off for the relevance family.",
)
@click.option(
    "--axioms/--no-axioms", default=False, show_default=True, help="Conservation and sensitivity (Table 4)."
)
@click.option("--sanity/--no-sanity", default=False, show_default=True, help="Cascading randomisation check.")
@click.option(
    "--mc-samples",
    "mc_samples",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also score with dropout active, maps averaged over T passes (Table 3); needs the dropout variant.",
)
@click.option(
    "--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="Dropout after each stage."
)
@click.option(
    "--max-frames", type=click.IntRange(min=1), default=None, help="Annotated frames scored (evenly spaced)."
)
@click.option(
    "--sample-frames",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Frames used by --axioms and --sanity.",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Channel ablations per forward pass in --axioms (bounds memory).",
)
@click.option(
    "--split",
    type=click.Choice(["train", "val", "test"]),
    default=None,
    help="Only this patient split (the checkpoint's own split when recorded) [default: every video].",
)
@click.option(
    "--frame-step", type=click.IntRange(min=1), default=2, show_default=True, help="Keep every n-th frame."
)
@click.option("--crop", default=None, help="Manual crop x,y,size instead of FOV detection.")
@click.option(
    "--rules",
    default="reference",
    show_default=True,
    help="LRP composite of the relevance family: a name registered in xrcam.lrp (list_composites()).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Frames per pass."
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run.",
)
@click.option("--seed", default=0, show_default=True, help="Seeds the sanity check's re-initialisation.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("evaluation"),
    show_default=True,
    help="Folder for the tables (Parquet + CSV). A results folder works: `xrcam reduce` then adds Table 4.",
)
def command(
    archive: Path,
    model: str | None,
    checkpoint: Path | None,
    random_init: int | None,
    classes: tuple[str, ...] | None,
    methods: str | None,
    layers: str,
    layer_sets: str,
    threshold: str,
    relu: str,
    axioms: bool,
    sanity: bool,
    mc_samples: int,
    dropout: float | None,
    max_frames: int | None,
    sample_frames: int,
    chunk_size: int,
    split: str | None,
    frame_step: int,
    crop: str | None,
    rules: str,
    batch_size: int,
    device: str,
    seed: int,
    out: Path,
) -> None:
    """Score explanation maps on ARCHIVE in one process (no Ray) and print the paper's tables.

    For every method and layer (and each --layer-sets aggregate) the annotated frames are explained,
    the maps upsampled, normalised and thresholded into masks, and the IoU with the ground truth
    averaged over the correctly classified frames (mIoU, Tables 1 and 2). --mc-samples T repeats this
    with dropout active (Table 3). --axioms adds conservation and sensitivity per layer (Table 4) and
    --sanity the cascading randomisation check, both on --sample-frames frames.

    Tables are printed and written as Parquet and CSV into --out: table1_layer_miou,
    table2_layerset_miou, table3_dropout_miou, table4_axioms, sanity, miou (long form with frame
    counts), iou and axioms (per frame), plus evaluate.json with the settings.

    Example: xrcam evaluate archive/ --checkpoint ckpt/model.pt --split test --axioms --sanity --out eval/
    """
    from dataclasses import asdict

    from workflows.evaluation import TABLE_ORDER, EvalOptions, evaluate, write_tables
    from workflows.preflight import require_weights
    from workflows.settings import RunSettings
    from xrcam import __version__
    from xrcam.errors import XrcamError
    from xrcam.lrp import list_composites
    from xrcam.models import file_sha256

    if rules not in list_composites():
        raise click.BadParameter(
            f"{rules!r}: choose one of {', '.join(list_composites())}", param_hint="--rules"
        )
    try:
        require_weights(str(checkpoint) if checkpoint else None, random_init)
    except XrcamError as exc:
        raise click.UsageError(str(exc)) from exc
    try:
        run = RunSettings.resolve(
            archive=str(archive),
            out=str(out),
            model=model,
            checkpoint=str(checkpoint) if checkpoint else None,
            random_init=random_init,
            classes=classes,
            methods=_csv(methods),
            layers=tuple(f"layer{p}" if p.isdigit() else p for p in _csv(layers) or ()),
            dropout=dropout,
            rules=rules,
            frame_step=frame_step,
            crop=crop,
            batch_size=batch_size,
            split=split,
            device=None if device == "auto" else device,
        )
        options = EvalOptions(
            layer_sets=_csv(layer_sets) or (),
            threshold=threshold,
            relu={"auto": None, "on": True, "off": False}[relu],
            axioms=axioms,
            sanity=sanity,
            mc_samples=mc_samples,
            max_frames=max_frames,
            sample_frames=sample_frames,
            chunk_size=chunk_size,
            seed=seed,
        )
        tables = evaluate(run, options, echo=click.echo)
    except XrcamError as exc:
        raise click.ClickException(str(exc)) from exc
    if not tables:
        raise click.ClickException(
            f"{archive}: nothing to evaluate: no annotated frames in the selected videos; "
            "add ground-truth masks, drop --split, or ask for --axioms / --sanity"
        )
    _print(tables)
    settings = {
        "xrcam_version": __version__,
        "checkpoint_sha256": file_sha256(run.checkpoint) if run.checkpoint else None,
        "run": run.to_dict(),
        "evaluate": asdict(options),
    }
    written = write_tables({name: tables[name] for name in TABLE_ORDER if name in tables}, out, settings)
    click.echo(f"\n{len(written)} files written to {out}")


def _print(tables: dict) -> None:
    import pandas as pd

    titles = {
        "table1_layer_miou": "mIoU (%) [95 % CI over patients] per layer (Table 1)",
        "table2_layerset_miou": "mIoU (%) [95 % CI over patients] per layer set (Table 2)",
        "table3_dropout_miou": "mIoU (%) with dropout on (Monte-Carlo) and off (Table 3)",
        "table4_axioms": "Axiom metrics, lower is better (Table 4)",
    }
    from workflows.commands.reduce import echo_tables

    if "miou" in tables:
        for dropout, rows in tables["miou"].groupby("dropout", sort=False):
            first = rows.iloc[0]  # the counts depend on the predictions only, not on method or layer set
            click.echo(
                f"mIoU (dropout {dropout}) averages {first['n_frames']} annotated frames of "
                f"{first['n_patients']} patients; left out: {first['n_misclassified']} misclassified, "
                f"{first['n_empty_gt']} with an empty ground truth"
            )
    echo_tables({title: tables[name] for name, title in titles.items() if name in tables}, precision=3)
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.precision", 3):
        if "sanity" in tables:
            for value in ("spearman", "ssim"):
                wide = tables["sanity"].pivot_table(
                    index=["method", "layer"], columns="randomized", values=value, sort=False
                )
                click.secho(
                    f"\nSanity check: {value} with the original map, stages randomised from the top",
                    bold=True,
                )
                click.echo(wide.to_string())
