"""The progressive schedule: the energy head's lr scale and grad-clip norm grow with the step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["ProgressiveSchedule"]

LrLambda = Callable[[int], float]


@dataclass
class ProgressiveSchedule:
    """step < stable_steps: start values; linear up to ramp_end_step; end values after.

    With the defaults: lr scale 0.1 and max grad norm 0.3 for 5k steps, then linear to 0.5 / 0.5 at 15k steps.
    Steps count optimizer steps (the scheduler is stepped once per optimizer step).
    """

    stable_steps: int = 5000
    ramp_end_step: int = 15000
    start_lr_scale: float = 0.1
    end_lr_scale: float = 0.5
    start_max_grad_norm: float = 0.3
    end_max_grad_norm: float = 0.5

    def __post_init__(self) -> None:
        if self.stable_steps < 0:
            raise ValueError(f"stable_steps={self.stable_steps}, expected >= 0")
        if self.ramp_end_step < self.stable_steps:
            raise ValueError(
                f"ramp_end_step={self.ramp_end_step}, expected >= stable_steps={self.stable_steps}"
            )
        for name in ("start_lr_scale", "end_lr_scale", "start_max_grad_norm", "end_max_grad_norm"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}={value}, expected a finite number > 0")

    @classmethod
    def constant(cls, lr_scale: float = 1.0, max_grad_norm: float = 1.0) -> ProgressiveSchedule:
        """The same lr scale and max grad norm at every step."""
        return cls(0, 0, lr_scale, lr_scale, max_grad_norm, max_grad_norm)

    def progress(self, step: int) -> float:
        """0 before stable_steps, 1 from ramp_end_step on, linear in between."""
        if step < self.stable_steps:
            return 0.0
        if step >= self.ramp_end_step:
            return 1.0
        return (step - self.stable_steps) / (self.ramp_end_step - self.stable_steps)

    def lr_scale(self, step: int) -> float:
        """Factor on the energy head's learning rate at `step`."""
        return self.start_lr_scale + (self.end_lr_scale - self.start_lr_scale) * self.progress(step)

    def max_grad_norm(self, step: int) -> float:
        """Gradient-clipping norm for the energy head at `step`."""
        return self.start_max_grad_norm + (self.end_max_grad_norm - self.start_max_grad_norm) * self.progress(step)

    def lr_lambda(self, group_index: int, num_groups: int, base_lambda: Optional[LrLambda] = None) -> list[LrLambda]:
        """One lambda per param group: lr_scale(step) * base for `group_index`, base (or 1.0) for the others."""
        if num_groups < 1:
            raise ValueError(f"num_groups={num_groups}, expected >= 1")
        if not -num_groups <= group_index < num_groups:
            raise ValueError(f"group_index={group_index} is out of range for {num_groups} param groups")
        chosen = group_index % num_groups

        def base(step: int) -> float:
            return 1.0 if base_lambda is None else float(base_lambda(step))

        def scaled(step: int) -> float:
            return self.lr_scale(step) * base(step)

        # Plain functions, not callable objects: LambdaLR.state_dict then leaves them out, so checkpoints
        # pickle neither the schedule nor a user's lambda.
        return [scaled if i == chosen else base for i in range(num_groups)]

    def make_lr_scheduler(
        self, optimizer: Optimizer, group_index: int = -1, base_lambda: Optional[LrLambda] = None
    ) -> LambdaLR:
        """LambdaLR scaling group `group_index` (the energy head's) by lr_scale; others follow base_lambda or stay."""
        lambdas = self.lr_lambda(group_index, len(optimizer.param_groups), base_lambda)
        return LambdaLR(optimizer, lr_lambda=lambdas)
