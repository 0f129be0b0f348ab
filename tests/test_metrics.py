"""Evaluation metrics: mIoU, axiom metrics (conservation, sensitivity) and the sanity check (SPEC §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import scipy.stats
import timm
import torch
from torch import nn

from xrcam.errors import XrcamConfigError
from xrcam.metrics import (
    ablation_logits,
    conservation,
    contrastive_score,
    logit_score,
    mean_iou,
    randomize_stage_,
    score_function,
    sensitivity,
    spearman,
    ssim,
    stage_activations,
    stage_head,
)


# --------------------------------------------------------------------------------------------- mIoU
def test_miou_excludes_misclassified_unannotated_and_empty_gt_frames():
    ious = [0.5, 0.1, 0.9, 0.0, math.nan, 0.3]
    correct = [True, True, False, True, True, True]
    has_gt = [True, True, True, True, False, True]
    gt_empty = [False, False, False, True, False, False]
    got = mean_iou(ious, correct=correct, has_gt=has_gt, gt_empty=gt_empty)
    assert got.miou == pytest.approx((0.5 + 0.1 + 0.3) / 3)
    assert (got.frames, got.empty_gt, got.misclassified) == (3, 1, 1)


def test_miou_without_eligible_frames_is_nan_not_an_error():
    got = mean_iou([0.4], correct=[False], has_gt=[True], gt_empty=[False])
    assert math.isnan(got.miou) and got.frames == 0 and got.misclassified == 1
    with pytest.raises(XrcamConfigError):
        mean_iou([0.4, 0.2], correct=[True], has_gt=[True], gt_empty=[False])


# ----------------------------------------------------------------------------------- scores
def test_scores_logit_and_contrastive():
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, 4.0, -3.0]])
    target = torch.tensor([0, 1])
    assert logit_score(logits, target).tolist() == [2.0, 4.0]
    # L_t - (N-1) L_t / N with N = 3
    assert contrastive_score(logits, target).tolist() == pytest.approx([2 - 2 * 2 / 3, 4 - 2 * 4 / 3])
    # ablated logits (B, K, N) keep each frame's target
    ablated = torch.stack([logits, logits + 1], dim=1)
    assert logit_score(ablated, target[:, None]).tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert score_function("xrelevancecam") is contrastive_score and score_function("hirescam") is logit_score


def test_conservation_on_known_numbers():
    score = torch.tensor([2.0, -4.0])
    contrib = torch.tensor([[1.0, 0.5, 0.5], [-1.0, -1.0, -1.0]])
    assert conservation(score, contrib).tolist() == pytest.approx([0.0, 0.25])
    # a zero score leaves the ratio undefined: NaN (skipped by averages), never inf
    assert torch.isnan(conservation(torch.tensor([0.0]), torch.tensor([[1.0]]))).all()
    assert torch.isnan(
        sensitivity(torch.tensor([1.0]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.5, 0.0]]))
    ).all()


# -------------------------------------------------------------------- sensitivity on a tiny network
class TinyHead(nn.Module):
    """logits = W relu(mean_hw A - 1): small enough to ablate by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.tensor([[1.0, 2.0, -1.0], [0.5, -1.0, 3.0]])

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return torch.relu(a.mean(dim=(2, 3)) - 1) @ self.w.T


def test_ablation_logits_and_sensitivity_by_hand():
    # one frame, K=3 channels of 2x2; channel means 3, 2, 0.5 -> relu(mean - 1) = 2, 1, 0
    a = torch.tensor([[[[3.0, 3.0], [3.0, 3.0]], [[1.0, 3.0], [2.0, 2.0]], [[0.5, 0.5], [0.0, 1.0]]]])
    head = TinyHead()
    logits = head(a)
    assert logits.tolist() == [[4.0, 0.0]]  # class 0: 1*2 + 2*1 - 0;  class 1: 0.5*2 - 1*1 + 0
    for chunk in (1, 2, 64):
        ablated = ablation_logits(head, a, chunk_size=chunk)
        # zeroing a channel makes its relu(mean - 1) = relu(-1) = 0
        assert ablated.tolist() == [[[2.0, -1.0], [2.0, 1.0], [4.0, 0.0]]]
    target = torch.tensor([0])
    score = logit_score(logits, target)  # 4
    drop = score[:, None] - logit_score(ablated, target[:, None])  # [2, 2, 0]
    assert drop.tolist() == [[2.0, 2.0, 0.0]]
    contrib = torch.tensor([[1.0, 2.5, 0.5]])
    # sum_k |d_k - c_k| / sum_k |d_k| = (1 + 0.5 + 0.5) / 4
    assert sensitivity(score, logit_score(ablated, target[:, None]), contrib).tolist() == pytest.approx([0.5])
    # the exact drops are a perfect score
    assert sensitivity(score, logit_score(ablated, target[:, None]), drop).tolist() == pytest.approx([0.0])


class TinyNet(nn.Module):
    """A hand-made network: layer1 = identity 1x1 conv + ReLU, then the head of :class:`TinyHead`."""

    def __init__(self):
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
        self.hidden = nn.Linear(3, 3)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.layer1[0].weight.copy_(torch.eye(3)[:, :, None, None])
            self.layer1[0].bias.zero_()
            self.hidden.weight.copy_(torch.eye(3))
            self.hidden.bias.fill_(-1.0)
            self.fc.weight.copy_(TinyHead().w)
            self.fc.bias.zero_()

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(a.mean(dim=(2, 3)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(x))


def test_axiom_metrics_on_a_hand_made_network():
    """Channel means m = (3, 2, 0.5), W_t = (1, 2, -1), L_t = 4, N = 2; zeroing channel k gives relu(-1) = 0.

    GradCAM: g_k = W_tk 1[m_k > 1] / hw, so c_k = W_tk 1[m_k > 1] m_k = (3, 4, 0) while the logit drops are
    d_k = W_tk relu(m_k - 1) = (2, 2, 0): conservation |4 - 7| / 4 = 0.75, sensitivity (1 + 2) / 4 = 0.75.
    XRelevanceCAM: S_c = L_t / 2 = 2, drops (1, 1, 0). z+ LRP from (4, -2): class 0 gives h = (2, 1, 0) the
    shares (2, 2, 0), class 1 gives (-2, 0, 0), so c = (0, 2, 0): conservation 0, sensitivity (1 + 1) / 2 = 1.
    """
    from xrcam.metrics import axiom_metrics

    net = TinyNet().eval()
    a = torch.tensor([[[[3.0, 3.0], [3.0, 3.0]], [[1.0, 3.0], [2.0, 2.0]], [[0.5, 0.5], [0.0, 1.0]]]])
    assert net(a).tolist() == [[4.0, 0.0]]
    result = axiom_metrics(
        net, a, methods=["gradcam", "xrelevancecam"], layers=["layer1"], heads={"layer1": net.head}
    )
    assert result["gradcam"]["layer1"].conservation.item() == pytest.approx(0.75, abs=1e-6)
    assert result["gradcam"]["layer1"].sensitivity.item() == pytest.approx(0.75, abs=1e-6)
    assert result["xrelevancecam"]["layer1"].conservation.item() == pytest.approx(0.0, abs=1e-6)
    assert result["xrelevancecam"]["layer1"].sensitivity.item() == pytest.approx(1.0, abs=1e-6)


def test_ablation_logits_batches_frames_and_channels_consistently():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 5, 4, 4, generator=g) * 3
    head = TinyHead()
    head.w = torch.randn(2, 5, generator=g)
    got = ablation_logits(head, a, chunk_size=4)
    for b in range(3):
        for k in range(5):
            x = a[b : b + 1].clone()
            x[:, k] = 0
            torch.testing.assert_close(got[b, k], head(x)[0])
    with pytest.raises(XrcamConfigError):
        ablation_logits(head, a, chunk_size=0)


# ------------------------------------------------------------------------------ timm plumbing
@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=2).eval()


def test_stage_head_reproduces_the_logits(resnet18):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    acts, logits = stage_activations(resnet18, images, ["layer1", "layer2", "layer3", "layer4"])
    assert acts["layer3"].shape == (2, 256, 4, 4)
    for layer, a in acts.items():
        with torch.no_grad():
            torch.testing.assert_close(stage_head(resnet18, layer)(a), logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(XrcamConfigError):
        stage_head(resnet18, "conv1")


def test_randomize_stage_changes_only_that_stage_and_is_seeded(resnet18):
    import copy

    trained = copy.deepcopy(resnet18)
    with torch.no_grad():  # BatchNorm away from its fresh (1, 0) values, as after training
        for p in trained.parameters():
            p.add_(0.01)
    a = randomize_stage_(copy.deepcopy(trained), "layer3", seed=5)
    b = randomize_stage_(copy.deepcopy(trained), "layer3", seed=5)
    before = dict(trained.named_parameters())
    for name, p in a.named_parameters():
        same = torch.equal(p, before[name])
        assert same == (not name.startswith("layer3.")), name
        assert torch.equal(p, dict(b.named_parameters())[name])
    rng_before = torch.random.get_rng_state()
    randomize_stage_(copy.deepcopy(resnet18), "layer4", seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched


# ------------------------------------------------------------------------- spearman and ssim
def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(4, 9, 9, generator=g) * 5).round()  # many ties
    b = a + torch.rand(4, 9, 9, generator=g) * 3
    b[1] = torch.rand(9, 9, generator=g)
    b[2] = b[2].clamp_max(3)  # ties on the other side too
    got = spearman(a, b)
    for i in range(4):
        ref = scipy.stats.spearmanr(a[i].ravel().numpy(), b[i].ravel().numpy()).statistic
        assert got[i].item() == pytest.approx(ref, abs=1e-6)
    assert spearman(a, a).tolist() == pytest.approx([1.0] * 4)
    assert spearman(a, -a).tolist() == pytest.approx([-1.0] * 4)
    assert torch.isnan(spearman(torch.zeros(1, 9, 9), a[:1])).all()


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 with an 11x11 gaussian (sigma 1.5) window, valid positions, data range 1."""
    r = np.arange(11) - 5
    g = np.exp(-(r**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(t):
        return scipy.signal.correlate2d(t, w, mode="valid")

    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def test_ssim_matches_reference_and_identity():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 24, 20, generator=g)
    b = (a + 0.3 * torch.rand(3, 24, 20, generator=g)).clamp(0, 1)
    b[2] = torch.rand(24, 20, generator=g)
    got = ssim(a, b)
    for i in range(3):
        assert got[i].item() == pytest.approx(
            _ssim_reference(a[i].double().numpy(), b[i].double().numpy()), abs=1e-6
        )
    assert ssim(a, a).tolist() == pytest.approx([1.0] * 3)
    assert got[2] < got[0] < 1


# --------------------------------------------------------------------- axioms with the explainer
ALL_STAGES = ("layer1", "layer2", "layer3", "layer4")


@pytest.mark.parametrize("name", ["resnet18", pytest.param("skresnet18", marks=pytest.mark.slow)])
def test_xrelevancecam_conservation_is_an_identity_and_gradcams_is_not(name):
    import xrcam
    from xrcam.metrics import axiom_metrics

    torch.manual_seed(0)
    model = xrcam.load_model(name, num_classes=2)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    result = axiom_metrics(
        model, images, methods=["gradcam", "xrelevancecam"], layers=ALL_STAGES, chunk_size=256
    )
    for layer in ALL_STAGES:
        assert result["xrelevancecam"][layer].conservation.max() < 1e-3, layer
        assert result["xrelevancecam"][layer].sensitivity.isfinite().all()
    assert max(float(result["gradcam"][layer].conservation.min()) for layer in ALL_STAGES) > 1e-2


def test_gradient_family_axioms_at_the_last_stage_match_the_linear_head():
    """Above layer4 sits GAP + linear, so GradCAM's weights are exact: S(A) - S(A\\A_k) = W_tk mean(A_k) = c_k.

    Hence sensitivity 0 and conservation |b_t| / |L_t| (the bias is the only part of L_t not in any channel).
    """
    import xrcam
    from xrcam.metrics import axiom_metrics

    torch.manual_seed(1)
    model = xrcam.load_model("resnet18", num_classes=3)
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = axiom_metrics(model, images, methods=["gradcam", "xgradcam", "hirescam"], layers=["layer4"])
    with torch.no_grad():
        logits = model(images)
    target = logits.argmax(dim=1)
    expected = (model.fc.bias[target] / logits.gather(1, target[:, None])[:, 0]).abs()
    for method in ("gradcam", "xgradcam", "hirescam"):
        r = result[method]["layer4"]
        assert r.sensitivity.max() < 1e-4, method
        torch.testing.assert_close(r.conservation, expected, rtol=1e-3, atol=1e-5)


def test_axiom_metrics_rejects_a_head_that_does_not_fit_and_restores_the_model(resnet18):
    from xrcam.metrics import axiom_metrics

    resnet18.train()
    images = torch.randn(2, 3, 64, 64)
    with pytest.raises(XrcamConfigError, match="layer3"):
        axiom_metrics(
            resnet18,
            images,
            methods=["gradcam"],
            layers=["layer3"],
            heads={"layer3": lambda a: torch.zeros(len(a), 2)},
        )
    assert all(m.training for m in resnet18.modules())
    resnet18.eval()


# ------------------------------------------------------------------------------ sanity check
def _blob_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A structured toy task: class 1 frames hold a bright square somewhere, class 0 frames only noise."""
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 48, 48, generator=g) * 0.3
    for i in range(n):
        if y[i]:
            r, c = torch.randint(4, 34, (2,), generator=g).tolist()
            x[i, :, r : r + 10, c : c + 10] += 2.0
    return x.expand(n, 3, 48, 48).contiguous(), y


@pytest.mark.slow
def test_cascading_randomization_lowers_similarity_on_a_trained_model():
    import pandas as pd

    import xrcam
    from xrcam.metrics import cascading_randomization

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = xrcam.load_model("resnet18", num_classes=2)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(20):
        x, y = _blob_batch(8, g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _blob_batch(12, g)
    images = x[y == 1][:4]
    records = cascading_randomization(
        model, images, methods=["gradcam", "layercam", "xrelevancecam"], layers=ALL_STAGES, size=48
    )
    df = pd.DataFrame.from_records(records)
    assert len(df) == 4 * 3 * 4 and list(df["randomized"].unique()) == ["4", "4+3", "4+3+2", "4+3+2+1"]
    assert all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )  # the model itself is untouched
    for value in ("spearman", "ssim"):
        by_step = df.groupby("step")[value].mean().to_numpy()
        assert by_step[0] < 0.95, (value, by_step)  # randomising layer4 alone already changes the maps
        assert np.all(np.diff(by_step) < 0.05), (value, by_step)  # never recovers as more stages go
        assert by_step[-1] < by_step[0] - 0.2, (value, by_step)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scoring_and_metrics_on_cuda_match_cpu():
    import copy

    import xrcam
    from xrcam.metrics import axiom_metrics
    from xrcam.scoring import THRESHOLD_RULES, aggregate, iou, make_masks, normalize

    g = torch.Generator().manual_seed(0)
    raw = {layer: torch.randn(3, 4 * 2**i, 4 * 2**i, generator=g) for i, layer in enumerate(ALL_STAGES)}
    gt = torch.rand(3, 64, 64, generator=g) > 0.7
    for device in ("cpu", "cuda"):
        norm = {layer: normalize(m.to(device), 64, method="gradcam") for layer, m in raw.items()}
        agg = aggregate(norm, "4+3+2+1")
        masks = {rule: make_masks(agg, rule) for rule in THRESHOLD_RULES}
        scores = {rule: iou(m, gt.to(device)).cpu() for rule, m in masks.items()}
        if device == "cpu":
            ref_agg, ref_scores = agg, scores
    torch.testing.assert_close(agg.cpu(), ref_agg, atol=1e-5, rtol=1e-5)
    for rule in THRESHOLD_RULES:
        torch.testing.assert_close(
            scores[rule], ref_scores[rule], atol=2e-2, rtol=0
        )  # a boundary pixel may flip
    a, b = ref_agg, torch.rand(3, 64, 64, generator=g)
    torch.testing.assert_close(spearman(a.cuda(), b.cuda()).cpu(), spearman(a, b), atol=1e-5, rtol=0)
    torch.testing.assert_close(ssim(a.cuda(), b.cuda()).cpu(), ssim(a, b), atol=1e-5, rtol=0)

    torch.manual_seed(0)
    model = xrcam.load_model("resnet18", num_classes=2).cuda()
    images = torch.randn(2, 3, 64, 64, generator=g).cuda()
    result = axiom_metrics(model, images, methods=["xrelevancecam"], layers=ALL_STAGES, chunk_size=128)
    assert all(result["xrelevancecam"][layer].conservation.max() < 1e-3 for layer in ALL_STAGES)
    state = torch.cuda.get_rng_state()
    randomize_stage_(copy.deepcopy(model), "layer4", seed=3)
    assert torch.equal(torch.cuda.get_rng_state(), state)
