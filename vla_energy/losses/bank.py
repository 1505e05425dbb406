"""ActionBank: a FIFO of recently gathered ground-truth chunks, identical on every process, used as negatives."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from vla_energy.checks import check_tensor, real_steps
from vla_energy.losses.false_negatives import lookalike_mask

__all__ = ["ActionBank"]


class ActionBank:
    """Negatives independent of batch size, world size and accumulation: recent chunks of all processes.

    Chunks are data, not features, so (unlike MoCo keys) they are never stale: the current head scores them every
    step. The loss stages each micro-batch's gathered chunks; `commit()` after the optimizer step enqueues them,
    so every process holds the same bank. Entries that are the positive's own sample or within `eps` of it are
    masked as false negatives.
    """

    def __init__(self, size: int, horizon: int, action_dim: int, eps: float = 1e-2) -> None:
        if size < 1:
            raise ValueError(f"size={size}, expected >= 1")
        self.size, self.horizon, self.action_dim, self.eps = int(size), int(horizon), int(action_dim), float(eps)
        self.actions = torch.zeros(self.size, self.horizon, self.action_dim)
        self.action_mask = torch.zeros(self.size, self.horizon, dtype=torch.bool)
        self.sample_ids = torch.full((self.size,), -1, dtype=torch.long)
        self.ptr = 0
        self.count = 0
        self._staged: list[tuple[Tensor, Tensor, Tensor]] = []

    def to(self, device: torch.device | str) -> ActionBank:
        """Move the storage to `device` (the accelerator's)."""
        self.actions, self.action_mask = self.actions.to(device), self.action_mask.to(device)
        self.sample_ids = self.sample_ids.to(device)
        return self

    def __len__(self) -> int:
        return self.count

    def stage(self, actions: Tensor, action_mask: Optional[Tensor] = None, sample_ids: Optional[Tensor] = None) -> None:
        """Remember a (gathered) micro-batch; it enters the bank at the next commit()."""
        check_tensor("actions", actions, ("N", "H", "Da"), H=self.horizon, Da=self.action_dim)
        n = actions.shape[0]
        mask = real_steps(action_mask, (n, self.horizon), actions.device)
        ids = torch.full((n,), -1, dtype=torch.long) if sample_ids is None else sample_ids.long()
        dev = self.actions.device
        self._staged.append((actions.detach().to(dev, self.actions.dtype), mask.to(dev), ids.to(dev)))

    def commit(self) -> None:
        """Enqueue everything staged since the last commit (oldest entries are overwritten)."""
        for actions, mask, ids in self._staged:
            for start in range(0, actions.shape[0], self.size):
                a, m, i = actions[start:start + self.size], mask[start:start + self.size], ids[start:start + self.size]
                pos = (self.ptr + torch.arange(a.shape[0], device=a.device)) % self.size
                self.actions[pos], self.action_mask[pos], self.sample_ids[pos] = a, m, i
                self.ptr = (self.ptr + a.shape[0]) % self.size
                self.count = min(self.size, self.count + a.shape[0])
        self._staged.clear()

    def discard(self, keep: int = 0) -> None:
        """Forget what was staged (a skipped step); `keep` leaves the first micro-batches staged before it."""
        del self._staged[keep:]

    def num_staged(self) -> int:
        """Micro-batches staged since the last commit."""
        return len(self._staged)

    def entries(self) -> tuple[Tensor, Tensor, Tensor]:
        """(actions [n,H,Da], action_mask [n,H], sample_ids [n]), oldest first."""
        if self.count < self.size:
            idx = torch.arange(self.count, device=self.actions.device)
        else:
            idx = (self.ptr + torch.arange(self.size, device=self.actions.device)) % self.size
        return self.actions[idx], self.action_mask[idx], self.sample_ids[idx]

    def negative_mask(
        self, positives: Tensor, positive_ids: Optional[Tensor] = None, positive_mask: Optional[Tensor] = None
    ) -> Tensor:
        """[b, n] True where a bank entry is a usable negative: not the positive's own sample, not within eps."""
        check_tensor("positives", positives, ("B", "H", "Da"), H=self.horizon, Da=self.action_dim)
        actions, _, ids = self.entries()
        mask = None if positive_mask is None else positive_mask.to(actions.device)
        return ~lookalike_mask(positives.to(actions.device), actions, self.eps, mask, positive_ids, ids)

    def state_dict(self) -> dict[str, Any]:
        """Contents and pointer (tensors only, so it can be saved as safetensors)."""
        return {"actions": self.actions.clone(), "action_mask": self.action_mask.clone(),
                "sample_ids": self.sample_ids.clone(), "ptr": torch.tensor(self.ptr), "count": torch.tensor(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a bank saved by state_dict (same size, horizon and action dim)."""
        if tuple(state["actions"].shape) != tuple(self.actions.shape):
            raise ValueError(f"bank state has actions of shape {tuple(state['actions'].shape)}, expected "
                             f"{tuple(self.actions.shape)} (bank_size, horizon, action_dim)")
        dev = self.actions.device
        self.actions, self.action_mask = state["actions"].to(dev), state["action_mask"].to(dev).bool()
        self.sample_ids = state["sample_ids"].to(dev).long()
        self.ptr, self.count = int(state["ptr"]), int(state["count"])
        self._staged.clear()
