"""InfoNCE temperatures with one call shape: fixed, adaptive (energy-gap rule) and learnable (CLIP-style).

Every temperature is an `nn.Module` called as `tau = temp(e_pos, e_neg, neg_mask=None)`: e_pos [B] are the
positives' energies, e_neg the negatives' energies (any shape) and neg_mask an optional boolean tensor of e_neg's
shape selecting the entries to use. It returns a 0-dim float32 tensor on the device of e_pos (the learnable one:
of its parameter). `temp.current` is the last value as a float, for logging.

Distributed training: the adaptive temperature must be identical on every process. It does not all-reduce
anything itself; callers pass statistics that are already global (the loss code scores the gathered actions, so
its e_pos / e_neg are the same on every rank).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from vla_energy.checks import check_mask, check_tensor

__all__ = [
    "TEMPERATURE_KINDS",
    "AdaptiveTemperature",
    "FixedTemperature",
    "LearnableTemperature",
    "Temperature",
    "make_temperature",
]

TEMPERATURE_KINDS = ("fixed", "adaptive", "learnable")


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value}, expected a finite number > 0")
    return value


class Temperature(nn.Module):
    """Base class: input checks and the `current` value shared by all temperatures."""

    def __init__(self, initial: float) -> None:
        super().__init__()
        self.current = float(initial)

    def _check(self, e_pos: Tensor, e_neg: Tensor, neg_mask: Optional[Tensor]) -> Optional[Tensor]:
        """Validate the call's tensors; return neg_mask as a bool tensor (or None)."""
        check_tensor("e_pos", e_pos, ("B",))
        if not isinstance(e_neg, Tensor) or not e_neg.is_floating_point():
            got = e_neg.dtype if isinstance(e_neg, Tensor) else type(e_neg).__name__
            raise ValueError(f"e_neg must be a floating point torch.Tensor, got {got}")
        if neg_mask is None:
            return None
        return check_mask("neg_mask", neg_mask, tuple(e_neg.shape), device=e_neg.device).bool()


class FixedTemperature(Temperature):
    """A constant tau (default 0.3)."""

    def __init__(self, tau: float = 0.3) -> None:
        super().__init__(_positive("tau", tau))
        self.tau = self.current

    @torch.no_grad()
    def forward(self, e_pos: Tensor, e_neg: Tensor, neg_mask: Optional[Tensor] = None) -> Tensor:
        """The constant tau as a 0-dim float32 tensor."""
        self._check(e_pos, e_neg, neg_mask)
        return torch.tensor(self.tau, dtype=torch.float32, device=e_pos.device)

    def extra_repr(self) -> str:
        return f"tau={self.tau}"


class AdaptiveTemperature(Temperature):
    """Tau from the energy gap: gap = |mean E_neg - mean E_pos|; gap < low_gap -> base * low_factor, gap > high_gap ->
    base * high_factor, else base; clamped to [min_tau, max_tau]. Computed without gradient.

    With ema > 0 the gap is smoothed (gap_ema = ema * gap_ema + (1 - ema) * gap, the first gap seeds it) while
    the module is in training mode; in eval mode the stored smoothed gap is used and not updated (BatchNorm
    semantics). The smoothed gap is a buffer, so it is in state_dict and survives a checkpoint. A call without any
    valid negative (or positive) carries no gap: it leaves the EMA alone and uses the stored gap, or base.
    """

    def __init__(
        self,
        base: float = 0.3,
        low_gap: float = 0.1,
        high_gap: float = 1.0,
        low_factor: float = 0.5,
        high_factor: float = 2.0,
        min_tau: float = 0.1,
        max_tau: float = 2.0,
        ema: float = 0.0,
    ) -> None:
        super().__init__(_positive("base", base))
        self.base = self.current
        if not 0 <= low_gap <= high_gap:
            raise ValueError(f"low_gap={low_gap}, high_gap={high_gap}, expected 0 <= low_gap <= high_gap")
        self.low_gap, self.high_gap = float(low_gap), float(high_gap)
        self.low_factor = _positive("low_factor", low_factor)
        self.high_factor = _positive("high_factor", high_factor)
        self.min_tau, self.max_tau = _positive("min_tau", min_tau), _positive("max_tau", max_tau)
        if self.min_tau > self.max_tau:
            raise ValueError(f"min_tau={min_tau} > max_tau={max_tau}")
        if not 0 <= ema < 1:
            raise ValueError(f"ema={ema}, expected 0 <= ema < 1")
        self.ema = float(ema)
        self.current = self.tau_for_gap(None)
        self.register_buffer("gap_ema", torch.zeros((), dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def tau_for_gap(self, gap: Optional[float]) -> float:
        """The energy-gap rule for one gap (None: no gap known -> base), clamped to [min_tau, max_tau]."""
        tau = self.base
        if gap is not None and gap < self.low_gap:
            tau = self.base * self.low_factor
        elif gap is not None and gap > self.high_gap:
            tau = self.base * self.high_factor
        return min(max(tau, self.min_tau), self.max_tau)

    @staticmethod
    def energy_gap(e_pos: Tensor, e_neg: Tensor, neg_mask: Optional[Tensor] = None) -> Optional[float]:
        """|mean E_neg - mean E_pos| over the selected negatives in float64; None when either set is empty."""
        neg = e_neg.detach().double()
        if neg_mask is not None:
            neg = neg[neg_mask]
        if e_pos.numel() == 0 or neg.numel() == 0:
            return None
        return abs(float(neg.mean()) - float(e_pos.detach().double().mean()))

    @torch.no_grad()
    def forward(self, e_pos: Tensor, e_neg: Tensor, neg_mask: Optional[Tensor] = None) -> Tensor:
        """tau from the (smoothed) energy gap, as a 0-dim float32 tensor without gradient."""
        gap = self.energy_gap(e_pos, e_neg, self._check(e_pos, e_neg, neg_mask))
        if self.ema > 0:
            if gap is not None and self.training:
                seeded = int(self.num_updates) > 0
                smoothed = self.ema * float(self.gap_ema) + (1 - self.ema) * gap if seeded else gap
                self.gap_ema.fill_(smoothed)
                self.num_updates += 1
            gap = float(self.gap_ema) if int(self.num_updates) > 0 else gap
        self.current = self.tau_for_gap(gap)
        return torch.tensor(self.current, dtype=torch.float32, device=e_pos.device)

    def extra_repr(self) -> str:
        return (f"base={self.base}, low_gap={self.low_gap}, high_gap={self.high_gap}, low_factor={self.low_factor}, "
                f"high_factor={self.high_factor}, min_tau={self.min_tau}, max_tau={self.max_tau}, ema={self.ema}")


class LearnableTemperature(Temperature):
    """tau = exp(log_tau), a trained parameter kept in [min_tau, max_tau].

    Like CLIP's logit scale, the parameter itself is clamped (in place, without gradient) before use: the value
    is always in range, and a parameter pushed against a bound still gets gradient to move back.
    """

    def __init__(self, init: float = 0.3, min_tau: float = 0.01, max_tau: float = 10.0) -> None:
        super().__init__(_positive("init", init))
        self.min_tau, self.max_tau = _positive("min_tau", min_tau), _positive("max_tau", max_tau)
        if not self.min_tau <= self.current <= self.max_tau:
            raise ValueError(f"init={init}, expected within [min_tau={min_tau}, max_tau={max_tau}]")
        self.log_tau = nn.Parameter(torch.tensor(math.log(self.current), dtype=torch.float32))

    def forward(self, e_pos: Tensor, e_neg: Tensor, neg_mask: Optional[Tensor] = None) -> Tensor:
        """exp(log_tau) as a 0-dim float32 tensor carrying gradient to log_tau."""
        self._check(e_pos, e_neg, neg_mask)
        low, high = math.log(self.min_tau), math.log(self.max_tau)
        # Clamp only when out of range: an in-place write bumps the parameter's version for nothing otherwise.
        if not low <= float(self.log_tau.detach()) <= high:
            with torch.no_grad():
                self.log_tau.clamp_(low, high)
        tau = self.log_tau.float().exp()
        self.current = float(tau.detach())
        return tau

    def extra_repr(self) -> str:
        return f"min_tau={self.min_tau}, max_tau={self.max_tau}"


def make_temperature(kind: str, tau: float = 0.3, **kwargs: Any) -> Temperature:
    """A temperature by name: "fixed" (tau), "adaptive" (base=tau) or "learnable" (init=tau); kwargs go to it."""
    if kind == "fixed":
        return FixedTemperature(tau, **kwargs)
    if kind == "adaptive":
        return AdaptiveTemperature(tau, **kwargs)
    if kind == "learnable":
        return LearnableTemperature(tau, **kwargs)
    raise ValueError(f"temperature kind {kind!r} is unknown, expected one of {TEMPERATURE_KINDS}")
