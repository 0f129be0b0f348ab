"""Reduction: aggregated maps and masks written back to the store, metrics rows that reconcile with it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from reduce_helpers import LAYERS, METHODS, build_store

from workflows.reduce import (
    METRICS_DIR,
    ReduceSettings,
    agg_name,
    mask_name,
    parse_threshold,
    reduce_results,
    reduce_video,
)
from workflows.store import ResultStore, map_name
from xrcam.errors import XrcamConfigError
from xrcam.postprocess import aggregate, iou, make_masks, normalize

SIZE = 32


@pytest.fixture
def results(tmp_path):
    build_store(tmp_path / "results")
    return tmp_path / "results"


def test_rows_reconcile_with_store_and_iou_recomputes_from_stored_masks(results):
    settings = ReduceSettings(layer_sets=("1", "4", "4+3", "4+3+2+1"), threshold="meanstd")
    summary = reduce_results(results, settings, workers=0)
    store = ResultStore.open(results)
    df = pd.read_parquet(results / METRICS_DIR)
    frames = sum(store.video(k)["frame_index"].shape[0] for k in store.video_keys())
    assert len(df) == summary["rows"] == frames * len(METHODS) * 4
    assert not df.duplicated(["video_id", "frame", "method", "layer_set"]).any()

    key = store.video_keys()[1]
    group = store.video(key)
    gt = torch.from_numpy(group["gt_mask"][:] > 0)
    has_gt = group["has_gt_mask"][:]
    for method in METHODS:
        for layer_set in settings.layer_sets:
            stored = torch.from_numpy(group[mask_name(method, layer_set)][:] > 0)
            rows = df[
                (df.video_key == key) & (df.method == method) & (df.layer_set == layer_set)
            ].sort_values("position")
            assert rows["mask_area"].tolist() == stored.flatten(1).sum(1).tolist()
            expected = iou(stored, gt).numpy()
            np.testing.assert_allclose(rows["iou"].to_numpy()[has_gt], expected[has_gt], rtol=1e-6)
            assert rows["iou"].isna().to_numpy()[~has_gt].all()
            assert set(rows["frame"]) == set(group["frame_index"][:].tolist())
    # the stored aggregate is the postprocess aggregate of the stored per-layer maps (float16 on disk)
    normalised = {
        layer: normalize(
            torch.from_numpy(group[map_name("xrelevancecam", layer)][:]), SIZE, method="xrelevancecam"
        )
        for layer in LAYERS
    }
    expected = aggregate(normalised, "4+3+2+1")
    stored = group[agg_name("xrelevancecam", "4+3+2+1")][:].astype(np.float32)
    np.testing.assert_allclose(stored, expected.numpy(), atol=1e-3)
    assert agg_name("xrelevancecam", "4") not in group  # single layers are the stored maps, not duplicated
    assert torch.equal(
        torch.from_numpy(group[mask_name("xrelevancecam", "4+3+2+1")][:] > 0), make_masks(expected)
    )


def test_frame_columns_match_the_store(results):
    reduce_results(results, ReduceSettings(layer_sets=("4",)), workers=0)
    store = ResultStore.open(results)
    df = pd.read_parquet(results / METRICS_DIR, filters=[("method", "==", "gradcam")])
    for key in store.video_keys():
        group = store.video(key)
        rows = df[df.video_key == key].sort_values("position")
        np.testing.assert_array_equal(rows["predicted_index"], group["predicted"][:])
        probs = group["probabilities"][:]
        np.testing.assert_allclose(rows["probability"], probs[np.arange(len(probs)), group["predicted"][:]])
        assert (rows["correct"] == (group["predicted"][:] == group.attrs["label_index"])).all()
        assert (
            rows["prediction"] == [["glioblastoma", "meningioma"][i] for i in group["predicted"][:]]
        ).all()
        assert set(rows["patient"]) == {group.attrs["patient"]}
        gt_area = (group["gt_mask"][:] > 0).sum(axis=(1, 2))
        np.testing.assert_array_equal(rows["gt_area"], gt_area)
        np.testing.assert_array_equal(rows["gt_empty"], group["has_gt_mask"][:] & (gt_area == 0))


def test_filter_by_method_returns_plain_strings(results):
    reduce_results(results, ReduceSettings(layer_sets=("4", "4+3")), workers=0)
    df = pd.read_parquet(results / METRICS_DIR, filters=[("method", "==", "xrelevancecam")])
    assert len(df) > 0 and set(df["method"]) == {"xrelevancecam"}
    for column in ("method", "layer_set", "video_id", "patient", "label", "prediction"):
        assert not isinstance(df[column].dtype, pd.CategoricalDtype), column
        assert pd.api.types.is_string_dtype(df[column]), column
    # one folder per method, each file carrying the run's settings in its schema metadata
    parts = sorted(p.parent.name for p in (results / METRICS_DIR).glob("*/part-0.parquet"))
    assert parts == sorted(METHODS)
    meta = json.loads(pq.read_schema(results / METRICS_DIR / "gradcam" / "part-0.parquet").metadata[b"xrcam"])
    assert meta["run_settings"]["model"] == "resnet18"
    assert meta["reduce_settings"]["layer_sets"] == ["4", "4+3"]
    assert meta["reduce_settings"]["threshold"] == "mean+std"


def test_summary_tables_follow_the_paper_layout(results):
    reduce_results(results, ReduceSettings(), workers=0)
    df = pd.read_parquet(results / METRICS_DIR)
    t1 = pd.read_parquet(results / "summary" / "table1_layer_miou.parquet")
    t2 = pd.read_parquet(results / "summary" / "table2_layerset_miou.parquet")
    assert list(t1.columns) == [
        "method",
        "model",
        "layer 1",
        "layer 2",
        "layer 3",
        "layer 4",
        "average",
        "frames",
    ]
    assert list(t2.columns) == [
        "method",
        "model",
        "layer 4",
        "layer 4+3",
        "layer 4+3+2",
        "layer 4+3+2+1",
        "frames",
    ]
    assert list(t1["method"]) == list(METHODS)
    # mIoU by hand: annotated, correctly classified, non-empty ground truth
    kept = df[df.has_gt_mask & df.correct & ~df.gt_empty]
    by_hand = kept[(kept.method == "xrelevancecam") & (kept.layer_set == "4+3")]["iou"].mean() * 100
    row = t2[t2.method == "xrelevancecam"].iloc[0]
    assert row["layer 4+3"] == pytest.approx(by_hand, rel=1e-5)
    assert row["frames"] == len(kept[(kept.method == "xrelevancecam") & (kept.layer_set == "4")])
    r1 = t1[t1.method == "gradcam"].iloc[0]
    assert r1["average"] == pytest.approx(np.mean([r1[f"layer {i}"] for i in range(1, 5)]))
    acc = pd.read_parquet(results / "summary" / "accuracy_per_class.parquet")
    frame_rows = df[(df.method == "gradcam") & (df.layer_set == "1")]
    assert acc["frames"].sum() == len(frame_rows)
    for _, r in acc.iterrows():
        assert r["accuracy"] == pytest.approx(frame_rows[frame_rows.label == r["label"]]["correct"].mean())
    per_patient = pd.read_parquet(results / "summary" / "accuracy_per_patient.parquet")
    assert sorted(per_patient["patient"]) == ["p0", "p1", "p2"]
    assert not (results / "summary" / "table4_axioms.parquet").exists()


def test_axiom_table_and_columns_when_evaluate_wrote_axioms(results):
    store = ResultStore.open(results)
    group = store.video(store.video_keys()[0])
    video_id, frames = group.attrs["video_id"], group["frame_index"][:2].tolist()
    rows = [
        {
            "video_id": video_id,
            "frame": f,
            "method": m,
            "layer": layer,
            "conservation": 0.1 * i,
            "sensitivity": 0.2 * i,
        }
        for i, m in enumerate(METHODS, start=1)
        for layer in LAYERS
        for f in frames
    ]
    pd.DataFrame(rows).to_parquet(results / "axioms.parquet")
    reduce_results(results, ReduceSettings(layer_sets=("3", "4", "4+3")), workers=0)
    t4 = pd.read_parquet(results / "summary" / "table4_axioms.parquet")
    assert list(t4.columns) == ["method", "axiom", "layer 1", "layer 2", "layer 3", "layer 4", "average"]
    row = t4[(t4.method == "relevancecam") & (t4.axiom == "sensitivity")].iloc[0]
    assert row["layer 3"] == pytest.approx(0.4) and row["average"] == pytest.approx(0.4)
    # the sampled frames carry their axiom metrics on the single-layer rows, nothing else does
    df = pd.read_parquet(results / METRICS_DIR)
    filled = df[df.conservation.notna()]
    assert len(filled) == len(METHODS) * 2 * len(frames)  # layer sets "3" and "4"
    assert set(filled.layer_set) == {"3", "4"} and set(filled.frame) == set(frames)
    assert set(filled.video_id) == {video_id}
    x = filled[filled.method == "xrelevancecam"]
    np.testing.assert_allclose(x["conservation"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(x["sensitivity"], 0.6, rtol=1e-6)


def test_rerun_is_idempotent_and_replaces_outputs(results):
    settings = ReduceSettings(layer_sets=("4", "4+3"))
    reduce_results(results, settings, workers=0)
    first = pd.read_parquet(results / METRICS_DIR)
    key = ResultStore.open(results).video_keys()[0]
    mask_first = ResultStore.open(results).video(key)[mask_name("gradcam", "4+3")][:]
    reduce_results(results, settings, workers=0)
    second = pd.read_parquet(results / METRICS_DIR)
    pd.testing.assert_frame_equal(first, second)
    np.testing.assert_array_equal(
        mask_first, ResultStore.open(results).video(key)[mask_name("gradcam", "4+3")][:]
    )
    # another threshold replaces the masks and rows instead of appending
    reduce_results(results, ReduceSettings(layer_sets=("4", "4+3"), threshold="fraction:0.9"), workers=0)
    third = pd.read_parquet(results / METRICS_DIR)
    assert len(third) == len(first)
    assert third["mask_area"].sum() < first["mask_area"].sum()
    assert ResultStore.open(results).video(key)[mask_name("gradcam", "4+3")].attrs["threshold"] == "fraction"
    # fewer layer sets: the arrays of the dropped set go too
    reduce_results(results, ReduceSettings(layer_sets=("4",)), workers=0)
    names = set(ResultStore.open(results).video(key).array_keys())
    assert mask_name("gradcam", "4") in names
    assert not {n for n in names if n.startswith(("agg_", "mask_")) and n.endswith("4-3")}
    assert not list(results.glob(".*tmp")) and not list(results.glob(".*old"))


def test_chunked_processing_gives_the_same_rows(results, tmp_path):
    key = ResultStore.open(results).video_keys()[0]
    whole = reduce_video(results, key, ReduceSettings(layer_sets=("4+3+2+1",), chunk_frames=100)).to_pandas()
    chunked = reduce_video(results, key, ReduceSettings(layer_sets=("4+3+2+1",), chunk_frames=3)).to_pandas()
    pd.testing.assert_frame_equal(whole, chunked)


def test_incomplete_videos_are_left_out(results):
    store = ResultStore.open(results)
    key = store.video_keys()[0]
    store.video(key).attrs.update({"complete": False})
    summary = reduce_results(results, ReduceSettings(layer_sets=("4",)), workers=0)
    assert summary["incomplete_videos"] == [key]
    assert key not in set(pd.read_parquet(results / METRICS_DIR)["video_key"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("meanstd", ("mean+std", 0.5)),
        ("mean+std", ("mean+std", 0.5)),
        ("fraction:0.3", ("fraction", 0.3)),
        ("otsu", ("otsu", 0.5)),
    ],
)
def test_threshold_option_parses(text, expected):
    assert parse_threshold(text) == expected


@pytest.mark.parametrize("text", ["median", "fraction:2", "fraction:x", "otsu:0.2"])
def test_bad_threshold_is_refused(text):
    with pytest.raises(XrcamConfigError):
        parse_threshold(text)


def test_layer_set_needing_an_unexplained_layer_is_refused(results):
    key = ResultStore.open(results).video_keys()[0]
    with pytest.raises(XrcamConfigError, match="layer5"):
        reduce_video(results, key, ReduceSettings(layer_sets=("5",)))
    with pytest.raises(XrcamConfigError, match="layer5"):
        reduce_results(results, ReduceSettings(layer_sets=("4", "5")), workers=0)


def test_settings_are_recorded_in_canonical_form():
    settings = ReduceSettings(layer_sets=("layer4+layer3", "4"), threshold="FRACTION:0.25")
    assert settings.layer_sets == ("4+3", "4") and settings.threshold == "fraction:0.25"
    assert ReduceSettings(threshold="meanstd").threshold == "mean+std"


def test_cli_reduce_in_process(results):
    from workflows.cli import main

    out = CliRunner().invoke(main, ["reduce", str(results), "--layer-sets", "4,4+3", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert "layer 4+3" in out.output
    assert (results / "summary" / "table2_layerset_miou.parquet").exists()
    bad = CliRunner().invoke(main, ["reduce", str(results / "nowhere")])
    assert bad.exit_code != 0 and "xrcam run" in bad.output


@pytest.mark.ray
@pytest.mark.slow
def test_reduce_on_local_ray_matches_serial(results, ray_local):
    settings = ReduceSettings(layer_sets=("4", "4+3+2+1"))
    reduce_results(results, settings, workers=0)
    serial = pd.read_parquet(results / METRICS_DIR)
    reduce_results(results, settings, workers=2)
    on_ray = pd.read_parquet(results / METRICS_DIR)
    pd.testing.assert_frame_equal(serial, on_ray)


@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_on_a_synthetic_archive(tmp_path, ray_local):
    """synth -> run (real explanations, local Ray) -> reduce: rows reconcile with the store."""
    import xrcam
    from workflows.cli import main
    from xrcam.models import save_checkpoint
    from xrcam.synth import SynthConfig, write_archive

    archive, results = tmp_path / "archive", tmp_path / "results"
    write_archive(archive, SynthConfig(patients=1, videos=1, frames=6, size=(64, 64), seed=4), fmt="png")
    torch.manual_seed(0)
    model = xrcam.load_model("resnet18", num_classes=2)
    ckpt = save_checkpoint(
        model, tmp_path / "model.pt", {"model": "resnet18", "classes": ["glioblastoma", "meningioma"]}
    )
    run = CliRunner().invoke(
        main,
        ["run", str(archive), "--out", str(results), "--checkpoint", str(ckpt), "--workers", "1"]
        + ["--chunk-frames", "2", "--batch-size", "3", "--no-progress"],
    )
    assert run.exit_code == 0, run.output
    out = CliRunner().invoke(main, ["reduce", str(results), "--workers", "1"])
    assert out.exit_code == 0, out.output

    store = ResultStore.open(results)
    df = pd.read_parquet(results / METRICS_DIR, filters=[("method", "==", "xrelevancecam")])
    assert set(df["method"]) == {"xrelevancecam"} and pd.api.types.is_string_dtype(df["method"])
    full = pd.read_parquet(results / METRICS_DIR)
    frames = sum(store.video(k)["frame_index"].shape[0] for k in store.video_keys())
    assert len(full) == frames * len(store.methods) * 7
    annotated = 0
    for key in store.video_keys():
        group = store.video(key)
        gt = torch.from_numpy(group["gt_mask"][:] > 0)
        has_gt = group["has_gt_mask"][:]
        annotated += int(has_gt.sum())
        for layer_set in ("1", "4+3+2+1"):
            stored = torch.from_numpy(group[mask_name("xrelevancecam", layer_set)][:] > 0)
            rows = df[(df.video_key == key) & (df.layer_set == layer_set)].sort_values("position")
            np.testing.assert_array_equal(rows["frame"], group["frame_index"][:])
            np.testing.assert_array_equal(rows["predicted_index"], group["predicted"][:])
            if has_gt.any():
                expected = iou(stored[torch.from_numpy(has_gt)], gt[torch.from_numpy(has_gt)]).numpy()
                np.testing.assert_allclose(rows["iou"].to_numpy()[has_gt], expected, rtol=1e-6)
    assert annotated > 0  # the synthetic meningioma video carries ground truth
    t1 = pd.read_parquet(results / "summary" / "table1_layer_miou.parquet")
    assert sorted(t1["method"]) == sorted(store.methods)


def test_a_damaged_video_is_reported_and_the_others_carry_on(results):
    from workflows.cli import main

    store = ResultStore.open(results)
    bad = store.video_keys()[1]
    chunk = results / "maps.zarr" / "videos" / bad / "gradcam_layer2" / "c" / "0" / "0" / "0"
    chunk.write_bytes(b"not a blosc chunk")
    out = CliRunner().invoke(main, ["reduce", str(results), "--layer-sets", "4,4+3+2", "--workers", "0"])
    assert out.exit_code == 1
    assert bad in out.output
    summary = json.loads((results / "reduce.json").read_text())
    assert [f["video_key"] for f in summary["failed_videos"]] == [bad]
    assert summary["videos"] == len(store.video_keys()) - 1
    keys = set(pd.read_parquet(results / METRICS_DIR)["video_key"])
    assert bad not in keys and len(keys) == len(store.video_keys()) - 1
