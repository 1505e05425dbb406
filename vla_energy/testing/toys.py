"""Toy problems for the heads' tests and benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bimodal_chunks"]


def bimodal_chunks(n: int, generator: torch.Generator, horizon: int = 4, action_dim: int = 2, hidden_size: int = 16,
                   noise: float = 0.3) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden [n,H,D], target [n,H,Da], mode [n,H,Da]): placeholder states that encode a chunk c (a ramp to a
    random point with coordinates in [0.4, 1]), whose demonstrated chunk is +c or -c at random, two equally valid
    modes; a regression of it predicts between them."""
    encoder = torch.randn(action_dim, hidden_size, generator=torch.Generator().manual_seed(1))
    size = torch.rand(n, action_dim, generator=generator) * 0.6 + 0.4
    hidden = noise * torch.randn(n, horizon, hidden_size, generator=generator)
    hidden[:, 0] += size @ encoder
    mode = size[:, None, :] * (torch.arange(1, horizon + 1).float() / horizon)[None, :, None]
    sign = torch.randint(0, 2, (n, 1, 1), generator=generator).float() * 2 - 1
    return hidden, sign * mode, mode
