"""The Zarr side of a results folder: every array and attribute name, the store version, sharding.

Layout (store format 3; ``docs/results.md`` explains why it is shaped this way)::

    RESULTS/maps.zarr/                      root group: attrs xrcam_store_format, xrcam_version, settings
        cam (cam,)  class (class,)          method names and class names, inherited by every video
        layer (layer,)                      the explained layers (stages), in the run's order
        y (y,), x (x,)                      crop-pixel coordinates of the crop grid (y counts up from
                                            the bottom row, so ``.plot.imshow()`` is the right way up)
        map_y (map_y,), map_x (map_x,)      centres of the finest layer's cells, in the same crop pixels
        <video_key>/                        one group per video (attrs: video_id, label, crop, map_shapes,
                                            source_row, source_column, shards_done, complete, ...)
            frame (frame,)                  original frame index of each stored row
            maps (layer, cam, frame, map_y, map_x) float16
                                            raw maps of every layer on the finest layer's grid: each
                                            coarser layer's cells replicated (nearest, by cell centre)
            logits (frame, class) float32   NaN until the frame is written
            gt_mask (frame, y, x) uint8     0/1 ground truth on the crop grid
            has_gt_mask (frame,) bool       whether the frame is annotated
    RESULTS/run.json                        the run's summary
    (the Parquet side - failures, metrics, tables - lives in :mod:`workflows.tables`)

**One maps array per video, on the finest layer's grid.** A results folder is mostly per-video files (an
array is a metadata file and a shard file), so one array for every layer instead of one per layer is
what keeps a 100-frame video at 11 files and an archive under 200 files per 1,000 frames. The
replication is exact and invertible: every coarse cell keeps at least one fine cell
(:func:`layer_cells`), so :meth:`ResultStore.read_stacks` picks each layer's raw maps back out bit for
bit, and ``.plot.imshow()`` of a coarse layer shows its cells where they lie on the crop. Replicated
cells compress to little (+20 % bytes over the raw layers at 230 px, see ``docs/results.md``).

**Grid coordinates** (``y``, ``x``, ``map_y``, ``map_x``) are stored once, in the root, while every video
of the run has the same grid (``VideoLayout.size`` and ``map_shapes``: the common case), and every video
inherits them as it inherits ``cam``/``class``/``layer`` (xarray DataTree coordinate inheritance). Only
the per-video part of the crop-to-source mapping is the video's: its ``source_row`` and
``source_column`` attributes (formulas in ``y``/``x``, with the video's crop offset). An inherited indexed
coordinate must agree with every child's dims, so when :meth:`ResultStore.create_video` meets a video
with another grid it *demotes* the grid: writes each existing video's own coordinates into its group,
deletes the root's, and from then on every video holds its own. Whether the root holds the grid is read
from the root's arrays, never from a stored flag, so a crash mid-way is repaired by the next
``create_video`` (``ResultStore`` only remembers, in memory, that a store's videos hold their own, to
skip listing the videos again).

Every per-frame array is a Zarr v3 *sharded* array: inner chunks of ``chunk_frames`` frames inside
shard files of exactly one work shard (``chunk_frames * shard_chunks`` frames), so the one worker that
explains a work shard writes each of its shard files alone, once. The driver creates every group and
array (and writes the small coordinate arrays) up front and is the only writer of attributes and
coordinates. A shard counts as finished once the driver has recorded it in the video's ``shards_done``
attribute, after the worker returned. When a video is complete its group's metadata is consolidated,
and the root's when the run writes its summary (and after a demotion), so
``xr.open_datatree(RESULTS/maps.zarr, engine="zarr")`` opens every video in one read without warnings.
Internally the store never trusts consolidated metadata (a resumed run adds groups), it lists the folder.

Aggregated maps and masks are *not* stored: :mod:`xrcam.scoring` derives them from the raw maps on
read (``workflows.results``) faster than they could be read back, at 1/24 of the bytes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from xrcam import __version__
from xrcam.errors import XrcamConfigError

__all__ = [
    "STORE_FORMAT",
    "MAPS_NAME",
    "RUN_NAME",
    "VideoLayout",
    "ResultStore",
    "video_key",
    "video_id_of_key",
    "settings_differences",
    "predictions",
    "layer_cells",
    "stored_format",
]

log = logging.getLogger(__name__)

#: Version of this layout; a store of another version is refused with a sentence saying how to redo it.
STORE_FORMAT = 3
MAPS_NAME = "maps.zarr"
RUN_NAME = "run.json"

# names of arrays and attributes: spelled here only
FRAME, Y, X, CLASS = "frame", "y", "x", "class"
#: The method dimension is ``cam`` (all seven methods are CAMs): a dimension called ``method`` would
#: collide with xarray's ``.sel(method=...)`` keyword and select nothing.
METHOD = "cam"
LOGITS, GT_MASK, HAS_GT, MAPS = "logits", "gt_mask", "has_gt_mask", "maps"
LAYER, MAP_Y, MAP_X = "layer", "map_y", "map_x"
FORMAT_ATTR = "xrcam_store_format"
#: Video-group attributes: where the video's crop pixels sit in its source frames, as formulas in
#: ``y``/``x`` (they depend on the video's crop offset, so they are the video's, not the root grid's).
SOURCE_ROW, SOURCE_COLUMN = "source_row", "source_column"


def _tables():
    from workflows import tables

    return tables


# ---------------------------------------------------------------------------------------- video keys
_ADJACENT = re.compile(r"(?<=[_/])_|_(?=[_/])")


def video_key(video_id: str) -> str:
    """The group name of a video: its archive-relative id with ``/`` written as ``__``.

    Injective: ``%`` is written ``%25`` and every ``_`` next to another ``_`` or a ``/`` is written
    ``%5F``, so the only ``__`` in a key are separators (``a/b__c.mkt`` -> ``a__b%5F%5Fc.mkt``,
    ``a__b/c.mkt`` -> ``a%5F%5Fb__c.mkt``). Ordinary ids read as before: ``meningioma/P01/V01.mkt``
    -> ``meningioma__P01__V01.mkt``. :func:`video_id_of_key` inverts it.
    """
    escaped = _ADJACENT.sub("%5F", video_id.replace("%", "%25"))
    return escaped.replace("/", "__")


def video_id_of_key(key: str) -> str:
    """The inverse of :func:`video_key`."""
    return key.replace("__", "/").replace("%5F", "_").replace("%25", "%")


# ---------------------------------------------------------------------------------------- layout
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
    shard_frames: int | None = None  # frames per work shard = per Zarr shard; None: the store's chunk

    @property
    def size(self) -> int:
        return self.input_size or self.crop[2]

    @property
    def key(self) -> str:
        return video_key(self.video_id)

    @property
    def map_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the grid every layer's maps are stored on: the finest layer's, per axis."""
        return tuple(max(shape[axis] for shape in self.map_shapes.values()) for axis in (0, 1))

    @property
    def num_frames(self) -> int:
        """Frames kept after ``frame_step`` (every ``frame_step``-th frame, starting at 0)."""
        return math.ceil(self.num_source_frames / self.frame_step)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["crop"] = list(self.crop)
        data["map_shapes"] = {layer: list(shape) for layer, shape in self.map_shapes.items()}
        data["input_size"] = self.size
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
            shard_frames=data.get("shard_frames"),
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
# from the noisy mantissas; 0/1 masks are bit-shuffled (they compress like bit-packed masks while xarray
# still sees plain images); zstd level 5 keeps writing cheap next to the explainer.
def _compressor(dtype: str = "float16") -> BloscCodec:
    shuffle = BloscShuffle.bitshuffle if dtype in ("uint8", "bool") else BloscShuffle.shuffle
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def predictions(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted, probabilities)`` of stored ``(frames, classes)`` logits: the argmax (-1 where a
    frame was never written, its logits NaN) and the softmax (NaN there). The one derivation that the
    read API's ``predicted``/``probabilities`` and the metric rows share."""
    import torch

    written = ~np.isnan(logits).any(axis=1)
    safe = np.nan_to_num(logits, nan=0.0)
    probabilities = torch.softmax(torch.from_numpy(safe), dim=1).numpy()
    probabilities[~written] = np.nan
    return np.where(written, safe.argmax(axis=1), -1).astype(np.int64), probabilities


def _cell_coords(cells: tuple[int, int], size: int, y: str, x: str) -> dict[str, np.ndarray]:
    """``{y: ..., x: ...}``: the centres of ``cells = (h, w)`` equal cells over the ``size``-px crop, in
    crop pixels (``y`` counted up from the bottom row), as bilinear upsampling with
    ``align_corners=False`` places them."""

    def centres(n: int) -> np.ndarray:
        return (np.arange(n) + 0.5) * (size / n) - 0.5

    h, w = cells
    return {y: (size - 1 - centres(h)).astype(np.float32), x: centres(w).astype(np.float32)}


def _source_attrs(layout: VideoLayout) -> dict[str, str]:
    """The video's :data:`SOURCE_ROW` / :data:`SOURCE_COLUMN` formulas (crop offset and scale)."""
    crop_x, crop_y, crop_size = layout.crop
    size = layout.size
    scale = crop_size / size
    return {
        SOURCE_ROW: f"{crop_y} + ({size} - 1 - y + 0.5) * {scale:g} - 0.5",
        SOURCE_COLUMN: f"{crop_x} + (x + 0.5) * {scale:g} - 0.5",
    }


def layer_cells(cells: int, fine: int) -> tuple[np.ndarray, np.ndarray]:
    """How ``cells`` cells of a layer sit on ``fine >= cells`` cells of the stored grid (both spread
    evenly over the crop): ``(spread, picks)``. ``spread[j]`` is the layer's cell whose area holds fine
    cell ``j``'s centre (nearest by centre; integer arithmetic, so exact); ``picks[i]`` is the first fine
    cell holding layer cell ``i``. Every layer cell holds at least one fine cell (``spread`` rises by at
    most one per step from 0 to ``cells - 1``), so ``stored[picks]`` is the raw map, bit for bit."""
    spread = (2 * np.arange(fine) + 1) * cells // (2 * fine)
    return spread, np.searchsorted(spread, np.arange(cells))


def _layer_index(layout: VideoLayout, layer: str, which: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of :func:`layer_cells` for ``layer`` on the stored grid of ``layout``:
    ``which=0`` spreads the layer over the grid, ``which=1`` picks it back out."""
    (h, w), (fine_h, fine_w) = layout.map_shapes[layer], layout.map_grid
    return layer_cells(h, fine_h)[which], layer_cells(w, fine_w)[which]


def _grid_coords(layout: VideoLayout, *, own: bool = False) -> list[tuple[str, np.ndarray, dict]]:
    """``(name, values, attrs)`` of the grid coordinates of ``layout`` (``y``, ``x``, ``map_y``,
    ``map_x``); ``own``: for a video that holds its own, whose ``y``/``x`` also carry its formulas."""
    size = layout.size
    y_attrs = {"long_name": "crop pixel, counted up from the bottom row"}
    x_attrs = {"long_name": "crop pixel column"}
    if own:
        source = _source_attrs(layout)
        y_attrs[SOURCE_ROW], x_attrs[SOURCE_COLUMN] = source[SOURCE_ROW], source[SOURCE_COLUMN]
    coords: list[tuple[str, np.ndarray, dict]] = [
        (Y, (size - 1 - np.arange(size)).astype(np.float32), y_attrs),
        (X, np.arange(size, dtype=np.float32), x_attrs),
    ]
    if layout.map_shapes:
        cell = {"units": "crop pixel", "long_name": "centre of a cell of the finest layer"}
        for name, values in _cell_coords(layout.map_grid, size, MAP_Y, MAP_X).items():
            coords.append((name, values, cell))
    return coords


def _write_coords(group: zarr.Group, coords: Iterable[tuple[str, np.ndarray, dict]]) -> None:
    for name, values, attrs in coords:
        array = group.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            dimension_names=(name,),
            attributes=attrs,
            overwrite=True,
        )
        array[:] = values


def _consolidate(store_path: Path, path: str = "") -> None:
    with warnings.catch_warnings():  # "consolidated metadata is not part of the v3 spec": known, wanted
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(store_path), path=path or None)


def stored_format(root: str | Path) -> int | None:
    """The format of the store in results folder ``root``: ``None`` without one, 1 for the first
    (unversioned) one. Lets the demo redo its own store of an older format instead of stopping."""
    meta = Path(root) / MAPS_NAME / "zarr.json"
    if not meta.is_file():
        return None
    return int(json.loads(meta.read_text()).get("attributes", {}).get(FORMAT_ATTR) or 1)


def _old_format_error(maps: Path, found: int | None) -> XrcamConfigError:
    root = maps.parent
    return XrcamConfigError(
        f"{maps} is in results format {found}, this xrcam reads format {STORE_FORMAT}: "
        f"redo it with `xrcam run ARCHIVE --out {root} --overwrite` (same options as before), "
        f"then `xrcam reduce {root}`"
    )


class ResultStore:
    """One results folder. Create or reopen it with :meth:`open`; workers use :meth:`write_shard`."""

    def __init__(self, root: str | Path, group: zarr.Group):
        self.root = Path(root)
        self.group = group
        self._layouts: dict[str, VideoLayout] = {}
        self._own_grids = False  # known to be a store whose videos hold their own grid coordinates

    @property
    def maps_path(self) -> Path:
        return self.root / MAPS_NAME

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        root: str | Path,
        settings: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
        mode: str = "r+",
    ) -> ResultStore:
        """Open the results folder ``root``, creating it when ``settings`` are given.

        With ``settings`` an existing store must have been written with the same settings, otherwise
        :class:`XrcamConfigError` names each one that differs; ``overwrite=True`` deletes it instead.
        Without ``settings`` the store must exist (workers and readers; ``mode="r"`` for read-only).
        A store of another format version is refused with a sentence saying how to redo it.
        """
        root = Path(root)
        maps = root / MAPS_NAME
        if settings is None:
            if not (maps / "zarr.json").is_file():
                raise XrcamConfigError(
                    f"{root}: no {MAPS_NAME} here; run `xrcam run ARCHIVE --out {root}` first"
                )
            return cls(root, cls._open_checked(maps, mode))
        settings = _normalise(dict(settings))
        if overwrite and root.exists():
            if maps.exists():
                shutil.rmtree(maps)
            for name in (_tables().FAILURES_NAME, RUN_NAME):
                (root / name).unlink(missing_ok=True)
            _tables().remove_reduction(root)
        if (maps / "zarr.json").is_file():
            group = cls._open_checked(maps, "r+")
            differences = settings_differences(group.attrs.get("settings") or {}, settings)
            if differences:
                raise XrcamConfigError(
                    f"{maps} was written with other settings:\n  "
                    + "\n  ".join(differences)
                    + "\nUse the same settings to resume, another --out, or --overwrite to replace it."
                )
            return cls(root, group)
        root.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(
            maps,
            mode="w",
            attributes={FORMAT_ATTR: STORE_FORMAT, "xrcam_version": __version__, "settings": settings},
        )
        store = cls(root, group)
        store._create_root_coords()
        return store

    @staticmethod
    def _open_checked(maps: Path, mode: str) -> zarr.Group:
        found = stored_format(maps.parent)
        if found != STORE_FORMAT:
            raise _old_format_error(maps, found)
        return zarr.open_group(maps, mode=mode, use_consolidated=False)

    def _create_root_coords(self) -> None:
        for name, values in ((METHOD, self.methods), (CLASS, self.classes), (LAYER, self.layers)):
            array = self.group.create_array(
                name, shape=(len(values),), dtype=str, dimension_names=(name,), overwrite=True
            )
            if values:
                array[:] = np.asarray(values, dtype=str)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.group.attrs["settings"])

    @property
    def methods(self) -> list[str]:
        return list(self.settings["methods"])

    @property
    def classes(self) -> list[str]:
        return list(self.settings.get("classes") or [])

    @property
    def layers(self) -> list[str]:
        return list(self.settings["layers"])

    @property
    def chunk_frames(self) -> int:
        return int(self.settings["chunk_frames"])

    def preprocess_config(self):
        """The run's :class:`xrcam.preprocess.PreprocessConfig`, rebuilt from the recorded settings."""
        from xrcam.preprocess import Crop, PreprocessConfig

        data = dict(self.settings.get("preprocessing") or {})
        crop = data.pop("crop", None)
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return PreprocessConfig(crop=Crop(*crop) if crop else None, **data)

    # ----------------------------------------------------------------- videos
    def video_keys(self) -> list[str]:
        return sorted(name for name, _ in self.group.groups())

    def _group(self, key: str) -> zarr.Group | None:
        try:
            node = self.group[key]
        except KeyError:
            return None
        return node if isinstance(node, zarr.Group) else None

    def video(self, key: str) -> zarr.Group | None:
        """A video's Zarr group (``attrs`` and arrays), or ``None`` when it has not been created."""
        return self._group(key)

    def layout(self, key: str) -> VideoLayout | None:
        """A video's layout, or ``None`` when its group is missing or was left half-created by a crash."""
        if key in self._layouts:
            return self._layouts[key]
        group = self._group(key)
        if group is None or not group.attrs.get("created"):
            return None
        layout = VideoLayout.from_json(group.attrs.asdict())
        self._layouts[key] = layout
        return layout

    def num_frames(self, key: str) -> int:
        layout = self.layout(key)
        if layout is None:
            raise KeyError(f"{self.root}: no video {key!r}")
        return layout.num_frames

    def shard_frames(self, layout: VideoLayout) -> int:
        return int(layout.shard_frames or self.chunk_frames)

    def create_video(self, layout: VideoLayout) -> zarr.Group:
        """Create a video's group and every array ('missing' fill values until a worker writes them).

        The coordinate arrays are written here: ``frame`` in the group; the grid coordinates in the root
        when the video's grid is the root's (or it is the first video), else in the group, after moving
        the root's into every other video (see the module docstring). The ``created`` attribute, set
        last, marks the group as usable (a crash before it leaves a group that counts as missing).
        """
        frames, chunk, n_classes = layout.num_frames, self.chunk_frames, layout.num_classes
        shard = self.shard_frames(layout)
        if shard % chunk:
            raise XrcamConfigError(f"shard of {shard} frames is not a multiple of chunk_frames={chunk}")
        held = self._root_grid(layout)
        shared = self._place_grid(layout, held)
        size, methods = layout.size, self.methods
        attrs = {
            **layout.to_json(),
            **_source_attrs(layout),
            "shards_done": [],
            "complete": False,
            "created": False,
        }
        group = self.group.create_group(layout.key, attributes=attrs, overwrite=True)
        per_frame: list[tuple[str, tuple[int, ...], str, tuple[str, ...], Any, dict]] = [
            (LOGITS, (frames, n_classes), "float32", (FRAME, CLASS), np.nan, {"long_name": "class logits"}),
            (GT_MASK, (frames, size, size), "uint8", (FRAME, Y, X), 0, {"long_name": "ground truth"}),
            (HAS_GT, (frames,), "bool", (FRAME,), False, {"long_name": "frame is annotated"}),
        ]
        if layout.map_shapes:
            if list(layout.map_shapes) != self.layers:
                raise XrcamConfigError(
                    f"{layout.video_id}: maps of layers {list(layout.map_shapes)}, the store's are {self.layers}"
                )
            grid = " ".join(f"{layer} {h}x{w}" for layer, (h, w) in layout.map_shapes.items())
            per_frame.append(
                (
                    MAPS,
                    (len(self.layers), len(methods), frames, *layout.map_grid),
                    "float16",
                    (LAYER, METHOD, FRAME, MAP_Y, MAP_X),
                    np.nan,
                    {
                        "long_name": "raw maps, every layer on the finest layer's grid (nearest)",
                        "grid": f"cells over the {size}-px crop: {grid}",
                    },
                )
            )
        for name, shape, dtype, dims, fill, array_attrs in per_frame:
            axis = dims.index(FRAME)
            inner, outer = (chunk, shard) if frames >= chunk else (max(frames, 1),) * 2
            group.create_array(
                name,
                shape=shape,
                chunks=(*shape[:axis], inner, *shape[axis + 1 :]),
                shards=(*shape[:axis], outer, *shape[axis + 1 :]),
                dtype=dtype,
                fill_value=fill,
                compressors=_compressor(dtype),
                dimension_names=dims,
                attributes=array_attrs,
            )
        frame = (
            FRAME,
            np.arange(frames, dtype=np.int64) * layout.frame_step,
            {"long_name": "source frame index"},
        )
        _write_coords(group, [frame, *([] if shared else _grid_coords(layout, own=True))])
        group.attrs["created"] = True
        self._layouts.pop(layout.key, None)
        if held and not shared:  # demoted: the root's consolidated metadata must stop listing its grid
            _consolidate(self.maps_path)
        return group

    def _root_grid(self, layout: VideoLayout) -> dict[str, int]:
        """Length of each grid coordinate the root holds; ``{}`` when every video holds its own.

        Looked up by name, not by listing the root, which would read every video group's metadata."""
        held = {}
        for name in (Y, X, MAP_Y, MAP_X):
            try:
                held[name] = self.group[name].shape[0]
            except KeyError:
                continue
        return held

    def _place_grid(self, layout: VideoLayout, held: Mapping[str, int]) -> bool:
        """Make the grid coordinates of ``layout`` available to its group before it is created: ``True``
        when the root holds them (the group then stores none), ``False`` when the group must hold its own.

        ``held``: :meth:`_root_grid`. The first video gives the root its grid; a video of another grid
        demotes the root's into every other video; once no grid is in the root (after a demotion, or in
        a store written before the root grid) every video holds its own. A set of root coordinates left
        incomplete by a crash never equals a video's, so it is replaced or demoted here.
        """
        wanted = {name: len(values) for name, values, _ in _grid_coords(layout)}
        if dict(held) == wanted:
            return True
        if not held and self._own_grids:
            return False
        others = [key for key in self.video_keys() if key != layout.key]
        if not others:  # the first video (or the first again, after a crash): the root takes its grid
            self._delete_root_grid(keep=wanted)
            _write_coords(self.group, _grid_coords(layout))
            return True
        if held:
            log.info(
                "%s: %s has another grid (%d px crop) than the videos before it; every video now holds "
                "its own coordinates",
                self.maps_path,
                layout.video_id,
                layout.size,
            )
            self._demote(others)
        self._own_grids = True
        return False

    def _demote(self, keys: Iterable[str]) -> None:
        """Write each video's own grid coordinates (from its own layout) into its group, then delete the
        root's. Idempotent: a demotion cut short by a crash is redone by the next one."""
        for key in keys:
            layout = self.layout(key)
            if layout is None:  # half-created: create_video redoes it whole, with its own coordinates
                continue
            group = self._group(key)
            _write_coords(group, _grid_coords(layout, own=True))
            if group.attrs.get("complete"):  # its consolidated metadata must list the new arrays
                _consolidate(self.maps_path, key)
        self._delete_root_grid()

    def _delete_root_grid(self, keep: Iterable[str] = ()) -> None:
        """Delete every root array but ``cam``, ``class``, ``layer`` and ``keep`` (lists the root: once
        per store)."""
        for name in [name for name in self.group.array_keys() if name not in {METHOD, CLASS, LAYER, *keep}]:
            del self.group[name]

    # ----------------------------------------------------------------- writing (workers)
    def write_shard(
        self,
        key: str,
        start: int,
        *,
        logits: np.ndarray,
        gt_mask: np.ndarray,
        has_gt_mask: np.ndarray,
        maps: Mapping[str, np.ndarray],
    ) -> None:
        """Write frames ``start : start + len(logits)`` of one video: one work shard (workers call this).

        ``maps[layer]``: ``(method, frames, h, w)`` in the store's method order, for every layer. Each
        array's shard file(s) for these frames are written once, whole.
        """
        group = self._group(key)
        if group is None or not group.attrs.get("created"):
            raise XrcamConfigError(f"{self.root}: video group {key!r} does not exist; the driver creates it")
        layout = self.layout(key)
        stop = start + len(logits)
        shard = self.shard_frames(layout)
        if start % shard or stop - start > shard or (stop % shard and stop != layout.num_frames):
            raise XrcamConfigError(
                f"{key}: frames {start}:{stop} are not one work shard of {shard} frames; resume with the "
                "--shard-chunks the store was created with"
            )
        if layout.map_shapes:
            group[MAPS][:, :, start:stop] = self._on_grid(layout, maps)
        group[GT_MASK][start:stop] = np.asarray(gt_mask, np.uint8)
        group[HAS_GT][start:stop] = has_gt_mask
        group[LOGITS][start:stop] = logits  # last: a row with logits is a written row

    @staticmethod
    def _on_grid(layout: VideoLayout, maps: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(layer, method, frames, *map_grid)``: every layer's maps replicated onto the stored grid."""
        if set(maps) != set(layout.map_shapes):
            raise XrcamConfigError(
                f"{layout.video_id}: maps of {sorted(maps)}, need {list(layout.map_shapes)}"
            )
        stacked = []
        for layer in layout.map_shapes:
            rows, columns = _layer_index(layout, layer, 0)
            stacked.append(np.asarray(maps[layer], np.float16)[:, :, rows[:, None], columns])
        return np.stack(stacked)

    # ----------------------------------------------------------------- reading
    def read_maps(
        self,
        key: str,
        positions: Sequence[int] | slice,
        methods: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """``{method: {layer: (n, h, w) float16}}`` raw maps of the frames at ``positions``."""
        stacks = self.read_stacks(key, positions, methods, layers)
        methods = list(methods) if methods is not None else self.methods
        return {m: {layer: s[i] for layer, s in stacks.items()} for i, m in enumerate(methods)}

    def read_stacks(
        self,
        key: str,
        positions: Sequence[int] | slice,
        methods: Sequence[str] | None = None,
        layers: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """``{layer: (method, n, h, w) float16}``: raw maps, one stack per layer at its own resolution
        (picked out of the stored grid exactly, :func:`layer_cells`)."""
        group, layout = self._group(key), self.layout(key)
        layers = list(layers) if layers is not None else list(layout.map_shapes)
        wanted = ([self.layers.index(layer) for layer in layers],)
        wanted += ([self.methods.index(m) for m in methods] if methods is not None else slice(None),)
        wanted += (positions if isinstance(positions, slice) else np.asarray(positions, dtype=np.int64),)
        stored = group[MAPS]
        if all(isinstance(part, slice) for part in wanted[1:]) and layers == self.layers:
            block = np.asarray(stored[(slice(None), *wanted[1:])])
        else:
            block = np.asarray(stored.get_orthogonal_selection(wanted))
        out = {}
        for i, layer in enumerate(layers):
            rows, columns = _layer_index(layout, layer, 1)
            out[layer] = block[i][:, :, rows[:, None], columns]
        return out

    def read_frame_arrays(self, key: str, positions: Sequence[int] | slice) -> dict[str, np.ndarray]:
        """Per-frame arrays of ``positions``: ``frame``, ``logits``, ``gt_mask`` (bool), ``has_gt_mask``."""
        group = self._group(key)
        sel = positions if isinstance(positions, slice) else np.asarray(positions, dtype=np.int64)

        def read(name):
            array = group[name]
            return np.asarray(array[sel] if isinstance(sel, slice) else array.get_orthogonal_selection(sel))

        return {
            FRAME: read(FRAME),
            LOGITS: read(LOGITS),
            GT_MASK: read(GT_MASK) > 0,
            HAS_GT: read(HAS_GT).astype(bool),
        }

    def read_gt(self, key: str, positions: Sequence[int]) -> np.ndarray:
        group = self._group(key)
        return np.asarray(group[GT_MASK].get_orthogonal_selection(np.asarray(positions, np.int64))) > 0

    def open_dataset(self, key: str):
        """One video as an ``xr.Dataset`` (lazy), with the store-wide ``cam``/``class``/``layer``
        coordinates, the grid coordinates (the root's, or the video's own), and derived from what is
        stored: each layer's raw maps at its own resolution (``layer4``: ``(cam, frame, layer4_y,
        layer4_x)``, picked out of ``maps`` exactly, lazily), the per-frame ``probabilities`` (softmax of
        the logits) and ``predicted`` (argmax; -1 where a frame was never written; :func:`predictions`).
        ``source_row``/``source_column`` are in its attrs and on ``y``/``x``."""
        import xarray as xr

        ds = xr.open_zarr(self.maps_path, group=key, consolidated=False, chunks=None)
        attrs = self._group(key).attrs.asdict()
        layout = self.layout(key)
        inherited = {}  # the grid coordinates a video inherits from the root (none once it holds its own)
        for name in ds.dims:
            if name in ds.coords or name in (METHOD, CLASS, LAYER):
                continue
            try:
                array = self.group[name]  # by name: listing the root would read every video's metadata
            except KeyError:
                continue
            inherited[name] = ((name,), np.asarray(array[:]), array.attrs.asdict())
        predicted, probabilities = predictions(np.asarray(ds[LOGITS].values))
        ds = ds.assign(
            probabilities=((FRAME, CLASS), probabilities, {"long_name": "softmax of the logits"}),
            predicted=((FRAME,), predicted, {"long_name": "predicted class index (-1: not written)"}),
        )
        ds = ds.assign_coords({METHOD: self.methods, CLASS: self.classes, LAYER: self.layers, **inherited})
        for name, formula in ((Y, SOURCE_ROW), (X, SOURCE_COLUMN)):
            if name in ds.coords and formula in attrs:
                ds[name].attrs[formula] = attrs[formula]
        if layout is not None and MAPS in ds:
            ds = ds.assign(self._own_resolution(ds[MAPS], layout))
        return ds.assign_attrs(attrs)

    @staticmethod
    def _own_resolution(maps, layout: VideoLayout) -> dict:
        """``{layer: DataArray}``: each layer's cells picked out of the stored grid (lazy)."""
        out = {}
        for layer, (h, w) in layout.map_shapes.items():
            coords = _cell_coords((h, w), layout.size, f"{layer}_y", f"{layer}_x")
            rows, columns = _layer_index(layout, layer, 1)
            picked = maps.sel({LAYER: layer}, drop=True).isel({MAP_Y: rows, MAP_X: columns})
            picked = picked.drop_vars([MAP_Y, MAP_X], errors="ignore")
            picked = picked.swap_dims(dict(zip((MAP_Y, MAP_X), coords, strict=True)))
            out[layer] = picked.assign_coords(coords).assign_attrs(
                long_name=f"raw {layer} maps", grid=f"{h}x{w} cells over the {layout.size}-px crop"
            )
        return out

    def open_datatree(self):
        """``xr.open_datatree(maps.zarr, engine="zarr")``, consolidating the metadata first if stale."""
        import xarray as xr

        if not self._consolidated_is_current():
            _consolidate(self.maps_path)
        return xr.open_datatree(self.maps_path, engine="zarr", chunks=None)

    def _consolidated_is_current(self) -> bool:
        meta = json.loads((self.maps_path / "zarr.json").read_text()).get("consolidated_metadata")
        if not meta:
            return False
        known = {name for name in meta.get("metadata", {}) if "/" not in name}
        return set(self.video_keys()) <= known

    # ----------------------------------------------------------------- completion
    def shards_done(self, key: str) -> set[tuple[int, int]]:
        group = self._group(key)
        return set() if group is None else {(int(a), int(b)) for a, b in group.attrs.get("shards_done", [])}

    def mark_done(self, key: str, start: int, stop: int) -> bool:
        """Record that frames ``start:stop`` of a video are written; returns whether the video is complete.

        A complete video's group metadata is consolidated (one read opens it)."""
        group = self._group(key)
        done = self.shards_done(key) | {(start, stop)}
        covered = sum(b - a for a, b in done)
        complete = covered >= self.layout(key).num_frames
        group.attrs.update({"shards_done": [list(r) for r in sorted(done)], "complete": complete})
        if complete:
            _consolidate(self.maps_path, key)
        return complete

    def is_complete(self, key: str) -> bool:
        group = self._group(key)
        return bool(group is not None and group.attrs.get("complete"))

    def consolidate(self) -> None:
        """Consolidate the whole store's metadata (the run does it when it writes its summary)."""
        _consolidate(self.maps_path)

    # ----------------------------------------------------------------- run outputs
    def write_failures(self, rows: Iterable[Mapping[str, Any]]) -> Path:
        """Replace the failures table with ``rows`` (schema: :data:`workflows.tables.FAILURE_SCHEMA`)."""
        return _tables().write_failures(self.root, rows)

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """Write ``run.json`` and consolidate the store's metadata (the end of a run)."""
        self.consolidate()
        path = self.root / RUN_NAME
        path.write_text(json.dumps(_normalise(dict(summary)), indent=2) + "\n")
        return path
