"""Reduction: Parquet rows that reconcile with the store and the scoring core, tables, reruns, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from reduce_helpers import LAYERS, METHODS, build_store

from workflows import results as results_api
from workflows.reduce import ReduceSettings, parse_threshold, reduce_results, reduce_video
from workflows.store import ResultStore
from workflows.tables import AGREEMENT_DIR, METRICS_DIR
from xrcam.errors import XrcamConfigError
from xrcam.scoring import aggregate, iou, make_masks, normalize

SIZE = 32
NO_ARCHIVE = ("random", "centre", "oracle")  # these fixtures have no archive: no intensity reference


@pytest.fixture
def results(tmp_path):
    build_store(tmp_path / "results")
    return tmp_path / "results"


def _settings(**changes):
    return ReduceSettings(**{"references": NO_ARCHIVE, **changes})


def test_rows_reconcile_with_the_masks_the_read_api_derives(results):
    settings = _settings(layer_sets=("1", "4", "4+3", "4+3+2+1"), threshold="mean+std")
    summary = reduce_results(results, settings, workers=0)
    res = results_api.open(results)
    df = res.metrics(is_reference=False)
    frames = sum(res.video(k).sizes["frame"] for k in res.video_keys)
    assert len(df) == frames * len(METHODS) * 4
    assert summary["rows"] == len(res.metrics())
    assert not df.duplicated(["video_id", "frame", "method", "layer_set"]).any()

    key = res.video_keys[1]
    ds = res.video(key)
    gt = torch.from_numpy(ds["gt_mask"].values > 0)
    has_gt = ds["has_gt_mask"].values
    for layer_set in settings.layer_sets:
        masks = res.masks(key, None, layer_set)
        for method in METHODS:
            stored = torch.from_numpy(masks[method])
            rows = df[(df.video_key == key) & (df.method == method) & (df.layer_set == layer_set)]
            rows = rows.sort_values("position")
            assert rows["mask_area"].tolist() == stored.flatten(1).sum(1).tolist()
            expected = iou(stored, gt).numpy()
            np.testing.assert_allclose(rows["iou"].to_numpy()[has_gt], expected[has_gt], rtol=1e-6)
            assert rows["iou"].isna().to_numpy()[~has_gt].all()
            assert rows["frame"].tolist() == ds["frame"].values.tolist()
    # the read API's aggregate is the scoring core's aggregate of the stored per-stage maps
    raw = {layer: torch.from_numpy(ds[layer].sel(cam="xrelevancecam").values) for layer in LAYERS}
    normalised = {layer: normalize(m, SIZE, method="xrelevancecam") for layer, m in raw.items()}
    expected = aggregate(normalised, "4+3+2+1")
    derived = res.maps(key, None, "4+3+2+1", methods=["xrelevancecam"])["xrelevancecam"]
    np.testing.assert_array_equal(derived, expected.numpy())
    assert np.array_equal(res.masks(key, None, "4+3+2+1")["xrelevancecam"], make_masks(expected).numpy())


def test_reference_rows_are_marked_and_scored_on_the_annotated_frames(results):
    reduce_results(results, _settings(layer_sets=("4", "4+3+2+1")), workers=0)
    res = results_api.open(results)
    refs = res.metrics(is_reference=True)
    assert set(refs["method"]) == {*NO_ARCHIVE, "inverted_relevancecam", "inverted_xrelevancecam"}
    assert refs["has_gt_mask"].all()
    annotated = res.metrics(method="gradcam", layer_set="4", has_gt_mask=True)
    for name, rows in refs.groupby("method"):
        assert sorted(rows[rows.layer_set == "4"]["frame"]) == sorted(annotated["frame"]), name
    # the oracle localises the ground truth better than noise on the 4+3+2+1 set
    t2 = res.table("table2")
    by = t2.set_index(["method", "layer_set"])["miou_pct"]
    assert by["oracle", "4+3+2+1"] > by["random", "4+3+2+1"]
    assert t2[t2.method.isin(NO_ARCHIVE)]["is_reference"].all()
    assert not t2[t2.method.isin(METHODS)]["is_reference"].any()


def test_frame_columns_match_the_store(results):
    reduce_results(results, _settings(layer_sets=("4",)), workers=0)
    res = results_api.open(results)
    df = res.metrics(method="gradcam")
    for key in res.video_keys:
        ds = res.video(key)
        rows = df[df.video_key == key].sort_values("position")
        predicted = ds["predicted"].values
        np.testing.assert_array_equal(rows["predicted_index"], predicted)
        probs = ds["probabilities"].values
        np.testing.assert_allclose(rows["probability"], probs[np.arange(len(probs)), predicted], rtol=1e-6)
        assert (rows["correct"] == (predicted == ds.attrs["label_index"])).all()
        assert (rows["prediction"] == [["glioblastoma", "meningioma"][i] for i in predicted]).all()
        assert set(rows["patient"]) == {ds.attrs["patient"]}
        gt_area = (ds["gt_mask"].values > 0).sum(axis=(1, 2))
        np.testing.assert_array_equal(rows["gt_area"], gt_area)
        np.testing.assert_array_equal(rows["gt_empty"], ds["has_gt_mask"].values & (gt_area == 0))


def test_metrics_are_hive_partitioned_by_method_with_plain_string_columns(results):
    reduce_results(results, _settings(layer_sets=("4", "4+3")), workers=0)
    df = pd.read_parquet(results / METRICS_DIR, filters=[("method", "==", "xrelevancecam")])
    assert len(df) > 0 and set(df["method"].astype(str)) == {"xrelevancecam"}
    parts = sorted(p.parent.name for p in (results / METRICS_DIR).glob("*/part-0.parquet"))
    assert f"method={METHODS[0]}" in parts and "method=random" in parts
    plain = results_api.open(results).metrics(method="xrelevancecam")
    for column in ("method", "layer_set", "video_id", "patient", "label", "prediction"):
        assert pd.api.types.is_string_dtype(plain[column]) and not isinstance(
            plain[column].dtype, pd.CategoricalDtype
        )
    assert all(c == c.lower() and " " not in c for c in plain.columns)
    path = results / METRICS_DIR / "method=gradcam" / "part-0.parquet"
    meta = json.loads(pq.read_schema(path).metadata[b"xrcam"])
    assert meta["run_settings"]["model"] == "resnet18"
    assert meta["reduce_settings"]["layer_sets"] == ["4", "4+3"]
    assert meta["reduce_settings"]["threshold"] == "mean+std"
    assert pq.ParquetFile(path).metadata.num_row_groups == len(results_api.open(results).video_keys)


def test_summary_tables_carry_cis_counts_and_follow_the_paper(results):
    reduce_results(results, _settings(), workers=0)
    res = results_api.open(results)
    df = res.metrics(is_reference=False)
    t1, t2 = res.table("table1"), res.table("table2")
    assert list(dict.fromkeys(t1["layer_set"])) == ["1", "2", "3", "4"]
    assert list(dict.fromkeys(t2["layer_set"])) == ["4", "4+3", "4+3+2", "4+3+2+1"]
    assert list(dict.fromkeys(t1[~t1.is_reference]["method"])) == list(METHODS)
    for column in ("miou_pct", "ci_lo_pct", "ci_hi_pct", "n_frames", "n_patients", "gt_coverage_pct"):
        assert column in t2
    kept = df[df.has_gt_mask & df.correct & ~df.gt_empty]
    mine = kept[(kept.method == "xrelevancecam") & (kept.layer_set == "4+3")]
    row = t2[(t2.method == "xrelevancecam") & (t2.layer_set == "4+3")].iloc[0]
    assert row["miou_pct"] == pytest.approx(mine["iou"].mean() * 100, rel=1e-5)
    assert row["ci_lo_pct"] <= row["miou_pct"] <= row["ci_hi_pct"]
    assert row["n_frames"] == len(mine) and row["n_patients"] == mine["patient"].nunique()
    assert row["gt_coverage_pct"] == pytest.approx(mine["gt_fraction"].mean() * 100, rel=1e-5)
    acc = res.table("accuracy_per_class")
    frame_rows = df[(df.method == "gradcam") & (df.layer_set == "1")]
    assert acc["n_frames"].sum() == len(frame_rows)
    for _, r in acc.iterrows():
        assert r["accuracy_pct"] == pytest.approx(
            100 * frame_rows[frame_rows.label == r["label"]]["correct"].mean()
        )
    assert sorted(res.table("accuracy_per_patient")["patient"]) == ["p0", "p1", "p2"]
    assert "table4" not in res.table_names


def test_agreement_table_compares_every_method_with_xrelevancecam(results):
    reduce_results(results, _settings(layer_sets=("4", "4+3+2+1")), workers=0)
    res = results_api.open(results)
    agreement = pd.read_parquet(results / AGREEMENT_DIR)
    frames = sum(res.video(k).sizes["frame"] for k in res.video_keys)
    assert len(agreement) == frames * (len(METHODS) - 1) * 2
    assert set(agreement["against"]) == {"xrelevancecam"} and "xrelevancecam" not in set(agreement["method"])
    key = res.video_keys[0]
    masks = res.masks(key, None, "4+3+2+1")
    row = agreement[
        (agreement.video_key == key) & (agreement.method == "gradcam") & (agreement.layer_set == "4+3+2+1")
    ]
    row = row.sort_values("position")
    expected = iou(torch.from_numpy(masks["gradcam"]), torch.from_numpy(masks["xrelevancecam"])).numpy()
    np.testing.assert_allclose(row["mask_iou"], expected, rtol=1e-6)
    assert row["rank_corr"].between(-1, 1).all()
    summary = res.table("agreement")
    assert set(summary["method"]) == set(METHODS) - {"xrelevancecam"}


def test_axiom_table_and_columns_when_evaluate_wrote_axioms(results):
    res = results_api.open(results)
    ds = res.video(res.video_keys[0])
    video_id, frames = ds.attrs["video_id"], ds["frame"].values[:2].tolist()
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
    reduce_results(results, _settings(layer_sets=("3", "4", "4+3")), workers=0)
    t4 = res.table("table4")
    assert list(t4.columns)[:7] == ["method", "axiom", "layer_1", "layer_2", "layer_3", "layer_4", "average"]
    row = t4[(t4.method == "relevancecam") & (t4.axiom == "sensitivity")].iloc[0]
    assert row["layer_3"] == pytest.approx(0.4) and row["average"] == pytest.approx(0.4)
    df = res.metrics(is_reference=False)
    filled = df[df.conservation.notna()]
    assert len(filled) == len(METHODS) * 2 * len(frames)  # layer sets "3" and "4"
    assert set(filled.layer_set) == {"3", "4"} and set(filled.frame) == set(frames)
    x = filled[filled.method == "xrelevancecam"]
    np.testing.assert_allclose(x["conservation"], 0.3, rtol=1e-6)
    np.testing.assert_allclose(x["sensitivity"], 0.6, rtol=1e-6)


def test_rerun_is_idempotent_replaces_outputs_and_never_touches_the_maps(results):
    maps_before = {p: p.read_bytes() for p in (results / "maps.zarr").rglob("*") if p.is_file()}
    settings = _settings(layer_sets=("4", "4+3"))
    reduce_results(results, settings, workers=0)
    first = results_api.open(results).metrics()
    reduce_results(results, settings, workers=0)
    pd.testing.assert_frame_equal(first, results_api.open(results).metrics())
    reduce_results(results, _settings(layer_sets=("4", "4+3"), threshold="fraction:0.9"), workers=0)
    third = results_api.open(results).metrics()
    assert len(third) == len(first)
    assert third["mask_area"].sum() < first["mask_area"].sum()
    reduce_results(results, _settings(layer_sets=("4",)), workers=0)
    assert set(results_api.open(results).metrics()["layer_set"]) == {"4"}
    assert not list(results.glob(".*tmp")) and not list(results.glob(".*old"))
    assert {p: p.read_bytes() for p in (results / "maps.zarr").rglob("*") if p.is_file()} == maps_before


def test_chunked_processing_gives_the_same_rows(results):
    key = ResultStore.open(results).video_keys()[0]
    whole = reduce_video(results, key, _settings(layer_sets=("4", "4+3+2+1"), chunk_frames=100))
    chunked = reduce_video(results, key, _settings(layer_sets=("4", "4+3+2+1"), chunk_frames=3))
    for name, table in whole["metrics"].items():
        pd.testing.assert_frame_equal(table.to_pandas(), chunked["metrics"][name].to_pandas())
    pd.testing.assert_frame_equal(whole["agreement"].to_pandas(), chunked["agreement"].to_pandas())


def test_incomplete_videos_are_left_out(results):
    store = ResultStore.open(results)
    key = store.video_keys()[0]
    store.video(key).attrs.update({"complete": False})
    summary = reduce_results(results, _settings(layer_sets=("4",)), workers=0)
    assert summary["incomplete_videos"] == [key]
    assert key not in set(results_api.open(results).metrics()["video_key"])


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
        reduce_video(results, key, _settings(layer_sets=("5",)))
    with pytest.raises(XrcamConfigError, match="layer5"):
        reduce_results(results, _settings(layer_sets=("4", "5")), workers=0)


def test_settings_are_recorded_in_canonical_form_and_defaults_match_the_library():
    from xrcam.references import REFERENCES

    settings = ReduceSettings(layer_sets=("layer4+layer3", "4"), threshold="FRACTION:0.25")
    assert settings.layer_sets == ("4+3", "4") and settings.threshold == "fraction:0.25"
    assert ReduceSettings(threshold="meanstd").threshold == "mean+std"
    assert ReduceSettings().references == tuple(REFERENCES)
    with pytest.raises(XrcamConfigError, match="unknown reference"):
        ReduceSettings(references=("median",))


def test_cli_reduce_in_process(results):
    from workflows.cli import main

    out = CliRunner().invoke(
        main,
        ["reduce", str(results), "--layer-sets", "4,4+3", "--workers", "0", "--references", "random,oracle"],
    )
    assert out.exit_code == 0, out.output
    assert "layer_4+3" in out.output and "random" in out.output
    assert (results / "summary" / "table2_layerset_miou.parquet").exists()
    bad = CliRunner().invoke(main, ["reduce", str(results / "nowhere")])
    assert bad.exit_code == 1 and "xrcam run" in bad.output


def test_cli_sign_check_and_agreement_can_be_chosen(results):
    from workflows.cli import main

    args = ["reduce", str(results), "--layer-sets", "4", "--references", ""]
    out = CliRunner().invoke(main, [*args, "--inverted", "", "--no-agreement"])
    assert out.exit_code == 0, out.output
    assert not (results / AGREEMENT_DIR).exists() or pd.read_parquet(results / AGREEMENT_DIR).empty
    assert not any(m.startswith("inverted_") for m in set(results_api.open(results).metrics()["method"]))
    out = CliRunner().invoke(main, [*args, "--inverted", "gradcam"])
    assert out.exit_code == 0, out.output
    methods = set(results_api.open(results).metrics()["method"])
    assert "inverted_gradcam" in methods and "inverted_xrelevancecam" not in methods
    assert len(pd.read_parquet(results / AGREEMENT_DIR))  # on by default
    out = CliRunner().invoke(main, [*args, "--inverted", "nosuchmethod"])
    assert out.exit_code != 0 and "nosuchmethod" in out.output and "Traceback" not in out.output


def test_cli_says_nothing_to_reduce_before_any_progress(tmp_path):
    from workflows.cli import main

    store = build_store(tmp_path / "r", videos=1)
    store.video(store.video_keys()[0]).attrs.update({"complete": False})
    out = CliRunner().invoke(main, ["reduce", str(tmp_path / "r"), "--workers", "0"])
    assert out.output.startswith("Nothing to reduce") and "xrcam reduce:" not in out.output
    assert out.exit_code == 1


def test_a_damaged_video_is_reported_and_the_others_carry_on(results):
    from workflows.cli import main

    store = ResultStore.open(results)
    bad = store.video_keys()[1]
    shard = results / "maps.zarr" / bad / "maps" / "c" / "0" / "0" / "0" / "0" / "0"
    assert shard.is_file()
    shard.write_bytes(b"not a shard")
    out = CliRunner().invoke(
        main, ["reduce", str(results), "--layer-sets", "4,4+3+2", "--workers", "0", "--references", ""]
    )
    assert out.exit_code == 1
    assert bad in out.output
    summary = json.loads((results / "reduce.json").read_text())
    assert [f["video_key"] for f in summary["failed_videos"]] == [bad]
    assert summary["videos"] == len(store.video_keys()) - 1
    keys = set(results_api.open(results).metrics()["video_key"])
    assert bad not in keys and len(keys) == len(store.video_keys()) - 1


def test_reduce_in_threads_matches_serial_and_starts_no_ray(results, monkeypatch):
    import workflows.reduce as reduce_module

    def no_ray(*args, **kwargs):
        raise AssertionError("a reduction without an address must not use Ray")

    monkeypatch.setattr(reduce_module, "_on_ray", no_ray)
    monkeypatch.delenv("XRCAM_ADDRESS", raising=False)
    settings = _settings(layer_sets=("4", "4+3+2+1"))
    reduce_results(results, settings, workers=0)
    serial = results_api.open(results).metrics()
    serial_agreement = results_api.open(results).agreement()
    reduce_results(results, settings, workers=2)  # no address: two threads of this process
    pd.testing.assert_frame_equal(serial, results_api.open(results).metrics())
    pd.testing.assert_frame_equal(serial_agreement, results_api.open(results).agreement())


@pytest.mark.ray
@pytest.mark.slow
def test_reduce_on_ray_matches_serial(results, ray_local):
    settings = _settings(layer_sets=("4", "4+3+2+1"))
    reduce_results(results, settings, workers=0)
    serial = results_api.open(results).metrics()
    reduce_results(results, settings, address="auto", workers=2)  # the session's Ray, as on a cluster
    pd.testing.assert_frame_equal(serial, results_api.open(results).metrics())


def test_library_refuses_a_store_without_complete_videos(tmp_path):
    from xrcam.errors import XrcamConfigError

    store = build_store(tmp_path / "r", videos=1)
    store.video(store.video_keys()[0]).attrs.update({"complete": False})
    with pytest.raises(XrcamConfigError, match="no complete video"):
        reduce_results(tmp_path / "r", _settings(), workers=0)
    assert not (tmp_path / "r" / "metrics").exists()  # nothing written from nothing
