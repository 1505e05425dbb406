"""The process group a model finds by itself (accelerate's PartialState): what the distributed losses need."""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import gather, reduce
from torch import Tensor

__all__ = ["ProcessGroup"]


class ProcessGroup:
    """num_processes, process_index, device, gather and reduce of the current launch, with no Accelerator.

    The losses take "an accelerator-like object"; this is the smallest one, read from PartialState (set up by
    `accelerate launch`, the Trainer or an Accelerator), so a model's forward needs no accelerator argument.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        state = PartialState()
        self.num_processes = state.num_processes
        self.process_index = state.process_index
        self.device = torch.device(device) if device is not None else state.device

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate `tensor` of every process along dim 0 (no autograd)."""
        return gather(tensor) if self.num_processes > 1 else tensor

    def reduce(self, tensor: Tensor, reduction: str = "mean") -> Tensor:
        """Sum or mean of `tensor` over processes (no autograd)."""
        return reduce(tensor, reduction=reduction) if self.num_processes > 1 else tensor
