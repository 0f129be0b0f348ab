"""The results store: xarray-native layout, sharding, video keys, format check, resume checks, failures."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from workflows.settings import RunSettings, load_toml
from workflows.store import ResultStore, VideoLayout, layer_cells, stored_format, video_id_of_key, video_key
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
    assert ds["maps"].dims == ("layer", "cam", "frame", "map_y", "map_x")
    assert list(ds["cam"].values) == SETTINGS["methods"] and list(ds["class"].values) == SETTINGS["classes"]
    assert list(ds["layer"].values) == SETTINGS["layers"]
    assert ds["frame"].values.tolist() == list(range(0, 19, 2))  # original frame indices
    finest = ds["maps"].sel(layer="layer1", cam="xrelevancecam").values
    np.testing.assert_array_equal(finest, maps["layer1"][1])
    coarse = ds["maps"].sel(layer="layer4", cam="xrelevancecam").values  # one cell: spread over the grid
    np.testing.assert_array_equal(coarse, np.broadcast_to(maps["layer4"][1], coarse.shape))
    np.testing.assert_array_equal(ds["gt_mask"].values > 0, gt)
    np.testing.assert_array_equal(ds["logits"].values, logits)
    # y counts up from the bottom row, so imshow puts row 0 (the top of the crop) at the top
    assert ds["y"].values[0] == LAYOUT.size - 1 and ds["x"].values[0] == 0
    ax = ds["gt_mask"].isel(frame=0).plot.imshow()
    top = ax.axes.get_ylim()[1]
    assert top == pytest.approx(LAYOUT.size - 0.5)
    # the crop-to-source formulas are the video's (its crop offset); res.video puts them on y/x too
    assert ds.attrs["source_row"].startswith("6 +") and ds.attrs["source_column"].startswith("5 +")
    direct = store.open_dataset(LAYOUT.key)
    assert direct["x"].attrs["source_column"] == ds.attrs["source_column"]
    # the read API's view adds each layer at its own resolution, picked out of `maps` exactly
    assert direct["layer4"].dims == ("cam", "frame", "layer4_y", "layer4_x")
    np.testing.assert_array_equal(direct["layer4"].values, maps["layer4"])
    np.testing.assert_array_equal(direct["layer1"].values, maps["layer1"])
    assert direct["layer4_y"].values.tolist() == [11.5]  # one cell over 24 px: its centre
    assert ds["map_y"].values[0] == 21.5 and ds["map_x"].values.tolist()[:2] == [1.5, 5.5]  # 6 cells


FOUR_STAGES = replace(
    LAYOUT, map_shapes={"layer1": (6, 6), "layer2": (3, 3), "layer3": (2, 2), "layer4": (1, 1)}
)
FOUR_STAGE_SETTINGS = {**SETTINGS, "layers": list(FOUR_STAGES.map_shapes)}


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_one_shard_video_is_11_files_and_the_root_holds_the_grid_once(tmp_path):
    store = ResultStore.open(tmp_path, FOUR_STAGE_SETTINGS)
    layouts = [
        replace(FOUR_STAGES, shard_frames=12),  # 10 kept frames: one work shard
        replace(FOUR_STAGES, video_id="glioblastoma/p2/v.mkt", crop=(0, 1, 24), shard_frames=12),
    ]
    for layout in layouts:
        store.create_video(layout)
        _write_all(store, layout)
    store.write_summary({"videos": 2})
    maps = tmp_path / "maps.zarr"
    arrays = ["frame", "logits", "gt_mask", "has_gt_mask", "maps"]
    for layout in layouts:
        files = _files(maps / layout.key)
        assert len(files) == 11, files  # 17 with an array per layer, 37 with the grid in every video
        assert sorted({f.split("/")[0] for f in files}) == sorted(["zarr.json", *arrays])
        assert all(len([f for f in files if f.startswith(f"{a}/")]) == 2 for a in arrays)  # metadata + 1 file
    grid = ["y", "x", "map_y", "map_x"]
    root_arrays = {p.name for p in maps.iterdir() if p.is_dir()} - {layout.key for layout in layouts}
    assert root_arrays == {"cam", "class", "layer", *grid}  # the names and the grid, once
    assert all(_files(maps / name) == ["c/0", "zarr.json"] for name in grid)
    ds = store.open_dataset(layouts[1].key)
    assert ds["y"].values[0] == 23 and ds["layer2_x"].values.tolist() == [3.5, 11.5, 19.5]
    assert ds.attrs["source_row"].startswith("1 +") and ds["y"].attrs["source_row"] == ds.attrs["source_row"]


def test_every_layer_reads_back_bit_for_bit_from_the_finest_layers_grid(tmp_path):
    """ResNet's layers at 230 px (58, 29, 15, 8 cells) do not nest by integer factors: each stored cell
    holds the layer's cell whose area holds the stored cell's centre, and every raw map reads back."""
    shapes = {"layer1": (58, 57), "layer2": (29, 29), "layer3": (15, 14), "layer4": (8, 8)}
    layout = replace(LAYOUT, crop=(0, 0, 230), input_size=None, map_shapes=shapes, num_source_frames=12)
    store = ResultStore.open(tmp_path, {**SETTINGS, "layers": list(shapes)})
    store.create_video(layout)
    maps, _, _ = _write_all(store, layout)
    stacks = store.read_stacks(layout.key, slice(None))
    for layer in shapes:
        np.testing.assert_array_equal(stacks[layer], maps[layer])
    subset = store.read_stacks(layout.key, [4, 1], methods=["xrelevancecam"], layers=["layer3"])
    np.testing.assert_array_equal(subset["layer3"], maps["layer3"][1:, [4, 1]])
    stored = store.open_dataset(layout.key)["maps"]
    for layer, (h, w) in shapes.items():  # nearest by centre, in floating point here
        rows = np.floor((np.arange(58) + 0.5) * h / 58).astype(int)
        columns = np.floor((np.arange(57) + 0.5) * w / 57).astype(int)
        np.testing.assert_array_equal(
            stored.sel(layer=layer).values, maps[layer][:, :, rows[:, None], columns]
        )


def test_every_cell_of_a_coarser_layer_keeps_a_stored_cell():
    for fine in range(1, 80):
        for cells in range(1, fine + 1):
            spread, picks = layer_cells(cells, fine)
            assert spread[0] == 0 and spread[-1] == cells - 1 and set(np.diff(spread)) <= {0, 1}
            assert spread[picks].tolist() == list(range(cells))


def test_a_run_of_two_grids_demotes_the_root_grid_and_opens_without_warnings(tmp_path):
    import warnings

    import xarray as xr

    store = ResultStore.open(tmp_path, SETTINGS)
    small = LAYOUT
    other = replace(
        LAYOUT,
        video_id="glioblastoma/p2/v.mkt",
        crop=(1, 2, 32),
        input_size=None,
        label_index=0,
        map_shapes={"layer1": (8, 8), "layer4": (1, 1)},
    )
    third = replace(LAYOUT, video_id="meningioma/p3/v.mkt")
    store.create_video(small)
    _write_all(store, small)  # complete: its group's metadata is consolidated before the demotion
    store.write_summary({"videos": 1})  # and the root's
    assert "y" in store.group.array_keys()
    store.create_video(other)  # another grid: the root's moves into the first video
    assert set(store.group.array_keys()) == {"cam", "class", "layer"}
    _write_all(store, other, seed=1)
    resumed = ResultStore.open(tmp_path, SETTINGS)  # a resumed run finds no grid in the root
    resumed.create_video(third)  # the first video's grid again: it holds its own too
    _write_all(resumed, third, seed=2)
    for layout in (small, other, third):
        assert "y" in ResultStore.open(tmp_path).video(layout.key).array_keys()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stale = xr.open_datatree(tmp_path / "maps.zarr", engine="zarr")  # consolidated before `third`
        tree = store.open_datatree()  # re-consolidates: every video
    assert sorted(stale.children) == sorted([small.key, other.key])
    assert sorted(tree.children) == sorted([small.key, other.key, third.key])
    for layout in (small, other, third):
        ds = tree[layout.key].to_dataset()
        assert ds.sizes["y"] == ds.sizes["x"] == layout.size
        assert ds["y"].values[0] == layout.size - 1  # decreasing: imshow the right way up
        cells = layout.map_shapes["layer1"][0]  # the finest layer's cells over the crop, counted up
        centres = (np.arange(cells) + 0.5) * layout.size / cells - 0.5
        np.testing.assert_allclose(ds["map_y"].values, layout.size - 1 - centres, rtol=1e-6)
        assert (
            ds["y"].attrs["source_row"]
            == ds.attrs["source_row"]
            == store.open_dataset(layout.key).attrs["source_row"]
        )
        direct = store.open_dataset(layout.key).coords.to_dataset()
        xr.testing.assert_equal(ds.coords.to_dataset(), direct[list(ds.coords)])
    assert store.open_dataset(other.key).sizes["layer1_y"] == 8 == tree[other.key].to_dataset().sizes["map_y"]
    assert stale[small.key].to_dataset()["y"].values[0] == 23  # what the stale view lists still reads
    # the demotion re-consolidated the complete video's own metadata, so opening it alone finds its y
    assert xr.open_zarr(tmp_path / "maps.zarr", group=small.key)["y"].values[0] == 23


def test_the_tree_view_of_a_video_has_the_coordinates_of_open_dataset(tmp_path):
    import xarray as xr

    store = ResultStore.open(tmp_path, FOUR_STAGE_SETTINGS)
    store.create_video(FOUR_STAGES)
    _write_all(store, FOUR_STAGES)
    tree = store.open_datatree()
    ds, direct = tree[FOUR_STAGES.key].to_dataset(), store.open_dataset(FOUR_STAGES.key)
    own = {f"layer{n}_{axis}" for n in range(1, 5) for axis in "yx"}  # of the derived per-layer maps
    assert set(direct.coords) == set(ds.coords) | own
    assert set(direct.data_vars) - set(ds.data_vars) == {
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "predicted",
        "probabilities",
    }
    for name in ds.coords:
        xr.testing.assert_equal(ds[name], direct[name])
        assert ds[name].dims == direct[name].dims
    assert direct["y"].attrs["long_name"] == ds["y"].attrs["long_name"]
    for name, var in direct.data_vars.items():
        if name in ds:
            assert var.dims == ds[name].dims


def test_root_coordinates_left_incomplete_by_a_crash_are_repaired_by_the_next_video(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    bigger = replace(LAYOUT, crop=(0, 0, 32), input_size=None)
    store.create_video(bigger)
    # as if the driver died writing the first video's root coordinates (another grid, part of them)
    del store.group["map_x"], store.group[bigger.key]
    store.create_video(LAYOUT)  # the first video (again): the root takes its grid, whole
    assert set(store.group.array_keys()) == {"cam", "class", "layer", "y", "x", "map_y", "map_x"}
    other = replace(LAYOUT, video_id="glioblastoma/p2/v.mkt")
    store.create_video(other)
    assert "y" not in store.video(other.key).array_keys()  # same grid: inherited
    del store.group["map_x"]  # a demotion cut short: part of the root grid gone, no video has its own
    third = replace(LAYOUT, video_id="glioblastoma/p3/v.mkt")
    store.create_video(third)  # the root grid is incomplete: demoted again, whole
    assert set(store.group.array_keys()) == {"cam", "class", "layer"}
    tree = store.open_datatree()
    for layout in (LAYOUT, other, third):
        assert tree[layout.key].to_dataset()["map_x"].values.tolist() == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5]


def test_creating_and_opening_a_video_never_lists_the_root(tmp_path, monkeypatch):
    """Listing the root reads every video group's metadata: per video, that would be quadratic."""
    from zarr.core.group import AsyncGroup

    members, listed = AsyncGroup.members, []

    def members_noting_the_root(group, *args, **kwargs):
        if group.path == "":
            listed.append(group.store_path)
        return members(group, *args, **kwargs)

    monkeypatch.setattr(AsyncGroup, "members", members_noting_the_root)
    store = ResultStore.open(tmp_path, SETTINGS)
    store.create_video(LAYOUT)  # the first video lists the (empty) root
    other = replace(LAYOUT, video_id="glioblastoma/p2/v.mkt", crop=(0, 0, 32), input_size=None)
    store.create_video(other)  # another grid: the demotion lists it
    shared = ResultStore.open(tmp_path / "shared", SETTINGS)
    shared.create_video(LAYOUT)
    listed.clear()
    for n in range(3, 5):  # from here on: videos that hold their own grid, or inherit the root's
        store.create_video(replace(LAYOUT, video_id=f"meningioma/p{n}/v.mkt"))
        shared.create_video(replace(LAYOUT, video_id=f"meningioma/p{n}/v.mkt"))
    assert store.open_dataset(other.key).sizes["y"] == 32
    assert shared.open_dataset(LAYOUT.key)["y"].values[0] == 23
    assert listed == []


def test_shards_follow_the_work_shards_and_files_stay_few(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    layout = replace(LAYOUT, num_source_frames=80, shard_frames=8)  # 40 kept frames, 5 work shards
    store.create_video(layout)
    _write_all(store, layout)
    shard_files = sorted((tmp_path / "maps.zarr" / layout.key / "maps" / "c").rglob("*"))
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
    with pytest.raises(XrcamConfigError, match="work shard"):  # two shards' frames, ending the video
        store.write_shard(
            layout.key,
            24,
            logits=np.zeros((16, 2), np.float32),
            gt_mask=np.zeros((16, 24, 24)),
            has_gt_mask=np.zeros(16, bool),
            maps={},
        )
    files = [p for p in (tmp_path / "maps.zarr").rglob("*") if p.is_file()]
    per_shard_arrays = 4  # logits, gt_mask, has_gt_mask, maps
    assert len(files) <= 40 + 5 * per_shard_arrays  # a fixed overhead per video, then per shard


def test_video_keys_are_injective_and_invertible():
    ids = ["a/b__c.mkt", "a__b/c.mkt", "a/b_/c", "a/b/_c", "a_/b", "x%2Fy/z", "x//y", "__z/y", "a/b/c.mkt"]
    keys = [video_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert [video_id_of_key(k) for k in keys] == ids
    assert video_key("meningioma/P01/V01.mkt") == "meningioma__P01__V01.mkt"
    assert video_key("a/b_c/d.mkt") == "a__b_c__d.mkt"  # a lone underscore stays readable
    assert all(not k.startswith("__") for k in keys)


@pytest.mark.parametrize("found", [None, 2])
def test_a_store_of_an_old_format_is_refused_with_how_to_redo_it(tmp_path, found):
    import zarr

    assert (
        stored_format(tmp_path) is None
        and stored_format(ResultStore.open(tmp_path / "new", SETTINGS).root) == 3
    )
    attrs = {"settings": SETTINGS, **({"xrcam_store_format": found} if found else {})}
    zarr.open_group(tmp_path / "maps.zarr", mode="w", attributes=attrs).require_group("videos")
    assert stored_format(tmp_path) == (found or 1)  # what `xrcam demo` reads to redo its own old store
    for opener in (lambda: ResultStore.open(tmp_path), lambda: ResultStore.open(tmp_path, SETTINGS)):
        with pytest.raises(
            XrcamConfigError, match=f"format {found or 1}, this xrcam reads format 3.*--overwrite"
        ):
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
