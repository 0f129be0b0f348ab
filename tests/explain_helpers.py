"""Test helpers for the explainer: random models with realistic BatchNorm, and an independent LRP.

``explicit_lrp`` re-implements the reference preset layer by layer with explicit formulas (the conv
adjoint ``conv2d_input``, hand-written splits) and no autograd, on the same timm module's parameters,
so it shares no code path with ``xrcam.lrp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers.selective_kernel import SelectiveKernel
from torch import Tensor, nn
from torch.nn.grad import conv2d_input

import xrcam


def random_model(name: str, num_classes: int, seed: int = 0, dtype=torch.float64, dropout=None) -> nn.Module:
    """Random weights, then BatchNorm statistics calibrated on noise and randomly perturbed."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = xrcam.load_model(name, num_classes=num_classes, dropout=dropout).to(dtype)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64, generator=gen).to(dtype))
    model.eval()
    with torch.no_grad():
        for m in norms:
            n = m.num_features
            m.running_mean += 0.2 * torch.randn(n, generator=gen).to(dtype) * m.running_var.sqrt()
            m.running_var *= torch.empty(n).uniform_(0.5, 2.0, generator=gen).to(dtype)
            m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=gen))
            m.bias.copy_(0.2 * torch.randn(n, generator=gen))
            m.momentum = 0.1
    return model


def images(batch: int = 2, size: int = 64, seed: int = 1, dtype=torch.float64) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---- independent reference LRP (z+ with zero biases, BN/ReLU pass-through, proportional splits) ----------


def _div(n: Tensor, d: Tensor) -> Tensor:
    n, d = torch.broadcast_tensors(n, d)
    safe = torch.where(d != 0, d, torch.ones_like(d))
    return torch.where(d != 0, n / safe, torch.zeros_like(n))


def _conv(x: Tensor, m: nn.Conv2d):
    y = F.conv2d(x, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
    wp = m.weight.clamp(min=0)

    def back(r: Tensor) -> Tensor:
        z = F.conv2d(x, wp, None, m.stride, m.padding, m.dilation, m.groups)
        return x * conv2d_input(x.shape, wp, _div(r, z), m.stride, m.padding, m.dilation, m.groups)

    return y, back


def _bn(x: Tensor, m: nn.BatchNorm2d, relu: bool):
    y = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    return (y.clamp(min=0) if relu else y), (lambda r: r)


def _conv_norm_act(x: Tensor, m: nn.Module):
    y, back = _conv(x, m.conv)
    y, _ = _bn(y, m.bn, relu=isinstance(m.bn.act, nn.ReLU))
    return y, back


def _selective_kernel(x: Tensor, m: SelectiveKernel):
    parts = torch.split(x, m.in_channels // m.num_paths, 1) if m.split_input else [x] * m.num_paths
    outs = [_conv_norm_act(p, op) for p, op in zip(parts, m.paths, strict=True)]
    stacked = torch.stack([o for o, _ in outs], 1)
    gates = m.attn(stacked)
    y = (stacked * gates).sum(1)

    def back(r: Tensor) -> Tensor:
        per_path = [b(_div(gates[:, p] * stacked[:, p] * r, y)) for p, (_, b) in enumerate(outs)]
        return torch.cat(per_path, 1) if m.split_input else sum(per_path)

    return y, back


def _chain(x: Tensor, steps):
    backs = []
    for step in steps:
        x, b = step(x)
        backs.append(b)

    def back(r: Tensor) -> Tensor:
        for b in reversed(backs):
            r = b(r)
        return r

    return x, back


def _block(x: Tensor, blk: nn.Module):
    kind = type(blk).__name__
    if kind == "BasicBlock":
        steps = [
            lambda t: _conv(t, blk.conv1),
            lambda t: _bn(t, blk.bn1, True),
            lambda t: _conv(t, blk.conv2),
            lambda t: _bn(t, blk.bn2, False),
        ]
    elif kind == "Bottleneck":
        steps = [
            lambda t: _conv(t, blk.conv1),
            lambda t: _bn(t, blk.bn1, True),
            lambda t: _conv(t, blk.conv2),
            lambda t: _bn(t, blk.bn2, True),
            lambda t: _conv(t, blk.conv3),
            lambda t: _bn(t, blk.bn3, False),
        ]
    elif kind == "SelectiveKernelBasic":
        steps = [lambda t: _selective_kernel(t, blk.conv1), lambda t: _conv_norm_act(t, blk.conv2)]
    elif kind == "SelectiveKernelBottleneck":
        steps = [
            lambda t: _conv_norm_act(t, blk.conv1),
            lambda t: _selective_kernel(t, blk.conv2),
            lambda t: _conv_norm_act(t, blk.conv3),
        ]
    else:
        raise TypeError(kind)
    a, back_a = _chain(x, steps)
    if blk.downsample is None:
        b, back_b = x, (lambda r: r)
    else:
        b, back_b = _chain(
            x, [lambda t: _conv(t, blk.downsample[0]), lambda t: _bn(t, blk.downsample[1], False)]
        )
    s = a + b

    def back(r: Tensor) -> Tensor:
        return back_a(_div(a * r, s)) + back_b(_div(b * r, s))

    return s.clamp(min=0), back


@torch.no_grad()
def explicit_lrp(model: nn.Module, x: Tensor, target: Tensor, num_classes: int) -> tuple[dict, dict, Tensor]:
    """Activations and reference-preset relevance at layer1..layer4 (CLRP "unit" start), and the logits."""
    t, _ = _bn(model.conv1(x), model.bn1, True)
    t = model.maxpool(t)
    acts, backs = {}, {}
    for i in range(1, 5):
        t, backs[i] = _chain(t, [lambda u, b=b: _block(u, b) for b in model.get_submodule(f"layer{i}")])
        acts[f"layer{i}"] = t
    pooled = t.mean((2, 3))
    logits = pooled @ model.fc.weight.T + model.fc.bias
    r0 = torch.full_like(logits, -1.0 / num_classes)
    r0[torch.arange(len(target)), target] = 1.0
    wp = model.fc.weight.clamp(min=0)
    r_pooled = pooled * (_div(r0, pooled @ wp.T) @ wp)
    r = _div(t * r_pooled[:, :, None, None], t.sum((2, 3), keepdim=True))
    relevance = {"layer4": r}
    for i in (4, 3, 2):
        r = backs[i](r)
        relevance[f"layer{i - 1}"] = r
    return acts, relevance, logits
