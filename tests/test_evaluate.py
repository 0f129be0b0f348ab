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
        archive, "--model", "resnet18", "--random-init", 0, "--methods", ",".join(METHODS), "--max-frames", 4,
        "--axioms", "--sanity",
        "--sample-frames", 2, "--mc-samples", 2, "--dropout", 0.1, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Table 1" in result.output and "Table 4" in result.output and "Sanity check" in result.output
    assert "misclassified" in result.output and "empty ground truth" in result.output
    for name in (
        "table1_layer_miou",
        "table2_layerset_miou",
        "summary/table3_dropout_miou",  # where every summary table lives: the read API finds it
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
    methods = iou[~iou["is_reference"]]
    assert len(methods) == 4 * len(METHODS) * len(sets) * 2
    assert set(iou["layer_set"]) == set(sets) and set(iou["dropout"]) == {"on", "off"}
    # reference rows and the sign check beside the methods, on the same frames, dropout off only
    refs = iou[iou["is_reference"]]
    assert set(refs["method"]) == {"random", "centre", "oracle", "intensity", "inverted_xrelevancecam"}
    assert set(refs["dropout"]) == {"off"} and len(refs) == 4 * 5 * len(sets)
    assert (iou["frame"] % 2 == 0).all() and (iou["label"] == "meningioma").all()
    assert iou["iou"].between(0, 1).all()

    miou = pd.read_parquet(out / "miou.parquet")
    assert (miou["n_frames"] + miou["n_misclassified"] + miou["n_empty_gt"] == 4).all()
    table1 = pd.read_parquet(out / "table1_layer_miou.parquet")
    assert list(dict.fromkeys(table1["layer_set"])) == ["1", "2", "3", "4"]
    assert list(dict.fromkeys(table1[~table1["is_reference"]]["method"])) == METHODS
    for method in [*METHODS, "oracle"]:
        rows = iou[(iou["method"] == method) & (iou["layer_set"] == "2") & (iou["dropout"] == "off")]
        kept = rows[rows["correct"] & ~rows["gt_empty"]]
        expected = kept["iou"].mean() * 100 if len(kept) else float("nan")
        cell = table1[(table1["method"] == method) & (table1["layer_set"] == "2")].iloc[0]
        assert cell["miou_pct"] == pytest.approx(expected, nan_ok=True)
        assert cell["n_frames"] == len(kept) and cell["n_patients"] == kept["patient"].nunique()
        if len(kept):
            assert cell["ci_lo_pct"] <= cell["miou_pct"] <= cell["ci_hi_pct"]
    table2 = pd.read_parquet(out / "table2_layerset_miou.parquet")
    assert list(dict.fromkeys(table2["layer_set"])) == [
        "4",
        "4+3",
        "4+3+2",
        "4+3+2+1",
    ]  # one Table 2 definition
    from workflows.tables import read_table

    table3 = read_table(out, "table3")  # what workflows.results.open(out).table("table3") reads
    assert set(table3["dropout"]) == {"on", "off"} and "ci_lo_pct" in table3

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
    result = _evaluate(archive, "--model", "resnet18", "--out", tmp_path / "no-weights")
    assert result.exit_code == 2 and "--checkpoint" in result.output and "--random-init" in result.output
    assert not (tmp_path / "no-weights").exists()  # refused before anything is written
    random_init = ("--random-init", 0)
    result = _evaluate(archive, "--model", "resnet18", *random_init, "--mc-samples", 3, "--out", tmp_path)
    assert result.exit_code != 0 and "--dropout" in result.output
    result = _evaluate(archive, "--model", "resnet18", *random_init, "--layer-sets", "4+x", "--out", tmp_path)
    assert result.exit_code != 0 and "layer set" in result.output
    result = _evaluate(
        archive, "--model", "resnet18", *random_init, "--threshold", "median", "--out", tmp_path
    )
    assert result.exit_code != 0 and "threshold" in result.output
    result = _evaluate(archive, "--model", "resnet18", *random_init, "--rules", "nonsense", "--out", tmp_path)
    assert result.exit_code == 2 and "reference" in result.output  # the registered composites are listed
    result = _evaluate(
        archive, "--model", "resnet18", "--classes", "one", "--random-init", 1, "--out", tmp_path
    )
    assert result.exit_code != 0 and "two distinct classes" in result.output


def test_table3_lives_in_the_summary_and_survives_a_rerun_of_reduce(tmp_path):
    from reduce_helpers import build_store

    from workflows import tables
    from workflows.evaluation import write_tables
    from workflows.reduce import ReduceSettings, reduce_results

    root = tmp_path / "r"
    build_store(root, videos=1)
    table3 = pd.DataFrame({"method": ["gradcam"], "dropout": ["on"], "miou_pct": [12.5]})
    write_tables({"table3_dropout_miou": table3}, root, {"evaluate": {}})
    assert (root / "summary" / "table3_dropout_miou.parquet").is_file()
    reduce_results(root, ReduceSettings(references=(), layer_sets=("4",)), workers=0)
    assert tables.read_table(root, "table3")["miou_pct"].tolist() == [12.5]
    assert "table3" in tables.table_names(root)
