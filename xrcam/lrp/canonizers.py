"""Architecture-specific rewrites that make timm's ResNet family relevance-aware, reversibly.

timm's residual blocks end with an in-place ``x += shortcut``, and its Selective-Kernel convolution
fuses its paths with attention gates. Neither is a module an LRP rule can sit on, so these canonizers
give such blocks a replacement ``forward`` that computes the same values out of place and routes the
sums through a rule:

* residual sum ``a + b``: relevance split in proportion to ``a`` and ``b`` (z-rule);
* Selective-Kernel fusion ``Σ_p a_p x_p``: split in proportion to ``a_p x_p``, the gates ``a`` held
  constant, so the attention branch receives no relevance (SPEC §4).

The replacement forwards are installed as instance attributes by :func:`xrcam.lrp.lrp_context`
and removed on exit; the class code is never modified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.layers.selective_kernel import SelectiveKernel, SelectiveKernelAttn
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.sknet import SelectiveKernelBasic, SelectiveKernelBottleneck
from torch import Tensor, nn

from xrcam.lrp.rules import GatedSum, Sum, Switch, route

__all__ = ["canonical_forward", "HELD_CONSTANT", "RESIDUAL_BLOCKS"]

# Modules whose outputs LRP treats as constants: no rule, no relevance (SPEC §4: the Selective-Kernel
# attention gates); their ordinary gradient still flows in gradient mode.
HELD_CONSTANT: tuple[type[nn.Module], ...] = (SelectiveKernelAttn,)

# Residual branch of each timm block, in the order its own forward applies it, and its final activation.
RESIDUAL_BLOCKS: dict[type[nn.Module], tuple[tuple[str, ...], str]] = {
    BasicBlock: (("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path"), "act2"),
    Bottleneck: (
        (
            "conv1",
            "bn1",
            "act1",
            "conv2",
            "bn2",
            "drop_block",
            "act2",
            "aa",
            "conv3",
            "bn3",
            "se",
            "drop_path",
        ),
        "act3",
    ),
    SelectiveKernelBasic: (("conv1", "conv2", "se", "drop_path"), "act"),
    SelectiveKernelBottleneck: (("conv1", "conv2", "conv3", "se", "drop_path"), "act"),
}

_ADD = Sum()


def _residual_forward(block: nn.Module, switch: Switch, name: str) -> Callable[[Tensor], Tensor]:
    branch_names, act_name = RESIDUAL_BLOCKS[type(block)]
    branch = [m for m in (getattr(block, name, None) for name in branch_names) if m is not None]
    act = getattr(block, act_name)

    def forward(x: Tensor) -> Tensor:
        out = x
        for module in branch:
            out = module(out)
        shortcut = x if block.downsample is None else block.downsample(x)
        return act(route(switch, _ADD, out + shortcut, out, shortcut, name=f"{name}.residual_sum"))

    return forward


def _selective_kernel_forward(sk: SelectiveKernel, switch: Switch, name: str) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        if sk.split_input:
            parts = torch.split(x, sk.in_channels // sk.num_paths, 1)
            paths = [op(part) for op, part in zip(sk.paths, parts, strict=True)]
        else:
            paths = [op(x) for op in sk.paths]
        stacked = torch.stack(paths, dim=1)
        gates = sk.attn(stacked)
        return route(switch, GatedSum(gates), (stacked * gates).sum(1), stacked, name=f"{name}.gated_sum")

    return forward


def canonical_forward(module: nn.Module, switch: Switch, name: str = "") -> Callable[[Tensor], Tensor] | None:
    """The relevance-aware replacement forward for ``module`` (called ``name``), or ``None``."""
    if type(module) in RESIDUAL_BLOCKS:
        return _residual_forward(module, switch, name)
    if type(module) is SelectiveKernel:
        return _selective_kernel_forward(module, switch, name)
    return None
