"""Input checks shared by the public entry points: clear errors instead of silent broadcasting."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor


def _describe(dims: Sequence[str], sizes: dict[str, int]) -> str:
    return "(" + ", ".join(f"{d}={sizes[d]}" if d in sizes else d for d in dims) + ")"


def check_tensor(
    name: str,
    tensor: object,
    dims: Sequence[str],
    device: torch.device | None = None,
    floating: bool = True,
    **sizes: int,
) -> Tensor:
    """Check that `tensor` is a tensor with len(dims) dims whose named sizes match; return it."""
    expected = _describe(dims, sizes)
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(tensor).__name__}")
    shape = tuple(tensor.shape)
    if tensor.dim() != len(dims):
        raise ValueError(f"{name} has shape {shape}, expected {expected}")
    for dim, size in zip(dims, shape):
        if dim in sizes and sizes[dim] != size:
            raise ValueError(f"{name} has shape {shape}, expected {expected}")
    if floating and not tensor.is_floating_point():
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected a floating point tensor")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device} (the device of the context)")
    return tensor


def check_mask(name: str, mask: object, shape: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Check a 0/1 or boolean mask of exactly `shape`; return it."""
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {tuple(shape)}, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if device is not None and mask.device != device:
        raise ValueError(f"{name} is on {mask.device}, expected {device}")
    if mask.is_floating_point() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 or booleans")
    return mask


def real_steps(mask: object, shape: Sequence[int], device: torch.device | None = None, name: str = "action_mask"
               ) -> Tensor:
    """A boolean mask of `shape` (True = a real step or token): `mask` checked, or all True when it is None.

    The one place where "no mask" means "every step is real".
    """
    if mask is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    return check_mask(name, mask, shape).to(device=device if device is not None else mask.device).bool()


def means_local_path(name: str) -> bool:
    """Whether `name` can only be meant as a local path: it starts with `.`, `/` or `~`, or its first component is
    a directory here (`runs/missing` beside an existing `runs/`), so it is not tried as a hub id."""
    if name.startswith((".", "/", "~")):
        return True
    first, sep, _ = name.partition("/")
    return bool(sep) and Path(first).is_dir()


def missing_path(name: str) -> str:
    """`no such file or directory <absolute path>`, with what its nearest existing parent holds."""
    path = Path(name).expanduser().absolute()
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    entries = sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))
    held = ", ".join(entries[:8]) + (", ..." if len(entries) > 8 else "") if entries else "nothing"
    return f"no such file or directory {path} ({parent} holds: {held})"


class UsageError(ValueError):
    """A problem with what the user asked for (an option, a path, a split too small): its message says what to do,
    and the command line reports it in one line, without a traceback."""
