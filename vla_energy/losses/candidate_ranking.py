"""Listwise ranking of candidates near the policy: energies ordered like their distance to the demonstrated chunk.

InfoNCE teaches "the truth is lowest" but says nothing about the order among chunks that are all wrong, which is
what choosing among a policy's candidates needs. Here each row's candidates (the policy's chunk, the policy plus
whole error chunks of other rows, the policy plus noise at its own error scale) get a target distribution
softmax(-d / (t * mean d)) over their RMS distance d to the truth, and the loss is the cross-entropy of the
energies' softmax(-E / tau) against it: a soft, scale-free version of "the candidate closest to the truth wins".
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_energy.checks import check_tensor, real_steps
from vla_energy.losses.distances import rowwise_rms
from vla_energy.losses.perturbation import Bound, clamp_to_bounds, perturb

__all__ = ["ranking_candidates", "candidate_ranking_loss"]


def ranking_candidates(
    actions: Tensor, policy: Tensor, scale: Optional[Tensor], num_candidates: int,
    action_mask: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
    low: Bound = -1.0, high: Bound = 1.0,
) -> Tensor:
    """[B,K,H,Da]: the policy chunk, then policy + (truth - policy) of other rows (half of the rest), then policy +
    scale * N(0,1) (scale [H,Da], the running policy error; Gaussian 0.1 before it is known); clamped to
    [low, high] (numbers or [Da] tensors)."""
    check_tensor("actions", actions, ("B", "H", "Da"))
    check_tensor("policy", policy, ("B", "H", "Da"), B=actions.shape[0], H=actions.shape[1], Da=actions.shape[2])
    if num_candidates < 2:
        raise ValueError(f"num_candidates={num_candidates}, expected >= 2 (the policy's chunk and one more)")
    b, device = actions.shape[0], actions.device
    policy = policy.detach().to(actions.dtype)
    real = real_steps(action_mask, actions.shape[:2], device).to(actions.dtype)
    residuals = (actions - policy) * real[..., None]
    rest = num_candidates - 1
    num_residual = rest // 2 if b > 1 else 0
    parts = [policy[:, None]]
    if num_residual:
        # Another row's residual for every row: a random offset in 1..b-1 never picks the row itself.
        offsets = torch.randint(1, b, (b, num_residual), generator=generator, device=device)
        others = (torch.arange(b, device=device)[:, None] + offsets) % b
        parts.append(policy[:, None] + residuals[others])
    parts.append(perturb(policy, 0.1 if scale is None else scale, generator, num=rest - num_residual))
    return clamp_to_bounds(torch.cat(parts, dim=1), low, high).detach()


def candidate_ranking_loss(
    head: nn.Module, context: Tensor, candidates: Tensor, actions: Tensor, tau: Tensor | float,
    context_mask: Optional[Tensor] = None, action_mask: Optional[Tensor] = None, target_temperature: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of softmax(-E/tau) over each row's K candidates against softmax(-d / (t * mean_k d)).

    Returns the mean over rows, and stats: how often the lowest energy is the closest candidate (top1) and the mean
    distance of the chosen candidate relative to the closest one's.
    """
    check_tensor("candidates", candidates, ("B", "K", "H", "Da"), B=actions.shape[0], H=actions.shape[1],
                 Da=actions.shape[2])
    if target_temperature <= 0:
        raise ValueError(f"target_temperature={target_temperature}, expected > 0")
    k = candidates.shape[1]
    mask = None if action_mask is None else action_mask[:, None].expand(-1, k, -1)
    energies = head(context, candidates, context_mask=context_mask, action_mask=mask)  # [B,K]
    dist = rowwise_rms(actions.detach(), candidates, action_mask).float()  # [B,K]
    target = F.softmax(-dist / (target_temperature * dist.mean(dim=1, keepdim=True).clamp(min=1e-8)), dim=1)
    logits = -energies.float() / tau
    loss = -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    with torch.no_grad():
        chosen = energies.argmin(dim=1)
        best = dist.min(dim=1).values
        picked = dist.gather(1, chosen[:, None]).squeeze(1)
        stats = {"ranking_top1": float((picked <= best).float().mean()),
                 "ranking_regret": float((picked / best.clamp(min=1e-8)).mean())}
    return loss, stats
