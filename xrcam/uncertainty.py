"""Confidence intervals for per-frame scores, by bootstrap over patients (SPEC §5, "Uncertainty").

Frames of one patient are not independent (same tissue, same probe session), and the split unit of
the archive is the patient, so an interval that resamples frames would be far too narrow. Here the
unique ``groups`` (patients) are resampled with replacement; each draw's statistic is the mean over
all frames of the drawn patients (a patient drawn twice counts twice), i.e. the same frame-weighted
mean as the point estimate. The interval is the percentile interval of ``n_boot`` draws.

Example::

    mean, lo, hi = bootstrap_ci(df["iou"], df["patient"])      # 95 % CI of the mIoU
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and its ``level`` percentile CI over resampled ``groups``.

    ``values`` and ``groups`` are aligned per row (e.g. per frame: IoU and patient). NaN values are
    left out (as the mIoU leaves them out). With no value the result is ``(nan, nan, nan)``; with a
    single group the interval collapses to the mean (nothing to resample). Deterministic in ``seed``.
    Vectorised: one ``(n_boot, n_groups)`` multinomial count matrix times the per-group sums.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")
    v = np.asarray(values, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if v.shape != g.shape:
        raise ValueError(f"values and groups differ in length: {v.shape[0]} vs {g.shape[0]}")
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if v.size == 0:
        return (float("nan"),) * 3
    _, codes = np.unique(g, return_inverse=True)
    sums = np.bincount(codes, weights=v)
    counts = np.bincount(codes).astype(np.float64)
    mean = float(sums.sum() / counts.sum())
    k = sums.size
    if k == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot).astype(np.float64)  # (n_boot, k)
    stats = (draws @ sums) / (draws @ counts)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return mean, float(lo), float(hi)
