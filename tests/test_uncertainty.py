"""bootstrap_ci: patients (groups) are resampled, not frames; the interval covers as it should."""

from __future__ import annotations

import numpy as np
import pytest

from xrcam.uncertainty import bootstrap_ci


def test_coverage_on_a_known_distribution():
    """Group means ~ N(0.4, 0.1); 30 groups of 5 frames: the 95 % CI covers 0.4 about 95 % of the time."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 300
    for t in range(trials):
        effects = rng.normal(0.4, 0.1, 30)
        values = np.repeat(effects, 5) + rng.normal(0, 0.01, 150)
        groups = np.repeat(np.arange(30), 5)
        mean, lo, hi = bootstrap_ci(values, groups, n_boot=500, seed=t)
        assert lo <= mean <= hi
        hits += lo <= 0.4 <= hi
    assert 0.88 <= hits / trials <= 0.99


def test_groups_are_resampled_not_rows():
    """Perfectly clustered data: the width follows the 10 groups, not the 1000 frames."""
    rng = np.random.default_rng(2)
    effects = rng.normal(0.5, 0.1, 10)
    values = np.repeat(effects, 100)
    groups = np.repeat([f"P{i:02d}" for i in range(10)], 100)
    _, lo, hi = bootstrap_ci(values, groups, n_boot=2000)
    group_se = effects.std() / np.sqrt(10)
    assert 0.6 * 2 * 1.96 * group_se < hi - lo < 1.4 * 2 * 1.96 * group_se
    # one group per row would give an interval about sqrt(100) = 10 times narrower
    _, lo_rows, hi_rows = bootstrap_ci(values, np.arange(1000), n_boot=2000)
    assert hi_rows - lo_rows < 0.3 * (hi - lo)
    # shuffling the rows changes nothing: only the grouping matters
    order = rng.permutation(1000)
    assert bootstrap_ci(values[order], groups[order], n_boot=2000) == pytest.approx((values.mean(), lo, hi))


def test_edge_cases():
    assert bootstrap_ci([0.2, 0.4], ["a", "a"]) == pytest.approx((0.3, 0.3, 0.3))
    assert all(np.isnan(bootstrap_ci([], [])))
    assert all(np.isnan(bootstrap_ci([np.nan], ["a"])))
    mean, lo, hi = bootstrap_ci([0.0, np.nan, 1.0, 1.0], ["a", "a", "b", "c"])
    assert mean == pytest.approx(2 / 3) and 0.0 <= lo <= mean <= hi <= 1.0
    assert bootstrap_ci([1, 2, 3], [0, 1, 2], seed=5) == bootstrap_ci([1, 2, 3], [0, 1, 2], seed=5)
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], [0, 1])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0], [0], level=1.5)
