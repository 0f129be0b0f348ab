"""The results store: layout per docs/architecture.md, settings check on reopen, completion markers, tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workflows.settings import RunSettings, load_toml, parse_crop
from workflows.store import ResultStore, VideoLayout, map_name, video_key
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


def test_layout_matches_the_contract_and_xarray_opens_it(tmp_path):
    xr = pytest.importorskip("xarray")
    store = ResultStore.open(tmp_path, SETTINGS)
    store.create_video(LAYOUT)
    assert LAYOUT.key == "meningioma__p1__video 1.mkt" == video_key(LAYOUT.video_id)
    assert LAYOUT.num_frames == 10  # ceil(19 / 2): frames 0, 2, ..., 18
    group = store.video(LAYOUT.key)
    expected = {
        "frame_index": ((10,), "int64"),
        "logits": ((10, 2), "float32"),
        "probabilities": ((10, 2), "float32"),
        "predicted": ((10,), "int64"),
        "gt_mask": ((10, 24, 24), "uint8"),
        "has_gt_mask": ((10,), "bool"),
        "gradcam_layer1": ((10, 6, 6), "float16"),
        "xrelevancecam_layer4": ((10, 1, 1), "float16"),
    }
    for name, (shape, dtype) in expected.items():
        assert group[name].shape == shape, name
        assert group[name].dtype == np.dtype(dtype), name
        assert group[name].chunks[0] == 4, name
    assert len(list(group.array_keys())) == 6 + 2 * 2
    attrs = group.attrs.asdict()
    for key in ("video_id", "patient", "label", "label_index", "crop", "frame_step", "num_source_frames"):
        assert key in attrs
    assert store.group.attrs["settings"]["model"] == "resnet18"
    assert "xrcam_version" in store.group.attrs

    store.write(
        LAYOUT.key, 0, {"frame_index": np.arange(0, 8, 2), map_name("gradcam", "layer1"): np.ones((4, 6, 6))}
    )
    ds = xr.open_zarr(tmp_path / "maps.zarr", group=f"videos/{LAYOUT.key}", consolidated=False)
    assert ds["gradcam_layer1"].dims == ("frame", "layer1_y", "layer1_x")
    assert ds["logits"].dims == ("frame", "class")
    assert ds["gt_mask"].dims == ("frame", "y", "x")
    assert ds["frame_index"].values[:4].tolist() == [0, 2, 4, 6]
    assert ds["frame_index"].values[4:].tolist() == [-1] * 6  # not written yet: the fill value says so
    assert np.isnan(ds["gradcam_layer1"].values[4:]).all()


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
        "error_type",
        "message",
    ]
    row = {
        "path": "/a/b.mkt",
        "video_id": "b.mkt",
        "shard": 2,
        "error_type": "XrcamInputError",
        "message": "/a/b.mkt: x",
    }
    table = pd.read_parquet(store.write_failures([row]))
    assert table.to_dict("records") == [row]


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
        parse_crop("1,2")


def test_a_half_created_video_group_counts_as_missing(tmp_path):
    store = ResultStore.open(tmp_path, SETTINGS)
    group = store.create_video(LAYOUT)
    del group["xrelevancecam_layer4"]  # as if the driver died while creating the arrays
    assert store.layout(LAYOUT.key) is None
    store.create_video(LAYOUT)
    assert store.layout(LAYOUT.key) == LAYOUT
