"""InfoNCE on energies (logits = -E / tau): explicit negatives, in-batch, per-row losses and statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from vla_energy.checks import check_mask, check_tensor, real_steps

TauLike = Union[float, Tensor, Callable[..., Tensor]]

__all__ = [
    "infonce_loss",
    "inbatch_infonce_loss",
    "infonce_rows",
    "infonce_stats",
    "infonce_stat_sums",
    "finish_stats",
    "loss_floor",
    "resolve_tau",
]


def loss_floor(num_negatives: float | Tensor, energy_range: tuple[float, float] | None, tau: float) -> float:
    """Lowest InfoNCE a bounded head can reach: log(1 + M * exp(-(E_max - E_min) / tau)); 0 when unbounded."""
    if energy_range is None:
        return 0.0
    spread = (energy_range[1] - energy_range[0]) / float(tau)
    m = torch.as_tensor(num_negatives, dtype=torch.float64)
    return float(torch.log1p(m * math.exp(-spread)).mean())


def resolve_tau(tau: TauLike, e_pos: Tensor, e_neg: Tensor, neg_mask: Tensor | None = None) -> Tensor:
    """A temperature as a 0-dim tensor: a number, a tensor, or a temperature module called on detached stats."""
    if callable(tau) and not isinstance(tau, Tensor):
        value = tau(e_pos.detach(), e_neg.detach(), neg_mask=neg_mask)
    else:
        dtype = torch.promote_types(e_pos.dtype, torch.float32)  # float64 energies keep a float64 tau
        value = torch.as_tensor(tau, dtype=dtype, device=e_pos.device)
    if value.dim() != 0:
        raise ValueError(f"tau has shape {tuple(value.shape)}, expected a scalar")
    if not bool(value.detach() > 0):
        raise ValueError(f"tau={float(value)}, expected > 0")
    return value


def infonce_rows(energies: Tensor, labels: Tensor, tau: Tensor | float, valid_mask: Tensor | None = None) -> Tensor:
    """Per-row cross-entropy of logits -E/tau against `labels`, masked columns excluded; rows [B]."""
    work = torch.promote_types(energies.dtype, torch.float32)
    logits = -energies.to(work) / torch.as_tensor(tau, device=energies.device).to(work)
    if valid_mask is not None:
        logits = logits.masked_fill(~valid_mask, float("-inf"))
    return F.cross_entropy(logits, labels, reduction="none")


def _negative_mask(energies: Tensor, labels: Tensor, valid_mask: Tensor | None) -> Tensor:
    """Boolean [B,N]: the columns that are negatives of each row (valid and not the label)."""
    neg = real_steps(valid_mask, tuple(energies.shape), energies.device, "valid_mask").clone()
    neg[torch.arange(energies.shape[0], device=energies.device), labels] = False
    return neg


StatSums = dict[str, tuple[Tensor, Tensor]]


@torch.no_grad()
def infonce_stat_sums(
    energies: Tensor,
    labels: Tensor,
    neg: Tensor,
    tau: float,
    column_types: Sequence[str] | None = None,
    energy_range: tuple[float, float] | None = None,
    row_mask: Tensor | None = None,
) -> StatSums:
    """(sum, weight) per statistic, so that processes can add theirs before dividing (see finish_stats); rows
    outside `row_mask` (padding) count in none."""
    e = energies.detach().double()
    b = e.shape[0]
    rows = real_steps(row_mask, (b,), e.device, "row_mask").double()
    neg = neg & rows.bool()[:, None]
    e_pos = e[torch.arange(b, device=e.device), labels]
    counts = neg.sum(dim=1).double()
    # A positive "wins" when it has strictly lower energy than every negative it was compared with.
    lowest = e.masked_fill(~neg, float("inf")).min(dim=1).values
    floor = torch.zeros_like(counts)
    if energy_range is not None:
        floor = torch.log1p(counts * math.exp(-(energy_range[1] - energy_range[0]) / float(tau)))
    sums: StatSums = {
        "e_pos": ((e_pos * rows).sum(), rows.sum()),
        "e_neg": ((e * neg).sum(), counts.sum()),
        "acc": (((e_pos < lowest).double() * rows).sum(), rows.sum()),
        "num_negatives": (counts.sum(), rows.sum()),
        "loss_floor": ((floor * rows).sum(), rows.sum()),
    }
    if column_types is not None:
        if len(column_types) != e.shape[1]:
            raise ValueError(f"column_types has {len(column_types)} entries, expected N={e.shape[1]}")
        for kind in dict.fromkeys(column_types):
            sel = neg & torch.tensor([t == kind for t in column_types], device=e.device)
            n = sel.sum(dim=1)
            has = n > 0
            low = e.masked_fill(~sel, float("inf")).min(dim=1).values
            sums[f"e_neg/{kind}"] = ((e * sel).sum(), n.sum().double())
            sums[f"acc/{kind}"] = ((e_pos[has] < low[has]).double().sum(), has.sum().double())
            sums[f"num_negatives/{kind}"] = (n.sum().double(), rows.sum())
    return sums


def finish_stats(sums: StatSums, tau: float) -> dict[str, float]:
    """Floats from (sum, weight) pairs; a negative type that no positive saw gets no keys; adds gap and tau."""
    absent = {k[len("e_neg/"):] for k, (_, w) in sums.items() if k.startswith("e_neg/") and float(w) == 0}
    stats: dict[str, float] = {}
    for key, (total, weight) in sums.items():
        if "/" in key and key.split("/", 1)[1] in absent:
            continue
        stats[key] = float(total / weight) if float(weight) > 0 else 0.0
    stats["gap"] = stats["e_neg"] - stats["e_pos"]
    stats["tau"] = float(tau)
    return stats


def infonce_stats(
    energies: Tensor,
    labels: Tensor,
    tau: float,
    valid_mask: Tensor | None = None,
    column_types: Sequence[str] | None = None,
    energy_range: tuple[float, float] | None = None,
) -> dict[str, float]:
    """e_pos, e_neg, gap, acc, tau, num_negatives, loss_floor, and per-type e_neg / acc / num_negatives."""
    neg = _negative_mask(energies, labels, valid_mask)
    return finish_stats(infonce_stat_sums(energies, labels, neg, tau, column_types, energy_range), tau)


def inbatch_infonce_loss(
    energies: Tensor,
    labels: Tensor,
    tau: TauLike = 0.3,
    valid_mask: Tensor | None = None,
    column_types: Sequence[str] | None = None,
    energy_range: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """InfoNCE over an energy matrix [B,N] whose column labels[i] is row i's positive; masked columns excluded."""
    check_tensor("energies", energies, ("B", "N"))
    b, n = energies.shape
    if labels.shape != (b,) or labels.dtype != torch.long:
        raise ValueError(f"labels has shape {tuple(labels.shape)} and dtype {labels.dtype}, expected (B={b},) long")
    if b and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise ValueError(f"labels must index the N={n} columns of energies, got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if valid_mask is not None:
        valid_mask = check_mask("valid_mask", valid_mask, (b, n), device=energies.device).bool()
        if b and not bool(valid_mask[torch.arange(b, device=energies.device), labels].all()):
            raise ValueError("valid_mask masks out a positive (the label column of some row)")
    neg = _negative_mask(energies, labels, valid_mask)
    e_pos = energies[torch.arange(b, device=energies.device), labels]
    t = resolve_tau(tau, e_pos, energies[neg], neg_mask=None)
    rows = infonce_rows(energies, labels, t, valid_mask)
    # A row without any negative has nothing to contrast: it is excluded (its loss would be exactly 0).
    keep = neg.any(dim=1)
    loss = (rows * keep).sum() / keep.sum().clamp(min=1)
    stats = infonce_stats(energies, labels, float(t.detach()), valid_mask, column_types, energy_range)
    stats["loss"] = float(loss.detach())
    stats["rows_without_negatives"] = float((~keep).sum())
    return loss, stats


def infonce_loss(
    e_pos: Tensor,
    e_neg: Tensor,
    tau: TauLike = 0.3,
    neg_mask: Tensor | None = None,
    neg_types: Sequence[str] | None = None,
    energy_range: tuple[float, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """InfoNCE of positives e_pos [B] against explicit negatives e_neg [B,M] (neg_mask [B,M]: True = use)."""
    check_tensor("e_pos", e_pos, ("B",))
    b = e_pos.shape[0]
    check_tensor("e_neg", e_neg, ("B", "M"), B=b)
    energies = torch.cat([e_pos.unsqueeze(1), e_neg], dim=1)
    valid = None
    if neg_mask is not None:
        neg_mask = check_mask("neg_mask", neg_mask, tuple(e_neg.shape), device=e_neg.device).bool()
        valid = torch.cat([torch.ones_like(neg_mask[:, :1]), neg_mask], dim=1)
    types = None if neg_types is None else ["positive", *neg_types]
    if neg_types is not None and len(neg_types) != e_neg.shape[1]:
        raise ValueError(f"neg_types has {len(neg_types)} entries, expected M={e_neg.shape[1]}")
    labels = torch.zeros(b, dtype=torch.long, device=e_pos.device)
    return inbatch_infonce_loss(energies, labels, tau, valid, types, energy_range)
