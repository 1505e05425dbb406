"""The policy's action loss (L1, or a flow head's squared velocity error), normalized over the real action steps of
all processes."""

from __future__ import annotations

from typing import Optional

from accelerate import Accelerator
from torch import Tensor

from vla_energy.checks import real_steps

__all__ = ["masked_l1", "masked_mean"]


def masked_l1(
    pred: Tensor, target: Tensor, action_mask: Optional[Tensor] = None, accelerator: Optional[Accelerator] = None
) -> Tensor:
    """Mean absolute error over real action steps; with an accelerator, over the real steps of all processes."""
    return masked_mean((pred.float() - target.float()).abs(), action_mask, accelerator)


def masked_mean(err: Tensor, action_mask: Optional[Tensor] = None, accelerator: Optional[Accelerator] = None
                ) -> Tensor:
    """Mean of per-element errors err [B, H, Da] over real action steps; with an accelerator, over the real steps of
    all processes.

    Across processes each rank returns sum(errors) * W / (real steps on all ranks), so that DDP's gradient mean equals
    the gradient of one process holding every sample, as global_infonce_loss does; a per-rank mean would weight a
    step by how many real steps its rank happens to hold.
    """
    err = err.float()
    weights = real_steps(action_mask, err.shape[:2], err.device).to(err.dtype).unsqueeze(-1).expand_as(err)
    count = weights.sum()
    world = 1 if accelerator is None else accelerator.num_processes
    if world > 1:
        count = accelerator.reduce(count.detach().clone(), reduction="sum")
    return (err * weights).sum() * world / count.clamp(min=1.0)
