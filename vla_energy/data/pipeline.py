"""build_datasets: load frames, split by episode, statistics on train, normalized action chunks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import datasets
import numpy as np
import torch
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

from vla_energy.data.arguments import DataConfig
from vla_energy.data.cameras import camera_columns, with_cameras
from vla_energy.data.chunking import add_action_chunks
from vla_energy.data.columns import iter_vector_batches
from vla_energy.data.loading import load_frames
from vla_energy.data.normalization import NormStats, compute_norm_stats
from vla_energy.data.split import split_rows, spread_indices

__all__ = ["build_datasets", "training_chunks", "retrieval_rows"]


@contextmanager
def _datasets_progress(enabled: bool) -> Iterator[None]:
    """Turn the `datasets` library's own bars off inside the block when `enabled` is False, then restore."""
    was_enabled = datasets.is_progress_bar_enabled()
    if not enabled and was_enabled:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            datasets.enable_progress_bars()


def build_datasets(cfg: DataConfig, progress: bool = True) -> tuple[Dataset, Dataset, NormStats]:
    """(train, val, stats): frames of `cfg.dataset` chunked to horizon H, split by episode (seeded), with
    `actions` (and with use_state, `state`) normalized by statistics computed on the training split only.

    Each example: image (a PIL image, or a list of them with several cameras and camera_layout="separate"),
    instruction, [state [Ds] float32], episode_index, frame_index, actions [H, Da] (normalized), action_mask [H]
    (True = real step), sample_id (row index in the frame table). Video frames are decoded when a row is read.
    """
    with _datasets_progress(progress):
        frames = load_frames(cfg, progress=progress)
        actions = np.concatenate(list(iter_vector_batches(frames, "action", progress=progress,
                                                          desc="reading actions")))
        episode = np.asarray(frames.select_columns(["episode_index"]).with_format("numpy")[:]["episode_index"])
        train_rows, val_rows = split_rows(episode, cfg.val_fraction, cfg.data_seed)
        # Statistics from the training episodes only, streamed in batches like the read above.
        batch = 65536
        stats = compute_norm_stats(
            (actions[train_rows[i:i + batch]] for i in range(0, len(train_rows), batch)), mode=cfg.normalization
        )
        if "state" in frames.column_names:
            states = np.concatenate(list(iter_vector_batches(frames, "state", progress=progress,
                                                             desc="reading states")))
            stats.state = compute_norm_stats(
                (states[train_rows[i:i + batch]] for i in range(0, len(train_rows), batch)), mode=cfg.normalization
            )
            normed = stats.state.normalize(states).astype(np.float32)
            frames = concatenate_datasets([frames.remove_columns(["state"]), Dataset.from_dict(
                {"state": normed}, features=Features({"state": Sequence(Value("float32"))}))], axis=1)
        chunked = add_action_chunks(frames, cfg.horizon, norm_stats=stats, actions=actions, progress=progress)
        cameras = camera_columns(chunked)
        return (with_cameras(chunked.select(train_rows), cfg.camera_layout, cameras),
                with_cameras(chunked.select(val_rows), cfg.camera_layout, cameras), stats)


def retrieval_rows(train_ds: Dataset, count: int) -> Dataset:
    """The up to `count` rows evenly spread over a split whose chunks (and context keys) a policy keeps."""
    return train_ds.select(spread_indices(len(train_ds), count))


def training_chunks(train_ds: Dataset, count: int) -> Optional[torch.Tensor]:
    """Up to `count` normalized action chunks [N,H,Da] evenly spread over a split (None for 0): what a policy keeps
    for candidates="retrieval", those of retrieval_rows."""
    if count <= 0:
        return None
    return retrieval_rows(train_ds, count).select_columns(["actions"]).with_format("torch")[:]["actions"].float()
