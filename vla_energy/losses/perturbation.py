"""The one way a chunk is perturbed (chunk + scale * N(0, 1)) and kept within bounds, for negatives and candidates
alike."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["perturb", "clamp_to_bounds", "pin_constant_dims", "check_bounds", "bounds_like", "Bound"]

Scale = Union[float, Tensor]
# A bound: a number, a per-action-dimension tensor [Da], or None (unbounded on that side).
Bound = Union[float, Tensor, None]


def perturb(chunks: Tensor, scale: Scale, generator: Optional[torch.Generator] = None,
            num: Optional[int] = None) -> Tensor:
    """chunks [B,H,Da] + scale * N(0, 1): one draw [B,H,Da], or `num` draws [B,num,H,Da] in one call.

    `scale` is a number or a tensor broadcasting over [B,H,Da] (e.g. a per-step, per-dim error [H,Da]). The noise
    is drawn on the chunks' device from `generator` and added in at least float32; the result has the chunks' dtype.
    """
    work = torch.promote_types(chunks.dtype, torch.float32)
    shape = tuple(chunks.shape) if num is None else (chunks.shape[0], int(num), *chunks.shape[1:])
    noise = torch.randn(shape, generator=generator, device=chunks.device, dtype=work)
    s = scale.to(chunks.device, work) if isinstance(scale, Tensor) else float(scale)
    center = chunks.to(work) if num is None else chunks.to(work)[:, None]
    if num is not None and isinstance(s, Tensor) and s.dim() == 3:
        s = s[:, None]  # a per-row scale [B,H,Da] applies to each row's draws
    return (center + s * noise).to(chunks.dtype)


def check_bounds(low: Bound, high: Bound) -> None:
    """Raise if some dimension's low bound is above its high bound."""
    if low is not None and high is not None and bool(torch.any(torch.as_tensor(low) > torch.as_tensor(high))):
        raise ValueError(f"low={low} > high={high}: the bounds are empty")


def bounds_like(x: Tensor, low: Bound, high: Bound) -> tuple[Bound, Bound]:
    """The bounds as clamp takes them for x: numbers, or (when either is a tensor) both as tensors like x."""
    if isinstance(low, Tensor) or isinstance(high, Tensor):  # torch.clamp takes two numbers or two tensors
        low, high = (None if b is None else torch.as_tensor(b).to(x) for b in (low, high))
    return low, high


def clamp_to_bounds(x: Tensor, low: Bound, high: Bound) -> Tensor:
    """x clamped to [low, high] (tensor bounds broadcast over the last dim); unchanged when both are None."""
    if low is None and high is None:
        return x
    return x.clamp(*bounds_like(x, low, high))


def pin_constant_dims(x: Tensor, low: Bound, high: Bound) -> Tensor:
    """x with every dimension whose bounds are equal (constant in the data) set to that value; others unchanged."""
    if not (isinstance(low, Tensor) and isinstance(high, Tensor)):
        return x
    low, high = low.to(x), high.to(x)
    return torch.where(low == high, low, x)
