"""Gradient alignment: at a perturbed chunk, the energy's descent direction points toward the demonstrated chunk.

Refinement moves a chunk along -dE/da. InfoNCE only shapes energies at the sampled chunks, so that direction can be
arbitrary between them; this term asks for 1 - cos(-dE/da, truth - a) to be small at chunks a near the truth.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from vla_energy.checks import check_tensor, real_steps

__all__ = ["gradient_alignment_loss"]


def gradient_alignment_loss(
    head: nn.Module, context: Tensor, actions: Tensor, perturbed: Tensor,
    context_mask: Optional[Tensor] = None, action_mask: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean over rows of 1 - cos(-dE/da at `perturbed`, actions - perturbed), over real steps; differentiable in
    the head's parameters (double backward). Returns the loss and the mean cosine."""
    check_tensor("actions", actions, ("B", "H", "Da"))
    check_tensor("perturbed", perturbed, ("B", "H", "Da"), B=actions.shape[0], H=actions.shape[1],
                 Da=actions.shape[2])
    a = perturbed.detach().clone().requires_grad_(True)
    # The fused attention kernels have no double backward; the math one does.
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        energies = head(context, a, context_mask=context_mask, action_mask=action_mask)
        (grad,) = torch.autograd.grad(energies.sum(), a, create_graph=True)
    real = real_steps(action_mask, actions.shape[:2], actions.device).to(actions.dtype)[..., None]
    descent = (-grad * real).flatten(1).float()
    toward = ((actions.detach() - a.detach()) * real).flatten(1).float()
    cos = F.cosine_similarity(descent, toward, dim=1, eps=1e-12)
    return (1 - cos).mean(), {"grad_align_cos": float(cos.detach().mean())}
