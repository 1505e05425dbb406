"""Success rates with 95% intervals: Wilson score for one rate, a paired bootstrap for a difference of two."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["wilson_interval", "paired_bootstrap_interval"]


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (stays inside [0, 1] and is not empty at 0 or n successes)."""
    if trials <= 0:
        raise ValueError(f"trials={trials}, expected at least one episode")
    if not 0 <= successes <= trials:
        raise ValueError(f"successes={successes}, expected 0..trials={trials}")
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def paired_bootstrap_interval(a: Sequence[float], b: Sequence[float], resamples: int = 1000,
                              seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of mean(a - b) over paired episodes (the same seeds), 95% percentile bootstrap."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if diff.ndim != 1 or diff.size == 0:
        raise ValueError(f"expected two equally long, non-empty sequences, got {len(a)} and {len(b)}")
    idx = np.random.default_rng(seed).integers(0, diff.size, size=(resamples, diff.size))
    means = diff[idx].mean(axis=1)
    return float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
