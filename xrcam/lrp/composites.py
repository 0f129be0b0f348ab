"""Composites as data: which rule sits on which module type, registered by name, and the reversible context.

A composite is a list of ``(module types, rule factory)`` entries; the first entry whose types match a
module gives its rule (zennit's shape). A named composite is a function registered with
:func:`register_composite` that takes the composite's parameters (keyword arguments with defaults),
validates them and returns that list; :func:`make_composite` builds one by name, like
:func:`xrcam.explain.create_explainer` builds methods. Adding a composite is one decorated function here.

``"reference"`` reproduces the published XRelevanceCAM code (SPEC §4): z⁺ with zeroed biases on every
Conv2d and on the classifier, BatchNorm / ReLU / dropout pass-through (no BN fusion), average pooling
proportional; residual sums and Selective-Kernel fusion are split proportionally by the canonizers
(:mod:`xrcam.lrp.canonizers`, where every architecture-specific detail lives), max-pooling goes to the
winner (its ordinary gradient). ``"epsilon"`` and ``"alphabeta"`` change only the Conv2d/Linear rule.

Example::

    with lrp_context(model, make_composite("reference")) as switch:
        logits = model(images)          # same values as without the context
        switch.relevance = True         # backward passes now carry relevance
        (r,) = torch.autograd.grad(logits, stage_output, start_relevance)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from xrcam.errors import XrcamConfigError
from xrcam.lrp.canonizers import HELD_CONSTANT, canonical_forward
from xrcam.lrp.rules import AlphaBeta, Epsilon, PassThrough, Proportional, Switch, ZPlus, route

__all__ = [
    "PRESETS",
    "Composite",
    "Entry",
    "RuleFactory",
    "list_composites",
    "lrp_context",
    "make_composite",
    "register_composite",
]

#: ``factory(module, signed_input) -> rule``; ``signed_input`` marks the input layer (the only one fed
#: values < 0, which the z⁺ and αβ rules must then handle in full).
RuleFactory = Callable[[nn.Module, bool], Callable[..., tuple[Tensor, ...]]]
Entry = tuple[tuple[type[nn.Module], ...], RuleFactory]

_LAYERS = (nn.Conv2d, nn.Linear)
# Modules whose ordinary gradient already is the right redistribution (reshape, identity, winner-take-all).
_GRADIENT_IS_RELEVANCE = (nn.Identity, nn.Flatten, nn.MaxPool2d, nn.AdaptiveMaxPool2d)
# Entries every preset shares after its layer rule.
_COMMON: tuple[Entry, ...] = (
    ((nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.Dropout), lambda module, signed: PassThrough()),
    ((nn.AdaptiveAvgPool2d, nn.AvgPool2d), lambda module, signed: Proportional(module.forward)),
)


@dataclass(frozen=True)
class Composite:
    """A named composite with its (validated) parameters and its ``(types, rule factory)`` entries."""

    preset: str = "reference"
    params: dict[str, float] = field(default_factory=dict)
    entries: tuple[Entry, ...] = ()

    @property
    def name(self) -> str:
        return self.preset

    def rule_for(self, module: nn.Module, signed_input: bool = False):
        """The rule of the first entry whose types match ``module``, or ``None``."""
        for types, factory in self.entries:
            if isinstance(module, types):
                return factory(module, signed_input)
        return None


_COMPOSITES: dict[str, Callable[..., Sequence[Entry]]] = {}


def register_composite(name: str) -> Callable:
    """Decorator registering ``fn(**params) -> [(module types, rule factory), ...]`` as composite ``name``.

    ``fn``'s keyword parameters (with defaults) are the composite's parameters; it validates them.
    """

    def decorate(fn: Callable[..., Sequence[Entry]]) -> Callable[..., Sequence[Entry]]:
        _COMPOSITES[name] = fn
        return fn

    return decorate


def list_composites() -> list[str]:
    """Registered composite names (registration order)."""
    return list(_COMPOSITES)


@register_composite("reference")
def _reference() -> list[Entry]:
    """z⁺ on Conv2d/Linear, biases zeroed: the published XRelevanceCAM code."""
    return [(_LAYERS, lambda module, signed: ZPlus(module, signed_input=signed)), *_COMMON]


@register_composite("epsilon")
def _epsilon(epsilon: float = 1e-6) -> list[Entry]:
    """LRP-ε on Conv2d/Linear (with their biases)."""
    return [(_LAYERS, lambda module, signed: Epsilon(module, epsilon=epsilon)), *_COMMON]


@register_composite("alphabeta")
def _alphabeta(alpha: float = 2.0, beta: float = 1.0) -> list[Entry]:
    """LRP-αβ on Conv2d/Linear; conserving only for α − β = 1."""
    if abs(alpha - beta - 1.0) > 1e-9:
        raise XrcamConfigError(f"LRP-alphabeta needs alpha - beta = 1 (got alpha={alpha}, beta={beta})")
    return [(_LAYERS, lambda module, signed: AlphaBeta(module, alpha, beta, signed_input=signed)), *_COMMON]


#: The registered composite names (the built-in ones; :func:`list_composites` includes later ones).
PRESETS = tuple(_COMPOSITES)


def make_composite(preset: str | Composite = "reference", **params: float) -> Composite:
    """Build the registered composite ``preset`` (``"reference"``, ``"epsilon"`` (epsilon=1e-6),
    ``"alphabeta"`` (alpha=2, beta=1), ...) with ``params``; a :class:`Composite` is returned as is."""
    if isinstance(preset, Composite):
        return preset
    fn = _COMPOSITES.get(preset)
    if fn is None:
        raise XrcamConfigError(
            f"unknown LRP rule preset {preset!r}; choose one of {', '.join(list_composites())}"
        )
    declared = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    }
    unknown = set(params) - set(declared)
    if unknown:
        raise XrcamConfigError(f"LRP preset {preset!r} takes no parameter(s) {sorted(unknown)}")
    values = {name: float(params.get(name, default)) for name, default in declared.items()}
    return Composite(preset, values, tuple(fn(**values)))


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
    if isinstance(module, HELD_CONSTANT):
        return []  # constants for LRP (canonizers say which); their own gradient still flows in gradient mode
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
    first = next((m for m in model.modules() if isinstance(m, _LAYERS)), None)
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
