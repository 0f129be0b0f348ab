"""Reference maps: shapes, and what they score through the SPEC §5 post-processing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xrcam.errors import XrcamConfigError
from xrcam.references import RANDOM_DRAWS, REFERENCES, reference_map

S = 96


def _score(raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """SPEC §5 spelled out: bilinear upsampling, min-max, mean+std threshold, IoU (relu off)."""
    x = F.interpolate(raw[:, None].float(), size=gt.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    flat = x.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    x = (x - lo) / (hi - lo + 1e-8)
    t = x.flatten(1).mean(1) + x.flatten(1).std(1, correction=0)
    pred = x > t[:, None, None]
    inter = (pred & gt).flatten(1).sum(1).float()
    union = (pred | gt).flatten(1).sum(1).float()
    return inter / union


@pytest.fixture(scope="module")
def scene():
    """Eight crops with 3 dark discs each (GT ~ 8-12 % of the crop) on a bright noisy background."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    gt = torch.zeros(8, S, S, dtype=torch.bool)
    for b in range(8):
        for _ in range(3):
            cy, cx = torch.randint(15, S - 15, (2,), generator=g).tolist()
            r = 7 + 3 * torch.rand((), generator=g).item()
            gt[b] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    frames = (0.6 + 0.1 * torch.randn(8, S, S, generator=g)).clamp(0, 1)
    frames = torch.where(gt, frames * 0.2, frames)
    return gt, frames


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("shape", [(24, 24), (3, 3), (S, S), (6, 8)])
def test_shape_dtype_and_range(scene, name, shape):
    gt, frames = scene
    raw = reference_map(name, gt=gt, frames=frames, shape=shape, generator=torch.Generator().manual_seed(1))
    assert raw.shape == (8, *shape) and raw.dtype == torch.float32
    assert torch.isfinite(raw).all() and raw.min() >= 0 and raw.max() <= 1


def test_oracle_at_the_crop_grid_is_the_ground_truth(scene):
    gt, frames = scene
    scores = _score(reference_map("oracle", gt=gt, frames=frames, shape=(S, S)), gt)
    assert scores.min() > 0.999
    coarse = _score(reference_map("oracle", gt=gt, frames=frames, shape=(3, 3)), gt)
    assert coarse.mean() < scores.mean()  # the ceiling falls with the stage's resolution


def test_random_scores_about_the_gt_coverage(scene):
    gt, frames = scene
    g = torch.Generator().manual_seed(3)
    draws = [_score(reference_map("random", gt=gt, frames=frames, shape=(24, 24), generator=g), gt)
             for _ in range(RANDOM_DRAWS)]  # fmt: skip
    random = torch.stack(draws).mean().item()
    coverage = gt.float().mean().item()
    assert 0.4 * coverage < random < 1.2 * coverage
    assert not torch.equal(draws[0], draws[1])  # every draw is a new map


def test_intensity_finds_dark_discs_and_centre_is_centred(scene):
    gt, frames = scene
    intensity = _score(reference_map("intensity", gt=gt, frames=frames, shape=(24, 24)), gt).mean()
    assert intensity > 0.5  # dark discs on a bright background: darkness alone localises them
    centre = reference_map("centre", gt=gt, frames=frames, shape=(7, 7))
    assert centre[0].argmax().item() == 24 and torch.equal(centre[0], centre[5])
    assert torch.allclose(centre[0], centre[0].T) and torch.allclose(centre[0], centre[0].flip(0))


def test_unknown_name_and_bad_shapes(scene):
    gt, frames = scene
    with pytest.raises(XrcamConfigError, match="unknown reference"):
        reference_map("sobel", gt=gt, frames=frames, shape=(4, 4))
    with pytest.raises(XrcamConfigError):
        reference_map("oracle", gt=gt[0], frames=frames[0], shape=(4, 4))


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_maps_of_every_stage_equal_one_call_per_stage(scene, name):
    from xrcam.references import reference_maps

    gt, frames = scene
    shapes = [(24, 24), (12, 12), (6, 6), (3, 3)]
    together = reference_maps(
        name, gt=gt, frames=frames, shapes=shapes, generator=torch.Generator().manual_seed(1)
    )
    one = torch.Generator().manual_seed(1)  # random: the same draws, stage after stage
    apart = [reference_map(name, gt=gt, frames=frames, shape=s, generator=one) for s in shapes]
    for a, b in zip(together, apart, strict=True):
        assert torch.equal(a, b)
