"""The AUROC of a score between two groups and its bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from vla_energy.evaluation.auroc import auroc, auroc_interval


def test_auroc_matches_counting_pairs_with_ties_half() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 6, 40).astype(float), rng.integers(0, 5, 30).astype(float)  # many ties
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert auroc(pos, neg) == pytest.approx(pairs)
    assert auroc([2, 3], [0, 1]) == 1.0 and auroc([0, 1], [2, 3]) == 0.0 and auroc([1, 1], [1]) == 0.5


def test_auroc_interval_contains_the_value_and_narrows_with_data() -> None:
    rng = np.random.default_rng(1)
    small = auroc_interval(rng.normal(1, 1, 10), rng.normal(0, 1, 10), seed=0)
    large = auroc_interval(rng.normal(1, 1, 400), rng.normal(0, 1, 400), seed=0)
    for value, low, high in (small, large):
        assert 0.0 <= low <= value <= high <= 1.0
    assert large[2] - large[1] < small[2] - small[1]
    assert large[1] > 0.6  # N(1,1) against N(0,1): AUROC ~0.76
    assert auroc_interval([1.0, 2.0], [0.0], seed=4) == auroc_interval([1.0, 2.0], [0.0], seed=4)


def test_auroc_refuses_empty_groups_and_nan() -> None:
    with pytest.raises(ValueError, match="both groups"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="not finite"):
        auroc([np.nan], [1.0])
