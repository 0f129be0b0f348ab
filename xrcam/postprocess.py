"""Deprecated alias of :mod:`xrcam.scoring` (the one scoring core); kept only while importers switch.

Import from :mod:`xrcam.scoring` instead; this module will be removed.
"""

from xrcam.scoring import (  # noqa: F401
    RELEVANCE_METHODS,
    STANDARD_LAYER_SETS,
    THRESHOLD_RULES,
    aggregate,
    default_relu,
    format_layer_set,
    iou,
    make_masks,
    minmax,
    normalize,
    otsu_threshold,
    parse_layer_set,
    thresholds,
)
