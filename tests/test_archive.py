"""Archive discovery (folder layout and manifests), masks, and the patient-level split."""

from __future__ import annotations

import csv
import shutil
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from xrcam.archive import VideoEntry, discover_archive, load_masks, split_patients
from xrcam.errors import XrcamInputError
from xrcam.synth import SynthConfig, generate_archive, write_archive

CONFIG = SynthConfig(classes=2, patients=2, videos=2, frames=3, size=(48, 48), seed=5)


@pytest.fixture
def archive_dir(tmp_path):
    write_archive(tmp_path, CONFIG, "png")
    return tmp_path


def test_layout_discovery(archive_dir):
    archive = discover_archive(archive_dir)
    assert archive.problems == []
    assert [e.video_id for e in archive.entries] == sorted(v.relpath("png") for v in generate_archive(CONFIG))
    for entry in archive.entries:
        assert entry.path == archive_dir / entry.video_id
        assert entry.video_id.split("/")[:2] == [entry.label, entry.patient]
        assert (entry.mask_path is not None) == (entry.label == "meningioma")
        if entry.mask_path:
            assert entry.mask_path == archive_dir / (entry.video_id + ".masks")
    assert archive.classes == ["glioblastoma", "meningioma"]


def test_manifest_csv_and_parquet_match_the_layout(archive_dir):
    layout = discover_archive(archive_dir).entries
    assert discover_archive(archive_dir / "manifest.csv").entries == layout
    pd.read_csv(archive_dir / "manifest.csv").to_parquet(archive_dir / "manifest.parquet")
    assert discover_archive(archive_dir / "manifest.parquet").entries == layout


def test_manifest_without_mask_column_finds_sibling_masks_and_explicit_mask_paths(archive_dir):
    rows = list(csv.DictReader(open(archive_dir / "manifest.csv")))
    (archive_dir / "gt").mkdir()
    moved = rows[0]["mask_path"]
    shutil.move(archive_dir / moved, archive_dir / "gt" / "first")
    with open(archive_dir / "m.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "patient", "label", "mask_path"])
        writer.writerow([rows[0]["path"], rows[0]["patient"], rows[0]["label"], "gt/first"])
        for row in rows[1:]:
            writer.writerow([row["path"], row["patient"], row["label"], ""])
    entries = {e.video_id: e for e in discover_archive(archive_dir / "m.csv").entries}
    assert entries[rows[0]["path"]].mask_path == archive_dir / "gt" / "first"
    for row in rows[1:]:
        expected = archive_dir / row["mask_path"] if row["mask_path"] else None
        assert entries[row["path"]].mask_path == expected


def test_masks_load_as_written(archive_dir):
    videos = {v.relpath("png"): v for v in generate_archive(CONFIG)}
    for entry in discover_archive(archive_dir).entries:
        masks = load_masks(entry)
        assert sorted(masks) == sorted(videos[entry.video_id].masks)
        for index, mask in masks.items():
            assert mask.dtype == bool
            np.testing.assert_array_equal(mask, videos[entry.video_id].masks[index])


def test_bad_rows_and_stray_files_are_reported_and_the_rest_carries_on(archive_dir):
    (archive_dir / "meningioma" / "stray.png").write_bytes(b"")
    with open(archive_dir / "manifest.csv", "a", newline="") as fh:
        csv.writer(fh).writerows(
            [["meningioma/P09/V01.mkt", "P09", "meningioma", ""], ["", "P01", "meningioma", ""]]
        )
    layout = discover_archive(archive_dir)
    assert [p.path.name for p in layout.problems] == ["stray.png"]
    assert len(layout.entries) == 8
    listed = discover_archive(archive_dir / "manifest.csv")
    assert len(listed.entries) == 8
    assert any("P09" in str(p.path) for p in listed.problems)
    assert any("row 11" in p.problem for p in listed.problems)


def test_manifest_missing_columns_names_the_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("file,label\na.avi,x\n")
    with pytest.raises(XrcamInputError, match="patient") as err:
        discover_archive(tmp_path / "m.csv")
    assert str(tmp_path / "m.csv") in str(err.value)


def _entries(per_class: dict[str, int]) -> list[VideoEntry]:
    out = []
    for label, n in per_class.items():
        for p in range(n):
            for v in range(2):
                patient = f"{label[:1]}{p:03d}"
                out.append(VideoEntry(f"{label}/{patient}/{v}.avi", None, patient, label))
    return out


def test_split_keeps_patients_whole_and_follows_fractions():
    entries = _entries({"meningioma": 25, "glioblastoma": 25})
    split = split_patients(entries, seed=0)
    assert set(split) == {e.patient for e in entries}
    assert Counter(split.values()) == {"train": 40, "val": 5, "test": 5}
    by_split = {s: {e.video_id for e in entries if split[e.patient] == s} for s in ("train", "val", "test")}
    patients_in = {s: {e.patient for e in entries if split[e.patient] == s} for s in by_split}
    assert not (patients_in["train"] & patients_in["val"]) and not (
        patients_in["train"] & patients_in["test"]
    )
    assert not (patients_in["val"] & patients_in["test"])
    # small splits hold both classes (stratified by class)
    for s in ("val", "test"):
        assert {e.label for e in entries if split[e.patient] == s} == {"meningioma", "glioblastoma"}
    assert Counter(split_patients(entries, fractions=(0.6, 0.2, 0.2)).values()) == {
        "train": 30,
        "val": 10,
        "test": 10,
    }


def test_split_is_seeded():
    entries = _entries({"meningioma": 10, "glioblastoma": 10})
    assert split_patients(entries, seed=7) == split_patients(list(reversed(entries)), seed=7)
    assert len({tuple(sorted(split_patients(entries, seed=s).items())) for s in range(5)}) > 1


@pytest.mark.parametrize(
    ("per_class", "fractions", "expected"),
    [
        ({"a": 3}, (0.8, 0.1, 0.1), {"train": 1, "val": 1, "test": 1}),
        ({"a": 3, "b": 3}, (0.8, 0.1, 0.1), {"train": 2, "val": 2, "test": 2}),
        ({"a": 5, "b": 5}, (0.8, 0.1, 0.1), {"train": 6, "val": 2, "test": 2}),
        ({"a": 16, "b": 18}, (0.8, 0.1, 0.1), {"train": 27, "val": 4, "test": 3}),
        ({"a": 2}, (0.8, 0.1, 0.1), {"train": 1, "test": 1}),
        ({"a": 1}, (0.8, 0.1, 0.1), {"train": 1}),
        ({"a": 5, "b": 5}, (0.8, 0.2, 0.0), {"train": 8, "val": 2}),
        ({"a": 4}, (0, 0, 1), {"test": 4}),
    ],
)
def test_split_with_few_patients_gives_every_requested_split_one(per_class, fractions, expected):
    assert Counter(split_patients(_entries(per_class), fractions=fractions, seed=1).values()) == expected


@pytest.mark.parametrize("per_class", [{"a": 2, "b": 10}, {"a": 5, "b": 5, "c": 3}, {"a": 40, "b": 3}])
def test_split_is_stratified_by_class(per_class):
    entries = _entries(per_class)
    split = split_patients(entries, seed=2)
    for s in ("train", "test"):  # every class has a training and a test patient
        assert {e.label for e in entries if split[e.patient] == s} == set(per_class)
    if min(per_class.values()) >= 3:
        assert {e.label for e in entries if split[e.patient] == "val"} == set(per_class)


def test_split_rejects_bad_fractions():
    for bad in ((0.5, 0.5), (-0.1, 0.6, 0.5), (0, 0, 0)):
        with pytest.raises(ValueError):
            split_patients(_entries({"a": 3}), fractions=bad)


def test_the_same_video_listed_twice_through_dotdot_or_a_link_counts_once(archive_dir):
    listed = sorted(v.relpath("png") for v in generate_archive(CONFIG))
    first = listed[0]  # e.g. glioblastoma/P01/V01
    klass, patient, video = first.split("/")
    with open(archive_dir / "twice.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "patient", "label"])
        writer.writerow([first, patient, klass])
        writer.writerow([f"{klass}/{patient}/../{patient}/{video}", patient, klass])  # same file via ..
        writer.writerow([f"./{klass}/{patient}/{video}/", "P99", klass])  # and again, as another patient
    archive = discover_archive(archive_dir / "twice.csv")
    assert [e.video_id for e in archive.entries] == [first]
    assert [p.problem for p in archive.problems] == [
        "row 3 of twice.csv lists the same video as row 2; the later row is skipped",
        "row 4 of twice.csv lists the same video as row 2; the later row is skipped",
    ]
    assert all(p.rejected for p in archive.problems)
    # a folder layout with a symbolic link to a video of another patient
    link = archive_dir / klass / "P77" / "V09"
    link.parent.mkdir()
    link.symlink_to(archive_dir / first, target_is_directory=True)
    layout = discover_archive(archive_dir)
    assert f"{klass}/P77/V09" not in [e.video_id for e in layout.entries]
    assert [(p.path, p.problem.split(" (")[0]) for p in layout.problems] == [
        (link, f"the same video as {first}")
    ]


def test_mask_problems_keep_the_video_and_name_the_frame(archive_dir):
    entry = next(e for e in discover_archive(archive_dir).entries if e.mask_path is not None)
    mask = sorted(entry.mask_path.iterdir())[0]
    from PIL import Image

    Image.new("L", (7, 5)).save(mask)
    archive = discover_archive(archive_dir)
    assert entry.video_id in [e.video_id for e in archive.entries]  # kept, without ground truth
    [problem] = archive.problems
    assert problem.path == mask and not problem.rejected and problem.frame is not None
    assert "mask is 7x5" in problem.problem and "without ground truth" in problem.problem
    assert next(e for e in archive.entries if e.video_id == entry.video_id).mask_path is None
    assert all(e.frame_shape == (48, 48) for e in archive.entries)
