"""Which negatives a step uses: five named strategies, each resolved once per run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vla_energy.losses.global_infonce import global_infonce_loss

__all__ = ["STRATEGIES", "StrategyPlan", "plan_strategy", "strategy_loss"]

STRATEGIES = ("inbatch", "global", "layer", "hybrid", "combined")


@dataclass(frozen=True)
class StrategyPlan:
    """The concrete choice: batch columns (global | local | none), explicit negatives, the action bank."""

    name: str
    batch: str
    explicit: bool
    bank: bool


def plan_strategy(name: str, world_size: int, local_batch: int) -> StrategyPlan:
    """Resolve a strategy name for a run's layout (the configured local batch, never a smaller last batch).

    inbatch: per-process in-batch only (b - 1 negatives per positive); global: all processes' chunks (+ bank if
    configured); layer: explicit negatives only (independent of the batch size); hybrid: by layout (world 1 ->
    in-batch, world > 1 and local batch >= 6 -> global, otherwise layer); combined: global + explicit + bank.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy={name!r}, expected one of {STRATEGIES}")
    if world_size < 1 or local_batch < 1:
        raise ValueError(f"world_size={world_size} and local_batch={local_batch} must be >= 1")
    if name == "hybrid":
        if world_size == 1:
            return StrategyPlan("hybrid:inbatch", "local", False, False)
        if local_batch >= 6:
            return StrategyPlan("hybrid:global", "global", False, False)
        return StrategyPlan("hybrid:layer", "none", True, False)
    return {
        "inbatch": StrategyPlan("inbatch", "local", False, False),
        "global": StrategyPlan("global", "global", False, True),
        "layer": StrategyPlan("layer", "none", True, False),
        "combined": StrategyPlan("combined", "global", True, True),
    }[name]


def strategy_loss(
    plan: StrategyPlan, head: nn.Module, context: Tensor, actions: Tensor, accelerator: Any, **kwargs: Any
) -> tuple[Tensor, dict[str, float]]:
    """global_infonce_loss with what the plan uses (negatives and bank are dropped when it does not)."""
    if not plan.explicit:
        kwargs.pop("negatives", None)
    if not plan.bank:
        kwargs.pop("bank", None)
    return global_infonce_loss(head, context, actions, accelerator, batch=plan.batch, **kwargs)
