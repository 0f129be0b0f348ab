"""Evaluation metrics of explanation maps: mIoU, the axiom metrics and the sanity check (SPEC §5).

- :func:`mean_iou` — weakly supervised segmentation score over correctly classified annotated frames
  (paper §4.2); frames whose ground truth is empty are counted apart, never averaged.
- :func:`conservation`, :func:`sensitivity` and :func:`axiom_metrics` — the XGradCAM axioms (Fu 2020)
  as the paper's Table 4 evaluates them (§4.8): the score ``S_c`` is the contrastive score
  ``L_t - (N-1) L_t / N`` (CLRP ``"logit"`` start) for the relevance family and the target logit for
  the gradient family. The ``K`` channel ablations of a stage are batched and re-run only the network
  above that stage (:func:`stage_head`).
- :func:`spearman`, :func:`ssim` and :func:`cascading_randomization` — the model-parameter
  randomisation test of Adebayo et al. 2018 (paper §4.7).

Example::

    results = axiom_metrics(model, images, methods=["gradcam", "xrelevancecam"], layers=["layer4"])
    results["xrelevancecam"]["layer4"].conservation   # (B,), ~0: an identity of the method
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xrcam.errors import XrcamConfigError
from xrcam.explain import create_explainer, method_family
from xrcam.hooks import capture, model_state
from xrcam.models import stage_names
from xrcam.scoring import normalize

__all__ = [
    "AxiomResult",
    "MeanIoU",
    "ablation_logits",
    "axiom_metrics",
    "cascading_randomization",
    "conservation",
    "contrastive_score",
    "logit_score",
    "mean_iou",
    "randomize_stage_",
    "score_function",
    "sensitivity",
    "spearman",
    "ssim",
    "stage_activations",
    "stage_head",
]

Head = Callable[[torch.Tensor], torch.Tensor]
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- mIoU
@dataclass(frozen=True)
class MeanIoU:
    """mIoU and the frame counts behind it, so a table can say what was (not) averaged."""

    miou: float  # mean IoU over `frames` (NaN when there are none)
    frames: int  # annotated, correctly classified frames with a non-empty ground truth
    empty_gt: (
        int  # annotated, correctly classified frames whose ground truth is empty: reported, not averaged
    )
    misclassified: int  # annotated frames left out because the prediction was wrong


def mean_iou(ious, *, correct, has_gt, gt_empty) -> MeanIoU:
    """mIoU over frames that carry a ground-truth mask and were classified correctly (paper §4.2).

    All arguments are per-frame 1-D arrays or tensors of the same length: IoU (any value where there
    is no ground truth), correctness, whether the frame is annotated, and whether its mask is empty.
    """
    ious = torch.from_numpy(
        np.array(ious, dtype=np.float64)
    ).flatten()  # a copy: pandas arrays may be read-only
    correct, has_gt, gt_empty = (
        torch.from_numpy(np.array(a, dtype=bool)).flatten() for a in (correct, has_gt, gt_empty)
    )
    if not (len(ious) == len(correct) == len(has_gt) == len(gt_empty)):
        raise XrcamConfigError("mean_iou: ious, correct, has_gt and gt_empty must have one entry per frame")
    kept = has_gt & correct & ~gt_empty
    value = ious[kept].mean().item() if kept.any() else math.nan
    return MeanIoU(
        miou=value,
        frames=int(kept.sum()),
        empty_gt=int((has_gt & correct & gt_empty).sum()),
        misclassified=int((has_gt & ~correct).sum()),
    )


# ----------------------------------------------------------------------------------- scores S_c
def logit_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``S_c = L_t``: the gradient family's score. ``logits`` (..., N), ``target`` broadcastable to (...)."""
    return logits.gather(-1, target.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


def contrastive_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``S_c = L_t - (N-1) L_t / N``: the total relevance of a CLRP ``"logit"`` start (paper §3.2).

    The target class starts with ``L_t`` and each of the ``N-1`` others with ``-L_t/N``, so LRP
    conserves ``L_t / N`` at every stage. For an ablated pass the target stays the original one.
    """
    n = logits.shape[-1]
    return logit_score(logits, target) / n


def score_function(method: str) -> ScoreFn:
    """The score the axiom metrics use for ``method``: its family's (:class:`xrcam.explain.Family`
    ``score``): contrastive for the relevance family, the target logit otherwise."""
    family = method_family(method)
    return contrastive_score if family is not None and family.score == "contrastive" else logit_score


# ------------------------------------------------------------------------------------ axioms
@dataclass(frozen=True)
class AxiomResult:
    """Per-frame axiom metrics of one method at one layer (lower is better)."""

    conservation: torch.Tensor  # (B,)
    sensitivity: torch.Tensor  # (B,)


def conservation(score: torch.Tensor, contributions: torch.Tensor) -> torch.Tensor:
    """``|S_c(A) - sum_k sum_hw w_k A_k| / |S_c(A)|`` per frame (NaN where ``S_c(A) = 0``).

    ``score`` (B,); ``contributions`` (B, K) holds each channel's ``sum_hw`` of its term of the map.
    """
    total = contributions.double().sum(dim=1)
    s = score.double()
    return _ratio((s - total).abs(), s.abs())


def sensitivity(score: torch.Tensor, ablated: torch.Tensor, contributions: torch.Tensor) -> torch.Tensor:
    """``sum_k |S_c(A) - S_c(A\\A_k) - c_k| / sum_k |S_c(A) - S_c(A\\A_k)|`` per frame.

    NaN where no ablation changes the score (the ratio is undefined).

    ``score`` (B,), ``ablated`` (B, K) the score with channel ``k`` zeroed, ``contributions`` (B, K).
    """
    drop = score.double()[:, None] - ablated.double()
    num = (drop - contributions.double()).abs().sum(dim=1)
    return _ratio(num, drop.abs().sum(dim=1))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` as float32, NaN (undefined, left out of averages) where ``den`` is 0."""
    return torch.where(den > 0, num / den.clamp_min(1e-300), math.nan).to(torch.float32)


def ablation_logits(head: Head, activation: torch.Tensor, *, chunk_size: int = 64) -> torch.Tensor:
    """Logits ``(B, K, N)`` of ``head`` applied to ``activation`` (B, K, h, w) with channel k zeroed.

    The ``B*K`` ablated copies are evaluated ``chunk_size`` at a time, which bounds memory to
    ``chunk_size`` copies of the stage activation plus the head's own activations.
    ``head`` is any callable from a stage activation to logits, e.g. :func:`stage_head`.
    """
    if chunk_size < 1:
        raise XrcamConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    b, k = activation.shape[:2]
    frame = torch.arange(b, device=activation.device).repeat_interleave(k)
    channel = torch.arange(k, device=activation.device).repeat(b)
    out = []
    with torch.no_grad():
        for start in range(0, b * k, chunk_size):
            f, c = frame[start : start + chunk_size], channel[start : start + chunk_size]
            x = activation[f].clone()
            x[torch.arange(len(f), device=x.device), c] = 0
            out.append(head(x))
    logits = torch.cat(out)
    return logits.view(b, k, logits.shape[-1])


def stage_head(model: nn.Module, layer: str) -> Head:
    """Callable running a timm ResNet-family model from the output of ``layer`` to its logits.

    It applies the stages above ``layer`` (:func:`xrcam.models.stage_names`) in order, then
    ``model.forward_head`` (pooling, dropout, classifier). Only the network above the ablated stage is
    re-run.
    """
    stages = stage_names(model)
    if layer not in stages:
        raise XrcamConfigError(f"unknown stage {layer!r}; explain one of {', '.join(stages)}")
    if not hasattr(model, "forward_head"):
        raise XrcamConfigError(f"{type(model).__name__} has no forward_head; pass a head callable instead")
    above = [model.get_submodule(name) for name in stages[stages.index(layer) + 1 :]]

    def head(x: torch.Tensor) -> torch.Tensor:
        for stage in above:
            x = stage(x)
        return model.forward_head(x)

    return head


def stage_activations(
    model: nn.Module, images: torch.Tensor, layers: Sequence[str]
) -> tuple[dict, torch.Tensor]:
    """Outputs of ``layers`` and the logits of one no-grad forward pass: ``({layer: A}, logits)``."""
    with capture(model, layers, detach=True) as captured, torch.no_grad():
        logits = model(images)
    return dict(captured), logits


def axiom_metrics(
    model: nn.Module,
    images: torch.Tensor,
    *,
    methods: Sequence[str],
    layers: Sequence[str] | None = None,
    target: torch.Tensor | int | None = None,
    rules: str = "reference",
    chunk_size: int = 64,
    heads: dict[str, Head] | None = None,
) -> dict[str, dict[str, AxiomResult]]:
    """Conservation and sensitivity per frame for each method and layer (paper §4.8, Table 4).

    The explainer runs with ``clrp="logit"`` and ``contributions=True`` so that ``S_c`` is a real
    score and ``exp.contributions[method][layer][:, k] = sum_hw w_k A_k``. The ablated scores keep the
    explained target. ``heads`` overrides :func:`stage_head` per layer (for non-timm models).
    ``layers`` default to the model's stages. The model runs in eval mode (dropout off); its flags are
    restored afterwards.
    """
    layers = tuple(stage_names(model) if layers is None else layers)
    images = images.to(next(model.parameters()).device)
    with model_state(model, training=False):
        explainer = create_explainer(
            model, methods=list(methods), layers=tuple(layers), rules=rules, clrp="logit", contributions=True
        )
        exp = explainer(images, target=target)
        acts, logits = stage_activations(model, images, layers)
        tgt = exp.target.to(logits.device)
        results: dict[str, dict[str, AxiomResult]] = {m: {} for m in methods}
        for layer in layers:
            head = (heads or {}).get(layer) or stage_head(model, layer)
            with torch.no_grad():
                check = head(acts[layer])
            if not torch.allclose(check, logits, rtol=1e-3, atol=1e-4):
                raise XrcamConfigError(
                    f"the head above {layer} does not reproduce the model's logits; "
                    "this model needs an explicit heads= mapping"
                )
            ablated = ablation_logits(head, acts[layer], chunk_size=chunk_size)
            for method in methods:
                score_fn = score_function(method)
                score = score_fn(exp.logits.to(logits.device), tgt)
                contrib = exp.contributions[method][layer].to(logits.device)
                results[method][layer] = AxiomResult(
                    conservation=conservation(score, contrib).cpu(),
                    sensitivity=sensitivity(score, score_fn(ablated, tgt[:, None]), contrib).cpu(),
                )
    return results


# ------------------------------------------------------------------------------ sanity check
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..P-1 per row of ``(B, P)``, ties sharing their average rank (as scipy's ``rankdata``)."""
    v, order = x.sort(dim=1)
    b, p = v.shape
    starts = torch.ones_like(v, dtype=torch.bool)
    starts[:, 1:] = v[:, 1:] != v[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    pos = torch.arange(p, device=x.device, dtype=torch.float64).expand(b, p)
    total = torch.zeros(b, p, dtype=torch.float64, device=x.device).scatter_add_(1, group, pos)
    count = torch.zeros(b, p, dtype=torch.float64, device=x.device).scatter_add_(
        1, group, torch.ones_like(pos)
    )
    avg = (total / count.clamp_min(1)).gather(1, group)
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample of ``(B, ...)`` pairs -> ``(B,)``; NaN if a sample is constant."""
    if a.shape != b.shape:
        raise XrcamConfigError(f"spearman: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _average_ranks(a.flatten(1)), _average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    den = (ra.square().sum(dim=1) * rb.square().sum(dim=1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(dim=1) / den.clamp_min(1e-300), math.nan).float()


def _gaussian(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, window: int = 11, sigma: float = 1.5):
    """Mean structural similarity per sample of maps ``(B, H, W)`` -> ``(B,)`` (Wang et al. 2004).

    Gaussian-weighted local statistics (``window`` x ``window``, ``sigma``), K1 = 0.01, K2 = 0.03,
    averaged over the positions where the window fits inside the map ("valid"). The window shrinks to
    the largest odd size that fits a smaller map.
    """
    x, y = a.float(), b.float()
    size = min(window, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    g = _gaussian(size, sigma, x.device, x.dtype)
    # the five local moments in one pass of the separable Gaussian (rows, then columns)
    stack = torch.stack([x, y, x * x, y * y, x * y], dim=1).flatten(0, 1)[:, None]
    moments = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mx, my, xx, yy, xy = moments.view(len(x), 5, *moments.shape[-2:]).double().unbind(dim=1)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(dim=1).float()


def randomize_stage_(model: nn.Module, stage: str, *, seed: int = 0) -> nn.Module:
    """Re-initialise every parameterised module of ``stage`` in place (``reset_parameters``), seeded.

    BatchNorm layers are reset too (unit scale, zero shift, fresh running statistics), as a freshly
    built network would have them.
    """
    target = model.get_submodule(stage)
    cuda = sorted({p.device.index or 0 for p in target.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for module in target.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def cascading_randomization(
    model: nn.Module,
    images: torch.Tensor,
    *,
    methods: Sequence[str],
    layers: Sequence[str] | None = None,
    stages: Sequence[str] | None = None,
    size: int | None = None,
    target: torch.Tensor | int | None = None,
    seed: int = 0,
    relu: bool | None = None,
    **explainer_options,
) -> list[dict]:
    """Cascading randomisation from the top stage down (Adebayo et al. 2018, paper §4.7).

    Explains ``images`` with the trained model, then on a deep copy re-initialises ``stages`` one
    after the other (default: the model's stages from the top, layer4, then layer3, ...) and explains again after each step with the original
    target (``layers``: default the model's stages). Each method/layer map is normalised
    (:func:`xrcam.scoring.normalize` with ``relu``,
    None = family default; upsampled to ``size``) and compared with the original. Returns one record per
    (step, method, layer): ``step`` (1 = top stage randomised), ``randomized`` (e.g. ``"4+3"``),
    ``method``, ``layer``, mean ``spearman`` and ``ssim`` over the ``frames``, and ``spearman_frames``:
    the frames where the rank correlation is defined (a constant map has none; NaN when there are
    none). The given model is not modified.
    """
    size = size or images.shape[-1]
    layers = tuple(stage_names(model) if layers is None else layers)
    stages = tuple(reversed(stage_names(model)) if stages is None else stages)

    def maps_of(net: nn.Module, tgt):
        exp = create_explainer(net, methods=list(methods), layers=tuple(layers), **explainer_options)(
            images, target=tgt
        )
        return exp.target, {
            (m, layer): normalize(exp.maps[m][layer], size, method=m, relu=relu)
            for m in methods
            for layer in layers
        }

    with model_state(model, training=False):
        tgt, original = maps_of(model, target)
    randomized = copy.deepcopy(model).eval()
    records = []
    for step, stage in enumerate(stages, start=1):
        randomize_stage_(randomized, stage, seed=seed + step)
        _, maps = maps_of(randomized, tgt)
        done = "+".join(s.removeprefix("layer") for s in stages[:step])
        for (method, layer), ref in original.items():
            rho = spearman(ref, maps[(method, layer)])
            sim = ssim(ref, maps[(method, layer)])
            records.append(
                {
                    "step": step,
                    "randomized": done,
                    "method": method,
                    "layer": layer,
                    "spearman": float(rho.nanmean()),
                    "ssim": float(sim.mean()),
                    "frames": len(rho),
                    "spearman_frames": int(rho.isfinite().sum()),
                }
            )
    return records
