"""False negatives: columns that are the positive's own sample or a look-alike of it (RMS distance <= eps)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from vla_energy.losses.distances import chunk_rms

__all__ = ["lookalike_mask"]


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
