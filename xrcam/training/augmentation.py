"""Augmentation: the paper's four (flips, rotation, contrast), batched torch on grey [0, 1] frames."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["augment"]


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    rotation_degrees: float = 180.0,
    contrast: float = 0.2,
) -> torch.Tensor:
    """Random horizontal/vertical flips, rotation and contrast of grey [0, 1] frames, per sample, batched.

    Rotation samples bilinearly with reflection padding, so no black corners appear inside the square
    crop. Contrast blends each frame with its mean grey by a factor from [1 - c, 1 + c] and clips to
    [0, 1] (as torchvision's ``adjust_contrast``). Random numbers come from ``generator`` (on the
    CPU), so a run is reproducible on any device.
    """
    batch = images.shape[0]

    def draw() -> torch.Tensor:
        return torch.rand(batch, generator=generator).to(images.device)

    flip_h, flip_v = draw() < 0.5, draw() < 0.5
    out = torch.where(flip_h[:, None, None, None], images.flip(-1), images)
    out = torch.where(flip_v[:, None, None, None], out.flip(-2), out)
    if rotation_degrees > 0:
        angle = (draw() * 2 - 1) * math.radians(rotation_degrees)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if contrast > 0:
        factor = (1 + (draw() * 2 - 1) * contrast).to(out.dtype)[:, None, None, None]
        mean = out.mean(dim=(-3, -2, -1), keepdim=True)
        out = (mean + factor * (out - mean)).clamp(0.0, 1.0)
    return out
