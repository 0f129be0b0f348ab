"""ShardWorker without Ray: what it writes equals the explainer called directly; shards are independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xrcam
from workflows import results
from workflows.driver import plan_shards
from workflows.settings import RunSettings
from workflows.store import ResultStore
from workflows.worker import ShardWorker
from xrcam.archive import discover_archive, load_masks
from xrcam.io.readers import open_video
from xrcam.models import save_checkpoint
from xrcam.preprocess import PreprocessConfig, Preprocessor
from xrcam.synth import SynthConfig, write_archive

CLASSES = ["glioblastoma", "meningioma"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Two 9-frame videos (one annotated), 80x80 px, and a resnet18 checkpoint with a sidecar."""
    root = tmp_path_factory.mktemp("worker")
    write_archive(
        root / "archive", SynthConfig(patients=1, videos=1, frames=9, size=(80, 80), seed=3), fmt="png"
    )
    torch.manual_seed(0)
    model = xrcam.load_model("resnet18", num_classes=2)
    checkpoint = save_checkpoint(model, root / "ckpt" / "model.pt", {"model": "resnet18", "classes": CLASSES})
    return root, checkpoint


def _settings(root, checkpoint, out, **changes):
    settings = RunSettings.resolve(
        None,
        archive=str(root / "archive"),
        out=str(out),
        checkpoint=str(checkpoint),
        chunk_frames=2,
        shard_chunks=1,
    )
    settings = settings.replace(**{"methods": tuple(xrcam.list_methods()), "batch_size": 3, **changes})
    store = ResultStore.open(settings.out, settings.store_settings(None, CLASSES))
    return settings, store


def _run_all(worker, store, settings, order=1):
    entries = discover_archive(settings.archive).entries
    manifests = []
    for entry in entries:
        described = worker.describe(entry)
        assert described["error"] is None
        store.create_video(described["layout"])
        for shard in plan_shards(entry, described["layout"], settings.shard_frames)[::order]:
            manifests.append(worker.process(shard))
            store.mark_done(shard.key, shard.start, shard.stop)
    return entries, manifests


def test_stored_maps_equal_the_explainer_on_the_same_frames(archive, tmp_path):
    root, checkpoint = archive
    settings, store = _settings(root, checkpoint, tmp_path / "out")
    assert settings.model == "resnet18" and settings.classes == tuple(CLASSES)  # from the sidecar
    worker = ShardWorker(settings.to_dict(), CLASSES, settings.out)
    entries, manifests = _run_all(worker, store, settings)
    assert all(m["error"] is None for m in manifests)
    assert sum(m["frames"] for m in manifests) == 2 * 5  # frames 0, 2, 4, 6, 8 of each video

    model = xrcam.load_model("resnet18", num_classes=2, checkpoint=checkpoint)
    explainer = xrcam.create_explainer(model)
    res = results.open(settings.out)  # the read API
    for entry in entries:
        ds = res.video(entry.video_id.replace("/", "__"))
        assert ds.attrs["complete"] is True
        assert ds.attrs["label_index"] == CLASSES.index(entry.label)
        with open_video(entry.path) as reader:
            pre = Preprocessor.for_video(reader, PreprocessConfig(frame_step=2))
            indices, frames = zip(*reader.read(0, None, 2), strict=True)
        np.testing.assert_array_equal(ds["frame"].values, indices)  # every kept frame exactly once
        assert not np.isnan(ds["logits"].values).any()  # ... and every one written
        assert list(ds.attrs["crop"]) == list(pre.crop)
        exp = explainer(pre(np.stack(frames)))
        np.testing.assert_allclose(ds["logits"].values, exp.logits.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            ds["probabilities"].values, exp.probabilities.numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_array_equal(ds["predicted"].values, exp.logits.argmax(1).numpy())
        for method in xrcam.list_methods():
            for layer in settings.layers:
                stored = ds[layer].sel(cam=method).values
                expected = exp.maps[method][layer].numpy()
                assert stored.dtype == np.float16 and stored.shape == expected.shape
                scale = np.abs(expected).max()
                np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3 * scale)
        masks = load_masks(entry)
        np.testing.assert_array_equal(ds["has_gt_mask"].values, [i in masks for i in indices])
        for row, index in enumerate(indices):
            expected_mask = pre.crop_mask(masks[index]) if index in masks else np.zeros((pre.crop.size,) * 2)
            np.testing.assert_array_equal(ds["gt_mask"].values[row], expected_mask.astype(np.uint8))
        assert any(masks) or entry.label == "glioblastoma"


def test_shard_order_and_repeats_do_not_change_the_bytes(archive, tmp_path):
    root, checkpoint = archive
    settings_a, store_a = _settings(root, checkpoint, tmp_path / "a")
    settings_b, store_b = _settings(root, checkpoint, tmp_path / "b")
    worker = ShardWorker(settings_a.to_dict(), CLASSES, settings_a.out)
    _run_all(worker, store_a, settings_a)
    worker_b = ShardWorker(settings_b.to_dict(), CLASSES, settings_b.out)
    entries, _ = _run_all(worker_b, store_b, settings_b, order=-1)  # last shard first
    shard = plan_shards(
        entries[0], store_b.layout(entries[0].video_id.replace("/", "__")), settings_b.shard_frames
    )[1]
    worker_b.process(shard)  # a shard redone (as after a worker crash) rewrites the same bytes
    chunks_a, chunks_b = (
        sorted(
            p.relative_to(tmp_path / d)
            for p in (tmp_path / d / "maps.zarr").rglob("*")
            if p.is_file() and "c" in p.parts
        )
        for d in ("a", "b")
    )
    assert chunks_a == chunks_b and chunks_a
    for rel in chunks_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_truncated_frame_fails_only_its_shard_with_the_file_named(archive, tmp_path):
    root, checkpoint = archive
    settings, store = _settings(root, checkpoint, tmp_path / "out")
    worker = ShardWorker(settings.to_dict(), CLASSES, settings.out)
    entry = discover_archive(settings.archive).entries[0]
    layout = worker.describe(entry)["layout"]
    store.create_video(layout)
    broken = sorted(entry.path.iterdir())[6]  # frame 6: kept position 3, i.e. shard 1 (positions 2-3)
    original = broken.read_bytes()
    try:
        broken.write_bytes(original[: len(original) // 2])  # header intact, pixels cut off
        manifests = [worker.process(s) for s in plan_shards(entry, layout, settings.shard_frames)]
    finally:
        broken.write_bytes(original)
    assert [m["error"] is None for m in manifests] == [True, False, True]
    error = manifests[1]["error"]
    assert error["error_type"] == "XrcamInputError"
    assert str(broken) in error["message"]


def test_out_of_memory_halves_the_batch_and_keeps_the_results(archive, tmp_path):
    """No GPU here: the explainer is wrapped to raise CUDA's OOM error on batches above 2 frames."""
    root, checkpoint = archive
    settings, store = _settings(
        root, checkpoint, tmp_path / "out", batch_size=4, chunk_frames=4, methods=("gradcam", "xrelevancecam")
    )
    worker = ShardWorker(settings.to_dict(), CLASSES, settings.out)
    real = worker.explainer
    sizes = []

    def small_memory(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    worker.explainer = small_memory
    _, manifests = _run_all(worker, store, settings)
    assert all(m["error"] is None for m in manifests)
    assert worker.batch_size == 2 and sizes[0] == 4 and max(sizes[1:]) == 2
    ds = results.open(settings.out).video(store.video_keys()[0])
    assert not np.isnan(ds["logits"].values).any()  # every frame written
    assert not np.isnan(ds["layer4"].sel(cam="xrelevancecam").values).any()


def test_split_follows_the_checkpoint_sidecar(archive, tmp_path):
    from workflows.driver import _split_entries

    root, _ = archive
    entries = discover_archive(root / "archive").entries
    model = xrcam.load_model("resnet18", num_classes=2)
    test_video = entries[1].video_id
    sidecar = {
        "model": "resnet18",
        "classes": CLASSES,
        "split": {"videos": {"train": [entries[0].video_id], "test": [test_video]}},
    }
    checkpoint = save_checkpoint(model, tmp_path / "model.pt", sidecar)
    settings = RunSettings.resolve(
        None, archive=str(root / "archive"), out=str(tmp_path), checkpoint=str(checkpoint), split="test"
    )
    assert [e.video_id for e in _split_entries(entries, settings)] == [test_video]


def test_error_records_carry_the_frame_where_the_exception_names_one():
    from workflows.worker import _error
    from xrcam.errors import XrcamInputError

    bad_mask = _error(XrcamInputError("a/v.mkt", "mask is not binary", frame=3))
    assert bad_mask["frame"] == 3 and bad_mask["error_type"] == "XrcamInputError"
    assert "frame" not in _error(ValueError("no frame here"))


def test_a_resume_with_another_shard_size_keeps_each_begun_videos_own(archive, tmp_path):
    """The shard size is the Zarr shard size of a video's arrays: fixed when its group is created."""
    from workflows.driver import RunSummary, _Scheduler

    root, checkpoint = archive
    settings, store = _settings(root, checkpoint, tmp_path / "out")  # shards of 2 frames
    worker = ShardWorker(settings.to_dict(), CLASSES, settings.out)
    entry = discover_archive(settings.archive).entries[0]
    store.create_video(worker.describe(entry)["layout"])
    resumed = settings.replace(shard_chunks=3)  # a resume asking for shards of 6 frames
    scheduler = _Scheduler(resumed, store, RunSummary(results=str(settings.out)), on_manifest=None)
    scheduler.plan(entry)
    shards = [task for kind, task, _ in scheduler.todo if kind == "process"]
    assert [s.num_frames for s in shards] == [2, 2, 1]  # 5 kept frames, in the video's own 2-frame shards
    manifests = [worker.process(shard) for shard in shards]
    assert all(m["error"] is None for m in manifests), manifests
