"""xrcam's own LRP engine (zennit's design, not its code): rules, canonizers, composites.

The gradient that flows back through a model inside :func:`lrp_context` is the relevance, so
relevance at any captured tensor comes from one batched ``torch.autograd.grad`` call.
"""

from xrcam.lrp.composite import PRESETS, Composite, lrp_context, make_composite
from xrcam.lrp.rules import Switch

__all__ = ["PRESETS", "Composite", "Switch", "lrp_context", "make_composite"]
