"""How well a score separates two groups: the AUROC (rank statistic, ties counted half) and its bootstrap interval."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

__all__ = ["auroc", "auroc_interval"]

Scores = Union[Sequence[float], np.ndarray]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing their mean rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def auroc(positive: Scores, negative: Scores) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2: 1.0 when every positive scores above every
    negative, 0.5 for a score that carries no information."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"auroc needs both groups: got {pos.size} positives and {neg.size} negatives")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("auroc got a score that is not finite")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0) / (pos.size * neg.size))


def auroc_interval(positive: Scores, negative: Scores, num_resamples: int = 1000, seed: int = 0,
                   level: float = 0.95) -> tuple[float, float, float]:
    """(auroc, low, high): the AUROC and its percentile-bootstrap interval, each group resampled on its own
    (seeded)."""
    pos, neg = np.asarray(positive, np.float64).ravel(), np.asarray(negative, np.float64).ravel()
    value = auroc(pos, neg)
    rng = np.random.default_rng(seed)
    boot = [auroc(pos[rng.integers(pos.size, size=pos.size)], neg[rng.integers(neg.size, size=neg.size)])
            for _ in range(num_resamples)]
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return value, float(low), float(high)
