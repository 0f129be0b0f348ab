"""Everything ``xrcam run`` checks before Ray starts and before the results folder is touched.

:func:`preflight` turns resolved :class:`~workflows.settings.RunSettings` into a :class:`Plan` (the
videos to explain, the rows already known to fail) or refuses with one sentence:

- model name, methods, LRP rules and CLRP start: checked by building the real model on the meta
  device (no weights, a fraction of a second) and an explainer on it;
- layers: against the model's own stages (:func:`xrcam.models.stage_names`), not any module name;
- weights: a ``--checkpoint`` that is readable and fits the model and the class list (checked on the
  meta device, mismatched keys named), or an explicit ``--random-init SEED``; never silently random;
- classes: from the checkpoint's sidecar or ``--classes``; never guessed from folder names when
  weights are given;
- the archive: not empty (the expected layout is named), a ``--crop`` that fits every video, and
  labels that are classes of the model (or, with ``--skip-unknown-labels``, failures).

Nothing here writes a file or starts a process, so a refused run leaves nothing behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workflows.settings import RunSettings
from xrcam.errors import XrcamConfigError, XrcamInputError

__all__ = ["Plan", "preflight", "check_model_settings", "failure_row", "EXPECTED_LAYOUT"]

EXPECTED_LAYOUT = (
    "a folder ROOT/<class>/<patient>/<video files (.mkt, .mp4, .avi, .tif) or frame folders>, "
    "or a .csv/.parquet manifest with the columns path, patient, label[, mask_path]"
)


@dataclass
class Plan:
    """What a checked run will do: its settings (methods and classes filled), videos and known failures."""

    settings: RunSettings
    root: Path
    entries: list[Any]  # xrcam.archive.VideoEntry
    failures: list[dict[str, Any]] = field(default_factory=list)  # discovery problems, unknown labels
    num_classes: int = 2


def failure_row(
    path: Any, video_id: str, shard: int, error_type: str, message: str, frame: int | None = None
) -> dict[str, Any]:
    """One row of ``failures.parquet`` (TEAM interface 9); ``video_id`` is the store's video key."""
    from workflows.store import video_key

    return {
        "path": str(path),
        "video_id": video_key(video_id),
        "shard": int(shard),
        "frame": None if frame is None else int(frame),
        "error_type": error_type,
        "message": message,
    }


def _meta_model(name: str, num_classes: int):
    import timm
    import torch

    from xrcam.models import SUPPORTED_MODELS

    if name not in SUPPORTED_MODELS:
        raise XrcamConfigError(
            f"model {name!r} is not supported; choose one of {', '.join(SUPPORTED_MODELS)}"
        )
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=num_classes)


def check_model_settings(settings: RunSettings, num_classes: int = 2) -> RunSettings:
    """Model, methods, layers, rules, CLRP and dropout checked against the real model (meta device).

    Returns ``settings`` with ``methods`` filled (all registered methods when not given).
    """
    import xrcam
    from xrcam.models import add_stage_dropout, stage_names

    model = _meta_model(settings.model, num_classes)
    stages = stage_names(model)
    layers = list(settings.layers)
    wrong = [layer for layer in layers if layer not in stages]
    if wrong or not layers:
        raise XrcamConfigError(
            f"layers {', '.join(wrong) or '(none)'}: not a stage of {settings.model}; "
            f"explain any of {', '.join(stages)}"
        )
    if len(set(layers)) != len(layers):
        raise XrcamConfigError(f"layers {', '.join(layers)}: a stage is listed twice")
    methods = list(settings.methods or xrcam.list_methods())
    if settings.dropout is not None:
        add_stage_dropout(model, float(settings.dropout))  # checks 0 < p < 1
    xrcam.create_explainer(model, methods=methods, layers=layers, rules=settings.rules, clrp=settings.clrp)
    return settings.replace(methods=tuple(methods))


def require_weights(checkpoint: str | None, random_init: int | None) -> None:
    """Exactly one of ``--checkpoint`` and ``--random-init SEED``: never silently random weights
    (``run`` and ``evaluate`` alike)."""
    if checkpoint and random_init is not None:
        raise XrcamConfigError(
            "--checkpoint and --random-init both given: explain with the checkpoint's weights (drop "
            "--random-init) or with seeded random weights (drop --checkpoint)"
        )
    if not checkpoint and random_init is None:
        raise XrcamConfigError(
            "no weights given: pass --checkpoint FILE (a model trained for these classes), or "
            "--random-init SEED to explain with seeded random weights (every worker then builds "
            "the same ones; for tests and demos only, the maps then mean nothing)"
        )


def _check_weights(settings: RunSettings) -> int | None:
    """The checkpoint's class count (``None`` for a random init); refuses a run without weights."""
    from xrcam.models import check_checkpoint

    require_weights(settings.checkpoint, settings.random_init)
    if not settings.checkpoint:
        return None
    classes = list(settings.classes) if settings.classes else None
    have = check_checkpoint(settings.model, settings.checkpoint, len(classes) if classes else None)
    if classes is None:
        raise XrcamConfigError(
            f"{settings.checkpoint}: no sidecar ({Path(settings.checkpoint).name}.json) names the classes "
            f"of these weights ({have} outputs); pass --classes with the {have} class names in the "
            "model's logit order, e.g. --classes glioblastoma,meningioma"
        )
    return have


def _discover(settings: RunSettings):
    from xrcam.archive import discover_archive

    source = Path(settings.archive)
    if not source.exists():
        raise XrcamInputError(source, f"not found; give {EXPECTED_LAYOUT}")
    archive = discover_archive(source)
    if not archive.entries and not archive.problems:
        raise XrcamInputError(source, f"no videos found; expected {EXPECTED_LAYOUT}")
    return archive


def _split_entries(entries: list, settings: RunSettings) -> list:
    """The videos of ``settings.split``: the checkpoint's own split when its sidecar records one
    (so ``--split test`` explains exactly the videos the model never trained on), else a fresh
    patient-level split with the library defaults."""
    from xrcam.archive import split_patients
    from xrcam.models import read_checkpoint_sidecar

    recorded = (
        (read_checkpoint_sidecar(settings.checkpoint) or {}).get("split") if settings.checkpoint else None
    )
    if recorded and recorded.get("videos"):
        wanted = set(recorded["videos"].get(settings.split, []))
        return [e for e in entries if e.video_id in wanted]
    options = {k: recorded[k] for k in ("fractions", "seed") if recorded and recorded.get(k) is not None}
    splits = split_patients(entries, **options)
    return [e for e in entries if splits.get(e.patient) == settings.split]


def _problem_rows(archive, settings: RunSettings) -> list[dict[str, Any]]:
    """Discovery problems as failure rows: shard -1 for a rejected video, else the shard of the frame."""
    from xrcam.archive import relative_id

    rows = []
    for problem in archive.problems:
        video_id = relative_id(Path(problem.video or problem.path), archive.root)
        if problem.rejected:
            shard = -1
        else:  # a problem of a video that is still explained (its masks): the shard the frame lies in
            position = (problem.frame or 0) // settings.frame_step
            shard = position // settings.shard_frames
        rows.append(
            failure_row(problem.path, video_id, shard, "XrcamInputError", str(problem), problem.frame)
        )
    return rows


def _check_crop(settings: RunSettings, entries: list) -> None:
    if settings.crop is None:
        return
    from xrcam.preprocess import Crop

    crop = Crop(*settings.crop)
    misfits = [e for e in entries if e.frame_shape is not None and not crop.fits(e.frame_shape)]
    if misfits:
        first = misfits[0]
        raise XrcamConfigError(
            f"crop {','.join(map(str, crop))} does not fit {len(misfits)} video(s), e.g. {first.video_id} "
            f"({first.frame_shape[1]}x{first.frame_shape[0]} pixels): x + size must be <= width and "
            "y + size <= height; drop --crop to detect each video's field of view"
        )


def _nothing_usable(settings: RunSettings, problems: list[str]) -> None:
    first = problems[0] if problems else "no videos"
    raise XrcamInputError(
        settings.archive,
        f"no usable videos: {len(problems)} rejected (first: {first}); expected {EXPECTED_LAYOUT}",
    )


def preflight(settings: RunSettings) -> Plan:
    """Check everything a run can check without starting it; see the module docstring.

    Raises an :class:`xrcam.errors.XrcamError` with one sentence at the first problem.
    """
    classes = list(settings.classes) if settings.classes else None
    settings = check_model_settings(settings, len(classes) if classes else 2)
    have = _check_weights(settings)
    archive = _discover(settings)
    entries = list(archive.entries)
    if settings.split:
        entries = _split_entries(entries, settings)
        if not entries:
            raise XrcamConfigError(
                f"{settings.archive}: no videos in the {settings.split} split; check --split"
            )
    if not entries:
        _nothing_usable(settings, [str(p) for p in archive.problems])
    if classes is None:  # random weights only: class order has no meaning, take the labels sorted
        classes = sorted({e.label for e in archive.entries})
        if len(classes) < 2:
            raise XrcamConfigError(
                f"{settings.archive}: fewer than two classes among the usable videos "
                f"({', '.join(classes) or 'none'}); pass --classes with at least two class names"
            )
    settings = settings.replace(classes=tuple(classes))
    if have is not None and have != len(classes):
        raise XrcamConfigError(
            f"{settings.checkpoint}: checkpoint has {have} classes, --classes names {len(classes)}"
        )
    failures = _problem_rows(archive, settings)
    unknown = sorted({e.label for e in entries} - set(classes))
    if unknown:
        videos = [e for e in entries if e.label in unknown]
        if not settings.skip_unknown_labels:
            raise XrcamConfigError(
                f"label(s) {', '.join(unknown)} of {len(videos)} video(s) (e.g. {videos[0].video_id}) are "
                f"not classes of the model ({', '.join(classes)}); fix the labels, pass --classes in the "
                "model's logit order, or --skip-unknown-labels to record these videos as failures"
            )
        failures += [
            failure_row(
                e.path,
                e.video_id,
                -1,
                "UnknownLabel",
                f"{e.path}: label {e.label!r} is not a class of the model ({', '.join(classes)}); skipped",
            )
            for e in videos
        ]
        entries = [e for e in entries if e.label not in unknown]
    if not entries:
        _nothing_usable(settings, [row["message"] for row in failures])
    _check_crop(settings, entries)
    return Plan(
        settings=settings, root=archive.root, entries=entries, failures=failures, num_classes=len(classes)
    )
