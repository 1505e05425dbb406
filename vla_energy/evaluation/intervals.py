"""95% intervals: the Wilson score interval of a rate and one percentile bootstrap for means and paired differences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["wilson_interval", "bootstrap_interval", "paired_bootstrap_interval"]

Values = Union[Tensor, Sequence[float], np.ndarray]


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


def bootstrap_interval(values: Values, counts: Optional[Values] = None, num_resamples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """sum(values) / sum(counts) (the mean without counts) and its percentile-bootstrap interval over samples
    (seeded); counts weight each sample, e.g. its number of real action steps."""
    v = torch.as_tensor(np.asarray(values, np.float64) if not isinstance(values, Tensor) else values).double()
    c = torch.ones_like(v) if counts is None else torch.as_tensor(
        np.asarray(counts, np.float64) if not isinstance(counts, Tensor) else counts).double()
    if v.shape != c.shape or v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"values {tuple(v.shape)} and counts {tuple(c.shape)} must be equal, non-empty [N]")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(v.numel(), (num_resamples, v.numel()), generator=g)
    boot = v[idx].sum(dim=1) / c[idx].sum(dim=1).clamp(min=1e-12)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(v.sum() / c.sum().clamp(min=1e-12)), lo, hi


def paired_bootstrap_interval(a: Values, b: Values, num_resamples: int = 1000, seed: int = 0,
                              counts: Optional[Values] = None) -> tuple[float, float, float]:
    """(mean, low, high) of the paired difference a - b over the same samples (episodes, seeds): the bootstrap
    resamples pairs, so the interval is of the difference itself."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape or a64.ndim != 1 or a64.size == 0:
        raise ValueError(f"expected two equally long, non-empty sequences, got {a64.shape} and {b64.shape}")
    return bootstrap_interval(a64 - b64, counts, num_resamples, seed)
