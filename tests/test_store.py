"""The results store: xarray-native layout, sharding, video keys, format check, resume checks, failures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from workflows.settings import RunSettings, load_toml
from workflows.store import ResultStore, VideoLayout, video_id_of_key, video_key
from xrcam.errors import XrcamConfigError

SETTINGS = {
    "archive": "/data/archive",
    "model": "resnet18",
    "classes": ["glioblastoma", "meningioma"],
    "methods": ["gradcam", "xrelevancecam"],
    "layers": ["layer1", "layer4"],
    "rules": "reference",
    "clrp": "unit",
    "preprocessing": {"frame_step": 2, "crop": None},
    "chunk_frames": 4,
}
LAYOUT = VideoLayout(
    video_id="meningioma/p1/video 1.mkt",
    path="/data/archive/meningioma/p1/video 1.mkt",
    patient="p1",
    label="meningioma",
    label_index=1,
    crop=(5, 6, 24),
    frame_step=2,
    num_source_frames=19,
    num_classes=2,
    map_shapes={"layer1": (6, 6), "layer4": (1, 1)},
    input_size=24,
)


def _write_all(store, layout=LAYOUT, seed=0):
    """Write every shard of ``layout`` as workers do; returns the maps written."""
    rng = np.random.default_rng(seed)
    n, shard = layout.num_frames, store.shard_frames(layout)
    maps = {
        layer: rng.normal(size=(len(store.methods), n, *shape)).astype(np.float16)
        for layer, shape in layout.map_shapes.items()
    }
    gt = rng.random((n, layout.size, layout.size)) > 0.7
    logits = rng.normal(size=(n, 2)).astype(np.float32)
    for start in range(0, n, shard):
        stop = min(start + shard, n)
        store.write_shard(
            layout.key,
            start,
            logits=logits[start:stop],
            gt_mask=gt[start:stop],
            has_gt_mask=np.arange(start, stop) % 2 == 0,
            maps={layer: m[:, start:stop] for layer, m in maps.items()},
        )
        store.mark_done(layout.key, start, stop)
    return maps, gt, logits


def test_xarray_opens_every_video_in_one_call_without_warnings(tmp_path):
    import warnings

    import matplotlib
    import xarray as xr

    matplotlib.use("Agg")
    store = ResultStore.open(tmp_path, SETTINGS)
    store.create_video(LAYOUT)
    maps, gt, logits = _write_all(store)
    other = replace(LAYOUT, video_id="glioblastoma/p2/v.mkt", label="glioblastoma", label_index=0)
    store.create_video(other)
    _write_all(store, other, seed=1)
    store.write_summary({"videos": 2})  # the end of a run consolidates the metadata
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = xr.open_datatree(tmp_path / "maps.zarr", engine="zarr")
        ds = tree[LAYOUT.key].to_dataset()
    assert sorted(tree.children) == sorted([LAYOUT.key, other.key])
    assert ds["layer1"].dims == ("cam", "frame", "layer1_y", "layer1_x")
    assert list(ds["cam"].values) == SETTINGS["methods"] and list(ds["class"].values) == SETTINGS["classes"]
    assert ds["frame"].values.tolist() == list(range(0, 19, 2))  # original frame indices
    np.testing.assert_array_equal(ds["layer1"].sel(cam="xrelevancecam").values, maps["layer1"][1])
    np.testing.assert_array_equal(ds["gt_mask"].values > 0, gt)
    np.testing.assert_array_equal(ds["logits"].values, logits)
    # y counts up from the bottom row, so imshow puts row 0 (the top of the crop) at the top
    assert ds["y"].values[0] == LAYOUT.size - 1 and ds["x"].values[0] == 0
    ax = ds["gt_mask"].isel(frame=0).plot.imshow()
    top = ax.axes.get_ylim()[1]
    assert top == pytest.approx(LAYOUT.size - 0.5)
    assert "source_row" in ds["y"].attrs and "5 +" in ds["x"].attrs["source_column"]
    assert ds["layer4_y"].values.tolist() == [11.5]  # one cell over 24 px: its centre


def test_shards_follow_the_work_shards_and_files_stay_few(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    layout = replace(LAYOUT, num_source_frames=80, shard_frames=8)  # 40 kept frames, 5 work shards
    store.create_video(layout)
    _write_all(store, layout)
    shard_files = sorted((tmp_path / "maps.zarr" / layout.key / "layer1" / "c").rglob("*"))
    shard_files = [p for p in shard_files if p.is_file()]
    assert len(shard_files) == 5  # one file per work shard, whatever the chunk count inside
    with pytest.raises(XrcamConfigError, match="work shard"):
        store.write_shard(
            layout.key,
            4,
            logits=np.zeros((4, 2), np.float32),
            gt_mask=np.zeros((4, 24, 24)),
            has_gt_mask=np.zeros(4, bool),
            maps={},
        )
    files = [p for p in (tmp_path / "maps.zarr").rglob("*") if p.is_file()]
    per_shard_arrays = 3 + len(layout.map_shapes)  # logits, gt_mask, has_gt_mask, one per stage
    assert len(files) <= 40 + 5 * per_shard_arrays  # a fixed overhead per video, then per shard


def test_video_keys_are_injective_and_invertible():
    ids = ["a/b__c.mkt", "a__b/c.mkt", "a/b_/c", "a/b/_c", "a_/b", "x%2Fy/z", "x//y", "__z/y", "a/b/c.mkt"]
    keys = [video_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert [video_id_of_key(k) for k in keys] == ids
    assert video_key("meningioma/P01/V01.mkt") == "meningioma__P01__V01.mkt"
    assert video_key("a/b_c/d.mkt") == "a__b_c__d.mkt"  # a lone underscore stays readable
    assert all(not k.startswith("__") for k in keys)


def test_a_store_of_the_old_format_is_refused_with_how_to_redo_it(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "maps.zarr", mode="w", attributes={"settings": SETTINGS}).require_group(
        "videos"
    )
    for opener in (lambda: ResultStore.open(tmp_path), lambda: ResultStore.open(tmp_path, SETTINGS)):
        with pytest.raises(XrcamConfigError, match="format 1.*--overwrite"):
            opener()


def test_reopening_with_other_settings_names_the_difference(tmp_path):
    ResultStore.open(tmp_path, SETTINGS).create_video(LAYOUT)
    assert ResultStore.open(tmp_path, dict(SETTINGS)).layout(LAYOUT.key) == LAYOUT  # same settings: resumes
    changed = {**SETTINGS, "model": "resnet50", "preprocessing": {"frame_step": 1, "crop": None}}
    with pytest.raises(XrcamConfigError) as info:
        ResultStore.open(tmp_path, changed)
    message = str(info.value)
    assert "model: store has 'resnet18', this run asks for 'resnet50'" in message
    assert "preprocessing.frame_step: store has 2, this run asks for 1" in message
    assert "--overwrite" in message
    store = ResultStore.open(tmp_path, changed, overwrite=True)
    assert store.video_keys() == []
    assert store.settings["model"] == "resnet50"


def test_completion_markers_cover_the_video(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    store.create_video(LAYOUT)
    assert store.shards_done(LAYOUT.key) == set()
    assert store.mark_done(LAYOUT.key, 8, 10) is False
    assert store.mark_done(LAYOUT.key, 0, 8) is True
    reopened = ResultStore.open(tmp_path)
    assert reopened.shards_done(LAYOUT.key) == {(0, 8), (8, 10)}
    assert reopened.video(LAYOUT.key).attrs["complete"] is True


def test_failures_table_reads_with_pandas_even_when_empty(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    assert pd.read_parquet(store.write_failures([])).columns.tolist() == [
        "path",
        "video_id",
        "shard",
        "frame",
        "error_type",
        "message",
    ]
    row = {
        "path": "/a/b.mkt",
        "video_id": "b.mkt",
        "shard": 2,
        "error_type": "XrcamInputError",
        "message": "x",
    }
    frame_row = {**row, "shard": 0, "frame": 14, "message": "bad mask"}
    table = pd.read_parquet(store.write_failures([row, frame_row]))
    assert table.loc[0, "shard"] == 2 and pd.isna(table.loc[0, "frame"])
    assert table.loc[1, "frame"] == 14 and table.loc[1, "message"] == "bad mask"


def test_settings_merge_toml_then_options(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'archive = "arch"\nout = "res"\nmodel = "resnet34"\nbatch-size = 4\nmethods = ["gradcam"]\ncrop = "1,2,30"\n'
    )
    settings = RunSettings.resolve(config, model="resnet18", batch_size=None, layers="layer3,layer4")
    assert settings.archive == str((tmp_path / "arch").resolve())
    assert settings.model == "resnet18"  # the option wins over the file
    assert settings.batch_size == 4  # not given on the command line: the file's value stays
    assert settings.methods == ("gradcam",)
    assert settings.layers == ("layer3", "layer4")
    assert settings.crop == (1, 2, 30)
    (tmp_path / "bad.toml").write_text("archive = 'a'\nbatchsize = 3\n")
    with pytest.raises(XrcamConfigError, match="unknown setting.*batchsize"):
        load_toml(tmp_path / "bad.toml")
    with pytest.raises(XrcamConfigError, match="x,y,size"):
        RunSettings.resolve(None, archive="a", out="o", crop="1,2")


def test_a_half_created_video_group_counts_as_missing(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    group = store.create_video(LAYOUT)
    group.attrs["created"] = False  # as if the driver died while creating the arrays
    assert ResultStore.open(tmp_path).layout(LAYOUT.key) is None
    store.create_video(LAYOUT)
    assert ResultStore.open(tmp_path).layout(LAYOUT.key) == LAYOUT
