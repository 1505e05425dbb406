"""The optimizer's parameter groups: policy (LoRA + action head) at the base lr, the energy head at its own."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["param_groups", "trainable_parameters"]


def trainable_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The parameters with requires_grad of `modules`, each once (shared ones are not repeated)."""
    seen: set[int] = set()
    params = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def param_groups(
    backbone: nn.Module,
    action_head: nn.Module | Iterable[nn.Module],
    energy_modules: Iterable[nn.Module],
    lr: float,
    energy_lr_scale: float = 0.1,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Groups: backbone LoRA + action head at `lr`; energy head (and a learnable temperature) at lr * scale.

    The energy group is last, so `ProgressiveSchedule.make_lr_scheduler(optimizer, group_index=-1)` finds it.
    """
    if energy_lr_scale <= 0:
        raise ValueError(f"energy_lr_scale={energy_lr_scale}, expected > 0")
    # The policy's heads: the action head, and with use_state the state projector.
    heads = [action_head] if isinstance(action_head, nn.Module) else list(action_head)
    policy = trainable_parameters([backbone, *heads])
    energy = trainable_parameters(energy_modules)
    if not energy:
        raise ValueError("the energy head has no trainable parameters")
    groups = [{"params": policy, "lr": lr, "weight_decay": weight_decay, "name": "policy"}] if policy else []
    groups.append({"params": energy, "lr": lr * energy_lr_scale, "weight_decay": weight_decay, "name": "energy"})
    return groups
