"""The one way a chunk is perturbed: chunk + scale * N(0, 1), for negatives and candidates alike."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["perturb"]

Scale = Union[float, Tensor]


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
