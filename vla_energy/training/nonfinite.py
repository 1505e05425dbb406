"""Agreement of all processes on whether a step's loss is finite (so that a skipped step is skipped everywhere)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["all_finite", "NONFINITE_MODES"]

NONFINITE_MODES = ("raise", "skip")


def all_finite(accelerator: Any, loss: Tensor) -> bool:
    """True only if the loss is finite on every process (one small all-reduce, on every process)."""
    flag = torch.isfinite(loss.detach()).all().float().reshape(1).to(accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(float(flag) == accelerator.num_processes)
