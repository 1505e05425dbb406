"""Action chunks: for frame t, actions[t : t+H] of its episode, padded with the last action and masked."""

from __future__ import annotations

from typing import Optional

import numpy as np
from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

from vla_energy.data.columns import read_column, read_vectors
from vla_energy.data.normalization import NormStats

__all__ = ["chunk_indices", "add_action_chunks", "CHUNK_FEATURES"]

CHUNK_FEATURES = Features({
    "actions": Sequence(Sequence(Value("float32"))),
    "action_mask": Sequence(Value("bool")),
    "sample_id": Value("int64"),
})


def chunk_indices(episode_index: np.ndarray, frame_index: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices [N, H] of each row's next H frames in its episode (frame order) and the mask [N, H].

    Rows need not be sorted or contiguous. Steps past the episode's last frame point at that last frame
    (the last action repeats) and are False in the mask, like LeRobot's `action_is_pad`.
    """
    ep = np.asarray(episode_index).astype(np.int64, copy=False)
    fr = np.asarray(frame_index).astype(np.int64, copy=False)
    if ep.ndim != 1 or fr.shape != ep.shape:
        raise ValueError(
            f"episode_index has shape {ep.shape} and frame_index {fr.shape}, expected two equal 1-D shapes (N,)"
        )
    if horizon < 1:
        raise ValueError(f"horizon={horizon}, expected >= 1")
    n = ep.shape[0]
    if n == 0:
        return np.zeros((0, horizon), np.int64), np.zeros((0, horizon), bool)
    order = np.lexsort((fr, ep))  # by episode, then frame
    ep_s, fr_s = ep[order], fr[order]
    same = (ep_s[1:] == ep_s[:-1]) & (fr_s[1:] == fr_s[:-1])
    if same.any():
        k = int(np.argmax(same))
        raise ValueError(
            f"episode {int(ep_s[k])} has frame_index {int(fr_s[k])} twice (rows {int(order[k])} and "
            f"{int(order[k + 1])}): episode/frame columns must identify each row"
        )
    starts = np.r_[True, ep_s[1:] != ep_s[:-1]]
    segment = np.cumsum(starts) - 1
    last = (np.r_[np.flatnonzero(starts)[1:], n] - 1)[segment]  # sorted position of the episode's last frame
    pos = np.arange(n)[:, None] + np.arange(horizon)[None, :]
    mask_s = pos <= last[:, None]
    idx_s = order[np.minimum(pos, last[:, None])]
    idx, mask = np.empty_like(idx_s), np.empty_like(mask_s)
    idx[order], mask[order] = idx_s, mask_s
    return idx, mask


def add_action_chunks(
    frames: Dataset,
    horizon: int,
    norm_stats: Optional[NormStats] = None,
    actions: Optional[np.ndarray] = None,
    drop_frame_action: bool = True,
    progress: bool = False,
) -> Dataset:
    """Add `actions` [H, Da] float32 (normalized if `norm_stats`), `action_mask` [H] and `sample_id` (row index).

    `frames` holds the standard frame columns (action, episode_index, frame_index); `actions` [N, Da] may be
    passed when already read, to skip reading the column again.
    """
    for col in ("action", "episode_index", "frame_index"):
        if col not in frames.column_names:
            raise ValueError(f"frames has no {col!r} column; its columns are {frames.column_names}")
    if actions is None:
        actions = read_vectors(frames, "action", progress=progress)
    if actions.ndim != 2 or actions.shape[0] != len(frames):
        raise ValueError(f"actions has shape {actions.shape}, expected (N={len(frames)}, Da)")
    episode = read_column(frames, "episode_index", progress=progress)
    frame = read_column(frames, "frame_index", progress=progress)
    idx, mask = chunk_indices(episode, frame, horizon)
    per_frame = norm_stats.normalize(actions.astype(np.float32)) if norm_stats is not None else actions
    chunks = np.asarray(per_frame, dtype=np.float32)[idx]  # [N, H, Da]
    new = Dataset.from_dict(
        {"actions": chunks, "action_mask": mask, "sample_id": np.arange(len(frames), dtype=np.int64)},
        features=CHUNK_FEATURES,
    )
    base = frames.remove_columns(["action"]) if drop_frame_action else frames
    clash = sorted(set(base.column_names) & set(CHUNK_FEATURES))
    if clash:
        base = base.remove_columns(clash)
    return concatenate_datasets([base, new], axis=1)
