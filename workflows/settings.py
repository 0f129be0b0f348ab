"""Settings of ``xrcam run``: defaults <- TOML file <- environment / command line <- checkpoint sidecar.

One frozen dataclass carries every setting to the driver and, as a plain dict, to each worker (workers
get their configuration through constructor arguments, never module globals). The subset that changes
what is written (:meth:`RunSettings.store_settings`) is recorded in the store and checked on resume.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xrcam.errors import XrcamConfigError

__all__ = ["RunSettings", "DEFAULT_LAYERS", "load_toml", "parse_crop"]

DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class RunSettings:
    """Everything ``xrcam run`` needs; field names are the TOML keys (dashes accepted too)."""

    archive: str
    out: str
    model: str = "skresnext50_32x4d"
    checkpoint: str | None = None
    classes: tuple[str, ...] | None = None  # class names in logit order; default: sorted archive labels
    dropout: float | None = None
    methods: tuple[str, ...] | None = None  # default: every registered method
    layers: tuple[str, ...] = DEFAULT_LAYERS
    rules: str = "reference"
    clrp: str = "unit"
    frame_step: int = 2
    crop: tuple[int, int, int] | None = None  # x, y, size override of FOV detection
    preprocessing: dict[str, Any] = field(default_factory=dict)  # extra Preprocessor settings (sidecar)
    chunk_frames: int = 32
    shard_chunks: int = 4  # a shard is this many chunks of one video
    batch_size: int = 16
    workers: int | None = None  # default: one per GPU, else CPU cores // 2 (at least 1)
    address: str | None = None  # Ray cluster to join; None starts a local one on 127.0.0.1
    split: str | None = None  # only videos of this patient split (train/val/test)
    overwrite: bool = False
    device: str | None = None  # default: cuda when the worker sees a GPU, else cpu

    def __post_init__(self) -> None:
        for name in ("frame_step", "chunk_frames", "shard_chunks", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise XrcamConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.workers is not None and self.workers < 1:
            raise XrcamConfigError(f"workers must be at least 1, got {self.workers}")
        if self.split not in (None, "train", "val", "test"):
            raise XrcamConfigError(f"split must be train, val or test, got {self.split!r}")

    @property
    def shard_frames(self) -> int:
        return self.chunk_frames * self.shard_chunks

    @classmethod
    def resolve(cls, config: str | Path | None = None, **given: Any) -> RunSettings:
        """Merge the TOML file ``config`` with ``given`` (command line/environment; ``None`` = not given),
        then fill the model settings from the checkpoint's sidecar."""
        values: dict[str, Any] = load_toml(config) if config else {}
        values.update({k: v for k, v in given.items() if v is not None})
        for key in ("methods", "layers", "classes"):
            if isinstance(values.get(key), str):
                values[key] = tuple(filter(None, (part.strip() for part in values[key].split(","))))
            elif values.get(key) is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("crop"), str):
            values["crop"] = parse_crop(values["crop"])
        elif values.get("crop") is not None:
            values["crop"] = tuple(int(v) for v in values["crop"])
        for key in ("archive", "out"):
            if key not in values:
                raise XrcamConfigError(f"no {key} given: pass it on the command line or in the config file")
            values[key] = str(Path(values[key]).expanduser().resolve())
        if values.get("checkpoint"):
            values["checkpoint"] = str(Path(values["checkpoint"]).expanduser().resolve())
            values = _with_sidecar(values, explicit=set(values))
        return cls(**values)

    def store_settings(self, checkpoint_sha256: str | None, classes: list[str]) -> dict[str, Any]:
        """The settings that decide what is written; a resumed run must match them exactly."""
        return {
            "archive": self.archive,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": checkpoint_sha256,
            "classes": list(classes),
            "dropout": self.dropout,
            "methods": list(self.methods or ()),
            "layers": list(self.layers),
            "rules": self.rules,
            "clrp": self.clrp,
            "preprocessing": self.preprocess_config().to_dict(),
            "chunk_frames": self.chunk_frames,
        }

    def preprocess_config(self):
        """This run's :class:`xrcam.preprocess.PreprocessConfig` (sidecar extras, frame step, crop)."""
        from xrcam.preprocess import Crop, PreprocessConfig

        extras = {k: tuple(v) if isinstance(v, list) else v for k, v in self.preprocessing.items()}
        try:
            return PreprocessConfig(
                frame_step=self.frame_step, crop=Crop(*self.crop) if self.crop else None, **extras
            )
        except (TypeError, ValueError) as exc:
            raise XrcamConfigError(f"preprocessing settings {self.preprocessing!r}: {exc}") from exc

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a run config: top-level keys (or a ``[run]`` table) named like the command-line options."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise XrcamConfigError(f"{path}: cannot read the run config ({exc})") from exc
    data = data.get("run", data)
    known = {f.name for f in dataclasses.fields(RunSettings)}
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise XrcamConfigError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for key in ("archive", "out", "checkpoint"):  # relative paths are relative to the config file
        if isinstance(values.get(key), str):
            values[key] = str((path.parent / values[key]).expanduser())
    return values


def parse_crop(text: str) -> tuple[int, int, int]:
    """``"x,y,size"`` -> ``(x, y, size)``."""
    try:
        x, y, size = (int(part) for part in text.split(","))
    except ValueError:
        raise XrcamConfigError(
            f"crop must be three integers x,y,size (e.g. 173,174,230), got {text!r}"
        ) from None
    if x < 0 or y < 0 or size < 1:
        raise XrcamConfigError(f"crop {text!r}: x and y must be >= 0 and size >= 1")
    return x, y, size


def _with_sidecar(values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """Fill model, classes, dropout and preprocessing from the checkpoint's JSON sidecar.

    A value the user gave explicitly that contradicts the sidecar is an error: the weights were trained
    for the sidecar's settings and would silently give wrong maps otherwise.
    """
    from xrcam.models import read_checkpoint_sidecar

    sidecar: Mapping[str, Any] = read_checkpoint_sidecar(values["checkpoint"]) or {}
    filled = dict(values)
    for key in ("model", "classes", "dropout"):
        if sidecar.get(key) is None:
            continue
        wanted = tuple(sidecar[key]) if key == "classes" else sidecar[key]
        if key in explicit and filled.get(key) != wanted:
            raise XrcamConfigError(
                f"{values['checkpoint']}: checkpoint was trained with {key}={wanted!r} "
                f"but this run asks for {key}={filled[key]!r}; drop the option or use a matching checkpoint"
            )
        filled[key] = wanted
    # frame_step and crop are run settings (which frames, where the FOV is), not properties of the weights
    preprocessing = {
        k: v for k, v in dict(sidecar.get("preprocessing") or {}).items() if k not in ("frame_step", "crop")
    }
    filled["preprocessing"] = {**preprocessing, **dict(values.get("preprocessing") or {})}
    return filled
