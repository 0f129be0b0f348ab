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

import timm
import torch
from torch import nn

from xrcam.errors import XrcamCheckpointError, XrcamConfigError

__all__ = [
    "SUPPORTED_MODELS",
    "STAGES",
    "stage_names",
    "load_model",
    "add_stage_dropout",
    "model_normalisation",
    "save_checkpoint",
    "read_checkpoint_sidecar",
    "load_state_dict",
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
STAGES = ("layer1", "layer2", "layer3", "layer4")
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


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise XrcamCheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise XrcamCheckpointError(
            f"{path}: refused: the file carries pickled Python objects, and loading it could run code. "
            "Re-save only the weights, e.g. torch.save(model.state_dict(), path) or xrcam.models.save_checkpoint"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise XrcamCheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise XrcamCheckpointError(
            f"{path}: expected a state_dict (name -> tensor) or {{'state_dict': ...}}, found {type(data).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def load_state_dict(model: nn.Module, path: str | Path, ignore_classifier: bool = False) -> None:
    """Load a checkpoint into ``model``, refusing a class-count or architecture mismatch with a clear reason.

    ``ignore_classifier=True`` keeps the model's own classifier (fine-tuning from ImageNet weights).
    """
    path = Path(path)
    state = _read_state_dict(path)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    head = next((n for n, m in model.named_modules() if m is classifier and n), None)
    if head is not None:
        head_keys = {f"{head}.weight", f"{head}.bias"}
        if ignore_classifier:
            state = {k: v for k, v in state.items() if k not in head_keys}
            state.update({k: v for k, v in model.state_dict().items() if k in head_keys})
        elif f"{head}.weight" in state:
            have, want = state[f"{head}.weight"].shape[0], classifier.out_features
            if have != want:
                raise XrcamCheckpointError(
                    f"{path}: checkpoint has {have} classes, model asks for {want}; pass num_classes={have} "
                    "or use a checkpoint trained for these classes"
                )
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    misshapen = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshapen:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
            if keys
        )
        raise XrcamCheckpointError(
            f"{path}: looks like a different architecture than {getattr(model, 'default_cfg', {}).get('architecture', type(model).__name__)} "
            f"({detail}); check the model name"
        )
    model.load_state_dict(state)


def load_model(
    name: str,
    num_classes: int = 2,
    checkpoint: str | Path | None = None,
    dropout: float | None = None,
    *,
    ignore_classifier: bool = False,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Build a supported timm backbone (random weights unless ``checkpoint``), in eval mode.

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
