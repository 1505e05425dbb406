"""False negatives: columns that are the positive's own sample or a look-alike of it (RMS distance <= eps)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vla_energy.checks import check_mask, check_tensor

__all__ = ["chunk_rms", "rowwise_rms", "lookalike_mask"]


def rowwise_rms(positives: Tensor, chunks: Tensor, positive_mask: Optional[Tensor] = None) -> Tensor:
    """[b, K] RMS distance (float64) of each row's chunks [b,K,H,Da] to its positive [b,H,Da], over the positive's
    real steps (a positive without any real step is at distance 0)."""
    pos = positives.detach().double()
    sq = (chunks.detach().to(pos.device, torch.float64) - pos[:, None]).square().mean(dim=-1)  # [b, K, H]
    steps = (torch.ones(pos.shape[:2], dtype=torch.float64, device=pos.device) if positive_mask is None
             else positive_mask.to(pos.device).double())[:, None]
    return ((sq * steps).sum(dim=-1) / steps.sum(dim=-1).clamp(min=1)).sqrt()


def chunk_rms(positives: Tensor, chunks: Tensor, positive_mask: Optional[Tensor] = None) -> Tensor:
    """[b, n] RMS distance (float64) of every chunk [n,H,Da] to every positive [b,H,Da], over the positive's real steps.

    A positive without any real step is at distance 0 from everything (nothing tells them apart).
    """
    check_tensor("positives", positives, ("B", "H", "Da"))
    b, h, da = positives.shape
    check_tensor("chunks", chunks, ("N", "H", "Da"), H=h, Da=da)
    pos = positives.detach().double()
    other = chunks.detach().to(pos.device, torch.float64)
    if positive_mask is None:
        steps = torch.ones(b, h, dtype=torch.float64, device=pos.device)
    else:
        steps = check_mask("positive_mask", positive_mask, (b, h)).to(pos.device).double()
    sq = (pos[:, None] - other[None]).square().mean(dim=-1)  # [b, n, H]
    return ((sq * steps[:, None]).sum(dim=-1) / steps.sum(dim=-1, keepdim=True).clamp(min=1)).sqrt()


def lookalike_mask(
    positives: Tensor,
    chunks: Tensor,
    eps: float,
    positive_mask: Optional[Tensor] = None,
    positive_ids: Optional[Tensor] = None,
    chunk_ids: Optional[Tensor] = None,
) -> Tensor:
    """[b, n] True where a chunk is a false negative of a positive: same sample id (>= 0) or RMS distance <= eps."""
    if eps < 0:
        raise ValueError(f"false_negative_eps={eps}, expected >= 0")
    same = chunk_rms(positives, chunks, positive_mask) <= eps
    if positive_ids is not None and chunk_ids is not None:
        pid = positive_ids.to(same.device).long()[:, None]
        cid = chunk_ids.to(same.device).long()[None, :]
        same |= (pid == cid) & (pid >= 0)
    return same
