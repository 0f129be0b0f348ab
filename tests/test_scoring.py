"""The scoring core: normalisation, layer aggregation, thresholds, masks, IoU, batched scoring (SPEC §5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xrcam.errors import XrcamConfigError
from xrcam.scoring import (
    STANDARD_LAYER_SETS,
    aggregate,
    default_relu,
    format_layer_set,
    iou,
    make_masks,
    minmax,
    normalize,
    otsu_threshold,
    parse_layer_set,
    thresholds,
)


def test_constant_map_normalises_to_zeros_never_nan():
    maps = torch.stack([torch.full((7, 7), 3.5), torch.zeros(7, 7), torch.full((7, 7), -2.0)])
    for relu in (True, False):
        out = normalize(maps, 28, relu=relu)
        assert out.shape == (3, 28, 28)
        assert torch.isfinite(out).all()
        assert (out == 0).all()
    assert not make_masks(normalize(maps, 28, relu=False)).any()


def test_normalize_is_per_sample_minmax_after_bilinear_upsampling():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4, 4, generator=g) * torch.tensor([1.0, 100.0])[:, None, None]
    out = normalize(maps, 16, relu=False)
    up = F.interpolate(maps[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    for i in range(2):
        ref = (up[i] - up[i].min()) / (up[i].max() - up[i].min())
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=1e-6)
        assert out[i].min() == 0 and abs(out[i].max() - 1) < 1e-6


def test_relu_option_and_family_defaults():
    maps = torch.tensor([[[-2.0, 0.0], [1.0, 2.0]]])
    # no upsampling: values are directly comparable
    assert normalize(maps, method="xrelevancecam").flatten().tolist() == pytest.approx(
        [0, 0.5, 0.75, 1], abs=1e-6
    )
    assert normalize(maps, method="gradcam").flatten().tolist() == pytest.approx([0, 0, 0.5, 1], abs=1e-6)
    assert normalize(maps, method="gradcam", relu=False).flatten().tolist() == pytest.approx(
        [0, 0.5, 0.75, 1], abs=1e-6
    )
    assert normalize(maps, method="relevancecam", relu=True).flatten().tolist() == pytest.approx(
        [0, 0, 0.5, 1], abs=1e-6
    )
    assert default_relu("layercam") and not default_relu("relevancecam")
    with pytest.raises(XrcamConfigError):
        normalize(maps)


def test_normalize_keeps_float16_input_finite_and_float32_out():
    maps = torch.randn(3, 5, 5).half()
    out = normalize(maps, 10, method="gradcam")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("text", "layers"),
    [
        ("4", ("layer4",)),
        ("4+3", ("layer4", "layer3")),
        ("4+3+2", ("layer4", "layer3", "layer2")),
        ("4+3+2+1", ("layer4", "layer3", "layer2", "layer1")),
        ("layer2+layer1", ("layer2", "layer1")),
    ],
)
def test_layer_set_parser_and_formatter_round_trip(text, layers):
    assert parse_layer_set(text) == layers
    assert parse_layer_set(format_layer_set(layers)) == layers
    assert format_layer_set(layers) == text.replace("layer", "")


@pytest.mark.parametrize("bad", ["", "4+4", "4+x", "conv1", "4++3"])
def test_bad_layer_sets_are_rejected(bad):
    with pytest.raises(XrcamConfigError):
        parse_layer_set(bad)


def test_standard_layer_sets_parse():
    assert [len(parse_layer_set(s)) for s in STANDARD_LAYER_SETS] == [1, 2, 3, 4]


def test_aggregation_of_known_maps():
    a = torch.tensor([[[0.0, 1.0], [0.5, 0.5]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])
    c = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    norm = {"layer4": a, "layer3": b, "layer2": c}
    # mean of (a, b) = [[0.5, 1], [0.25, 0.5]] -> min-max: [[1/3, 1], [0, 1/3]]
    torch.testing.assert_close(aggregate(norm, "4+3"), torch.tensor([[[1 / 3, 1.0], [0.0, 1 / 3]]]))
    # a zero map changes the mean but not the min-max result
    torch.testing.assert_close(aggregate(norm, "4+3+2"), aggregate(norm, "4+3"))
    # a single layer is its own normalised map
    torch.testing.assert_close(aggregate(norm, "4"), a)
    with pytest.raises(XrcamConfigError, match="layer1"):
        aggregate(norm, "4+3+2+1")


def test_mean_std_threshold_on_known_map():
    m = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])  # mean 0.25, population std sqrt(3)/4
    t = thresholds(m, "mean+std")
    assert t.item() == pytest.approx(0.25 + np.sqrt(3) / 4)
    assert make_masks(m).tolist() == [[[False, False], [False, True]]]


def test_fraction_threshold_on_known_map():
    m = torch.tensor([[[0.1, 0.4], [0.6, 0.8]]])
    assert thresholds(m, "fraction", fraction=0.5).item() == pytest.approx(0.4)
    assert make_masks(m, "fraction", fraction=0.5).tolist() == [[[False, False], [True, True]]]
    assert make_masks(m, "fraction", fraction=0.25).tolist() == [[[False, True], [True, True]]]
    with pytest.raises(XrcamConfigError):
        thresholds(m, "fraction", fraction=1.5)
    with pytest.raises(XrcamConfigError):
        thresholds(m, "median")


def _otsu_exhaustive(values: np.ndarray) -> np.ndarray:
    """Reference: try every distinct value as threshold, keep the best between-class variance."""
    flat = values.ravel().astype(np.float64)
    best, best_t = -1.0, flat.max()
    for t in np.unique(flat)[:-1]:
        lo, hi = flat[flat <= t], flat[flat > t]
        w0, w1 = len(lo) / len(flat), len(hi) / len(flat)
        var = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, best_t = var, t
    return values > best_t


def test_otsu_on_known_bimodal_map():
    m = torch.tensor([[[0.1, 0.1, 0.2], [0.8, 0.9, 0.9], [0.1, 0.2, 0.85]]])
    assert make_masks(m, "otsu").tolist() == [
        [[False, False, False], [True, True, True], [False, False, True]]
    ]
    assert otsu_threshold(m).item() == pytest.approx(0.2)


@pytest.mark.parametrize("seed", range(5))
def test_otsu_matches_exhaustive_reference(seed):
    g = torch.Generator().manual_seed(seed)
    # quantised values make ties, a mixture makes the optimum non-trivial
    maps = torch.cat(
        [torch.rand(3, 12, 12, generator=g) ** 2, (torch.rand(3, 12, 12, generator=g) * 8).round() / 8]
    )
    got = make_masks(maps, "otsu")
    for i in range(len(maps)):
        assert got[i].numpy().tolist() == _otsu_exhaustive(maps[i].numpy()).tolist()


def test_otsu_of_constant_map_is_empty():
    assert not make_masks(torch.full((2, 5, 5), 0.3), "otsu").any()


def test_iou_of_known_masks():
    pred = torch.zeros(4, 4, 4, dtype=torch.bool)
    gt = torch.zeros(4, 4, 4, dtype=torch.bool)
    pred[0, :2, :2] = True  # 4 px
    gt[0, :2, :] = True  # 8 px, overlap 4 -> 4/8
    pred[1, 0, 0] = True  # disjoint -> 0
    gt[1, 3, 3] = True
    pred[2] = True  # identical -> 1
    gt[2] = True
    # frame 3: both empty -> NaN
    out = iou(pred, gt)
    assert out[:3].tolist() == [0.5, 0.0, 1.0]
    assert torch.isnan(out[3])
    with pytest.raises(XrcamConfigError):
        iou(pred, gt[:, :3])


def test_minmax_works_on_any_trailing_shape():
    x = torch.arange(24.0).view(2, 3, 4)
    out = minmax(x)
    assert out[0].min() == 0 and out[1].max() == pytest.approx(1)


def test_family_defaults_cover_the_registered_methods():
    import xrcam

    assert set(xrcam.list_methods("relevance")) == {m for m in xrcam.list_methods() if not default_relu(m)}
    assert set(xrcam.list_methods("gradient")) == {m for m in xrcam.list_methods() if default_relu(m)}


def _raw_batch(seed=0, methods=("gradcam", "xrelevancecam"), batch=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"layer1": (8, 8), "layer2": (4, 4), "layer3": (2, 2), "layer4": (1, 1)}
    shapes["layer4"] = (2, 2)
    return {m: {layer: torch.randn(batch, *s, generator=g) for layer, s in shapes.items()} for m in methods}


@pytest.mark.parametrize("threshold", ["mean+std", "fraction:0.4", "otsu"])
def test_score_batch_equals_the_per_method_steps(threshold):
    from xrcam.scoring import parse_threshold, score_batch

    raw = _raw_batch()
    gt = torch.zeros(3, 32, 32, dtype=torch.bool)
    gt[:, 8:20, 10:24] = True
    sets = ["1", "4", "4+3", "4+3+2+1"]
    scores = score_batch(raw, size=32, layer_sets=sets, gt=gt, threshold=threshold, keep_maps=True)
    rule, fraction = parse_threshold(threshold)
    assert scores.iou.shape == (4, 2, 3) and scores.methods == ["gradcam", "xrelevancecam"]
    for m, method in enumerate(raw):
        norm = {layer: normalize(x, 32, method=method) for layer, x in raw[method].items()}
        for k, layer_set in enumerate(sets):
            agg = aggregate(norm, layer_set)
            masks = make_masks(agg, rule, fraction=fraction)
            assert torch.equal(scores.maps[k, m], agg)
            assert torch.equal(scores.masks[k, m], masks)
            torch.testing.assert_close(scores.iou[k, m], iou(masks, gt), equal_nan=True)
            assert scores.mask_area[k, m].tolist() == masks.flatten(1).sum(1).tolist()


def test_layer_sets_sharing_and_branching_prefixes_equal_aggregate_bit_for_bit():
    """The scoring core walks the sets' prefixes, extending sums and dividing in place; sets that
    branch (4+3 -> 4+3+2 and 4+3+1), repeat, or share no prefix must still equal :func:`aggregate`."""
    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("gradcam", "xrelevancecam"), batch=2)
    sets = ["4+3", "4+3+2", "4+3+1", "3+2", "4+3", "2", "4+3+2+1", "2", "1+2"]
    scores = score_batch(raw, size=24, layer_sets=sets, keep_maps=True)
    for m, method in enumerate(raw):
        norm = {layer: normalize(x, 24, method=method) for layer, x in raw[method].items()}
        for k, layer_set in enumerate(sets):
            assert torch.equal(scores.maps[k, m], aggregate(norm, layer_set)), layer_set


def test_inverted_rows_score_the_negated_map_without_relu():
    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("xrelevancecam",))
    gt = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.6
    scores = score_batch(raw, size=16, layer_sets=["4+3"], gt=gt, inverted=["xrelevancecam"])
    assert scores.methods == ["xrelevancecam", "inverted_xrelevancecam"]
    negated = {"xrelevancecam": {layer: -x for layer, x in raw["xrelevancecam"].items()}}
    expected = score_batch(negated, size=16, layer_sets=["4+3"], gt=gt)
    torch.testing.assert_close(scores.iou[:, 1], expected.iou[:, 0], equal_nan=True)
    assert not torch.equal(scores.iou[:, 0], scores.iou[:, 1])


def test_agreement_with_itself_is_perfect_and_differs_for_another_method():
    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("gradcam", "xrelevancecam"), batch=4)
    scores = score_batch(raw, size=16, layer_sets=["4+3+2+1"], agreement_with="xrelevancecam")
    assert torch.allclose(scores.agreement["rank_corr"][:, 1], torch.ones(1, 4))
    assert torch.all(scores.agreement["mask_iou"][:, 1] == 1)
    assert (scores.agreement["rank_corr"][:, 0] < 0.999).all()


@pytest.mark.parametrize("size", [100, 24])
def test_agreement_rank_corr_equals_rank_correlation_of_the_aggregated_maps(size):
    """The batched agreement pools at each stage's grid; it must equal ranking the aggregated maps
    themselves, pooled to the agreement grid (100 px: pooled 100 -> 32; 24 px: no pooling), up to
    which of two (nearly) equal cells ranks first: bilinear upsampling leaves plateaus at the border,
    and rounding breaks their ties differently (on the benchmark's maps: mean 5e-6, max 2.6e-3)."""
    from xrcam.scoring import rank_correlation, score_batch

    g = torch.Generator().manual_seed(5)
    shapes = {"layer1": (25, 25), "layer2": (13, 13), "layer3": (7, 7), "layer4": (4, 4)}
    raw = {
        m: {layer: torch.randn(3, *shape, generator=g) for layer, shape in shapes.items()}
        for m in ("gradcam", "layercam", "xrelevancecam")
    }
    sets = ["1", "4", "4+3", "4+3+2+1"]
    scores = score_batch(raw, size=size, layer_sets=sets, agreement_with="xrelevancecam", keep_maps=True)
    agg = scores.maps  # (K, M, B, S, S), M in raw's order
    expected = rank_correlation(agg, agg[:, 2:3])
    difference = (scores.agreement["rank_corr"] - expected).abs()
    assert difference.max() < 0.02 and difference.mean() < 2e-3, difference
    assert torch.allclose(scores.agreement["rank_corr"][:, 2], torch.ones(len(sets), 3))
    assert (scores.agreement["rank_corr"][:, :2] < 0.999).all()


def test_rank_correlation_of_a_monotone_transform_is_one_and_of_the_reverse_minus_one():
    from xrcam.scoring import rank_correlation

    a = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(rank_correlation(a, a.exp(), grid=None), torch.ones(2))
    torch.testing.assert_close(rank_correlation(a, -a, grid=None), -torch.ones(2))
    assert torch.isnan(rank_correlation(torch.zeros(1, 5, 5), a[:1, :5, :5], grid=None)).all()


def test_reference_rows_go_through_the_same_steps():
    """Reference maps (xrcam.references) are scored like a method's: the oracle beats random."""
    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("gradcam",))
    gt = torch.zeros(3, 32, 32, dtype=torch.bool)
    gt[:, 4:20, 4:20] = True
    scores = score_batch(
        raw,
        size=32,
        layer_sets=["4", "4+3+2+1"],
        gt=gt,
        references=["random", "oracle"],
        generator=torch.Generator().manual_seed(0),
    )
    assert scores.methods == ["gradcam", "random", "oracle"]
    assert scores.iou.shape == (2, 3, 3)
    assert (scores.iou[1, 2] > 0.5).all()  # with the fine stages the oracle localises the ground truth
    assert (scores.iou[:, 2] > scores.iou[:, 1]).all()


def test_mean_std_threshold_equals_torch_std_bit_for_bit():
    from xrcam.scoring import thresholds

    g = torch.Generator().manual_seed(5)
    maps = torch.rand((40, 230, 230), generator=g) ** 3  # skewed, like normalised saliency maps
    maps[3] = 0.25  # a constant map: std 0
    flat = maps.flatten(1)
    expected = flat.mean(dim=1) + flat.std(dim=1, correction=0)
    assert torch.equal(thresholds(maps, "mean+std"), expected)


@pytest.mark.parametrize("threshold", ["mean+std", "otsu"])
def test_counts_in_the_reused_buffers_equal_those_of_the_kept_masks(threshold):
    """Without keep_maps the masks are 0/1 floats written over the maps and counted as sums; the
    areas, IoUs and agreement must be those of the bool masks keep_maps returns, bit for bit."""
    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("gradcam", "layercam", "xrelevancecam"), batch=4)
    gt = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(3)) > 0.7
    gt[1] = False  # a frame without ground truth: IoU 0 for a non-empty mask, NaN for an empty one
    sets = ["1", "4", "4+3", "4+3+2+1"]
    options = dict(size=32, layer_sets=sets, gt=gt, threshold=threshold, agreement_with="xrelevancecam")
    fast = score_batch(raw, **options)
    kept = score_batch(raw, keep_maps=True, **options)
    area = kept.masks.flatten(-2).count_nonzero(dim=-1).float()
    assert torch.equal(fast.mask_area, area) and torch.equal(kept.mask_area, area)

    with_gt = iou(kept.masks, gt)  # the public IoU of bool masks: counts by matrix products
    assert torch.equal(fast.iou.nan_to_num(-1), with_gt.nan_to_num(-1))
    assert (fast.iou[:, :, 1][area[:, :, 1] > 0] == 0).all()
    j = fast.methods.index("xrelevancecam")
    agree = iou(kept.masks, kept.masks[:, j : j + 1])
    assert torch.equal(fast.agreement["mask_iou"].nan_to_num(-1), agree.nan_to_num(-1))
    assert torch.equal(fast.agreement["mask_iou"].nan_to_num(-1), kept.agreement["mask_iou"].nan_to_num(-1))


def test_scoring_leaves_no_reference_cycles():
    """A reference cycle (e.g. a closure that calls itself) would keep the batch-sized buffers alive
    until the garbage collector runs: a 40-video reduce peaked at 2.0 instead of 1.0 GB that way."""
    import gc

    from xrcam.scoring import score_batch

    raw = _raw_batch(methods=("gradcam", "xrelevancecam"))
    gt = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(4)) > 0.7
    options = dict(
        size=32,
        layer_sets=["1", "4", "4+3", "4+3+1", "4+3+2+1"],
        gt=gt,
        agreement_with="xrelevancecam",
        inverted=["xrelevancecam"],
        references=["random", "centre", "oracle"],
    )
    score_batch(raw, **options)  # first call: imports and lazily built tables are not garbage
    gc.collect()
    gc.disable()
    try:
        score_batch(raw, **options)
        assert gc.collect() == 0
    finally:
        gc.enable()
