"""Trainable parameters that a step's forward did not use: DDP (find_unused_parameters=False) stops on them."""

from __future__ import annotations

from torch import nn

__all__ = ["unused_parameters", "check_unused_parameters"]


def unused_parameters(model: nn.Module) -> list[str]:
    """Names of trainable parameters without a gradient after a backward."""
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_unused_parameters(model: nn.Module, find_unused_parameters: bool, limit: int = 20) -> None:
    """After the first backward of a DDP run: a clear error naming the parameters DDP would wait for forever."""
    if find_unused_parameters:
        return
    unused = unused_parameters(model)
    if unused:
        shown = unused[:limit] + ([f"... ({len(unused) - limit} more)"] if len(unused) > limit else [])
        raise RuntimeError(
            f"{len(unused)} trainable parameters got no gradient in the first step, so DDP would stop with "
            f"'Expected to have finished reduction': {shown}. Leave them out of LoRA (lora_target_modules / "
            "lora_exclude_vision), freeze them, or set ddp_find_unused_parameters true"
        )
