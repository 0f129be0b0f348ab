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

__all__ = ["RunSettings", "DEFAULT_LAYERS", "load_toml", "coerce_settings"]

#: The one named stage list: ``--layers``' default, needed before any model is built (``--help``, the
#: settings recorded in a store). Everything else reads the stages from the model
#: (:func:`xrcam.models.stage_names`); preflight checks these against them, and every supported model has
#: exactly these (tests/test_models.py).
DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")


@dataclass(frozen=True)
class RunSettings:
    """Everything ``xrcam run`` needs; field names are the TOML keys (dashes accepted too)."""

    archive: str
    out: str
    model: str = "skresnext50_32x4d"
    checkpoint: str | None = None
    random_init: int | None = None  # without a checkpoint: seed of the random weights every worker builds
    classes: tuple[str, ...] | None = None  # class names in logit order (the sidecar's, or --classes)
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
    skip_unknown_labels: bool = False  # record videos whose label is not a class as failures, not refuse
    overwrite: bool = False
    device: str | None = None  # default: cuda when the worker sees a GPU, else cpu

    def __post_init__(self) -> None:
        for name in ("frame_step", "chunk_frames", "shard_chunks", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise XrcamConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.workers is not None and self.workers < 1:
            raise XrcamConfigError(f"workers must be at least 1, got {self.workers}")
        if self.random_init is not None and self.random_init < 0:
            raise XrcamConfigError(f"random_init must be a seed >= 0, got {self.random_init}")
        if self.classes is not None:
            classes = list(self.classes)
            if len(classes) < 2 or len(set(classes)) != len(classes) or not all(classes):
                raise XrcamConfigError(
                    f"classes must name at least two distinct classes in the model's logit order, got {classes}"
                )
        if self.split not in (None, "train", "val", "test"):
            raise XrcamConfigError(f"split must be train, val or test, got {self.split!r}")

    @property
    def shard_frames(self) -> int:
        return self.chunk_frames * self.shard_chunks

    @classmethod
    def resolve(cls, config: str | Path | None = None, **given: Any) -> RunSettings:
        """Merge the TOML file ``config`` with ``given`` (command line/environment; ``None`` = not given),
        then fill the model settings from the checkpoint's sidecar."""
        values: dict[str, Any] = coerce_settings(load_toml(config), str(config)) if config else {}
        values.update(coerce_settings({k: v for k, v in given.items() if v is not None}, "the command line"))
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
            "random_init": None if self.checkpoint else self.random_init,
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


_INT = ("frame_step", "chunk_frames", "shard_chunks", "batch_size", "workers", "random_init")
_TEXT = ("archive", "out", "model", "checkpoint", "rules", "clrp", "address", "split", "device")
_NAMES = ("classes", "methods", "layers")
_FLAGS = ("overwrite", "skip_unknown_labels")


def _crop(value: Any, key: str) -> tuple[int, int, int]:
    from xrcam.preprocess import Crop

    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be 'x,y,size' (e.g. \"173,174,230\"), got {value!r}")
    return tuple(Crop.parse(value))


def coerce_settings(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` with each setting checked for its type (and comma lists split), or one sentence
    naming the key, its value and what it must be: ``run.toml: batch_size = 'eight' must be an integer``."""
    out = dict(values)
    for key, value in values.items():
        kind = None
        try:
            if key in _INT:
                kind = "an integer"
                if isinstance(value, bool) or not isinstance(value, int):
                    if not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
                        raise ValueError
                    value = int(value)
            elif key == "dropout":
                kind = "a number between 0 and 1"
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                value = float(value)
            elif key in _TEXT:
                kind = "a text value"
                if not isinstance(value, str):
                    raise ValueError
            elif key in _NAMES:
                kind = 'a list of names ("a,b" or ["a", "b"])'
                if isinstance(value, str):
                    value = tuple(filter(None, (part.strip() for part in value.split(","))))
                elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                    value = tuple(v.strip() for v in value)
                else:
                    raise ValueError
            elif key in _FLAGS:
                kind = "true or false"
                if not isinstance(value, bool):
                    raise ValueError
            elif key == "crop":
                value = _crop(value, key)
            elif key == "preprocessing":
                kind = "a table of preprocessing settings"
                if not isinstance(value, Mapping):
                    raise ValueError
        except (ValueError, TypeError) as exc:
            reason = f"must be {kind}" if kind else str(exc)
            raise XrcamConfigError(f"{source}: {key} = {value!r} {reason}") from None
        out[key] = value
    return out


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
