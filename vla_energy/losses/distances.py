"""The one distance between action chunks: RMS over the positive's real steps and all action dims."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vla_energy.checks import check_tensor, real_steps

__all__ = ["rowwise_rms", "chunk_rms"]


def rowwise_rms(positives: Tensor, chunks: Tensor, positive_mask: Optional[Tensor] = None) -> Tensor:
    """[b, K] RMS distance (float64) of each row's chunks [b,K,H,Da] to its positive [b,H,Da], over the positive's
    real steps (a positive without any real step is at distance 0 from everything: nothing tells them apart)."""
    pos = positives.detach().double()
    sq = (chunks.detach().to(pos.device, torch.float64) - pos[:, None]).square().mean(dim=-1)  # [b, K, H]
    steps = real_steps(positive_mask, pos.shape[:2], pos.device, "positive_mask").double()[:, None]
    return ((sq * steps).sum(dim=-1) / steps.sum(dim=-1).clamp(min=1)).sqrt()


def chunk_rms(positives: Tensor, chunks: Tensor, positive_mask: Optional[Tensor] = None) -> Tensor:
    """[b, n] RMS distance (float64) of every chunk [n,H,Da] to every positive [b,H,Da]: rowwise_rms against a pool
    shared by all rows."""
    check_tensor("positives", positives, ("B", "H", "Da"))
    b, h, da = positives.shape
    check_tensor("chunks", chunks, ("N", "H", "Da"), H=h, Da=da)
    return rowwise_rms(positives, chunks[None].expand(b, *chunks.shape), positive_mask)
