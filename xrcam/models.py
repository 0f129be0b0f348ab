"""Backbones xrcam explains: timm ResNet-family models, safe checkpoints, and the dropout variant.

``load_model`` returns the timm module itself (its ``state_dict`` is timm's), in eval mode, built with
``pretrained=False`` so nothing is ever downloaded. Weights come only from a local file read with
``torch.load(weights_only=True)`` (or safetensors), which cannot execute code; a file that needs
pickled objects is refused instead.

The dropout variant (paper §4.6) appends ``nn.Dropout(p)`` to each stage ``layer1..layer4``: the stage
output the explainer reads is still called ``layerN``, and because dropout has no parameters the
variant's ``state_dict`` is key-for-key a plain one, so plain checkpoints load into it and back.

Example::

    model = load_model("skresnext50_32x4d", num_classes=2, checkpoint="run/model.pt", dropout=0.1)
    mean, std = model_normalisation(model)
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from xrcam.errors import XrcamCheckpointError, XrcamConfigError

__all__ = [
    "SUPPORTED_MODELS",
    "stage_names",
    "load_model",
    "add_stage_dropout",
    "model_normalisation",
    "save_checkpoint",
    "read_checkpoint_sidecar",
    "load_state_dict",
    "read_state_dict",
    "check_state_dict",
    "check_checkpoint",
    "checkpoint_num_classes",
    "file_sha256",
]

SUPPORTED_MODELS = (
    "skresnext50_32x4d",
    "resnet50",
    "resnext50_32x4d",
    "resnet18",
    "resnet34",
    "skresnet18",
    "skresnet34",
)
_STAGE_NAME = re.compile(r"^layer\d+$")


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The explainable stages of ``model`` (its ``layerN`` residual stages), input side first.

    Read from timm's ``feature_info`` when the model has one (the stem ``act1`` is not a stage),
    else from its top-level ``layerN`` children. Works on a model built on the meta device.
    """
    info = getattr(model, "feature_info", None)
    names: list[str] = []
    if info is not None:
        try:
            names = [entry["module"] for entry in info]
        except (TypeError, KeyError):
            names = list(info.module_name()) if hasattr(info, "module_name") else []
    if not names:
        names = [name for name, _ in model.named_children()]
    stages = [name for name in names if _STAGE_NAME.match(name)]
    return tuple(sorted(dict.fromkeys(stages), key=lambda name: int(name[5:])))


def add_stage_dropout(model: nn.Module, p: float) -> nn.Module:
    """Append ``nn.Dropout(p)`` to each stage in place (parameter-free: the state_dict keys do not change)."""
    if not 0.0 < p < 1.0:
        raise XrcamConfigError(f"dropout must lie strictly between 0 and 1, got {p}")
    for name in stage_names(model):
        stage = model.get_submodule(name)
        if not isinstance(stage, nn.Sequential):
            raise XrcamConfigError(f"stage {name} of {type(model).__name__} is not an nn.Sequential")
        stage.append(nn.Dropout(p))
    return model


def model_normalisation(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone expects (timm ``pretrained_cfg``; ImageNet values for these models)."""
    config = timm.data.resolve_data_config({}, model=model)
    return tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"])


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, for provenance records (``checkpoint_sha256``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sidecar_path(path: str | Path) -> Path:
    return Path(f"{path}.json")


def read_checkpoint_sidecar(path: str | Path) -> dict | None:
    """The JSON written beside a checkpoint by :func:`save_checkpoint` (``<path>.json``), or ``None``."""
    sidecar = _sidecar_path(path)
    if not sidecar.exists():
        return None
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise XrcamCheckpointError(
            f"{sidecar}: unreadable checkpoint sidecar ({exc}); fix or delete it"
        ) from exc
    if not isinstance(data, dict):
        raise XrcamCheckpointError(f"{sidecar}: checkpoint sidecar must hold a JSON object")
    return data


def save_checkpoint(model: nn.Module, path: str | Path, sidecar: Mapping | None = None) -> Path:
    """Write a plain ``state_dict`` (CPU tensors only, loadable with ``weights_only=True``) and ``<path>.json``.

    ``sidecar`` carries what a reader needs to rebuild and trust the model: model name, classes,
    preprocessing, dropout, split, metrics. Returns the checkpoint path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    if sidecar is not None:
        _sidecar_path(path).write_text(json.dumps(dict(sidecar), indent=2, sort_keys=True, default=str))
    return path


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "net")  # what training scripts nest weights under


def _unwrap(data: Any) -> Any:
    """The state_dict inside the usual wrappers (``{"state_dict": ...}``, ``{"model": ...}``, nested)."""
    for _ in range(3):
        if not isinstance(data, Mapping) or all(isinstance(v, torch.Tensor) for v in data.values()):
            return data
        inner = next((data[k] for k in _WRAPPER_KEYS if isinstance(data.get(k), Mapping)), None)
        if inner is None:
            return data
        data = inner
    return data


def _torch_load(path: Path) -> Any:
    import argparse

    # torchvision's and timm's training scripts store their argparse.Namespace beside the weights:
    # a plain record of options that is safe to rebuild, unlike arbitrary pickled objects
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file, as ``name -> tensor`` with the usual wrappers removed.

    Accepts a plain ``state_dict``, ``{"state_dict": ...}`` / ``{"model": ...}`` (training scripts'
    checkpoints with optimizer, epoch and argparse options beside the weights), DataParallel /
    DistributedDataParallel ``module.`` prefixes, and ``.safetensors`` files. torchvision's ResNet
    ``state_dict`` keys are timm's, so torchvision-layout ResNet checkpoints load unchanged. A file that
    needs pickled Python objects is refused (loading it could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise XrcamCheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise XrcamCheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    else:
        try:
            data = _torch_load(path)
        except pickle.UnpicklingError as exc:
            if "GLOBAL" not in str(exc).upper():  # not a pickled object: the bytes are not a checkpoint
                raise XrcamCheckpointError(
                    f"{path}: not a readable PyTorch checkpoint (damaged, or not written by torch.save)"
                ) from exc
            raise XrcamCheckpointError(
                f"{path}: refused: the file carries pickled Python objects, and loading it could run code. "
                "Re-save only the weights, e.g. torch.save(model.state_dict(), path) or xrcam.models.save_checkpoint"
            ) from exc
        except Exception as exc:  # torch's unpickler raises many types for damaged files
            raise XrcamCheckpointError(
                f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
            ) from exc
    data = _unwrap(data)
    if (
        not isinstance(data, Mapping)
        or not data
        or not all(isinstance(v, torch.Tensor) for v in data.values())
    ):
        found = (
            f"a dict with keys {', '.join(map(str, list(data)[:6]))}"
            if isinstance(data, Mapping)
            else type(data).__name__
        )
        raise XrcamCheckpointError(
            f"{path}: expected a state_dict (name -> tensor), {{'state_dict': ...}} or {{'model': ...}}, "
            f"found {found}"
        )
    state = {str(k): v for k, v in data.items()}
    while state and all(k.startswith("module.") for k in state):  # (nested) DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _head_name(model: nn.Module) -> str | None:
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    return next((n for n, m in model.named_modules() if m is classifier and n), None)


def checkpoint_num_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """How many classes the weights in ``state`` were trained for (rows of ``model``'s classifier)."""
    head = _head_name(model)
    weight = state.get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _matching_models(state: Mapping[str, torch.Tensor], num_classes: int) -> list[str]:
    """The supported backbones whose parameter names and shapes equal those of ``state``."""
    found = []
    for name in SUPPORTED_MODELS:
        with torch.device("meta"):
            candidate = timm.create_model(name, pretrained=False, num_classes=num_classes)
        own = candidate.state_dict()
        if set(own) == set(state) and all(own[k].shape == state[k].shape for k in own):
            found.append(name)
    return found


def _name_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, *, ignore_classifier: bool = False
) -> dict[str, torch.Tensor]:
    """``state`` ready for ``model.load_state_dict``, or a refusal that names the mismatched keys.

    Works with ``model`` on the meta device (shapes only), so a run can check a checkpoint in a
    fraction of a second before any worker starts.
    """
    state = dict(state)
    head = _head_name(model)
    if head is not None:
        head_keys = {f"{head}.weight", f"{head}.bias"}
        if ignore_classifier:
            state = {k: v for k, v in state.items() if k not in head_keys}
            state.update({k: v for k, v in model.state_dict().items() if k in head_keys})
        else:
            have, want = checkpoint_num_classes(model, state), model.get_classifier().out_features
            if have is not None and have != want:
                raise XrcamCheckpointError(
                    f"{path}: checkpoint has {have} classes, model asks for {want}; pass num_classes={have} "
                    "(on the command line: --classes with its class names in logit order) "
                    "or use a checkpoint trained for these classes"
                )
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        architecture = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
        detail = "; ".join(
            f"{label}: {_name_list(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                (
                    "wrong shape",
                    [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshapen],
                ),
            )
            if keys
        )
        classes = checkpoint_num_classes(model, state) or 2
        matches = [m for m in _matching_models(state, classes) if m != architecture]
        hint = (
            f"it matches {', '.join(matches)}: pass --model {matches[0]}"
            if matches
            else "check the model name"
        )
        raise XrcamCheckpointError(f"{path}: the weights do not fit {architecture} ({detail}); {hint}")
    return state


def load_state_dict(model: nn.Module, path: str | Path, ignore_classifier: bool = False) -> None:
    """Load a checkpoint into ``model``, refusing a class-count or architecture mismatch with a clear reason.

    ``ignore_classifier=True`` keeps the model's own classifier (fine-tuning from ImageNet weights).
    """
    state = check_state_dict(model, read_state_dict(path), path, ignore_classifier=ignore_classifier)
    model.load_state_dict(state)


def check_checkpoint(
    name: str, checkpoint: str | Path, num_classes: int | None = None, *, ignore_classifier: bool = False
) -> int:
    """Check, without building real weights, that ``checkpoint`` loads into model ``name``.

    Reads the file (memory-mapped where possible), compares its keys and shapes with the model built
    on the meta device, and returns the number of classes the weights were trained for. Raises
    :class:`XrcamCheckpointError` naming the problem (unreadable, pickled code, wrong architecture
    with the mismatched keys, wrong class count).
    """
    if name not in SUPPORTED_MODELS:
        raise XrcamConfigError(
            f"model {name!r} is not supported; choose one of {', '.join(SUPPORTED_MODELS)}"
        )
    state = read_state_dict(checkpoint)
    with torch.device("meta"):
        probe = timm.create_model(name, pretrained=False, num_classes=int(num_classes or 2))
    have = checkpoint_num_classes(probe, state)
    if num_classes is None and have is not None:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, num_classes=have)
    check_state_dict(probe, state, checkpoint, ignore_classifier=ignore_classifier)
    return have if have is not None else int(num_classes or 2)


def load_model(
    name: str,
    num_classes: int = 2,
    checkpoint: str | Path | None = None,
    dropout: float | None = None,
    *,
    ignore_classifier: bool = False,
    device: str | torch.device | None = None,
    seed: int | None = None,
) -> nn.Module:
    """Build a supported timm backbone (random weights unless ``checkpoint``), in eval mode.

    ``seed`` makes the random initialisation reproducible: every process that builds the model with
    the same seed gets identical weights (torch's global generator is seeded just for the build and
    restored afterwards).

    A sidecar ``<checkpoint>.json`` written by :func:`save_checkpoint` is checked against the request
    (model name, number of classes) and attached as ``model.xrcam_checkpoint`` with the file's SHA-256.
    """
    if name not in SUPPORTED_MODELS:
        raise XrcamConfigError(
            f"model {name!r} is not supported; choose one of {', '.join(SUPPORTED_MODELS)}"
        )
    if int(num_classes) < 2:
        raise XrcamConfigError(f"num_classes must be at least 2, got {num_classes}")
    sidecar = read_checkpoint_sidecar(checkpoint) if checkpoint is not None else None
    if sidecar is not None:
        saved_name = sidecar.get("model")
        if saved_name is not None and saved_name != name:
            raise XrcamCheckpointError(
                f"{checkpoint}: checkpoint was trained as {saved_name!r}, model asks for {name!r}"
            )
        classes = sidecar.get("classes")
        if isinstance(classes, list) and len(classes) != num_classes and not ignore_classifier:
            raise XrcamCheckpointError(
                f"{checkpoint}: checkpoint has {len(classes)} classes ({', '.join(map(str, classes))}), "
                f"model asks for {num_classes}"
            )
    if seed is None:
        model = timm.create_model(name, pretrained=False, num_classes=int(num_classes))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = timm.create_model(name, pretrained=False, num_classes=int(num_classes))
    if checkpoint is not None:
        load_state_dict(model, checkpoint, ignore_classifier=ignore_classifier)
        model.xrcam_checkpoint = {
            "path": str(checkpoint),
            "sha256": file_sha256(checkpoint),
            "sidecar": sidecar,
        }
    if dropout:
        add_stage_dropout(model, float(dropout))
    if device is not None:
        model.to(device)
    return model.eval()
