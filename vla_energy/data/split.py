"""Seeded train/validation split by episode (no episode is in both)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["split_episodes", "split_rows", "spread_indices"]


def split_episodes(episodes: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) episode ids; round(val_fraction * E) episodes (at least 1 when > 0) are held out."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}, expected 0 <= val_fraction < 1")
    unique = np.unique(np.asarray(episodes))
    if val_fraction == 0.0:
        return unique, unique[:0]
    if unique.size < 2:
        raise ValueError(
            f"the dataset has {unique.size} episode(s); a validation split by episode needs at least 2 "
            "(or set val_fraction=0)"
        )
    n_val = min(unique.size - 1, max(1, int(round(val_fraction * unique.size))))
    perm = np.random.default_rng(seed).permutation(unique.size)
    val = np.sort(unique[perm[:n_val]])
    train = np.sort(unique[perm[n_val:]])
    return train, val


def split_rows(episode_index: np.ndarray, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val) of a frame table, split by episode."""
    episode_index = np.asarray(episode_index)
    train_eps, val_eps = split_episodes(episode_index, val_fraction, seed)
    is_val = np.isin(episode_index, val_eps)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices evenly spaced over `total` rows, so that every episode of a split is represented."""
    count = min(total, count)
    return torch.linspace(0, total - 1, count).long().tolist() if count > 0 else []
