"""Composites (which rule sits on which module type), the named presets, and the reversible context.

Preset ``"reference"`` reproduces the published XRelevanceCAM code (SPEC §4): z⁺ with zeroed biases
on every Conv2d and on the classifier, BatchNorm / ReLU / dropout pass-through (no BN fusion),
proportional splits at residual sums, Selective-Kernel fusion and average pooling, max-pooling to the
winner (its ordinary gradient). ``"epsilon"`` and ``"alphabeta"`` change only the Conv2d/Linear rule.

Example::

    with lrp_context(model, make_composite("reference")) as switch:
        logits = model(images)          # same values as without the context
        switch.relevance = True         # backward passes now carry relevance
        (r,) = torch.autograd.grad(logits, stage_output, start_relevance)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from timm.layers.selective_kernel import SelectiveKernelAttn
from torch import Tensor, nn

from xrcam.errors import XrcamConfigError
from xrcam.lrp.canonizers import canonical_forward
from xrcam.lrp.rules import AlphaBeta, Epsilon, PassThrough, Proportional, Switch, ZPlus, route

__all__ = ["PRESETS", "Composite", "make_composite", "lrp_context"]

PRESETS = ("reference", "epsilon", "alphabeta")

_PASS_THROUGH = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Dropout)
_AVERAGING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
# Modules whose ordinary gradient already is the right redistribution (reshape, identity, winner-take-all).
_GRADIENT_IS_RELEVANCE = (nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AdaptiveMaxPool2d)


@dataclass(frozen=True)
class Composite:
    """A rule preset with its parameters; ``rule_for`` maps one module to its rule (or ``None``)."""

    preset: str = "reference"
    params: dict[str, float] = field(default_factory=dict)

    def layer_rule(self, module: nn.Module, signed_input: bool = False):
        if self.preset == "reference":
            return ZPlus(module, signed_input=signed_input)
        if self.preset == "epsilon":
            return Epsilon(module, **self.params)
        return AlphaBeta(module, **self.params, signed_input=signed_input)

    def rule_for(self, module: nn.Module, signed_input: bool = False):
        """The rule for ``module``; ``signed_input`` marks the input layer (the only one fed values < 0)."""
        if isinstance(module, nn.Conv2d | nn.Linear):
            return self.layer_rule(module, signed_input)
        if isinstance(module, _PASS_THROUGH):
            return PassThrough()
        if isinstance(module, _AVERAGING):
            return Proportional(module.forward)
        return None


def make_composite(preset: str | Composite = "reference", **params: float) -> Composite:
    """Build a composite from a preset name: ``"reference"``, ``"epsilon"`` (epsilon=1e-6) or
    ``"alphabeta"`` (alpha=2, beta=1)."""
    if isinstance(preset, Composite):
        return preset
    allowed = {"reference": set(), "epsilon": {"epsilon"}, "alphabeta": {"alpha", "beta"}}
    if preset not in allowed:
        raise XrcamConfigError(f"unknown LRP rule preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(params) - allowed[preset]
    if unknown:
        raise XrcamConfigError(f"LRP preset {preset!r} takes no parameter(s) {sorted(unknown)}")
    if preset == "alphabeta":
        alpha, beta = float(params.get("alpha", 2.0)), float(params.get("beta", 1.0))
        if abs(alpha - beta - 1.0) > 1e-9:
            raise XrcamConfigError(f"LRP-alphabeta needs alpha - beta = 1 (got alpha={alpha}, beta={beta})")
        params = {"alpha": alpha, "beta": beta}
    return Composite(preset, dict(params))


def _routed_forward(module: nn.Module, rule, switch: Switch, name: str) -> Callable[..., Tensor]:
    original = module.forward

    def forward(*inputs: Tensor) -> Tensor:
        return route(switch, rule, original(*inputs), *inputs, name=name)

    return forward


def _plan(
    module: nn.Module, composite: Composite, switch: Switch, first: nn.Module | None, name: str = ""
) -> list:
    """(module, replacement forward) for every module the composite or a canonizer rewrites.

    ``first`` is the input layer: every later Conv2d/Linear of this family follows a ReLU (or pooling
    of one) and so sees non-negative inputs, which lets the z⁺ and αβ rules skip the negative half.
    """
    if isinstance(module, SelectiveKernelAttn):
        return []  # the gates are constants for LRP; their own gradient still flows in gradient mode
    rule = composite.rule_for(module, signed_input=module is first)
    if rule is not None:
        return [(module, _routed_forward(module, rule, switch, name))]
    children = list(module.named_children())
    if not children:
        if isinstance(module, _GRADIENT_IS_RELEVANCE):
            return []
        raise XrcamConfigError(
            f"module {name or type(module).__name__!r} ({type(module).__name__}) has no LRP rule; xrcam "
            "explains the timm ResNet/ResNeXt/SK-ResNet(X)t family (see xrcam.models.SUPPORTED_MODELS)"
        )
    plan = []
    forward = canonical_forward(module, switch, name)
    if forward is not None:
        plan.append((module, forward))
    for child_name, child in children:
        plan += _plan(child, composite, switch, first, f"{name}.{child_name}" if name else child_name)
    return plan


@contextmanager
def lrp_context(
    model: nn.Module, composite: Composite | str = "reference", track_leaks: bool = False
) -> Iterator[Switch]:
    """Rewrite ``model`` for LRP inside the block; restore every forward and flag on exit, even on error.

    Forward values are unchanged. The yielded :class:`Switch` selects what backward passes carry
    (and collects per-module relevance leaks when ``track_leaks``). In-place ReLUs are made
    out-of-place meanwhile (an in-place write would clobber routed outputs).
    """
    switch = Switch(track_leaks)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)
    plan = _plan(model, make_composite(composite), switch, first)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU) and m.inplace]
    patched: list[tuple[nn.Module, object]] = []
    try:
        for module, forward in plan:
            patched.append((module, module.__dict__.get("forward")))
            module.forward = forward
        for relu in relus:
            relu.inplace = False
        yield switch
    finally:
        for relu in relus:
            relu.inplace = True
        for module, previous in reversed(patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
