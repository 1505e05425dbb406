"""The environment interface the rollout loop drives: a batch of seeded episodes stepped in lockstep, and a suite
(the tasks of one simulator, their settings and the seeds they refuse)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["BatchedEnv", "Suite"]


class BatchedEnv(Protocol):
    """B episodes of one task, stepped together; observations are batched and keyed as in the training dataset."""

    def reset(self, seeds: Sequence[int]) -> dict[str, Any]:
        """Start one episode per seed (at most the batch size); returns the first observation of each."""
        ...

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Apply actions [B, Da] to the episodes where `active` [B] is True (the others stay as they are); returns
        the next observation and whether each stepped episode has succeeded now [B] (False where not stepped)."""
        ...

    def frame(self, index: int) -> np.ndarray:
        """An RGB uint8 picture of episode `index` now, for the report's GIFs."""
        ...

    def episode_info(self, index: int) -> dict[str, Any]:
        """Extra facts of episode `index` for episodes.json (JSON-serialisable; may be empty)."""
        ...

    def close(self) -> None:
        """Release the simulator."""
        ...


@dataclass
class Suite:
    """The tasks of one environment family, as a rollout of a trained run needs them."""

    title: str  # where the episodes run, in the report's title ("Meta-World", "the synthetic task")
    tasks: list[str]
    make: Callable[[str, int], BatchedEnv]  # (task, episodes in lockstep) -> a batched environment
    settings: str  # what the episodes look like, one sentence of the report
    success: str  # when an episode succeeds, one sentence of the report
    default_max_steps: int
    max_steps_limit: int
    # Raises a ValueError for seeds whose episodes trained the policy; returns what it checked (for the report).
    check_seeds: Callable[[Sequence[int]], str]
    details: list[str] = field(default_factory=list)  # more settings, as report lines ("- Rendering: ...")
    metrics: dict[str, Any] = field(default_factory=dict)  # the settings in metrics.json
    settings_json: dict[str, Any] = field(default_factory=dict)  # everything the environment was built from
