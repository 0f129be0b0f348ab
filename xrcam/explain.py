"""CAM explanations of every method at every stage from one forward pass and (at most) two backward passes.

Notation (SPEC §4): ``A`` is a stage output (B, K, h, w), ``g = ∂ logit_target / ∂A`` and ``R`` the
contrastive LRP relevance at ``A``. A method is a few lines that turn ``(g or R, A)`` into weights;
channel weights ``w`` (B, K) give ``map = Σ_k w_k A_k``, element weights (B, K, h, w) give
``map = Σ_k w_k ⊙ A_k``. Maps stay raw at the stage's resolution: no ReLU, no upsampling, no scaling.

How the signals are computed (one forward pass under :func:`xrcam.lrp.lrp_context`, whose forward
values equal the plain model's): the gradient family's ``g`` at all stages comes from one
``torch.autograd.grad`` of the summed target logits; then the same graph, switched to relevance mode,
gives ``R`` at all stages from one more ``torch.autograd.grad`` started at the CLRP relevance.

Example::

    model = xrcam.load_model("resnet18", num_classes=2)
    explainer = xrcam.create_explainer(model, methods=["gradcam", "xrelevancecam"])
    exp = explainer(torch.randn(2, 3, 96, 96))
    exp.maps["xrelevancecam"]["layer1"].shape   # (2, 24, 24)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from xrcam.errors import XrcamConfigError
from xrcam.hooks import capture, model_state

if TYPE_CHECKING:  # the LRP engine and timm load on first explanation, so reading the registry stays light
    from xrcam.lrp import Composite

__all__ = [
    "Explanation",
    "Explainer",
    "Family",
    "FAMILIES",
    "Method",
    "create_explainer",
    "default_relu",
    "list_methods",
    "method_family",
    "method_title",
    "register_method",
    "stage_signals",
    "StageSignals",
    "CLRP_STARTS",
]

CLRP_STARTS = ("unit", "logit")

# --------------------------------------------------------------------------------------------------------
# Method registry (timm's register_model idea): plain strings select methods everywhere. The registry is
# the only source of a method's family, and the family the only source of its post-processing defaults:
# adding a method is one decorated function here.


@dataclass(frozen=True)
class Family:
    """What a family of methods reads and how its maps are treated downstream.

    ``signal``: ``"gradient"`` (g = ∂ logit_target / ∂A) or ``"relevance"`` (contrastive LRP R at A).
    ``relu``: whether maps are rectified before normalising by default (SPEC §5; :mod:`xrcam.scoring`).
    ``score``: the score ``S_c`` the axiom metrics use (``"logit"``: L_t; ``"contrastive"``: the total
    relevance of a CLRP ``"logit"`` start; :mod:`xrcam.metrics`).
    """

    name: str
    relu: bool
    score: str


FAMILIES: dict[str, Family] = {
    # the gradient papers and peer libraries rectify; the published XRelevanceCAM code does not, so
    # negative relevance stays at the bottom of the scale
    "gradient": Family("gradient", relu=True, score="logit"),
    "relevance": Family("relevance", relu=False, score="contrastive"),
}


@dataclass(frozen=True)
class Method:
    """A CAM method: its family says which signal it reads (``g`` or ``R``); ``weights(signal, A)``."""

    name: str
    family: str
    weights: Callable[[Tensor, Tensor], Tensor]
    title: str = ""  # display name in tables and figures (e.g. "GradCAM++"); default: the name


_METHODS: dict[str, Method] = {}


def register_method(name: str, family: str, title: str | None = None) -> Callable:
    """Decorator registering ``fn(signal, activation) -> weights`` as method ``name`` of ``family``.

    ``title`` is its display name in reports (default: ``name``).
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")

    def decorate(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        _METHODS[name] = Method(name, family, fn, title or name)
        return fn

    return decorate


def list_methods(family: str | None = None) -> list[str]:
    """Registered method names (registration order), optionally of one family only."""
    return [m.name for m in _METHODS.values() if family is None or m.family == family]


def method_family(method: str) -> Family | None:
    """The :class:`Family` of a registered method; ``None`` for other names (reference maps, sign checks)."""
    entry = _METHODS.get(method)
    return None if entry is None else FAMILIES[entry.family]


def method_title(method: str) -> str:
    """Display name of a registered method (``"GradCAM++"``); other names are returned unchanged."""
    entry = _METHODS.get(method)
    return method if entry is None else entry.title


def default_relu(method: str) -> bool:
    """Whether ``method``'s maps are rectified before normalising by default: its family's ``relu``.

    Names that are not registered methods (reference maps, ``inverted_<method>`` sign checks) are not.
    """
    family = method_family(method)
    return family is not None and family.relu


def _spatial_sum(t: Tensor) -> Tensor:
    return t.sum(dim=(2, 3))


# ---- gradient family: signal is g = ∂ logit_target / ∂A ------------------------------------------------


@register_method("gradcam", family="gradient", title="GradCAM")
def _gradcam(g: Tensor, a: Tensor) -> Tensor:
    """w_k = mean_hw g (Selvaraju et al., ICCV 2017)."""
    return g.mean(dim=(2, 3))


@register_method("gradcampp", family="gradient", title="GradCAM++")
def _gradcampp(g: Tensor, a: Tensor) -> Tensor:
    """α = g² / (2g² + Σ_hw A · g³ + 1e-6), α = 0 where g = 0; w_k = Σ_hw α relu(g) (Chattopadhyay et al., WACV 2018)."""
    g2 = g * g
    denominator = 2 * g2 + _spatial_sum(a)[..., None, None] * g2 * g + 1e-6
    alpha = torch.where(g != 0, g2 / denominator, torch.zeros_like(g))
    return _spatial_sum(alpha * g.clamp(min=0))


@register_method("xgradcam", family="gradient", title="XGradCAM")
def _xgradcam(g: Tensor, a: Tensor) -> Tensor:
    """w_k = Σ_hw (g A) / (Σ_hw A + 1e-7) (Fu et al., BMVC 2020)."""
    return _spatial_sum(g * a) / (_spatial_sum(a) + 1e-7)


@register_method("hirescam", family="gradient", title="HiResCAM")
def _hirescam(g: Tensor, a: Tensor) -> Tensor:
    """Element weights g: map = Σ_k g_k ⊙ A_k (Draelos & Carin, 2020)."""
    return g


@register_method("layercam", family="gradient", title="LayerCAM")
def _layercam(g: Tensor, a: Tensor) -> Tensor:
    """Element weights relu(g): map = Σ_k relu(g_k) ⊙ A_k (Jiang et al., TIP 2021)."""
    return g.clamp(min=0)


# ---- relevance family: signal is the contrastive LRP relevance R at A ----------------------------------


@register_method("relevancecam", family="relevance", title="RelevanceCAM")
def _relevancecam(r: Tensor, a: Tensor) -> Tensor:
    """w_k = mean_hw R (Lee et al., CVPR 2021)."""
    return r.mean(dim=(2, 3))


@register_method("xrelevancecam", family="relevance", title="XRelevanceCAM")
def _xrelevancecam(r: Tensor, a: Tensor) -> Tensor:
    """w_k = Σ_hw R / (Σ_hw A + 1e-7) (You et al., IJCARS 2024, Eq. 1)."""
    return _spatial_sum(r) / (_spatial_sum(a) + 1e-7)


# --------------------------------------------------------------------------------------------------------
# Signals: one forward, one gradient pass, one relevance pass.


@dataclass
class StageSignals:
    """What one pass captured: logits (B, N), target (B,), and per layer A, g and R (as requested)."""

    logits: Tensor
    target: Tensor
    activations: dict[str, Tensor]
    gradients: dict[str, Tensor] = field(default_factory=dict)
    relevance: dict[str, Tensor] = field(default_factory=dict)
    leaks: dict[str, Tensor] | None = None  # module name -> (B,) relevance not passed on (track_leaks)


def _resolve_target(target: int | Sequence[int] | Tensor | None, logits: Tensor) -> Tensor:
    batch, classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).to(torch.int64)
    t = t.expand(batch) if t.dim() == 0 else t
    if t.shape != (batch,):
        raise XrcamConfigError(
            f"target must be an int or hold one class per image ({batch}), got shape {tuple(t.shape)}"
        )
    if bool(((t < 0) | (t >= classes)).any()):
        raise XrcamConfigError(f"target classes must lie in [0, {classes - 1}], got {t.tolist()}")
    return t


def clrp_start(logits: Tensor, target: Tensor, clrp: str = "unit") -> Tensor:
    """CLRP start relevance: target class 1 (or L_t), every other class −1/N (or −L_t/N); ΣR₀ = 1/N (or L_t/N)."""
    n = logits.shape[1]
    onehot = torch.nn.functional.one_hot(target, n).to(logits.dtype)
    start = onehot * (1 + 1 / n) - 1 / n
    if clrp == "logit":
        start = start * logits.detach().gather(1, target[:, None])
    return start


def stage_signals(
    model: nn.Module,
    images: Tensor,
    layers: Sequence[str] | None = None,
    target: int | Sequence[int] | Tensor | None = None,
    *,
    gradients: bool = True,
    relevance: bool = True,
    composite: Composite | str = "reference",
    clrp: str = "unit",
    track_leaks: bool = False,
) -> StageSignals:
    """One forward pass of ``model`` (in whatever mode the caller set) and the requested backward passes.

    ``layers`` default to the model's stages (:func:`xrcam.models.stage_names`). ``images`` must require
    grad or the model's parameters must, so the forward builds a graph; :class:`Explainer` takes care
    of that and of the model's state.
    """
    from xrcam.lrp import lrp_context
    from xrcam.models import stage_names

    layers = tuple(stage_names(model) if layers is None else layers)
    with lrp_context(model, composite, track_leaks) as switch, capture(model, layers) as acts:
        logits = model(images)
        target_ = _resolve_target(target, logits)
        captured = [acts[name] for name in layers]
        signals = StageSignals(logits.detach(), target_, {n: a.detach() for n, a in acts.items()})
        if gradients:
            score = logits.gather(1, target_[:, None]).sum()
            grads = torch.autograd.grad(score, captured, retain_graph=relevance)
            signals.gradients = dict(zip(layers, grads, strict=True))
        if relevance:
            switch.relevance = True
            rels = torch.autograd.grad(logits, captured, clrp_start(logits, target_, clrp))
            signals.relevance = dict(zip(layers, rels, strict=True))
            signals.leaks = switch.leaks
    return signals


# --------------------------------------------------------------------------------------------------------
# Explainer


@dataclass
class Explanation:
    """Result of one explainer call. Maps are raw, at each stage's resolution, in the model's dtype."""

    logits: Tensor  # (B, N)
    target: Tensor  # (B,) int64
    maps: dict[str, dict[str, Tensor]]  # method -> layer -> (B, h, w)
    contributions: dict[str, dict[str, Tensor]] | None = None  # method -> layer -> (B, K)
    activations: dict[str, Tensor] | None = None  # layer -> (B, K, h, w)

    @property
    def probabilities(self) -> Tensor:
        return self.logits.softmax(dim=1)


def _rng_state(device: torch.device) -> Callable[[], None]:
    """Snapshot the RNG that dropout draws from; calling the result rewinds it (same masks again)."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)

    return restore


class Explainer:
    """Callable computing the chosen methods at the chosen layers; build it with :func:`create_explainer`."""

    def __init__(
        self,
        model: nn.Module,
        methods: Sequence[str],
        layers: Sequence[str],
        composite: Composite,
        clrp: str,
        contributions: bool,
        activations: bool,
        mc_samples: int | None,
    ):
        self.model = model
        self.methods = [_METHODS[m] for m in methods]
        self.layers = tuple(layers)
        self.composite = composite
        self.clrp = clrp
        self.contributions = contributions
        self.activations = activations
        self.mc_samples = mc_samples

    @property
    def settings(self) -> dict:
        """Plain-data description for provenance records."""
        return {
            "methods": [m.name for m in self.methods],
            "layers": list(self.layers),
            "rules": self.composite.preset,
            "rule_params": dict(self.composite.params),
            "clrp": self.clrp,
            "mc_samples": self.mc_samples,
        }

    def __call__(self, images: Tensor, target: int | Sequence[int] | Tensor | None = None) -> Explanation:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise XrcamConfigError(
                f"images must be a (B, 3, H, W) tensor, got {type(images).__name__} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        reference = next(self.model.parameters())
        images = images.detach().to(device=reference.device, dtype=reference.dtype).requires_grad_(True)
        passes = self.mc_samples or 1
        # eval mode (dropout active for Monte-Carlo), parameters frozen; every flag restored on exit
        with model_state(self.model, training=False, dropout=self.mc_samples is not None, frozen=True):
            if self.mc_samples is not None and target is None:
                rewind = _rng_state(images.device)
                with torch.no_grad():
                    mean_logits = sum(self.model(images) for _ in range(passes)) / passes
                target = mean_logits.argmax(dim=1)
                rewind()  # the explained passes draw the same dropout masks
            total: Explanation | None = None
            for _ in range(passes):
                one = self._one_pass(images, target)
                total = one if total is None else _accumulate(total, one)
        return _scale(total, 1.0 / passes) if passes > 1 else total

    def _one_pass(self, images: Tensor, target) -> Explanation:
        families = {m.family for m in self.methods}
        signals = stage_signals(
            self.model, images, self.layers, target,
            gradients="gradient" in families, relevance="relevance" in families,
            composite=self.composite, clrp=self.clrp,
        )  # fmt: skip
        maps: dict[str, dict[str, Tensor]] = {}
        contributions: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for method in self.methods:
                source = signals.gradients if method.family == "gradient" else signals.relevance
                maps[method.name], contributions[method.name] = {}, {}
                for layer in self.layers:
                    a = signals.activations[layer]
                    w = method.weights(source[layer], a)
                    if w.dim() == 2:  # channel weights
                        maps[method.name][layer] = torch.einsum("bk,bkhw->bhw", w, a)
                        if self.contributions:
                            contributions[method.name][layer] = w * _spatial_sum(a)
                    else:  # element weights
                        term = w * a
                        maps[method.name][layer] = term.sum(dim=1)
                        if self.contributions:
                            contributions[method.name][layer] = _spatial_sum(term)
        return Explanation(
            logits=signals.logits,
            target=signals.target,
            maps=maps,
            contributions=contributions if self.contributions else None,
            activations=signals.activations if self.activations else None,
        )


def _nested_apply(a, b, fn):
    if isinstance(a, dict):
        return {k: _nested_apply(a[k], None if b is None else b[k], fn) for k in a}
    return fn(a, b)


def _accumulate(total: Explanation, one: Explanation) -> Explanation:
    add = lambda x, y: x + y  # noqa: E731
    return Explanation(
        logits=total.logits + one.logits,
        target=total.target,
        maps=_nested_apply(total.maps, one.maps, add),
        contributions=None
        if total.contributions is None
        else _nested_apply(total.contributions, one.contributions, add),
        activations=None
        if total.activations is None
        else _nested_apply(total.activations, one.activations, add),
    )


def _scale(exp: Explanation, factor: float) -> Explanation:
    mul = lambda x, _: x * factor  # noqa: E731
    return Explanation(
        logits=exp.logits * factor,
        target=exp.target,
        maps=_nested_apply(exp.maps, None, mul),
        contributions=None if exp.contributions is None else _nested_apply(exp.contributions, None, mul),
        activations=None if exp.activations is None else _nested_apply(exp.activations, None, mul),
    )


def create_explainer(
    model: nn.Module,
    methods: str | Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    rules: str | Composite = "reference",
    clrp: str = "unit",
    *,
    contributions: bool = False,
    activations: bool = False,
    mc_samples: int | None = None,
    **rule_params: float,
) -> Explainer:
    """Build an :class:`Explainer`; nothing is attached to ``model`` until it is called.

    ``methods``: names from :func:`list_methods` (default: all). ``layers``: module names whose outputs
    are explained (default: the model's stages, :func:`xrcam.models.stage_names`). ``rules``: a
    registered LRP composite (:func:`xrcam.lrp.list_composites`: ``"reference"``, ``"epsilon"``,
    ``"alphabeta"``, ...; extra keyword arguments such as ``epsilon=`` or ``alpha=, beta=`` are its
    parameters) or a :class:`~xrcam.lrp.Composite`.
    ``clrp``: ``"unit"`` (published code) or ``"logit"`` (paper's derivation, for axiom metrics).
    ``contributions``: also return each channel's Σ_hw term of the map. ``activations``: also return A.
    ``mc_samples=T``: average maps and logits over T passes with the model's dropout layers active.
    """
    from xrcam.lrp import make_composite
    from xrcam.models import stage_names

    if methods is None:
        methods = list_methods()
    elif isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in _METHODS]
    if unknown:
        raise XrcamConfigError(f"unknown method(s) {unknown}; available: {', '.join(list_methods())}")
    if not methods or len(set(methods)) != len(methods):
        raise XrcamConfigError(f"methods must be a non-empty list without repeats, got {list(methods)}")
    if layers is None:
        layers = stage_names(model)
    elif isinstance(layers, str):
        layers = [layers]
    names = dict(model.named_modules())
    missing = [name for name in layers if not name or name not in names]
    if missing or not layers:
        raise XrcamConfigError(
            f"layer(s) {missing or list(layers)} not found in the model; use stage names such as "
            f"{', '.join(stage_names(model)) or 'layer1 ... layer4'}"
        )
    if clrp not in CLRP_STARTS:
        raise XrcamConfigError(f"clrp must be one of {CLRP_STARTS}, got {clrp!r}")
    if mc_samples is not None:
        if int(mc_samples) < 1:
            raise XrcamConfigError(f"mc_samples must be a positive number of passes, got {mc_samples}")
        if not any(isinstance(m, nn.Dropout) for m in model.modules()):
            raise XrcamConfigError("mc_samples needs the dropout variant: load the model with dropout=0.1")
        mc_samples = int(mc_samples)
    composite = make_composite(rules, **rule_params)
    return Explainer(
        model, list(methods), list(layers), composite, clrp, contributions, activations, mc_samples
    )
