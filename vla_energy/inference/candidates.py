"""Candidate sources for reranking: the policy's own error distribution, its layers, retrieval from training chunks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vla_energy.checks import check_mask, check_tensor

__all__ = ["leave_one_group_out_error", "error_scaled_candidates", "residual_candidates", "retrieve_nearest"]


def leave_one_group_out_error(policy: Tensor, truth: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """[N,H,Da] RMS policy error per step and dim, each sample's estimated from the other groups (episodes) only.

    So a sample's noise scale never uses its own ground truth. Steps without data in the other groups get the
    overall RMS error.
    """
    check_tensor("policy", policy, ("N", "H", "Da"))
    check_tensor("truth", truth, ("N", "H", "Da"), N=policy.shape[0], H=policy.shape[1], Da=policy.shape[2])
    m = check_mask("mask", mask, tuple(policy.shape[:2])).double()[..., None]  # [N,H,1]
    sq = (policy.double() - truth.double()).square() * m
    ids, inverse = torch.unique(groups, return_inverse=True)
    if ids.numel() < 2:
        raise ValueError("leave-one-group-out needs samples from at least 2 groups (episodes)")
    per_sq = torch.zeros(ids.numel(), *sq.shape[1:], dtype=torch.float64).index_add_(0, inverse, sq)
    per_n = torch.zeros(ids.numel(), *m.shape[1:], dtype=torch.float64).index_add_(0, inverse, m)
    rest_sq, rest_n = sq.sum(0) - per_sq[inverse], m.sum(0) - per_n[inverse]
    overall = (sq.sum() / (m.sum() * sq.shape[-1]).clamp(min=1)).sqrt()
    scale = torch.where(rest_n > 0, (rest_sq / rest_n.clamp(min=1)).sqrt(), overall)
    return scale.to(policy.dtype)


def error_scaled_candidates(
    policy: Tensor, scale: Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
    low: float = -1.0, high: float = 1.0,
) -> Tensor:
    """[B,K,H,Da]: the policy chunk + K-1 draws of policy + scale * N(0, 1), scale [B,H,Da] or [H,Da]; in bounds."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}, expected >= 1")
    noise = torch.randn((policy.shape[0], num_samples - 1, *policy.shape[1:]), generator=generator,
                        dtype=policy.dtype, device=policy.device)
    draws = policy[:, None] + scale.to(policy.device, policy.dtype).unsqueeze(-3) * noise
    return torch.cat([policy[:, None], draws], dim=1).clamp(low, high)


def residual_candidates(
    policy: Tensor, residuals: Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
    exclude: Optional[Tensor] = None, low: float = -1.0, high: float = 1.0,
) -> Tensor:
    """[B,K,H,Da]: the policy chunk + K-1 chunks policy + (truth - policy) of other samples (whole, correlated errors).

    residuals [N,H,Da] is the pool; exclude [B,N] True where a residual must not be used for a row (its own
    episode).
    """
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_tensor("residuals", residuals, ("N", "H", "Da"), H=policy.shape[1], Da=policy.shape[2])
    b, n = policy.shape[0], residuals.shape[0]
    weights = torch.ones(b, n, dtype=torch.float64)
    if exclude is not None:
        weights = weights.masked_fill(exclude.cpu(), 0.0)
    if bool((weights.sum(dim=1) == 0).any()):
        raise ValueError("a row has no residual left to draw from (every residual is excluded)")
    idx = torch.multinomial(weights, num_samples - 1, replacement=True, generator=generator) if num_samples > 1 \
        else torch.zeros(b, 0, dtype=torch.long)
    draws = policy[:, None] + residuals[idx.to(residuals.device)].to(policy.device, policy.dtype)
    return torch.cat([policy[:, None], draws], dim=1).clamp(low, high)


def retrieve_nearest(policy: Tensor, chunks: Tensor, num_samples: int, batch_size: int = 4096) -> Tensor:
    """[B,K,H,Da]: the policy chunk + the K-1 chunks of `chunks` [N,H,Da] (e.g. the training set) nearest to it (L2)."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_tensor("chunks", chunks, ("N", "H", "Da"), H=policy.shape[1], Da=policy.shape[2])
    k = num_samples - 1
    if k > chunks.shape[0]:
        raise ValueError(f"num_samples={num_samples} needs {k} retrieved chunks, but chunks holds {chunks.shape[0]}")
    flat_p = policy.reshape(policy.shape[0], -1).float()
    best_d = torch.full((policy.shape[0], 0), 0.0)
    best_i = torch.zeros(policy.shape[0], 0, dtype=torch.long)
    for start in range(0, chunks.shape[0], batch_size):
        block = chunks[start:start + batch_size].reshape(-1, flat_p.shape[1]).to(flat_p)
        d = torch.cdist(flat_p, block).cpu()
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(start, start + block.shape[0]).expand_as(d)], 1)
        best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, pick)
    near = chunks[best_i.to(chunks.device)].to(policy.device, policy.dtype)
    return torch.cat([policy[:, None], near], dim=1)
