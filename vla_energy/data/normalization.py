"""Per-dimension action statistics and the normalization applied in training and at inference."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from vla_energy.data.arguments import NORMALIZATIONS

__all__ = ["NormStats", "NORM_STATS_NAME", "compute_norm_stats"]

NORM_STATS_NAME = "norm_stats.json"
_EPS = 1e-8

ArrayLike = Union[np.ndarray, Tensor]


@dataclass
class NormStats:
    """Statistics of each action dimension over the training split, and the normalization mode.

    `state`: the same statistics of the proprioceptive state (use_state), normalized the same way.
    """

    mode: str
    mean: list[float]
    std: list[float]
    q01: list[float]
    q99: list[float]
    min: list[float]
    max: list[float]
    count: int
    state: Optional[NormStats] = None

    def __post_init__(self) -> None:
        if isinstance(self.state, dict):
            self.state = NormStats(**self.state)
        if self.mode not in NORMALIZATIONS:
            raise ValueError(f"mode={self.mode!r}, expected one of {NORMALIZATIONS}")
        dims = {name: len(getattr(self, name)) for name in ("mean", "std", "q01", "q99", "min", "max")}
        if len(set(dims.values())) != 1:
            raise ValueError(f"statistics have different lengths {dims}, expected one action dimension Da")

    @property
    def action_dim(self) -> int:
        """Da."""
        return len(self.mean)

    def constant_dims(self) -> np.ndarray:
        """[Da] bool: dimensions that never vary in the training split (min == max), e.g. a gripper never used."""
        return np.asarray(self.max, np.float64) - np.asarray(self.min, np.float64) <= _EPS

    def normalized_bounds(self) -> tuple[Union[float, Tensor], Union[float, Tensor]]:
        """Where normalized chunks of this data lie: [-1, 1] for q01_q99 (normalization clips there) except that a
        dimension constant in the data stays at its value (then [Da] tensors); the data's range for mean_std and none."""
        if self.mode == "q01_q99":
            constant = torch.as_tensor(self.constant_dims())
            if not constant.any():
                return -1.0, 1.0
            # A chunk moving a dimension the data never moves (noise on an unused gripper, a padded dimension) is off
            # the data for a trivial reason, which an energy head reads as a negative whatever the rest does.
            value = torch.as_tensor(self.normalize(np.asarray(self.min, np.float32)))
            return torch.where(constant, value, -1.0), torch.where(constant, value, 1.0)
        low = torch.as_tensor(self.normalize(np.asarray(self.min, np.float32)))
        high = torch.as_tensor(self.normalize(np.asarray(self.max, np.float32)))
        return low, high

    def _center_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """x_norm = (x - center) / scale; a degenerate dimension (scale ~ 0) gets scale 1 instead of a division by 0."""
        if self.mode == "q01_q99":
            low, high = np.asarray(self.q01, np.float64), np.asarray(self.q99, np.float64)
            center, scale = (high + low) / 2, (high - low) / 2
        elif self.mode == "mean_std":
            center, scale = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        else:
            center, scale = np.zeros(self.action_dim), np.ones(self.action_dim)
        return center, np.where(scale > _EPS, scale, 1.0)

    def _check(self, x: ArrayLike, name: str) -> None:
        if x.ndim == 0 or x.shape[-1] != self.action_dim:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, expected (..., Da={self.action_dim}) (last dim = action dims)"
            )

    def _as(self, values: np.ndarray, like: ArrayLike) -> ArrayLike:
        if isinstance(like, Tensor):
            dtype = like.dtype if like.is_floating_point() else torch.float32
            return torch.as_tensor(values, dtype=dtype, device=like.device)
        return values.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)

    def normalize(self, x: ArrayLike) -> ArrayLike:
        """Raw actions [..., Da] -> normalized (q01_q99: values outside q01..q99 are clipped to [-1, 1])."""
        self._check(x, "actions")
        center, scale = self._center_scale()
        c, s = self._as(center, x), self._as(scale, x)
        if isinstance(x, Tensor) and not x.is_floating_point():
            x = x.float()
        elif isinstance(x, np.ndarray) and not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        y = (x - c) / s
        if self.mode == "q01_q99":
            y = y.clamp(-1.0, 1.0) if isinstance(y, Tensor) else np.clip(y, -1.0, 1.0)
        return y

    def unnormalize(self, y: ArrayLike) -> ArrayLike:
        """Normalized actions [..., Da] (e.g. model outputs) -> raw action units."""
        self._check(y, "normalized actions")
        center, scale = self._center_scale()
        if isinstance(y, Tensor) and not y.is_floating_point():
            y = y.float()
        elif isinstance(y, np.ndarray) and not np.issubdtype(y.dtype, np.floating):
            y = y.astype(np.float32)
        return y * self._as(scale, y) + self._as(center, y)

    def to_dict(self) -> dict:
        """JSON-ready dict (no `state` key when there are no state statistics)."""
        out = asdict(self)
        if self.state is None:
            del out["state"]
        return out

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write JSON to `path` (a directory gets norm_stats.json inside), atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / NORM_STATS_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> NormStats:
        """Read what save() wrote (a file, or a directory holding norm_stats.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / NORM_STATS_NAME
        raw = json.loads(path.read_text())
        expected = {"mode", "mean", "std", "q01", "q99", "min", "max", "count"}
        if not isinstance(raw, dict) or set(raw) - {"state"} != expected:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path}: keys {got}, expected {sorted(expected)}")
        return cls(**raw)


def compute_norm_stats(batches: Iterable[ArrayLike], mode: str = "q01_q99") -> NormStats:
    """Statistics per action dimension from batches of frame actions [n, Da] (quantiles are exact)."""
    parts = []
    for i, batch in enumerate(batches):
        arr = batch.detach().cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        if arr.ndim != 2 or (parts and arr.shape[1] != parts[0].shape[1]):
            want = f"(n, Da={parts[0].shape[1]})" if parts else "(n, Da)"
            raise ValueError(f"actions batch {i} has shape {arr.shape}, expected {want}")
        parts.append(arr.astype(np.float64))
    if not parts or sum(len(p) for p in parts) == 0:
        raise ValueError("cannot compute normalization statistics from zero actions")
    x = np.concatenate(parts)
    if not np.isfinite(x).all():
        rows = np.nonzero(~np.isfinite(x).all(axis=1))[0][:5].tolist()
        raise ValueError(f"actions contain NaN/Inf (first rows {rows}); clean the dataset first")
    q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
    return NormStats(
        mode=mode, mean=x.mean(0).tolist(), std=x.std(0).tolist(), q01=q01.tolist(), q99=q99.tolist(),
        min=x.min(0).tolist(), max=x.max(0).tolist(), count=int(x.shape[0]),
    )
