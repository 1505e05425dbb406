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
    """Gathered ranking energies and policy errors of an evaluation, reduced to metrics (same on every rank)."""

    def __init__(self) -> None:
        self.energies: list[Tensor] = []
        self.l1: list[Tensor] = []  # [sum |err| over real steps, real step count x Da] per sample

    def add(self, energies: Tensor, policy: Tensor, actions: Tensor, action_mask: Tensor | None) -> None:
        """One batch's (already gathered, deduplicated) outputs."""
        mask = torch.ones(actions.shape[:2], dtype=torch.bool, device=actions.device) if action_mask is None \
            else action_mask.bool()
        err = ((policy.float() - actions.float()).abs() * mask[..., None]).sum(dim=(1, 2))
        self.energies.append(energies.float().cpu())
        self.l1.append(torch.stack([err, mask.sum(dim=1).float() * actions.shape[-1]], dim=1).cpu())

    def metrics(self) -> dict[str, float]:
        """top1_acc (true chunk strictly lowest), chance_acc, e_pos, e_neg, gap, action_l1, eval_samples."""
        if not self.energies:
            raise ValueError("the evaluation split is empty")
        e = torch.cat(self.energies)
        l1 = torch.cat(self.l1).sum(dim=0)
        return {
            "top1_acc": float((e[:, 0] < e[:, 1:].min(dim=1).values).float().mean()),
            "chance_acc": 1.0 / e.shape[1],
            "e_pos": float(e[:, 0].mean()),
            "e_neg": float(e[:, 1:].mean()),
            "gap": float(e[:, 1:].mean() - e[:, 0].mean()),
            "action_l1": float(l1[0] / l1[1].clamp(min=1)),
            "eval_samples": float(e.shape[0]),
        }

    def ranking_energies(self) -> Tensor:
        """[N, 1+M] energies, true chunk first (for the histograms of the report)."""
        return torch.cat(self.energies)
