"""xrcam.hooks: the one hook-capture helper and model-state restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xrcam
from xrcam.errors import XrcamConfigError
from xrcam.hooks import capture, model_state, stage_shapes


@pytest.fixture(scope="module")
def model():
    return xrcam.load_model("resnet18", num_classes=2)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_records_stage_outputs_and_removes_its_hooks(model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), capture(model, ["layer2", "layer4"]) as outputs:
        logits = model(x)
        assert _hooks(model) == 2
    assert _hooks(model) == 0
    assert outputs["layer2"].shape == (2, 128, 8, 8) and outputs["layer4"].shape == (2, 512, 2, 2)
    assert torch.allclose(model.forward_head(outputs["layer4"]), logits)
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["layer1"]):
        raise RuntimeError("boom")
    assert _hooks(model) == 0
    with pytest.raises(XrcamConfigError, match="layer9"), capture(model, ["layer1", "layer9"]):
        pass
    assert _hooks(model) == 0


def test_capture_detach_keeps_no_graph(model):
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with capture(model, ["layer1"], detach=True) as kept, capture(model, ["layer1"]) as live:
        model(x)
    assert not kept["layer1"].requires_grad and live["layer1"].requires_grad


def test_model_state_restores_every_flag():
    net = xrcam.load_model("resnet18", num_classes=2, dropout=0.1)
    net.layer2.train()
    net.fc.weight.requires_grad_(False)
    modes = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    with model_state(net, training=False, dropout=True, frozen=True):
        assert not net.layer1.training
        assert all(m.training for m in net.modules() if isinstance(m, nn.Dropout))
        assert not any(p.requires_grad for p in net.parameters())
    assert [m.training for m in net.modules()] == modes
    assert [p.requires_grad for p in net.parameters()] == grads


def test_stage_shapes(model):
    assert stage_shapes(model, (96, 96), ["layer1", "layer4"]) == {"layer1": (24, 24), "layer4": (3, 3)}
