"""The read API (workflows.results) on a real run, and reduce / evaluate / scoring agreeing on one fixture."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import xrcam
from workflows import results as results_api
from workflows.driver import plan_shards
from workflows.reduce import ReduceSettings, reduce_results
from workflows.settings import RunSettings
from workflows.store import ResultStore
from workflows.worker import ShardWorker
from xrcam.archive import discover_archive
from xrcam.scoring import score_batch

CLASSES = ["glioblastoma", "meningioma"]
METHODS = ("gradcam", "xrelevancecam")
SETS = ("1", "4", "4+3", "4+3+2+1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 16-bit synthetic archive explained by the real worker (no Ray): random-init resnet18."""
    from xrcam.synth import SynthConfig, write_archive

    root = tmp_path_factory.mktemp("results")
    write_archive(
        root / "archive",
        SynthConfig(patients=1, videos=1, frames=8, size=(72, 72), seed=5, bit_depth=16),
        fmt="tiff-stack",
    )
    settings = RunSettings.resolve(
        None, archive=str(root / "archive"), out=str(root / "out"), model="resnet18", random_init=3,
        chunk_frames=2, shard_chunks=1,
    )  # fmt: skip
    settings = settings.replace(methods=METHODS, classes=tuple(CLASSES), batch_size=3)
    store = ResultStore.open(settings.out, settings.store_settings(None, CLASSES))
    worker = ShardWorker(settings.to_dict(), CLASSES, settings.out)
    entries = discover_archive(settings.archive).entries
    for entry in entries:
        layout = worker.describe(entry)["layout"]
        store.create_video(layout)
        for shard in plan_shards(entry, layout, settings.shard_frames):
            assert worker.process(shard)["error"] is None
            store.mark_done(shard.key, shard.start, shard.stop)
    store.write_summary({"videos": len(entries)})
    refs = ("random", "centre", "oracle", "intensity")
    reduce_results(settings.out, ReduceSettings(layer_sets=SETS, references=refs), workers=0)
    return {"settings": settings, "worker": worker, "entries": entries, "out": root / "out"}


def _explain(run, key):
    """The worker's model on the frames the read API returns: maps exactly as the run computed them."""
    res = results_api.open(run["out"])
    from xrcam.frames import read_batches

    layout = ResultStore.open(run["out"]).layout(key)
    batches = list(read_batches(layout.path, res._store.preprocess_config(), crop=layout.crop, masks=False))
    x = torch.cat([b.x for b in batches])
    return run["worker"].explainer(x), x


def test_open_lists_settings_classes_videos_and_the_tree(run):
    res = results_api.open(run["out"])
    assert res.classes == CLASSES and res.methods == list(METHODS)
    assert res.settings["model"] == "resnet18" and res.reduce_settings["layer_sets"] == list(SETS)
    assert res.video_keys == sorted(ResultStore.open(run["out"]).video_keys())
    assert sorted(res.tree.children) == res.video_keys
    key = res.video_keys[0]
    ds = res.video(key)
    assert ds["maps"].dims == ("layer", "cam", "frame", "map_y", "map_x")  # as the tree holds it
    assert ds["layer2"].dims == ("cam", "frame", "layer2_y", "layer2_x")  # and each layer at its own grid
    own = {f"{layer}_{axis}" for layer in res.layers for axis in "yx"}
    assert set(ds.coords) == set(res.tree[key].to_dataset().coords) | own  # the grid wherever it is stored
    assert ds["y"].values[0] == ds.sizes["y"] - 1 and ds["y"].attrs["source_row"] == ds.attrs["source_row"]
    entry = run["entries"][0]
    assert res.video(entry.video_id).attrs["video_id"] == entry.video_id  # a video id works as a key
    assert {"table1", "table2", "miou", "agreement", "accuracy_per_class"} <= set(res.table_names)
    assert res.failures().empty


def test_frames_are_exactly_the_crops_the_run_explained(run):
    res = results_api.open(run["out"])
    for key in res.video_keys:
        ds = res.video(key)
        exp, x = _explain(run, key)
        crops = res.frames(key)
        config = res._store.preprocess_config()
        np.testing.assert_allclose(crops, (x[:, 0] * config.std[0] + config.mean[0]).numpy(), atol=1e-6)
        assert crops.shape == (ds.sizes["frame"], ds.sizes["y"], ds.sizes["x"]) and crops.dtype == np.float32
        assert 0.0 <= crops.min() and crops.max() <= 1.0
        np.testing.assert_allclose(ds["logits"].values, exp.logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(res.frames(key, [2, 0]), crops[[2, 0]])  # any positions, in order


def test_reduce_evaluate_and_scoring_agree_on_one_fixture(run, tmp_path):
    """reduce's rows == the scoring core on the stored (float16) maps; evaluate's rows == the scoring core
    on the explainer's float32 maps; so reduce and evaluate differ only by float16 storage."""
    from workflows.evaluation import EvalOptions, evaluate

    res = results_api.open(run["out"])
    rows = res.metrics(is_reference=False)
    for key in res.video_keys:
        exp, _ = _explain(run, key)
        gt = torch.from_numpy(res.gt_masks(key))
        raw16 = {m: {layer: v.to(torch.float16) for layer, v in exp.maps[m].items()} for m in METHODS}
        core = score_batch(raw16, size=gt.shape[-1], layer_sets=SETS, gt=gt)
        has_gt = res.video(key)["has_gt_mask"].values
        for m, method in enumerate(METHODS):
            for k, layer_set in enumerate(SETS):
                mine = rows[(rows.video_key == key) & (rows.method == method) & (rows.layer_set == layer_set)]
                mine = mine.sort_values("position")
                assert mine["mask_area"].tolist() == core.mask_area[k, m].tolist()
                np.testing.assert_allclose(
                    mine["iou"].to_numpy()[has_gt], core.iou[k, m].numpy()[has_gt], atol=1e-6
                )

    settings = run["settings"]
    tables = evaluate(settings, EvalOptions(layer_sets=("4", "4+3", "4+3+2+1")), echo=lambda _m: None)
    ev = tables["iou"]
    ev = ev[ev["method"].isin(METHODS) & ev["dropout"].eq("off") & ev["layer_set"].isin(SETS)]
    merged = ev.merge(rows, on=["video_id", "frame", "method", "layer_set"], suffixes=("_eval", "_reduce"))
    assert len(merged) == len(ev) > 0
    assert (merged["correct_eval"] == merged["correct_reduce"]).all()
    # float16 storage moves a few mask pixels at most
    assert np.nanmean(np.abs(merged["iou_eval"] - merged["iou_reduce"])) < 0.02
    for (video_id, frame), group in ev.groupby(["video_id", "frame"]):
        entry = next(e for e in run["entries"] if e.video_id == video_id)
        key = res.video_key(video_id)
        position = frame // settings.frame_step
        exp, _ = _explain(run, key)
        gt = torch.from_numpy(res.gt_masks(key, [position]))
        raw = {m: {layer: v[position : position + 1] for layer, v in exp.maps[m].items()} for m in METHODS}
        core = score_batch(raw, size=gt.shape[-1], layer_sets=("4", "4+3", "4+3+2+1"), gt=gt)
        for m, method in enumerate(METHODS):
            for k, layer_set in enumerate(("4", "4+3", "4+3+2+1")):
                value = group[(group.method == method) & (group.layer_set == layer_set)]["iou"].item()
                assert value == pytest.approx(core.iou[k, m, 0].item(), abs=1e-6, nan_ok=True), entry.video_id


def test_maps_and_masks_are_the_scoring_core_on_the_stored_maps(run):
    res = results_api.open(run["out"])
    key = res.video_keys[-1]
    maps = res.maps(key, [0, 1], "4+3+2+1")
    masks = res.masks(key, [0, 1], "4+3+2+1")
    assert set(maps) == set(METHODS)
    for method in METHODS:
        assert maps[method].shape == (2, 72, 72) or maps[method].shape[0] == 2
        assert maps[method].min() >= 0 and maps[method].max() <= 1
        threshold = maps[method].reshape(2, -1)
        expected = maps[method] > (threshold.mean(1) + threshold.std(1))[:, None, None]
        assert (masks[method] == expected).mean() > 0.999
    both_maps, both_masks = res.maps_and_masks(key, [0, 1], "4+3+2+1")  # one scoring pass, same arrays
    for method in METHODS:
        np.testing.assert_array_equal(both_maps[method], maps[method])
        np.testing.assert_array_equal(both_masks[method], masks[method])
    fraction = res.masks(key, [0], "4", threshold="fraction:0.9")["gradcam"]
    assert fraction.sum() < res.masks(key, [0], "4")["gradcam"].sum() or fraction.sum() == 0
    with pytest.raises(KeyError):
        res.maps(key, [0], "4", methods=["layercam"])
    with pytest.raises(IndexError):
        res.frames(key, [999])


def test_metrics_filters_prune_and_tables_carry_reference_rows(run):
    res = results_api.open(run["out"])
    one = res.metrics(method="xrelevancecam", layer_set="4+3")
    assert set(one["method"]) == {"xrelevancecam"} and set(one["layer_set"]) == {"4+3"}
    both = res.metrics(columns=["method", "iou"], method=["gradcam", "oracle"])
    assert set(both["method"]) == {"gradcam", "oracle"} and list(both.columns) == ["method", "iou"]
    t2 = res.table("table2")
    assert {"random", "centre", "oracle", "intensity", "inverted_xrelevancecam"} <= set(t2["method"])
    assert t2[t2.method == "oracle"]["is_reference"].all()
    assert isinstance(res.table("agreement"), pd.DataFrame)
    rows = res.agreement(method="gradcam", layer_set="4")  # the per-frame agreement table, filtered
    assert len(rows) and set(rows["method"]) == {"gradcam"} and set(rows["against"]) == {"xrelevancecam"}
    assert rows["mask_iou"].between(0, 1).all() and set(rows["frame"]) <= set(res.metrics()["frame"])
    with pytest.raises(xrcam.XrcamConfigError, match="no table"):
        res.table("table9")
