"""Held-out top-1 ranking through the model's forward: each sample carries its true chunk and 31 other-episode chunks.

The pool is data (fixed_negative_pool over the split's episodes), so it travels in the batch; every rank then
evaluates its share through `model(**batch)` (sharded weights included) and the results are gathered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vla_energy.evaluation.metrics import fixed_negative_pool

__all__ = ["RankingDataset", "RankingCollator", "RankingTally"]


class RankingDataset(Dataset):
    """Rows of `dataset` plus `candidate_actions` [1+M,H,Da] (true chunk first) and `candidate_mask` [1+M,H]."""

    def __init__(self, dataset: Any, num_negatives: int = 31, seed: int = 0) -> None:
        self.dataset = dataset
        episodes = torch.tensor(list(dataset["episode_index"]))
        self.pool = fixed_negative_pool(episodes, num_negatives, seed)
        self.actions = np.asarray(dataset["actions"], dtype=np.float32)
        horizon = self.actions.shape[1]
        masks = dataset["action_mask"] if "action_mask" in dataset.column_names else None
        self.masks = (np.asarray(masks, dtype=bool) if masks is not None
                      else np.ones(self.actions.shape[:2], dtype=bool))
        if self.masks.shape[1] != horizon:
            raise ValueError(f"action_mask has {self.masks.shape[1]} steps, actions have H={horizon}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rows = np.concatenate([[i], self.pool[i].numpy()])
        return {**self.dataset[i], "candidate_actions": self.actions[rows], "candidate_mask": self.masks[rows]}


class RankingCollator:
    """The inner collator's batch plus the stacked candidates."""

    def __init__(self, collator: Callable[[Sequence[Mapping[str, Any]]], dict[str, Tensor]]) -> None:
        self.collator = collator

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        batch = self.collator(examples)
        if "candidate_actions" in examples[0]:
            batch["candidate_actions"] = torch.from_numpy(np.stack([e["candidate_actions"] for e in examples]))
            batch["candidate_mask"] = torch.from_numpy(np.stack([e["candidate_mask"] for e in examples]))
        return batch


class RankingTally:
    """Gathered ranking energies, candidates and policy chunks of an evaluation, reduced to metrics by
    evaluation.metrics.summarize_ranking (the one definition; same on every rank)."""

    def __init__(self, false_negative_eps: float = 1e-2) -> None:
        self.false_negative_eps = false_negative_eps
        self.parts: dict[str, list[Tensor]] = {"energies": [], "candidates": [], "candidate_mask": [], "policy": []}

    def add(self, energies: Tensor, candidates: Tensor, candidate_mask: Tensor, policy: Tensor) -> None:
        """One batch's (already gathered, deduplicated) outputs."""
        for key, value in zip(self.parts, (energies, candidates, candidate_mask, policy)):
            self.parts[key].append(value.detach().cpu())

    def metrics(self) -> dict[str, float]:
        """top1_acc, chance_acc, e_pos, e_neg, gap, lookalikes, argmin_rms, action_l1, eval_samples."""
        from vla_energy.evaluation.metrics import summarize_ranking

        if not self.parts["energies"]:
            raise ValueError("the evaluation split is empty")
        cat = {k: torch.cat(v) for k, v in self.parts.items()}
        return summarize_ranking(cat["energies"], cat["candidates"], cat["candidate_mask"], cat["policy"],
                                 self.false_negative_eps)

    def ranking_energies(self) -> Tensor:
        """[N, 1+M] energies, true chunk first (for the histograms of the report)."""
        return torch.cat(self.parts["energies"]).float()
