"""Reference maps that every localisation table shows beside the methods (SPEC §5, "Reference rows").

They are not explanation methods: they say what an mIoU is worth. A method that does not beat
``random`` and ``centre`` has not localised anything; ``oracle`` is the ceiling a map at that stage's
resolution can reach through the same post-processing; ``intensity`` is the trivial "dark = lesion"
map, which tells whether darkness alone would have done as well.

Each reference is a *raw* map at a stage's grid ``shape=(h, w)``, exactly like a method's map of
that stage, so the scoring core pushes it through the same upsample → min-max → threshold → IoU
(with ReLU off; every reference is already non-negative):

- ``random``: uniform noise on the grid (the caller averages the IoU over :data:`RANDOM_DRAWS` draws);
- ``centre``: a centred isotropic Gaussian, σ = :data:`CENTRE_SIGMA` of the grid side (a centre prior);
- ``oracle``: the ground-truth mask average-pooled to the grid;
- ``intensity``: the inverted frame, Gaussian-smoothed (σ = :data:`INTENSITY_SIGMA` of the crop side,
  at least 1 px) and average-pooled to the grid (psammoma bodies are dark).

Example::

    raw = reference_map("oracle", gt=gt, frames=grey, shape=exp.maps["gradcam"]["layer1"].shape[-2:])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xrcam.errors import XrcamConfigError

__all__ = ["REFERENCES", "RANDOM_DRAWS", "CENTRE_SIGMA", "INTENSITY_SIGMA", "reference_map", "reference_maps"]

#: The reference rows, in the order tables print them.
REFERENCES = ("random", "centre", "oracle", "intensity")
#: Draws of the random map whose IoUs are averaged into the ``random`` row.
RANDOM_DRAWS = 5
#: Standard deviation of the centre prior, as a fraction of the grid side.
CENTRE_SIGMA = 0.25
#: Smoothing of the intensity map before pooling, as a fraction of the crop side.
INTENSITY_SIGMA = 0.01


def _check(gt: Tensor, frames: Tensor) -> None:
    if gt.dim() != 3 or frames.dim() != 3 or gt.shape != frames.shape:
        raise XrcamConfigError(
            f"gt and frames must both be (B, S, S) of one shape, got {tuple(gt.shape)} and {tuple(frames.shape)}"
        )


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(B, H, W)`` with reflect padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = x[:, None]
    pad = min(radius, x.shape[-1] - 1, x.shape[-2] - 1)
    if pad < radius:  # tiny frames: crop the kernel to what reflect padding allows
        k = k[radius - pad : radius + pad + 1]
        k = k / k.sum()
        radius = pad
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[:, 0]


def reference_map(
    name: str,
    *,
    gt: Tensor,
    frames: Tensor,
    shape: tuple[int, int],
    generator: torch.Generator | None = None,
) -> Tensor:
    """Raw reference map ``(B, h, w)`` float32 of ``name`` (one of :data:`REFERENCES`) at grid ``shape``.

    ``gt`` is the ground truth ``(B, S, S)`` bool on the crop grid, ``frames`` the grey preprocessed
    crops ``(B, S, S)`` in [0, 1] (before the model's mean/std). The result lives on ``gt``'s device.
    ``generator`` seeds ``random`` (a CPU generator for CPU tensors; a fresh draw per call otherwise).
    """
    return reference_maps(name, gt=gt, frames=frames, shapes=[shape], generator=generator)[0]


def reference_maps(
    name: str,
    *,
    gt: Tensor,
    frames: Tensor,
    shapes: list[tuple[int, int]],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """:func:`reference_map` at each grid of ``shapes``, in order (``random`` draws stage after stage).

    The work shared by every grid is done once: the intensity map's blur of the full-size crops.
    """
    _check(gt, frames)
    if name == "intensity":
        sigma = max(1.0, INTENSITY_SIGMA * max(frames.shape[-2:]))
        smooth = _gaussian_blur(frames.float(), sigma)[:, None]
        return [1.0 - F.adaptive_avg_pool2d(smooth, (int(h), int(w)))[:, 0] for h, w in shapes]
    return [_reference_at(name, gt, shape, generator) for shape in shapes]


def _reference_at(name: str, gt: Tensor, shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    h, w = int(shape[0]), int(shape[1])
    batch, device = gt.shape[0], gt.device
    if name == "random":
        return torch.rand((batch, h, w), generator=generator, device=device, dtype=torch.float32)
    if name == "centre":
        yy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h - 0.5
        xx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w - 0.5
        g = torch.exp(-(yy[:, None] ** 2 + xx[None, :] ** 2) / (2 * CENTRE_SIGMA**2))
        return g.expand(batch, h, w).clone()
    if name == "oracle":
        return F.adaptive_avg_pool2d(gt.float()[:, None], (h, w))[:, 0]
    raise XrcamConfigError(f"unknown reference {name!r}; choose one of {', '.join(REFERENCES)}")
