"""xrcam's own LRP engine (zennit's design, not its code): rules, canonizers, composites.

- :mod:`xrcam.lrp.rules`: how one operation hands relevance back to its inputs (generic torch);
- :mod:`xrcam.lrp.composites`: named composites, each a list of ``(module types, rule)`` entries, first
  match wins, registered like methods (:func:`register_composite`, :func:`make_composite`);
- :mod:`xrcam.lrp.canonizers`: every architecture-specific (timm) detail: residual sums,
  Selective-Kernel fusion, modules held constant.

The gradient that flows back through a model inside :func:`lrp_context` is the relevance, so
relevance at any captured tensor comes from one batched ``torch.autograd.grad`` call.
"""

from xrcam.lrp.composites import (
    PRESETS,
    Composite,
    list_composites,
    lrp_context,
    make_composite,
    register_composite,
)
from xrcam.lrp.rules import Switch

__all__ = [
    "PRESETS",
    "Composite",
    "Switch",
    "list_composites",
    "lrp_context",
    "make_composite",
    "register_composite",
]
