"""LRP rules: how one operation hands the relevance of its output back to its inputs.

The engine follows zennit's idea, implemented here from scratch: every explained operation's output
passes through :func:`route`, an identity in the forward pass whose backward pass does one of two
things, chosen by a shared :class:`Switch` at backward time:

* gradient mode: the ordinary gradient flows (through the operation's own autograd graph);
* relevance mode: the rule's relevance flows, straight to the operation's inputs.

So the "gradient" that reaches a captured stage output in relevance mode *is* the relevance there, and
one forward pass serves both families of methods (two ``torch.autograd.grad`` calls on one graph).

A rule is a callable ``rule(relevance_out, *inputs) -> tuple[relevance_in, ...]``.
Linear rules use the gradient-times-input trick: with ``z = f(x)`` linear and bias-free,
``R_in = x * (J_f^T (R_out / z))``, and ``J_f^T s`` is one vector-Jacobian product of ``f``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Switch",
    "route",
    "safe_divide",
    "z_rule",
    "PassThrough",
    "Proportional",
    "Sum",
    "GatedSum",
    "ZPlus",
    "Epsilon",
    "AlphaBeta",
]

Rule = Callable[..., tuple[Tensor, ...]]


class Switch:
    """Which signal the routed backward passes carry: gradients (default) or relevance.

    With ``track_leaks=True`` every routed operation records, per sample, how much relevance it did
    not pass on (``Σ R_out − Σ R_in``, keyed by module name): zero for the conserving rules except
    where a denominator was exactly 0. A diagnostic for tests and docs; it costs two sums per op.
    """

    def __init__(self, track_leaks: bool = False) -> None:
        self.relevance = False
        self.leaks: dict[str, Tensor] | None = {} if track_leaks else None


class _Route(torch.autograd.Function):
    """Identity on ``output``; its backward gives the gradient to ``output`` or the relevance to ``inputs``."""

    @staticmethod
    def forward(ctx, switch: Switch, rule: Rule, name: str, output: Tensor, *inputs: Tensor) -> Tensor:
        ctx.switch, ctx.rule, ctx.name, ctx.num_inputs = switch, rule, name, len(inputs)
        ctx.save_for_backward(*(inputs if getattr(rule, "keep_inputs", True) else ()))
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if not ctx.switch.relevance:
            return (None, None, None, grad) + (None,) * ctx.num_inputs
        relevance = ctx.rule(grad, *ctx.saved_tensors) if ctx.saved_tensors else ctx.rule(grad)
        leaks = ctx.switch.leaks
        if leaks is not None:
            per_sample = lambda t: t.reshape(t.shape[0], -1).sum(1)  # noqa: E731
            leak = per_sample(grad) - sum(per_sample(r) for r in relevance)
            leaks[ctx.name] = leaks[ctx.name] + leak if ctx.name in leaks else leak
        return (None, None, None, None, *relevance)


def route(switch: Switch, rule: Rule, output: Tensor, *inputs: Tensor, name: str = "") -> Tensor:
    """Return ``output`` unchanged, wired so that relevance mode applies ``rule`` to ``inputs``.

    The rule's ``keep_inputs`` attribute (default true) says whether it needs the inputs saved.
    """
    return _Route.apply(switch, rule, name, output, *inputs)


def safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``, and 0 where the denominator is exactly 0 (that relevance is dropped)."""
    # n/0 is ±inf or nan: zero them in place (two passes instead of masking: this runs on every layer)
    return torch.div(numerator, denominator).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def z_rule(fn: Callable[..., Tensor], inputs: Sequence[Tensor], relevance: Tensor) -> tuple[Tensor, ...]:
    """Proportional redistribution through a bias-free linear ``fn``: ``R_i = x_i * ∂/∂x_i <s, fn(x)>``, ``s = R / fn(x)``."""
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        z = fn(*leaves)
        grads = torch.autograd.grad(z, leaves, safe_divide(relevance, z))
    return tuple(x * g for x, g in zip(inputs, grads, strict=True))


class PassThrough:
    """BatchNorm, ReLU, dropout: relevance passes unchanged (SPEC §4: no BN fusion)."""

    keep_inputs = False

    def __call__(self, relevance: Tensor) -> tuple[Tensor]:
        return (relevance,)


class Proportional:
    """z-rule for a bias-free linear operation with no weights to clamp (sums, average pooling)."""

    keep_inputs = True

    def __init__(self, fn: Callable[..., Tensor]):
        self.fn = fn

    def __call__(self, relevance: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        return z_rule(self.fn, inputs, relevance)


class Sum:
    """Residual sum ``a + b``: ``R_a = a/(a+b)·R``, ``R_b = b/(a+b)·R`` (z-rule, written out: it runs per block)."""

    keep_inputs = True

    def __call__(self, relevance: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        share = safe_divide(relevance, a + b)
        return a * share, b * share


class GatedSum:
    """Selective-Kernel fusion ``y = Σ_p a_p x_p`` with the gates ``a`` held constant: split ∝ ``a_p x_p``."""

    keep_inputs = True

    def __init__(self, gates: Tensor):
        self.gates = gates.detach()

    def __call__(self, relevance: Tensor, paths: Tensor) -> tuple[Tensor]:
        weighted = paths * self.gates
        return (weighted * safe_divide(relevance, weighted.sum(1)).unsqueeze(1),)


@dataclass(frozen=True)
class _Layer:
    """The parts of a Conv2d / Linear a rule needs, with a forward that takes any weight and bias."""

    module: nn.Module

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, weight, bias)
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros":
            return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)
        raise TypeError(
            f"no LRP rule for {type(m).__name__} (padding_mode={getattr(m, 'padding_mode', None)})"
        )


def _signed_parts(
    layer: _Layer, weight: Tensor, x: Tensor, relevance: Tensor, positive: bool, signed_input: bool
) -> Tensor:
    """Relevance of the positive (or negative) products ``x_i w_ij`` alone, each normalised by its own sum.

    ``signed_input=False`` assumes ``x >= 0`` (true after every ReLU), which halves the work.
    """
    weight = weight.detach()
    w_same = weight.clamp(min=0) if positive else weight.clamp(max=0)
    if not signed_input:
        return z_rule(lambda a: layer(a, w_same), (x,), relevance)[0]
    w_flip = weight.clamp(max=0) if positive else weight.clamp(min=0)
    r_pos, r_neg = z_rule(
        lambda a, b: layer(a, w_same) + layer(b, w_flip), (x.clamp(min=0), x.clamp(max=0)), relevance
    )
    return r_pos + r_neg


class ZPlus:
    """z⁺ rule (LRP-αβ with α=1, β=0), biases zeroed: ``R_i = Σ_j (x_i w_ij)⁺ / Σ_i' (x_i' w_i'j)⁺ · R_j``.

    Montavon et al., "Layer-wise relevance propagation: an overview", 2019. For non-negative inputs
    (every layer after a ReLU) this is ``x ⊙ W⁺ᵀ (R / W⁺x)``, the published XRelevanceCAM code's rule.
    """

    keep_inputs = True

    def __init__(self, module: nn.Module, signed_input: bool = False):
        self.layer, self.signed_input = _Layer(module), signed_input

    def __call__(self, relevance: Tensor, x: Tensor) -> tuple[Tensor]:
        weight = self.layer.module.weight
        return (_signed_parts(self.layer, weight, x, relevance, True, self.signed_input),)


class AlphaBeta:
    """LRP-αβ: ``α·R⁺ − β·R⁻`` with positive and negative products normalised separately.

    Conserving for α − β = 1, which the ``"alphabeta"`` composite checks (:mod:`xrcam.lrp.composites`).
    """

    keep_inputs = True

    def __init__(self, module: nn.Module, alpha: float = 2.0, beta: float = 1.0, signed_input: bool = False):
        self.layer, self.alpha, self.beta, self.signed_input = _Layer(module), alpha, beta, signed_input

    def __call__(self, relevance: Tensor, x: Tensor) -> tuple[Tensor]:
        weight, signed = self.layer.module.weight, self.signed_input
        r = self.alpha * _signed_parts(self.layer, weight, x, relevance, True, signed)
        if self.beta:
            r = r - self.beta * _signed_parts(self.layer, weight, x, relevance, False, signed)
        return (r,)


class Epsilon:
    """LRP-ε: ``R_i = x_i w_ij / (z_j + ε·sign(z_j)) · R_j`` with the layer's own bias in ``z``."""

    keep_inputs = True

    def __init__(self, module: nn.Module, epsilon: float = 1e-6):
        self.layer, self.epsilon = _Layer(module), epsilon

    def __call__(self, relevance: Tensor, x: Tensor) -> tuple[Tensor]:
        module = self.layer.module
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            z = self.layer(leaf, module.weight.detach(), None)
            bias = module.bias.detach() if module.bias is not None else None
            total = z if bias is None else z + bias.view(1, -1, *([1] * (z.dim() - 2)))
            stabilised = total + self.epsilon * torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
            (grad,) = torch.autograd.grad(z, leaf, relevance / stabilised)
        return (x * grad,)
