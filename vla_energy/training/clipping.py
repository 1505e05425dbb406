"""Gradient clipping per parameter group after one unscale: plain tensors and FSDP2's DTensors alike."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["clip_group_", "global_norm"]


def global_norm(params: Sequence[nn.Parameter]) -> Tensor:
    """L2 norm of the gradients of `params` over every shard (a plain 0-dim tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor (FSDP2): the global value


def clip_group_(params: Sequence[nn.Parameter], max_norm: float) -> Tensor:
    """Clip the group's gradients to `max_norm` (0 or less: measure only); returns the norm before clipping.

    Call after the loss scale is removed (`accelerator.unscale_gradients()` once per step: a GradScaler refuses a
    second unscale). For FSDP2 the parameters are DTensors on one mesh and torch clips them with the global norm.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if max_norm <= 0:
        return global_norm(params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
