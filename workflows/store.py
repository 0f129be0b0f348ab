"""The results folder of ``xrcam run``: a Zarr v3 store of per-layer maps, a failures table, a run summary.

Layout (the contract in ``docs/architecture.md``)::

    RESULTS/maps.zarr/videos/<video_key>/{frame_index, logits, probabilities, predicted,
                                          gt_mask, has_gt_mask, <method>_<layer>}
    RESULTS/failures.parquet
    RESULTS/run.json

The driver creates every group and array up front and is the only writer of metadata (attributes);
workers only write whole chunks of data into arrays that already exist, so no two processes ever touch
the same file. A shard counts as finished once the driver has recorded it in the video group's
``shards_done`` attribute, which happens after the worker has returned, i.e. after its data is on disk.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from xrcam import __version__
from xrcam.errors import XrcamConfigError

__all__ = [
    "MAPS_NAME",
    "FAILURES_NAME",
    "RUN_NAME",
    "FAILURE_COLUMNS",
    "VideoLayout",
    "ResultStore",
    "video_key",
    "map_name",
    "settings_differences",
]

MAPS_NAME = "maps.zarr"
FAILURES_NAME = "failures.parquet"
RUN_NAME = "run.json"
FAILURE_COLUMNS = ("path", "video_id", "shard", "error_type", "message")


_BASE_ARRAYS = ("frame_index", "logits", "probabilities", "predicted", "gt_mask", "has_gt_mask")


def video_key(video_id: str) -> str:
    """The group name of a video: its archive-relative id with '/' replaced by '__'."""
    return video_id.replace("/", "__")


def map_name(method: str, layer: str) -> str:
    """The array name of one method's maps at one layer, e.g. ``xrelevancecam_layer1``."""
    return f"{method}_{layer}"


@dataclass(frozen=True)
class VideoLayout:
    """Everything needed to create (or check) one video's group: its identity, shapes and crop."""

    video_id: str
    path: str
    patient: str
    label: str
    label_index: int
    crop: tuple[int, int, int]  # x, y, size in source pixels
    frame_step: int
    num_source_frames: int
    num_classes: int
    map_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # layer -> (h, w)
    input_size: int | None = None  # side of the model input and gt_mask; None: the crop's size

    @property
    def size(self) -> int:
        return self.input_size or self.crop[2]

    @property
    def key(self) -> str:
        return video_key(self.video_id)

    @property
    def num_frames(self) -> int:
        """Frames kept after ``frame_step`` (every ``frame_step``-th frame, starting at 0)."""
        return math.ceil(self.num_source_frames / self.frame_step)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop"] = list(self.crop)
        data["map_shapes"] = {layer: list(shape) for layer, shape in self.map_shapes.items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VideoLayout:
        return cls(
            video_id=data["video_id"],
            path=data["path"],
            patient=data["patient"],
            label=data["label"],
            label_index=int(data["label_index"]),
            crop=tuple(int(v) for v in data["crop"]),
            frame_step=int(data["frame_step"]),
            num_source_frames=int(data["num_source_frames"]),
            num_classes=int(data["num_classes"]),
            map_shapes={layer: tuple(int(v) for v in shape) for layer, shape in data["map_shapes"].items()},
            input_size=data.get("input_size"),
        )


def _normalise(value: Any) -> Any:
    """Settings as they read back from JSON (tuples become lists), so comparisons are like for like."""
    return json.loads(json.dumps(value, default=str))


def _flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def settings_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """Human-readable lines, one per setting whose stored value differs from the wanted one."""
    old, new = _flatten(_normalise(stored)), _flatten(_normalise(wanted))
    return [
        f"{name}: store has {old.get(name)!r}, this run asks for {new.get(name)!r}"
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


# Compression: float16 maps shuffle their bytes so the slowly varying sign/exponent bytes compress apart
# from the noisy mantissas; zstd level 5 keeps writing cheap next to the explainer.
def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle)


class ResultStore:
    """One results folder. Create or reopen it with :meth:`open`; workers use :meth:`write`."""

    def __init__(self, root: str | Path, group: zarr.Group):
        self.root = Path(root)
        self.group = group

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls, root: str | Path, settings: Mapping[str, Any] | None = None, *, overwrite: bool = False
    ) -> ResultStore:
        """Open the results folder ``root``, creating it when ``settings`` are given.

        With ``settings`` an existing store must have been written with the same settings, otherwise
        :class:`XrcamConfigError` names each one that differs; ``overwrite=True`` deletes it instead.
        Without ``settings`` the store must exist (workers and readers).
        """
        root = Path(root)
        maps = root / MAPS_NAME
        if settings is None:
            if not (maps / "zarr.json").is_file():
                raise XrcamConfigError(
                    f"{root}: no {MAPS_NAME} here; run `xrcam run ARCHIVE --out {root}` first"
                )
            return cls(root, zarr.open_group(maps, mode="r+"))
        settings = _normalise(dict(settings))
        if overwrite and root.exists():
            if maps.exists():
                shutil.rmtree(maps)
            for name in (FAILURES_NAME, RUN_NAME):
                (root / name).unlink(missing_ok=True)
        if (maps / "zarr.json").is_file():
            group = zarr.open_group(maps, mode="r+")
            stored = group.attrs.get("settings")
            differences = settings_differences(stored or {}, settings)
            if differences:
                raise XrcamConfigError(
                    f"{maps} was written with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nUse the same settings to resume, another --out, or --overwrite to replace it."
                )
            return cls(root, group)
        root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(
            maps, mode="w", attributes={"xrcam_version": __version__, "settings": settings}
        )
        group.require_group("videos")
        return cls(root, group)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["settings"])

    @property
    def methods(self) -> list[str]:
        return list(self.settings["methods"])

    @property
    def layers(self) -> list[str]:
        return list(self.settings["layers"])

    @property
    def chunk_frames(self) -> int:
        return int(self.settings["chunk_frames"])

    # ----------------------------------------------------------------- videos
    def video_keys(self) -> list[str]:
        return sorted(name for name, _ in self.group["videos"].groups())

    def video(self, key: str) -> zarr.Group | None:
        """The group of one video, or ``None`` when it has not been created."""
        videos = self.group["videos"]
        return videos[key] if key in videos else None

    def layout(self, key: str) -> VideoLayout | None:
        """A video's layout, or ``None`` when its group is missing or was left half-created by a crash."""
        group = self.video(key)
        if group is None:
            return None
        layout = VideoLayout.from_json(group.attrs.asdict())
        required = set(_BASE_ARRAYS) | {
            map_name(m, layer) for m in self.methods for layer in layout.map_shapes
        }
        return layout if required <= set(group.array_keys()) else None

    def create_video(self, layout: VideoLayout) -> zarr.Group:
        """Create a video's group and all its arrays (filled with 'missing' values until written)."""
        frames, chunk, n_classes = layout.num_frames, self.chunk_frames, layout.num_classes
        size = layout.size
        attrs = {
            "video_id": layout.video_id,
            "patient": layout.patient,
            "label": layout.label,
            "label_index": layout.label_index,
            "crop": list(layout.crop),
            "frame_step": layout.frame_step,
            "num_source_frames": layout.num_source_frames,
            "path": layout.path,
            "num_classes": layout.num_classes,
            "map_shapes": {layer: list(shape) for layer, shape in layout.map_shapes.items()},
            "input_size": layout.size,
            "shards_done": [],
            "complete": False,
        }
        group = self.group["videos"].create_group(layout.key, attributes=attrs, overwrite=True)
        specs: list[tuple[str, tuple[int, ...], str, tuple[str, ...], Any]] = [
            ("frame_index", (frames,), "int64", ("frame",), -1),
            ("logits", (frames, n_classes), "float32", ("frame", "class"), np.nan),
            ("probabilities", (frames, n_classes), "float32", ("frame", "class"), np.nan),
            ("predicted", (frames,), "int64", ("frame",), -1),
            ("gt_mask", (frames, size, size), "uint8", ("frame", "y", "x"), 0),
            ("has_gt_mask", (frames,), "bool", ("frame",), False),
        ]
        for layer, (h, w) in layout.map_shapes.items():
            for method in self.methods:
                specs.append(
                    (
                        map_name(method, layer),
                        (frames, h, w),
                        "float16",
                        ("frame", f"{layer}_y", f"{layer}_x"),
                        np.nan,
                    )
                )
        for name, shape, dtype, dims, fill in specs:
            group.create_array(
                name,
                shape=shape,
                chunks=(chunk, *shape[1:]),
                dtype=dtype,
                fill_value=fill,
                compressors=_compressor(),
                dimension_names=dims,
            )
        return group

    def write(self, key: str, start: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write frames ``start : start + len`` of each named array of one video (workers call this)."""
        group = self.video(key)
        if group is None:
            raise XrcamConfigError(f"{self.root}: video group {key!r} does not exist; the driver creates it")
        for name, data in arrays.items():
            group[name][start : start + len(data)] = data

    # ----------------------------------------------------------------- completion
    def shards_done(self, key: str) -> set[tuple[int, int]]:
        group = self.video(key)
        return set() if group is None else {(int(a), int(b)) for a, b in group.attrs.get("shards_done", [])}

    def mark_done(self, key: str, start: int, stop: int) -> bool:
        """Record that frames ``start:stop`` of a video are written; returns whether the video is complete."""
        group = self.video(key)
        done = self.shards_done(key) | {(start, stop)}
        covered = sum(b - a for a, b in done)
        complete = covered >= group["frame_index"].shape[0]
        group.attrs.update({"shards_done": [list(r) for r in sorted(done)], "complete": complete})
        return complete

    # ----------------------------------------------------------------- tables
    def write_failures(self, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Replace the failures table with ``rows`` (this run's failures; an empty table when none)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = list(rows)
        table = pa.table(
            {
                "path": pa.array([str(r["path"]) for r in rows], pa.string()),
                "video_id": pa.array([str(r["video_id"]) for r in rows], pa.string()),
                "shard": pa.array([int(r["shard"]) for r in rows], pa.int64()),
                "error_type": pa.array([str(r["error_type"]) for r in rows], pa.string()),
                "message": pa.array([str(r["message"]) for r in rows], pa.string()),
            }
        )
        path = self.root / FAILURES_NAME
        pq.write_table(table, path)
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.root / RUN_NAME
        path.write_text(json.dumps(_normalise(dict(summary)), indent=2) + "\n")
        return path
