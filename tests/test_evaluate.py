"""``xrcam evaluate`` end to end on a small synthetic archive: tables, files and their consistency."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

from workflows.cli import main

METHODS = ["gradcam", "xrelevancecam"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from xrcam.synth import SynthConfig, write_archive

    root = tmp_path_factory.mktemp("archive")
    write_archive(root, SynthConfig(patients=2, videos=1, frames=6, size=(96, 96), seed=0), fmt="tiff-stack")
    return root


def _evaluate(*args: str):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)], catch_exceptions=False)


@pytest.mark.slow
def test_evaluate_writes_consistent_tables(archive, tmp_path):
    out = tmp_path / "eval"
    result = _evaluate(
        archive, "--model", "resnet18", "--methods", ",".join(METHODS), "--max-frames", 4, "--axioms", "--sanity",
        "--sample-frames", 2, "--mc-samples", 2, "--dropout", 0.1, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "Table 4" in result.output and "Sanity check" in result.output
    assert "misclassified" in result.output and "empty ground truth" in result.output
    for name in (
        "table1_layer_miou",
        "table2_layerset_miou",
        "table3_dropout_miou",
        "table4_axioms",
        "sanity",
    ):
        assert (out / f"{name}.parquet").is_file() and (out / f"{name}.csv").is_file(), name
    settings = json.loads((out / "evaluate.json").read_text())
    assert settings["run"]["model"] == "resnet18" and settings["evaluate"]["mc_samples"] == 2

    iou = pd.read_parquet(out / "iou.parquet")
    sets = ["1", "2", "3", "4", "4+3", "4+3+2", "4+3+2+1"]
    # 4 annotated frames (frame_step 2 keeps 0, 2, 4 of each meningioma video) x methods x sets x dropout on/off
    assert iou.groupby(["video_id", "frame"]).ngroups == 4
    assert len(iou) == 4 * len(METHODS) * len(sets) * 2
    assert set(iou["layer_set"]) == set(sets) and set(iou["dropout"]) == {"on", "off"}
    assert (iou["frame"] % 2 == 0).all() and (iou["label"] == "meningioma").all()
    assert iou["iou"].between(0, 1).all()

    miou = pd.read_parquet(out / "miou.parquet")
    assert (miou["frames"] + miou["misclassified"] + miou["empty_gt"] == 4).all()
    table1 = pd.read_parquet(out / "table1_layer_miou.parquet").set_index("method")
    for method in METHODS:
        rows = iou[(iou["method"] == method) & (iou["layer_set"] == "2") & (iou["dropout"] == "off")]
        kept = rows[rows["correct"] & ~rows["gt_empty"]]
        expected = kept["iou"].mean() * 100 if len(kept) else float("nan")
        assert table1.loc[method, "layer 2"] == pytest.approx(expected, nan_ok=True)
    assert list(table1.columns) == ["model", "layer 1", "layer 2", "layer 3", "layer 4", "average", "frames"]

    axioms = pd.read_parquet(out / "axioms.parquet")
    assert len(axioms) == 2 * len(METHODS) * 4
    xr = axioms[axioms["method"] == "xrelevancecam"]
    assert (xr["conservation"] < 1e-3).all()
    sanity = pd.read_csv(out / "sanity.csv", dtype={"randomized": str})
    assert list(sanity["randomized"].unique()) == ["4", "4+3", "4+3+2", "4+3+2+1"]
    defined = sanity["spearman_frames"] > 0  # a ReLU'd map can be all zeros: no rank correlation
    assert (
        sanity.loc[defined, "spearman"].between(-1, 1).all() and sanity.loc[~defined, "spearman"].isna().all()
    )
    assert sanity["ssim"].between(-1, 1).all() and (sanity["frames"] == 2).all()


def test_evaluate_reads_model_and_classes_from_the_checkpoint_and_honours_split(archive, tmp_path):
    import xrcam
    from xrcam.models import save_checkpoint

    ckpt = tmp_path / "model.pt"
    classes = ["glioblastoma", "meningioma"]
    save_checkpoint(
        xrcam.load_model("resnet18", num_classes=2),
        ckpt,
        {"model": "resnet18", "classes": classes, "split": {"videos": {"test": ["meningioma/P02/V01.tif"]}}},
    )
    out = tmp_path / "eval"
    result = _evaluate(archive, "--checkpoint", ckpt, "--methods", "xrelevancecam", "--layers", "4", "--layer-sets",
                       "4", "--split", "test", "--threshold", "otsu", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    iou = pd.read_parquet(out / "iou.parquet")
    assert set(iou["video_id"]) == {"meningioma/P02/V01.tif"}
    assert set(iou["layer_set"]) == {"4"} and set(iou["prediction"]) <= set(classes)
    assert json.loads((out / "evaluate.json").read_text())["checkpoint_sha256"]


def test_evaluate_explains_what_to_do_on_bad_options(archive, tmp_path):
    result = _evaluate(archive, "--model", "resnet18", "--mc-samples", 3, "--out", tmp_path)
    assert result.exit_code != 0 and "--dropout" in result.output
    result = _evaluate(archive, "--model", "resnet18", "--layer-sets", "4+x", "--out", tmp_path)
    assert result.exit_code != 0 and "layer set" in result.output
    result = _evaluate(archive, "--model", "resnet18", "--threshold", "median", "--out", tmp_path)
    assert result.exit_code != 0 and "threshold" in result.output
