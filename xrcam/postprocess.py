"""From raw per-layer maps to normalised maps, layer aggregates, binary masks and IoU (SPEC §5).

Everything here is batched torch on the maps' own device: a batch of maps ``(B, h, w)`` goes in, a
batch comes out, with no numpy round-trip, so the same code serves the CPU tests, a GPU worker and
the Parquet reduction.

Example::

    norm = {layer: normalize(exp.maps["xrelevancecam"][layer], size=230, method="xrelevancecam")
            for layer in exp.maps["xrelevancecam"]}
    agg = aggregate(norm, parse_layer_set("4+3+2+1"))
    pred = make_masks(agg, rule="mean+std")
    scores = iou(pred, gt)                    # (B,), NaN where both masks are empty
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from xrcam.errors import XrcamConfigError

__all__ = [
    "RELEVANCE_METHODS",
    "STANDARD_LAYER_SETS",
    "THRESHOLD_RULES",
    "aggregate",
    "default_relu",
    "format_layer_set",
    "iou",
    "make_masks",
    "minmax",
    "normalize",
    "otsu_threshold",
    "parse_layer_set",
    "thresholds",
]

#: Methods whose maps come from LRP relevance; every other method belongs to the gradient family.
RELEVANCE_METHODS = frozenset({"relevancecam", "xrelevancecam"})

#: The layer sets of the paper's Table 2, deepest stage first.
STANDARD_LAYER_SETS = ("4", "4+3", "4+3+2", "4+3+2+1")

#: Mask rules accepted by :func:`thresholds` and :func:`make_masks`.
THRESHOLD_RULES = ("mean+std", "fraction", "otsu")

_EPS = 1e-8


def default_relu(method: str) -> bool:
    """Whether ``method`` rectifies its map before normalising (SPEC §5).

    The gradient family does (as its papers and peer libraries do); the relevance family does not
    (as the published XRelevanceCAM code does), so negative relevance stays at the bottom of the scale.
    """
    return method not in RELEVANCE_METHODS


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max scaling of ``(B, ...)`` to [0, 1]; a constant sample becomes all zeros, never NaN."""
    flat = maps.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    return (maps - lo) / (hi - lo + _EPS)


def normalize(
    maps: torch.Tensor,
    size: int | tuple[int, int] | None = None,
    *,
    method: str | None = None,
    relu: bool | None = None,
) -> torch.Tensor:
    """Raw stage-resolution maps ``(B, h, w)`` -> ``(B, S, S)`` in [0, 1] on the crop grid.

    Order: optional ReLU at the stage's own resolution (as torch-cam / pytorch-grad-cam rectify the
    CAM before resizing), bilinear upsampling to ``size`` with ``align_corners=False`` (skipped when
    ``size`` is None or already matches), then per-sample min-max with a 1e-8 guard.
    ``relu=None`` takes the family default of ``method`` (:func:`default_relu`); ``True``/``False``
    force it. Computation is in float32 (or float64 if given) whatever the stored dtype.
    """
    if maps.dim() != 3:
        raise XrcamConfigError(f"normalize expects maps of shape (B, h, w), got {tuple(maps.shape)}")
    if relu is None:
        if method is None:
            raise XrcamConfigError("normalize needs either method= (for the family default) or relu=")
        relu = default_relu(method)
    x = maps if maps.dtype == torch.float64 else maps.float()
    if relu:
        x = x.clamp_min(0)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return minmax(x)


def parse_layer_set(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"4+3+2+1"`` -> ``("layer4", "layer3", "layer2", "layer1")``; layer names pass through.

    Accepts stage numbers or names (``"layer4+layer3"``) joined by ``+``, or an iterable of either.
    Order is kept (it does not change the mean); duplicates are an error.
    """
    parts = text.split("+") if isinstance(text, str) else list(text)
    layers = []
    for part in parts:
        part = str(part).strip()
        if part.isdigit():
            part = f"layer{part}"
        if not (part.startswith("layer") and part[5:].isdigit()):
            raise XrcamConfigError(
                f"bad layer set {text!r}: use stage numbers joined by '+', e.g. '4+3+2+1' or 'layer4+layer3'"
            )
        layers.append(part)
    if not layers or len(set(layers)) != len(layers):
        raise XrcamConfigError(f"bad layer set {text!r}: give each stage once, e.g. '4+3'")
    return tuple(layers)


def format_layer_set(layers: str | Iterable[str]) -> str:
    """``("layer4", "layer3")`` -> ``"4+3"``: the inverse of :func:`parse_layer_set`."""
    return "+".join(layer[5:] for layer in parse_layer_set(layers))


def aggregate(normalised: Mapping[str, torch.Tensor], layer_set: str | Sequence[str]) -> torch.Tensor:
    """Mean of the normalised maps of ``layer_set``, min-max scaled again (paper §3.3, Table 2).

    ``normalised`` maps layer name -> ``(B, S, S)`` maps already on the common crop grid
    (see :func:`normalize`).
    """
    layers = parse_layer_set(layer_set)
    missing = [layer for layer in layers if layer not in normalised]
    if missing:
        raise XrcamConfigError(
            f"layer set {format_layer_set(layers)!r} needs maps of {missing}; "
            f"explain those layers too (have {sorted(normalised)})"
        )
    return minmax(torch.stack([normalised[layer] for layer in layers]).mean(dim=0))


def otsu_threshold(maps: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold per sample of ``(B, ...)``, evaluated exactly at every distinct value.

    Values are sorted once per sample; splitting after sorted position ``i`` puts the ``i+1`` smallest
    values in the background. The between-class variance ``w0 w1 (mu0 - mu1)^2`` is maximised over
    the splits that fall between two *different* values (an infinitely fine histogram, so no bin
    count to choose). The returned threshold is the largest background value: foreground is
    ``map > threshold``. A constant sample has no split and gets its value (an empty mask).
    """
    x = maps.flatten(1).double()
    n = x.shape[1]
    v = x.sort(dim=1).values
    csum = v.cumsum(dim=1)
    total = csum[:, -1:]
    n0 = torch.arange(1, n + 1, device=x.device, dtype=x.dtype)
    n1 = n - n0
    mu0 = csum / n0
    mu1 = (total - csum) / n1.clamp_min(1)
    between = (n0 / n) * (n1 / n) * (mu0 - mu1) ** 2
    valid = torch.zeros_like(v, dtype=torch.bool)
    valid[:, :-1] = v[:, 1:] > v[:, :-1]
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    best = between.argmax(dim=1, keepdim=True)
    has_split = valid.any(dim=1)
    t = torch.where(has_split, v.gather(1, best)[:, 0], v[:, -1])
    return t.to(maps.dtype if maps.is_floating_point() else torch.float32)


def thresholds(maps: torch.Tensor, rule: str = "mean+std", *, fraction: float = 0.5) -> torch.Tensor:
    """Per-sample mask threshold ``(B,)`` of normalised maps ``(B, S, S)``; foreground is ``map > t``.

    - ``"mean+std"`` (default, the published code's rule): mean plus population standard deviation.
    - ``"fraction"``: ``fraction`` times the sample's maximum.
    - ``"otsu"``: :func:`otsu_threshold`.
    """
    flat = maps.flatten(1).float() if maps.dtype != torch.float64 else maps.flatten(1)
    if rule == "mean+std":
        return flat.mean(dim=1) + flat.std(dim=1, correction=0)
    if rule == "fraction":
        if not 0.0 <= fraction <= 1.0:
            raise XrcamConfigError(f"mask fraction must be in [0, 1], got {fraction}")
        return fraction * flat.max(dim=1).values
    if rule == "otsu":
        return otsu_threshold(flat)
    raise XrcamConfigError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def make_masks(maps: torch.Tensor, rule: str = "mean+std", *, fraction: float = 0.5) -> torch.Tensor:
    """Binary saliency masks ``(B, S, S)`` bool: ``map > thresholds(map, rule)``.

    The strict inequality makes an all-zero map (e.g. a normalised constant map) an empty mask.
    """
    t = thresholds(maps, rule, fraction=fraction)
    return maps > t.view(-1, *([1] * (maps.dim() - 1))).to(maps.dtype)


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over union per sample of boolean masks ``(B, S, S)`` -> ``(B,)`` float32.

    NaN where both masks are empty (IoU undefined); 0 where only the prediction or only the ground
    truth is empty.
    """
    if pred.shape != gt.shape:
        raise XrcamConfigError(
            f"mask shapes differ: prediction {tuple(pred.shape)} vs ground truth {tuple(gt.shape)}"
        )
    p, g = pred.bool().flatten(1), gt.bool().flatten(1)
    inter = (p & g).sum(dim=1).float()
    union = (p | g).sum(dim=1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))
