"""Negatives at the policy's own scale: truth + noise at the running policy error, and the policy's chunk itself."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vla_energy.checks import check_tensor, real_steps
from vla_energy.losses.negatives import Negatives, false_negative_mask
from vla_energy.losses.perturbation import perturb

__all__ = ["RunningPolicyError", "policy_negatives", "concat_negatives"]


class RunningPolicyError:
    """EMA of the policy's RMS error per step and action dim over all processes' real steps (equal on every rank)."""

    def __init__(self, horizon: int, action_dim: int, momentum: float = 0.9) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum={momentum}, expected in [0, 1)")
        self.momentum = float(momentum)
        self.scale = torch.zeros(horizon, action_dim)
        self.initialized = False

    @torch.no_grad()
    def update(self, accelerator: Any, policy: Tensor, actions: Tensor, action_mask: Optional[Tensor] = None) -> Tensor:
        """Fold this step's global error in; returns the scale [H,Da]."""
        check_tensor("policy", policy, ("B", "H", "Da"), H=self.scale.shape[0], Da=self.scale.shape[1])
        real = real_steps(action_mask, policy.shape[:2], policy.device).double()
        sq = ((policy.detach().double() - actions.double()).square() * real[..., None]).sum(dim=0)  # [H,Da]
        sums = torch.cat([sq, real.double().sum(dim=0)[:, None]], dim=1)  # [H,Da+1]
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
        sq, count = sums[:, :-1], sums[:, -1:]
        step = (sq / count.clamp(min=1)).sqrt().float().cpu()
        seen = (count > 0).cpu().expand_as(step)
        if not self.initialized:
            self.scale = torch.where(seen, step, self.scale)
            self.initialized = bool(seen.any())
        else:
            blended = self.momentum * self.scale + (1 - self.momentum) * step
            self.scale = torch.where(seen, blended, self.scale)
        return self.scale

    def state_dict(self) -> dict[str, Tensor]:
        """The scale and whether it has seen data (tensors, for safetensors)."""
        return {"scale": self.scale.clone(), "initialized": torch.tensor(self.initialized)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what state_dict saved."""
        self.scale, self.initialized = state["scale"].float().cpu(), bool(state["initialized"])


def policy_negatives(
    actions: Tensor,
    policy: Tensor,
    scale: Optional[Tensor],
    num_near: int,
    own: bool,
    action_mask: Optional[Tensor] = None,
    false_negative_eps: float = 1e-2,
    generator: Optional[torch.Generator] = None,
) -> Negatives:
    """num_near chunks truth + scale * N(0,1) (scale [H,Da]: the policy's error) and, if own, the policy's chunk.

    Each is masked when within false_negative_eps of the truth: a policy that is right is not pushed away.
    """
    check_tensor("actions", actions, ("B", "H", "Da"))
    check_tensor("policy", policy, ("B", "H", "Da"), B=actions.shape[0], H=actions.shape[1], Da=actions.shape[2])
    negs, types = [], []
    if num_near > 0:
        if scale is None:
            raise ValueError("num_near > 0 needs the policy error scale [H, Da]")
        for _ in range(num_near):
            negs.append(perturb(actions, scale, generator))
            types.append("policy_error_noise")
    if own:
        negs.append(policy.detach().to(actions.dtype))
        types.append("policy")
    if not negs:
        raise ValueError("policy_negatives with num_near=0 and own=False builds nothing")
    stacked = torch.stack(negs, dim=1).detach()
    return Negatives(stacked, types, false_negative_mask(actions.detach(), stacked, action_mask, false_negative_eps))


def concat_negatives(first: Optional[Negatives], second: Negatives) -> Negatives:
    """Both sets side by side in the negative dimension (first may be None)."""
    if first is None:
        return second
    return Negatives(torch.cat([first.actions, second.actions], dim=1), first.types + second.types,
                     torch.cat([first.mask, second.mask], dim=1))
