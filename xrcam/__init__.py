"""xrcam: explainable tissue characterisation for pCLE videos (XRelevanceCAM and CAM baselines).

The public names are imported lazily so that ``import xrcam`` (and ``xrcam --help``) stays fast and
never pulls in torch before it is needed, and never imports ray at all.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "xrcam.models",
    "create_explainer": "xrcam.explain",
    "list_methods": "xrcam.explain",
    "Explanation": "xrcam.explain",
    "XrcamError": "xrcam.errors",
    "XrcamInputError": "xrcam.errors",
    "XrcamCheckpointError": "xrcam.errors",
    "XrcamConfigError": "xrcam.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xrcam' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
