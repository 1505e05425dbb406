"""The policy's action L1, normalized over the real action steps of all processes."""

from __future__ import annotations

from typing import Optional

import torch
from accelerate import Accelerator
from torch import Tensor

__all__ = ["masked_l1"]


def masked_l1(
    pred: Tensor, target: Tensor, action_mask: Optional[Tensor] = None, accelerator: Optional[Accelerator] = None
) -> Tensor:
    """Mean absolute error over real action steps; with an accelerator, over the real steps of all processes.

    Across processes each rank returns sum(errors) * W / (real steps on all ranks), so that DDP's gradient mean equals
    the gradient of one process holding every sample, as global_infonce_loss does; a per-rank mean would weight a
    step by how many real steps its rank happens to hold.
    """
    err = (pred.float() - target.float()).abs()
    weights = torch.ones_like(err) if action_mask is None else action_mask.to(err.dtype).unsqueeze(-1).expand_as(err)
    count = weights.sum()
    world = 1 if accelerator is None else accelerator.num_processes
    if world > 1:
        count = accelerator.reduce(count.detach().clone(), reduction="sum")
    return (err * weights).sum() * world / count.clamp(min=1.0)
