"""The one scoring core (SPEC §5): raw per-stage maps -> normalised, aggregated maps -> masks -> IoU.

``xrcam reduce``, ``xrcam evaluate``, the report and the read API (:mod:`workflows.results`) all call
this module, so they agree by construction. Everything is batched torch on the maps' own device (CPU
or GPU), batched over frames *and* methods: a stage's maps of every method arrive as one
``(M, B, h, w)`` tensor, are upsampled in one ``interpolate`` call, and the layer sets, masks and IoU
of all methods come out as ``(K, M, B)`` tensors.

Steps, each also usable on its own:

- :func:`normalize` / :func:`normalize_stack`: optional ReLU at the stage's own resolution (the
  gradient family's default, :func:`default_relu`), bilinear upsampling to the crop grid
  (``align_corners=False``), per-sample min-max with a 1e-8 guard (a constant map becomes zeros).
- :func:`aggregate` / :func:`aggregate_stack`: mean of the normalised maps of a layer set, min-max again.
- :func:`thresholds` / :func:`make_masks`: ``mean+std`` (default), ``fraction`` of the max, ``otsu``.
- :func:`iou`: per-sample IoU, NaN where both masks are empty.
- :func:`score_batch`: all of the above for every method and layer set at once, plus mask areas,
  reference rows (random, centre, oracle, intensity via :mod:`xrcam.references`) and the sign check
  (``inverted_<method>``: the negated raw map through the same steps).

Example::

    norm = {layer: normalize(exp.maps["xrelevancecam"][layer], size=230, method="xrelevancecam")
            for layer in exp.maps["xrelevancecam"]}
    agg = aggregate(norm, parse_layer_set("4+3+2+1"))
    pred = make_masks(agg, rule="mean+std")
    scores = iou(pred, gt)                    # (B,), NaN where both masks are empty
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xrcam.errors import XrcamConfigError

__all__ = [
    "STANDARD_LAYER_SETS",
    "THRESHOLD_RULES",
    "INVERTED_PREFIX",
    "Scores",
    "aggregate",
    "aggregate_stack",
    "default_relu",
    "release_scratch",
    "format_layer_set",
    "iou",
    "make_masks",
    "minmax",
    "normalize",
    "normalize_stack",
    "otsu_threshold",
    "parse_layer_set",
    "parse_threshold",
    "rank_correlation",
    "score_batch",
    "score_stacks",
    "thresholds",
]

#: The layer sets of the paper's Table 2, deepest stage first.
STANDARD_LAYER_SETS = ("4", "4+3", "4+3+2", "4+3+2+1")

#: Mask rules accepted by :func:`thresholds` and :func:`make_masks`.
THRESHOLD_RULES = ("mean+std", "fraction", "otsu")

#: Name prefix of the sign-check rows: the method's negated raw map through the same steps.
INVERTED_PREFIX = "inverted_"

_EPS = 1e-8

#: Cells per side of the pooled maps whose ranks the method agreement compares (see rank_correlation).
_AGREEMENT_GRID = 32

_SCRATCH = threading.local()  # reusable batch-sized buffers of score_stacks (see _scratch)


def _scratch(name: object, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of ``shape`` for an intermediate of :func:`score_stacks`, reused from call to call.

    Every fresh multi-MB temporary is a new mapping, page-faulted anew (and, freed, can leave the heap
    fragmented); reusing ~10 buffers per thread makes scoring ~1.8x faster (one batch of 8 frames, 7
    methods, 7 layer sets at 230 px, one thread: 181-194 -> 101-102 ms) and keeps a reducing process
    at the size of one batch. Never handed out to callers (``keep_maps`` results are fresh).
    :func:`release_scratch` frees them (reduce does after each video).
    """
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    n = math.prod(shape)
    key = (name, dtype, torch.device(device))
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < n:
        buffer = cache[key] = torch.empty(n, dtype=dtype, device=device)
    return buffer[:n].view(*shape)


def release_scratch() -> None:
    """Free this thread's reusable scoring buffers."""
    _SCRATCH.buffers = {}


def default_relu(method: str) -> bool:
    """Whether ``method`` rectifies its map before normalising (SPEC §5): :func:`xrcam.explain.default_relu`.

    The gradient family does (as its papers and peer libraries do); the relevance family does not
    (as the published XRelevanceCAM code does), so negative relevance stays at the bottom of the
    scale. Names that are not registered methods (reference maps, ``inverted_<method>`` sign checks)
    are not rectified. The explainer's registry is the only source; it is imported on first use, so
    importing this module stays light.
    """
    from xrcam.explain import default_relu as family_default

    return family_default(method)


def parse_threshold(text: str) -> tuple[str, float]:
    """``"mean+std"`` (also ``meanstd``), ``"fraction:0.5"``, ``"otsu"`` -> ``(rule, fraction)``."""
    rule, _, value = str(text).strip().lower().partition(":")
    rule = {"meanstd": "mean+std", "mean_std": "mean+std"}.get(rule, rule)
    if rule not in THRESHOLD_RULES or (value and rule != "fraction"):
        raise XrcamConfigError(
            f"unknown threshold {text!r}: use mean+std, fraction:<0..1> (e.g. fraction:0.5) or otsu"
        )
    try:
        fraction = float(value) if value else 0.5
    except ValueError:
        raise XrcamConfigError(
            f"threshold {text!r}: the fraction must be a number, e.g. fraction:0.5"
        ) from None
    if not 0.0 <= fraction <= 1.0:
        raise XrcamConfigError(f"threshold {text!r}: the fraction must be between 0 and 1")
    return rule, fraction


def format_threshold(text: str) -> str:
    """Canonical spelling of a threshold: ``mean+std``, ``fraction:0.5`` or ``otsu``."""
    rule, fraction = parse_threshold(text)
    return f"fraction:{fraction:g}" if rule == "fraction" else rule


def minmax(
    maps: torch.Tensor, *, out: torch.Tensor | None = None, bounds: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample min-max scaling of ``(B, ...)`` to [0, 1]; a constant sample becomes all zeros, never NaN.

    ``out`` (may be ``maps`` itself) receives the result without a temporary; ``bounds`` ``(B, 2)``, if
    given, receives each sample's minimum and divisor ``max - min + 1e-8``.
    """
    flat = maps.flatten(1)
    lo = flat.amin(dim=1).view(-1, *([1] * (maps.dim() - 1)))  # amin/amax: same values, ~6x faster
    hi = flat.amax(dim=1).view(-1, *([1] * (maps.dim() - 1)))  # than min/max, which also find indices
    if out is None:
        out = maps - lo
    else:
        torch.sub(maps, lo, out=out)
    span = hi - lo + _EPS
    if bounds is not None:
        bounds[:, 0] = lo.view(-1)
        bounds[:, 1] = span.view(-1)
    return out.div_(span)


def _minmax_last2(
    maps: torch.Tensor, *, out: torch.Tensor | None = None, bounds: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`minmax` over the last two dims of a tensor of any leading shape (``bounds``: ``(*lead, 2)``)."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, *maps.shape[-2:])
    target = None if out is None else out.view(-1, *maps.shape[-2:])
    bounds_out = None if bounds is None else bounds.view(-1, 2)
    return minmax(flat, out=target, bounds=bounds_out).reshape(*lead, *maps.shape[-2:])


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
    return normalize_stack(maps[None], size, relu=[relu])[0]


def normalize_stack(
    maps: torch.Tensor,
    size: int | tuple[int, int] | None,
    *,
    relu: Sequence[bool] | torch.Tensor,
    out: torch.Tensor | None = None,
    bounds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Raw maps of several methods at one stage ``(M, B, h, w)`` -> ``(M, B, S, S)`` in [0, 1].

    ``relu[m]`` says whether method ``m`` is rectified first. One ``interpolate`` call for all.
    ``out``: a float32 ``(M, B, S, S)`` tensor to write into (float32 maps only). ``bounds``: an
    ``(M, B, 2)`` tensor that receives each map's minimum and min-max divisor (see :func:`minmax`).
    """
    if maps.dim() != 4:
        raise XrcamConfigError(f"normalize_stack expects maps of shape (M, B, h, w), got {tuple(maps.shape)}")
    x = maps if maps.dtype == torch.float64 else maps.float()
    flags = torch.as_tensor(list(relu) if not isinstance(relu, torch.Tensor) else relu, dtype=torch.bool)
    if flags.numel() != x.shape[0]:
        raise XrcamConfigError(f"relu needs one flag per method ({x.shape[0]}), got {flags.numel()}")
    if flags.all():
        x = x.clamp_min(0)
    elif flags.any():
        x = torch.where(flags.to(x.device).view(-1, 1, 1, 1), x.clamp_min(0), x)
    m, b, h, w = x.shape
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        if (h, w) != size:
            if out is not None and x.dtype == torch.float32:
                # F.interpolate's own kernel (size given, no scale factors), written into ``out``
                torch._C._nn.upsample_bilinear2d(
                    x.reshape(m * b, 1, h, w), size, False, None, None, out=out.view(m * b, 1, *size)
                )
                return _minmax_last2(out, out=out, bounds=bounds)
            x = F.interpolate(x.reshape(m * b, 1, h, w), size=size, mode="bilinear", align_corners=False)
            x = x.reshape(m, b, *size)
            return _minmax_last2(x, out=x, bounds=bounds)  # in place: ours
    if out is not None and x.dtype == torch.float32:
        return _minmax_last2(x, out=out, bounds=bounds)
    return _minmax_last2(x, bounds=bounds)


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

    ``normalised`` maps layer name -> ``(B, S, S)`` (or ``(M, B, S, S)``) maps already on the common
    crop grid (see :func:`normalize`).
    """
    layers = parse_layer_set(layer_set)
    missing = [layer for layer in layers if layer not in normalised]
    if missing:
        raise XrcamConfigError(
            f"layer set {format_layer_set(layers)!r} needs maps of {missing}; "
            f"explain those layers too (have {sorted(normalised)})"
        )
    return _minmax_last2(torch.stack([normalised[layer] for layer in layers]).mean(dim=0))


def aggregate_stack(
    normalised: torch.Tensor,
    layers: Sequence[str],
    layer_sets: Sequence[str],
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(L, M, B, S, S)`` normalised maps of ``layers`` -> ``(K, M, B, S, S)``, one per layer set.

    A single-layer set is that layer's normalised map (min-max of an already [0, 1] map, as
    :func:`aggregate` gives); a multi-layer set is the mean over its layers, min-max again.
    ``normalised`` is left as it is (the scoring core's own walk, :func:`_layer_set_maps`, consumes it).
    """
    if out is None:
        out = normalised.new_empty((len(layer_sets), *normalised.shape[1:]))
    for k, maps in _layer_set_maps(normalised.clone(), layers, layer_sets):
        out[k].copy_(maps)
    return out


def _layer_set_maps(
    normalised: torch.Tensor, layers: Sequence[str], layer_sets: Sequence[str]
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(k, maps)`` for every layer set ``k``: its aggregated ``(M, B, S, S)`` maps, valid until the
    next step. Consumes ``normalised`` (a single-layer set is written over its layer's maps).

    Arithmetic as :func:`aggregate` does it: sequential float32 sums, one division (bit for bit
    ``torch.mean`` over a stacked dim 0), min-max. Sets sharing a prefix share its partial sum (4,
    4+3, 4+3+2 ... are one running sum), and every step that can is done in place: the multi-layer
    sets first, walking the tree of their prefixes (a sum is extended in place by its last branch,
    and a set that no later set extends is divided in place), then the single-layer sets over their
    own layer's maps. A fresh destination costs ~3x an in-place pass over 56 maps of 230 px (the
    writes miss the cache), and the batch's working set shrinks from ~15 to ~6 maps per method
    (``_scratch`` buffers: one for the sets' maps, one per branching depth for the sums).
    """
    index = {layer: i for i, layer in enumerate(layers)}
    picks = []
    for layer_set in layer_sets:
        wanted = parse_layer_set(layer_set)
        missing = [layer for layer in wanted if layer not in index]
        if missing:
            raise XrcamConfigError(
                f"layer set {format_layer_set(wanted)!r} needs maps of {missing}; have {list(layers)}"
            )
        picks.append(tuple(index[layer] for layer in wanted))
    shape, dtype, device = normalised.shape[1:], normalised.dtype, normalised.device
    work = _scratch("set_maps", shape, dtype, device)
    multi = [k for k, p in enumerate(picks) if len(p) > 1]
    for first in dict.fromkeys(picks[k][0] for k in multi):
        yield from _prefix_walk((first,), normalised[first], False, picks, normalised, work)
    singles = [k for k, p in enumerate(picks) if len(p) == 1]
    for i, k in enumerate(singles):
        (layer,) = picks[k]
        single = normalised[layer]
        # min-max of a min-max'd map: its minimum is exactly 0, so (x - 0) / (max - 0 + eps) needs
        # only the maximum (bit for bit what minmax computes)
        hi = single.flatten(-2).amax(dim=-1)[..., None, None]
        later = any(picks[j] == (layer,) for j in singles[i + 1 :])
        yield k, torch.div(single, hi + _EPS, out=work if later else single)


def _prefix_walk(
    prefix: tuple[int, ...],
    total: torch.Tensor,
    owned: bool,
    picks: Sequence[tuple[int, ...]],
    normalised: torch.Tensor,
    work: torch.Tensor,
) -> Iterator[tuple[int, torch.Tensor]]:
    """The multi-layer sets of :func:`_layer_set_maps` under ``prefix``, whose maps sum to ``total``
    (``owned``: a sum buffer of ours, free to overwrite). A module-level function, not a closure
    calling itself: that closure would be a reference cycle holding the batch buffers until the
    garbage collector ran (a 40-video reduce peaked at 2.0 instead of 1.0 GB)."""
    ends = [k for k, p in enumerate(picks) if len(p) > 1 and p == prefix]
    deeper = [p for p in picks if len(p) > len(prefix) and p[: len(prefix)] == prefix]
    branches = list(dict.fromkeys(p[len(prefix)] for p in deeper))
    for i, k in enumerate(ends):
        target = total if owned and not branches and i == len(ends) - 1 else work
        torch.div(total, len(prefix), out=target)
        yield k, _minmax_last2(target, out=target)
    for i, layer in enumerate(branches):
        if owned and i == len(branches) - 1:  # the last branch extends the sum in place
            extended = total.add_(normalised[layer])
        else:
            buffer = _scratch(("sum", len(prefix)), total.shape, total.dtype, total.device)
            extended = torch.add(total, normalised[layer], out=buffer)
        yield from _prefix_walk((*prefix, layer), extended, True, picks, normalised, work)


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
        mean = flat.mean(dim=1)
        return mean + (_std(flat, mean) if flat.dtype == torch.float32 else flat.std(dim=1, correction=0))
    if rule == "fraction":
        if not 0.0 <= fraction <= 1.0:
            raise XrcamConfigError(f"mask fraction must be in [0, 1], got {fraction}")
        return fraction * flat.amax(dim=1)
    if rule == "otsu":
        return otsu_threshold(flat)
    raise XrcamConfigError(f"unknown threshold rule {rule!r}; choose one of {', '.join(THRESHOLD_RULES)}")


def _std(flat: torch.Tensor, mean: torch.Tensor, *, rows: int | None = None) -> torch.Tensor:
    """Population standard deviation per row of float32 ``(B, N)``, as ``torch.std`` gives it.

    ``torch.std`` accumulates in float64 (Welford); so does this, as a two-pass sum of squared
    deviations from the float32 ``mean``: per block of ``rows`` rows, one subtraction computed in
    float64 (the shift is float64, so the float32 rows are widened as they are read) and one BLAS dot
    per row. About 5x faster on CPU (56 maps of 230 px: 17 ms -> 3.0 ms). Both are float64-accurate,
    so the float32 results agree (checked bit for bit against ``torch.std`` in tests/test_scoring.py);
    the shift's own error, ``(mean - true mean)**2``, is ~1e-14 of a [0, 1] map's variance. ``rows``
    defaults to as many as fit 256 KiB of float64, so the block stays in the core's L2 cache between
    its subtraction and its dot (one 230-px map is 413 KiB: one row at a time, 2x faster than 2 or
    more rows). The loop makes no view per row: 56 maps of 230 px, 4.9 -> 3.9 ms on this round's
    machine.
    """
    if rows is None:
        rows = max(1, (256 * 1024) // (8 * max(1, flat.shape[1])))
    out = torch.empty(flat.shape[0], dtype=torch.float64, device=flat.device)
    # one float64 buffer for every block: a fresh temporary per block would be allocated anew each time
    buffer = _scratch("std", (min(rows, flat.shape[0]), flat.shape[1]), torch.float64, flat.device)
    full = buffer.unsqueeze(1), buffer.unsqueeze(2)  # the block's rows as (r, 1, N) and (r, N, 1)
    # per block only the subtraction and the BLAS dots; the shift keeps a dim, so the subtraction is
    # computed in float64 (a 0-dim float64 shift would leave it in float32)
    shifts = mean.double()[:, None]
    blocks = zip(flat.split(rows), shifts.split(rows), out.view(-1, 1, 1).split(rows), strict=True)
    for block, shift, dots in blocks:
        if len(block) == rows:
            d, (row, col) = buffer, full
        else:  # the last, shorter block
            d = buffer[: len(block)]
            row, col = d.unsqueeze(1), d.unsqueeze(2)
        torch.sub(block, shift, out=d)
        torch.bmm(row, col, out=dots)
    return out.div_(flat.shape[1]).sqrt_().float()


def make_masks(
    maps: torch.Tensor, rule: str = "mean+std", *, fraction: float = 0.5, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary saliency masks, same shape as ``maps`` (any leading dims, last two spatial) bool.

    ``map > thresholds(map, rule)`` per sample; the strict inequality makes an all-zero map (e.g. a
    normalised constant map) an empty mask.
    """
    flat = maps.reshape(-1, *maps.shape[-2:])
    t = thresholds(flat, rule, fraction=fraction)
    if out is not None:
        torch.gt(flat, t.view(-1, 1, 1).to(flat.dtype), out=out.view(flat.shape))
        return out
    return (flat > t.view(-1, 1, 1).to(flat.dtype)).reshape(maps.shape)


def iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Intersection over union per sample of boolean masks ``(..., S, S)`` -> ``(...)`` float32.

    ``gt`` broadcasts against ``pred`` (e.g. ``(B, S, S)`` against ``(K, M, B, S, S)``). NaN where
    both masks are empty (IoU undefined); 0 where only the prediction or only the ground truth is empty.
    Counts are float32 dot products of 0/1 vectors (exact below 2**24 pixels, and a BLAS call
    instead of a boolean reduction).
    """
    try:
        if pred.shape[-3:] != gt.shape[-3:]:
            raise RuntimeError
        torch.broadcast_shapes(pred.shape, gt.shape)
    except RuntimeError:
        raise XrcamConfigError(
            f"mask shapes differ: prediction {tuple(pred.shape)} vs ground truth {tuple(gt.shape)}"
        ) from None
    p = pred.flatten(-2).float()
    g = gt.flatten(-2).float()
    return _iou_of_counts(_overlap(p, g), p.sum(dim=-1), g.sum(dim=-1))


def _iou_of_counts(inter: torch.Tensor, area_a: torch.Tensor, area_b: torch.Tensor) -> torch.Tensor:
    """IoU from pixel counts (broadcasting): NaN where both masks are empty, as :func:`iou` gives."""
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(union, float("nan")))


def _overlap(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum(p * g, -1)`` for 0/1 float vectors ``p (..., B, N)`` and ``g`` broadcastable, via matmul."""
    if g.dim() <= p.dim() and g.shape[-2:] == p.shape[-2:]:
        lead = torch.broadcast_shapes(p.shape[:-2], g.shape[:-2])
        b, n = p.shape[-2:]
        pp = p.expand(*lead, b, n).reshape(-1, b, 1, n)
        gg = g.expand(*lead, b, n).reshape(-1, b, n, 1)
        return (pp @ gg).reshape(*lead, b)
    return (p * g).sum(dim=-1)


def rank_correlation(a: torch.Tensor, b: torch.Tensor, *, grid: int | None = _AGREEMENT_GRID) -> torch.Tensor:
    """Spearman rank correlation per sample of maps ``(..., S, S)`` (``b`` broadcasts) -> ``(...)``.

    With ``grid`` both maps are first average-pooled to at most ``grid x grid`` cells (ranking 53k
    pixels per map would dominate the reduction; 32 x 32 is finer than every stage grid but layer1's
    58 x 58 at 230-px crops). Ties get their order's rank (no averaging); a constant map gives NaN.
    """
    if grid is not None and max(a.shape[-2:]) > grid:
        a = _pool(a, grid)
        b = _pool(b, grid)
    ra, rb = _ranks(a.float()), _ranks(b.float())  # b is ranked once even where it broadcasts
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    num = (ra * rb).sum(dim=-1)
    den = (ra.square().sum(dim=-1) * rb.square().sum(dim=-1)).sqrt()
    flat_a, flat_b = a.flatten(-2), b.flatten(-2)
    const = (flat_a.amax(-1) == flat_a.amin(-1)) | (flat_b.amax(-1) == flat_b.amin(-1))
    return torch.where(const | (den == 0), torch.full_like(num, float("nan")), num / den.clamp_min(1e-12))


_STAGE_POOLING: dict[tuple, torch.Tensor] = {}


def _stage_pooling(cells: int, size: int, grid: int, device: torch.device) -> torch.Tensor:
    """``(g, cells)`` matrix ``P @ U``: linear upsampling of ``cells`` to ``size`` pixels as
    ``F.interpolate`` does it (``align_corners=False``), then average pooling to ``g = min(grid, size)``
    cells as ``F.adaptive_avg_pool2d`` does it. Both are linear and separable, so pooling a bilinearly
    upsampled map is ``A_y @ map @ A_x.T`` at the stage's own resolution."""
    key = (cells, size, grid, str(device))
    matrix = _STAGE_POOLING.get(key)
    if matrix is None:
        basis = torch.eye(cells, dtype=torch.float64)[:, None]  # (cells, 1, cells)
        up = F.interpolate(basis, size=size, mode="linear", align_corners=False)  # rows: U's columns
        pooled = F.adaptive_avg_pool1d(up, min(grid, size))[:, 0]  # (cells, g)
        matrix = _STAGE_POOLING[key] = pooled.T.contiguous().float().to(device)
    return matrix


def _pooled_layer_sets(
    raw: Mapping[str, torch.Tensor],
    bounds: torch.Tensor,
    flags: Sequence[bool],
    layers: Sequence[str],
    layer_sets: Sequence[str],
    size: tuple[int, int],
) -> torch.Tensor:
    """``(K, M, B, g, g)`` maps with the ranks of the aggregated maps average-pooled to the agreement
    grid, computed at each stage's resolution.

    An aggregated map is an increasing affine function of the sum of its stages' normalised maps
    ``(upsample(relu(raw_l)) - lo_l) / span_l`` (``bounds``: ``lo_l, span_l`` per map), and pooling is
    linear with rows summing to 1, so its pooled ranks are those of
    ``sum_l (A_y @ relu(raw_l) @ A_x.T - lo_l) / span_l`` (:func:`_stage_pooling`): ~15x faster than
    pooling the 53k-pixel aggregated maps (7 methods x 8 frames x 7 layer sets at 230 px, one thread:
    23.5 -> 1.6 ms). Equal to :func:`rank_correlation` of the aggregated maps
    up to float rounding (ties broken by rounding may move a rank).
    """
    index = {layer: i for i, layer in enumerate(layers)}
    on = torch.as_tensor(list(flags), dtype=torch.bool, device=bounds.device)
    per_layer = []
    for i, layer in enumerate(layers):
        x = raw[layer][: len(flags)].float()
        if on.any():
            x = torch.where(on.view(-1, 1, 1, 1), x.clamp_min(0), x)
        a_y = _stage_pooling(x.shape[-2], size[0], _AGREEMENT_GRID, x.device)
        a_x = _stage_pooling(x.shape[-1], size[1], _AGREEMENT_GRID, x.device)
        lo, span = bounds[i, : len(flags), :, 0, None, None], bounds[i, : len(flags), :, 1, None, None]
        per_layer.append(((a_y @ x @ a_x.T) - lo) / span)
    return torch.stack(
        [
            torch.stack([per_layer[index[layer]] for layer in parse_layer_set(layer_set)]).sum(dim=0)
            for layer_set in layer_sets
        ]
    )


def _ranks(maps: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 of the flattened last two dims (one argsort and a scatter)."""
    flat = maps.flatten(-2)
    order = flat.argsort(dim=-1)
    ranks = torch.empty_like(flat)
    ranks.scatter_(
        -1, order, torch.arange(flat.shape[-1], dtype=flat.dtype, device=flat.device).expand_as(flat)
    )
    return ranks


def _pool(maps: torch.Tensor, grid: int) -> torch.Tensor:
    lead = maps.shape[:-2]
    x = F.adaptive_avg_pool2d(maps.reshape(-1, 1, *maps.shape[-2:]).float(), grid)
    return x.reshape(*lead, *x.shape[-2:])


# --------------------------------------------------------------------------------- batched scoring
@dataclass
class Scores:
    """Scores of one batch: every tensor is ``(K, M, B)`` (layer sets x methods x frames).

    ``methods`` are the scored rows in order: the methods first, then any ``inverted_<method>`` rows
    and reference rows (``random`` is already the mean IoU over its draws). ``maps``/``masks``
    ``(K, M, B, S, S)`` are kept only when asked for.
    """

    methods: list[str]
    layer_sets: list[str]
    iou: torch.Tensor
    mask_area: torch.Tensor
    maps: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    agreement: dict[str, torch.Tensor] = field(default_factory=dict)  # mask_iou, rank_corr vs a method


def score_batch(raw: Mapping[str, Mapping[str, torch.Tensor]], **options) -> Scores:
    """Score one batch of frames given as ``raw[method][layer]`` maps ``(B, h, w)``; see :func:`score_stacks`."""
    methods = list(raw)
    if not methods:
        raise XrcamConfigError("score_batch needs the maps of at least one method")
    layers = list(raw[methods[0]])
    stacks = {layer: torch.stack([raw[m][layer] for m in methods]) for layer in layers}
    return score_stacks(stacks, methods, **options)


def score_stacks(
    stacks: Mapping[str, torch.Tensor],
    methods: Sequence[str],
    *,
    size: int | tuple[int, int],
    layer_sets: Sequence[str],
    gt: torch.Tensor | None = None,
    threshold: str = "mean+std",
    relu: bool | None = None,
    inverted: Sequence[str] = (),
    references: Sequence[str] = (),
    frames: torch.Tensor | None = None,
    random_draws: int | None = None,
    generator: torch.Generator | None = None,
    frame_seeds: Sequence[int] | None = None,
    agreement_with: str | None = None,
    keep_maps: bool = False,
    score_methods: bool = True,
) -> Scores:
    """Score one batch of frames for every method and layer set at once.

    ``stacks[layer]``: raw maps ``(M, B, h, w)`` of ``methods`` (in that order) at each stage's own
    grid, any float dtype (the store's layout). ``gt``: ``(B, S, S)`` bool ground truth (IoU is NaN
    without it). ``relu=None``: each method's family default. ``inverted``: methods whose negated raw
    map is scored as ``inverted_<method>`` (the sign check; relu off). ``references``: names from
    :data:`xrcam.references.REFERENCES`, pushed through the same upsample/normalise/threshold with
    relu off at each stage's grid; they need ``gt`` and (for ``intensity``) ``frames`` ``(B, S, S)`` in
    [0, 1]; ``random`` is the mean over ``random_draws`` draws, drawn from ``generator`` or, with
    ``frame_seeds``, from one generator per frame (the same noise whatever the batching). ``agreement_with``: also the mask IoU
    and rank correlation of every method's map against that method's, per frame and layer set.
    ``score_methods=False`` scores only the ``inverted`` and reference rows (``methods`` then only
    names the stacks' rows).
    """
    methods = list(methods)
    layers = list(stacks)
    rule, fraction = parse_threshold(threshold)
    flags = [default_relu(m) if relu is None else relu for m in methods] if score_methods else []
    names = list(methods) if score_methods else []
    extra = []
    for method in inverted:
        if method not in methods:
            raise XrcamConfigError(f"inverted {method!r}: no maps of that method in this batch")
        extra.append(methods.index(method))
        flags.append(False)
        names.append(f"{INVERTED_PREFIX}{method}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    batch = stacks[layers[0]].shape[1]
    against = names.index(agreement_with) if agreement_with is not None and score_methods else None
    counts = None
    if names:
        device = stacks[layers[0]].device
        dtype = torch.float64 if stacks[layers[0]].dtype == torch.float64 else torch.float32
        shape = (len(names), batch, *size)
        normalised = _scratch("normalised", (len(layers), *shape), dtype, device)
        bounds = torch.empty((len(layers), len(names), batch, 2), dtype=dtype, device=device)
        for i, layer in enumerate(layers):
            s = stacks[layer]
            if extra:
                s = torch.cat([s, -s[extra]]) if score_methods else -s[extra]
            n = normalize_stack(s, size, relu=flags, out=normalised[i], bounds=bounds[i])
            if n.data_ptr() != normalised[i].data_ptr():  # float64 maps: not written in place
                normalised[i] = n
        gt_flat = None if gt is None else gt.to(device).flatten(-2)
        counts = _set_counts(
            normalised, layers, layer_sets, rule, fraction, keep=keep_maps, gt=gt_flat, against=against
        )
        del normalised
        areas = counts.area
        ious = counts.gt_iou if gt_flat is not None else torch.full(areas.shape, float("nan"), device=device)
    else:
        ious = torch.empty((len(layer_sets), 0, batch))
        areas = torch.empty((len(layer_sets), 0, batch))
    scores = Scores(names, list(layer_sets), ious, areas)
    if against is not None:
        j, m = against, len(methods)
        pooled = _pooled_layer_sets(stacks, bounds, flags[:m], layers, layer_sets, size)
        scores.agreement = {
            "mask_iou": _iou_of_counts(counts.row_overlap[:, :m], areas[:, :m], areas[:, j : j + 1]),
            "rank_corr": rank_correlation(pooled[:, :m], pooled[:, j : j + 1], grid=None),
        }
    if keep_maps and counts is not None:
        scores.maps, scores.masks = counts.maps, counts.masks
    if references:
        shapes = [tuple(stacks[layer].shape[-2:]) for layer in layers]
        ref = _score_references(
            references,
            layers=layers,
            shapes=shapes,
            size=size,
            layer_sets=layer_sets,
            gt=gt,
            frames=frames,
            rule=rule,
            fraction=fraction,
            draws=random_draws,
            generator=generator,
            device=stacks[layers[0]].device,
            frame_seeds=frame_seeds,
        )
        scores.methods += ref.methods
        scores.iou = torch.cat([scores.iou, ref.iou], dim=1)
        scores.mask_area = torch.cat([scores.mask_area, ref.mask_area], dim=1)
    return scores


@dataclass
class _SetCounts:
    """Pixel counts of every layer set's masks and their IoU with the ground truth, each ``(K, R, B)``
    float32 (the counts exact integers)."""

    area: torch.Tensor
    gt_iou: torch.Tensor | None  # IoU with the ground truth (NaN where both are empty)
    row_overlap: torch.Tensor | None  # mask AND the mask of row ``against``
    maps: torch.Tensor | None = None  # (K, R, B, S, S), only with keep
    masks: torch.Tensor | None = None  # (K, R, B, S, S) bool, only with keep


def _set_counts(
    normalised: torch.Tensor,
    layers: Sequence[str],
    layer_sets: Sequence[str],
    rule: str,
    fraction: float,
    *,
    keep: bool,
    gt: torch.Tensor | None = None,
    against: int | None = None,
) -> _SetCounts:
    """``(L, R, B, S, S)`` normalised maps -> every layer set's mask areas, overlaps with ``gt``
    ``(B, S*S)`` bool (on the maps' device; returned as IoUs) and with the masks of row ``against``,
    for methods and references alike. Consumes ``normalised`` (see :func:`_layer_set_maps`).

    Each set's masks are made and counted right after its maps (~12 MB for a batch of 8: still in
    the L3 cache), as 0/1 floats written over the maps themselves: torch's comparison into a float
    tensor is vectorised, into a bool tensor it is not (56 maps of 230 px: ~0.45 vs ~1.5 ms). The
    counts are then float sums of 0/1 values (exact below 2**24 pixels): the areas over every pixel,
    the overlaps with ``gt`` over its pixels only (a few % of the crop), those with row ``against``
    as one BLAS matrix-vector product per frame. ``keep=True`` also returns every set's maps and
    bool masks (fresh tensors).
    """
    k_sets, rows, batch = len(layer_sets), normalised.shape[1], normalised.shape[2]
    n = normalised.shape[-2] * normalised.shape[-1]
    device, dtype = normalised.device, normalised.dtype
    shape = (k_sets, *normalised.shape[1:])
    area = torch.empty((k_sets, rows, batch), dtype=dtype, device=device)
    gt_overlap = None if gt is None else torch.empty_like(area)
    row_overlap = None if against is None else torch.empty_like(area)
    maps_out = torch.empty(shape, dtype=dtype, device=device) if keep else None
    masks = torch.empty(shape, dtype=torch.bool, device=device) if keep else None
    if gt is not None:  # overlaps with the ground truth read only its pixels (a few % of the crop)
        truth = gt.reshape(batch * n).nonzero().squeeze(1)  # into the frames' (B * S * S)
        gt_area = gt.sum(dim=-1, dtype=torch.float32)
        per_frame = gt_area.long().tolist()  # how many of those are each frame's, in frame order
    for k, maps in _layer_set_maps(normalised, layers, layer_sets):
        if keep:
            maps_out[k] = maps
        flat = maps.reshape(-1, n)
        t = thresholds(flat, rule, fraction=fraction).view(-1, 1).to(dtype)
        torch.gt(flat, t, out=flat)  # 1.0 where map > t: make_masks' rule, over the consumed maps
        if keep:
            masks[k] = flat.view(maps.shape).bool()
        binary = flat.view(rows, batch, n)
        area[k] = binary.sum(dim=-1)
        if gt is not None:  # one gather for every frame, then a sum per frame (sums of 0/1: exact)
            inside = binary.view(rows, batch * n).index_select(1, truth).split(per_frame, dim=1)
            torch.stack([part.sum(dim=1) for part in inside], dim=1, out=gt_overlap[k])
        if against is not None:
            for b in range(batch):
                torch.mv(binary[:, b], binary[against, b], out=row_overlap[k, :, b])
    area = area.float()
    gt_iou = None if gt is None else _iou_of_counts(gt_overlap.float(), area, gt_area)
    return _SetCounts(area, gt_iou, None if row_overlap is None else row_overlap.float(), maps_out, masks)


def _score_references(
    names: Sequence[str],
    *,
    layers: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    size: tuple[int, int],
    layer_sets: Sequence[str],
    gt: torch.Tensor | None,
    frames: torch.Tensor | None,
    rule: str,
    fraction: float,
    draws: int | None,
    generator: torch.Generator | None,
    device: torch.device,
    frame_seeds: Sequence[int] | None = None,
) -> Scores:
    """Reference rows: every reference (and every random draw) is one row of one
    :func:`normalize_stack`/:func:`aggregate_stack` call; the frame-independent ``centre`` map is
    scored once and compared with every frame's ground truth."""
    from xrcam import references as refs

    if gt is None:
        raise XrcamConfigError("reference rows need the ground truth (gt=)")
    if frames is None:
        if "intensity" in names:
            raise XrcamConfigError("the intensity reference needs the preprocessed frames (frames=)")
        frames = torch.zeros(gt.shape, dtype=torch.float32, device=gt.device)  # unused by the others
    draws = draws or refs.RANDOM_DRAWS
    rows: list[list[torch.Tensor]] = [[] for _ in shapes]  # per stage: (B, h, w) maps, one per row
    spans: dict[str, tuple[int, int]] = {}
    for name in names:
        if name == "centre":
            continue
        first = len(rows[0])
        repeats = draws if name == "random" else 1
        per_frame = None
        if name == "random" and frame_seeds is not None:
            per_frame = [torch.Generator().manual_seed(int(seed)) for seed in frame_seeds]
        for _ in range(repeats):  # draw order as ever: draw, then stage, then frame
            if per_frame is None:
                stages = refs.reference_maps(name, gt=gt, frames=frames, shapes=shapes, generator=generator)
            else:
                stages = [
                    torch.cat(
                        [
                            refs.reference_map(
                                name,
                                gt=gt[i : i + 1].cpu(),
                                frames=frames[i : i + 1].cpu(),
                                shape=shape,
                                generator=g,
                            )
                            for i, g in enumerate(per_frame)
                        ]
                    )
                    for shape in shapes
                ]
            for j, stage in enumerate(stages):
                rows[j].append(stage.to(device).float())
        spans[name] = (first, len(rows[0]))
    gt_flat = gt.to(device).flatten(-2)
    gt_area = gt_flat.sum(dim=-1, dtype=torch.float32)
    ious: dict[str, torch.Tensor] = {}
    areas: dict[str, torch.Tensor] = {}
    if spans:
        shape = (len(rows[0]), rows[0][0].shape[0], *size)
        stacked = _scratch("ref_normalised", (len(rows), *shape), torch.float32, device)
        for j, stage in enumerate(rows):
            normalize_stack(torch.stack(stage), size, relu=[False] * len(stage), out=stacked[j])
        counts = _set_counts(stacked, layers, layer_sets, rule, fraction, keep=False, gt=gt_flat)
        del stacked
        area, score = counts.area, counts.gt_iou
        for name, (a, b) in spans.items():
            # stacked draws first, then reduced over dim 0: the summation order of the per-draw loop
            ious[name] = torch.stack(score[:, a:b].unbind(1)).nanmean(dim=0)
            areas[name] = torch.stack(area[:, a:b].unbind(1)).mean(dim=0)
    if "centre" in names:  # the same map for every frame: scored once, compared with each ground truth
        one = gt[:1]
        stacked = torch.stack(
            [
                normalize_stack(
                    refs.reference_map("centre", gt=one, frames=frames[:1], shape=shape)
                    .to(device)
                    .float()[None],
                    size,
                    relu=[False],
                )
                for shape in shapes
            ]
        )
        masks = make_masks(aggregate_stack(stacked, layers, layer_sets), rule, fraction=fraction)
        binary = masks.flatten(-2)[:, 0, 0].float()  # (K, S*S): one mask per layer set
        area = binary.sum(dim=-1, keepdim=True).expand(-1, gt_flat.shape[0])  # (K, B)
        ious["centre"] = _iou_of_counts(binary @ gt_flat.float().T, area, gt_area)
        areas["centre"] = area
    return Scores(
        list(names),
        list(layer_sets),
        torch.stack([ious[n] for n in names], dim=1),
        torch.stack([areas[n] for n in names], dim=1),
    )
