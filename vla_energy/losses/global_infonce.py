"""Global InfoNCE: local contexts against the gathered action chunks of all processes (exact, b x N per rank)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_energy.checks import check_mask, check_tensor, real_steps
from vla_energy.losses.bank import ActionBank
from vla_energy.losses.false_negatives import lookalike_mask
from vla_energy.losses.infonce import TauLike, finish_stats, infonce_rows, infonce_stat_sums
from vla_energy.losses.negatives import Negatives

__all__ = ["GatheredBatch", "gather_actions", "global_infonce_loss", "BATCH_MODES", "PADDING_ID"]

BATCH_MODES = ("global", "local", "none")
# The sample id of a padding row (row_mask False): it is neither a loss row nor a column of any other row.
PADDING_ID = -2
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class GatheredBatch:
    """The action chunks of all processes, padding rows dropped, in rank order."""

    actions: Tensor  # [N,H,Da]
    action_mask: Tensor  # [N,H] bool
    sample_ids: Tensor  # [N] long (-1 = unknown)
    offset: int  # global index of this process's first row
    sizes: list[int]  # rows per process


def gather_actions(
    accelerator: Any, actions: Tensor, action_mask: Optional[Tensor] = None, sample_ids: Optional[Tensor] = None
) -> GatheredBatch:
    """accelerator.gather of the chunks (never hidden states); sizes and shapes are exchanged first."""
    b, h, da = actions.shape
    dev = actions.device
    mask = real_steps(action_mask, (b, h), dev)
    ids = torch.full((b,), -1, dtype=torch.long, device=dev) if sample_ids is None else sample_ids.long().to(dev)
    world = accelerator.num_processes
    if world == 1:
        return GatheredBatch(actions, mask, ids, 0, [b])
    code = _DTYPES.index(actions.dtype) if actions.dtype in _DTYPES else -1
    meta = accelerator.gather(torch.tensor([[b, h, da, code]], device=dev)).view(world, 4).cpu()
    shapes = {tuple(row[1:].tolist()) for row in meta}
    if len(shapes) != 1:
        # Every rank sees the same gathered metadata, so every rank raises: no rank is left waiting.
        raise ValueError(
            "actions differ across processes: (H, Da, dtype code) per rank = "
            f"{[tuple(r[1:].tolist()) for r in meta]}; every process must pass chunks of the same H, Da and dtype"
        )
    sizes = meta[:, 0].tolist()
    m = max(sizes)
    rank = accelerator.process_index
    offset = sum(sizes[:rank])
    if m == 0:
        return GatheredBatch(actions, mask, ids, 0, sizes)
    pad = m - b
    # One gather: actions, mask and ids packed in a float64 row keep their values exactly (ids < 2**53).
    packed = torch.cat([actions.double().reshape(b, h * da), mask.double(), ids.double()[:, None]], dim=1)
    packed = torch.cat([packed, packed.new_zeros(pad, packed.shape[1])]) if pad else packed
    every = accelerator.gather(packed).view(world, m, -1)
    rows = torch.cat([every[r, : sizes[r]] for r in range(world)])
    return GatheredBatch(
        actions=rows[:, : h * da].reshape(-1, h, da).to(actions.dtype),
        action_mask=rows[:, h * da : h * da + h] > 0.5,
        sample_ids=rows[:, -1].round().long(),
        offset=offset,
        sizes=sizes,
    )


def _all_gather_with_grad(block: Tensor, sizes: Sequence[int]) -> Tensor:
    """Autograd-aware gather of a small [b, N] energy block from every process -> [sum(sizes), N]."""
    import torch.distributed.nn.functional as dist_fn

    m = max(sizes)
    padded = F.pad(block, (0, 0, 0, m - block.shape[0]))
    parts = dist_fn.all_gather(padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def _reduce_sum(accelerator: Any, values: Tensor) -> Tensor:
    return values if accelerator.num_processes == 1 else accelerator.reduce(values, reduction="sum")


def global_infonce_loss(
    head: nn.Module,
    context: Tensor,
    actions: Tensor,
    accelerator: Any,
    context_mask: Optional[Tensor] = None,
    tau: TauLike = 0.3,
    negatives: Union[Tensor, Negatives, None] = None,
    bank: Optional[ActionBank] = None,
    action_mask: Optional[Tensor] = None,
    sample_ids: Optional[Tensor] = None,
    negative_mask: Optional[Tensor] = None,
    negative_types: Optional[Sequence[str]] = None,
    batch: str = "global",
    symmetric: bool = False,
    false_negative_eps: float = 1e-2,
    row_mask: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, float]]:
    """InfoNCE of each local context against all processes' chunks (+ explicit negatives + bank) in one softmax.

    Rank r scores its b contexts against the N gathered chunks (labels: the global index of each local sample),
    its [b,M] explicit negatives and the bank. Each rank's loss is sum(rows) * W / N_total, so DDP's gradient mean
    equals the gradient of one process holding all N samples, also for uneven and empty local batches.
    batch="local" is the per-process in-batch baseline; batch="none" uses only explicit negatives and the bank.
    Batch columns that are a row's own sample (sample_ids) or within `false_negative_eps` RMS of its positive (over
    its real steps) are masked like bank entries; stats["false_negatives"] counts them per row. `row_mask` [b]
    (True = a sample) marks padding rows (e.g. the duplicates `even_batches` adds to an evaluation's last batch):
    they are neither loss rows nor columns, and the loss equals that of the real rows alone.
    """
    if batch not in BATCH_MODES:
        raise ValueError(f"batch={batch!r}, expected one of {BATCH_MODES}")
    check_tensor("context", context, ("B", "S", "D"))
    b = context.shape[0]
    check_tensor("actions", actions, ("B", "H", "Da"), B=b, device=context.device)
    h, da = actions.shape[1:]
    if action_mask is not None:
        check_mask("action_mask", action_mask, (b, h), device=context.device)
    if sample_ids is not None and tuple(sample_ids.shape) != (b,):
        raise ValueError(f"sample_ids has shape {tuple(sample_ids.shape)}, expected (B={b},)")
    is_row = real_steps(row_mask, (b,), context.device, "row_mask")
    if row_mask is not None:  # padding rows travel as a sample id that no column of a real row may take
        ids = sample_ids if sample_ids is not None else torch.full((b,), -1, dtype=torch.long, device=context.device)
        sample_ids = torch.where(is_row, ids.to(context.device).long(), PADDING_ID)
    types: list[str] = []
    if isinstance(negatives, Negatives):
        negative_mask, negative_types, negatives = negatives.mask, negatives.types, negatives.actions
    if negatives is not None:
        check_tensor("negatives", negatives, ("B", "M", "H", "Da"), B=b, H=h, Da=da, device=context.device)
        if negative_mask is not None:
            check_mask("negative_mask", negative_mask, tuple(negatives.shape[:2]), device=context.device)
        if negative_types is not None and len(negative_types) != negatives.shape[1]:
            raise ValueError(f"negative_types has {len(negative_types)} entries, expected M={negatives.shape[1]}")

    world = accelerator.num_processes
    gathered = gather_actions(accelerator, actions, action_mask, sample_ids) if batch == "global" else None
    if bank is not None and gathered is not None:
        real = gathered.sample_ids != PADDING_ID
        bank.stage(gathered.actions[real], gathered.action_mask[real], gathered.sample_ids[real])

    # Shared columns (the same chunks for every local context) and per-sample columns, scored in one forward.
    am = real_steps(action_mask, (b, h), context.device)
    shared, shared_mask, valid = [], [], []
    lookalikes = torch.zeros(b, dtype=torch.float64, device=context.device)
    same = None  # [b, N] look-alikes of each local positive among the batch columns
    if batch in ("global", "local"):
        cols, col_mask, col_ids, first = ((gathered.actions, gathered.action_mask, gathered.sample_ids, gathered.offset)
                                          if gathered is not None else (actions, am, sample_ids, 0))
        labels = first + torch.arange(b, device=context.device)
        # Identical chunks (idle segments, neighbouring frames, repeated samples) are not pushed apart.
        same = lookalike_mask(actions, cols, false_negative_eps, action_mask, sample_ids, col_ids).to(context.device)
        if col_ids is not None:
            same |= (col_ids == PADDING_ID).to(context.device)[None]
        same[torch.arange(b, device=context.device), labels] = False
        lookalikes = same.sum(dim=1).double()
        shared.append(cols)
        shared_mask.append(col_mask)
        types += ["batch"] * cols.shape[0]
        valid.append(~same)
    if bank is not None and len(bank):
        bank_actions, bank_mask, _ = bank.entries()
        shared.append(bank_actions.to(actions.dtype))
        shared_mask.append(bank_mask)
        types += ["bank"] * bank_actions.shape[0]
        valid.append(bank.negative_mask(actions, sample_ids, action_mask).to(context.device))
    num_shared = sum(t.shape[0] for t in shared)
    own, own_mask = [], []
    if batch == "none":  # the positive itself is the first per-sample column
        own.append(actions[:, None])
        own_mask.append(am[:, None])
        types.append("positive")
        valid.append(torch.ones(b, 1, dtype=torch.bool, device=context.device))
        labels = torch.full((b,), num_shared, dtype=torch.long, device=context.device)
    if negatives is not None:
        m = negatives.shape[1]
        own.append(negatives.detach())
        own_mask.append(am[:, None].expand(b, m, h))
        types += list(negative_types) if negative_types is not None else ["explicit"] * m
        valid.append(real_steps(negative_mask, (b, m), context.device, "negative_mask"))
    energies = head(
        context,
        actions=torch.cat(own, dim=1) if own else None,
        pool=torch.cat(shared) if shared else None,
        context_mask=context_mask,
        action_mask=torch.cat(own_mask, dim=1) if own else None,
        pool_action_mask=torch.cat(shared_mask) if shared else None,
    )
    valid_mask = torch.cat(valid, dim=1)
    neg = valid_mask & is_row[:, None]
    neg[torch.arange(b, device=neg.device), labels] = False

    # Statistics that every process shares: global means through one small all-reduce.
    e_detached = energies.detach().double()
    e_pos = e_detached[torch.arange(b, device=neg.device), labels]
    tau_value = _global_tau(tau, accelerator, e_pos[is_row], e_detached, neg)
    rows = infonce_rows(energies, labels, tau_value, valid_mask)
    keep = neg.any(dim=1)  # padding rows have no negative
    counts = _reduce_sum(accelerator, torch.stack([torch.tensor(float(b)), keep.sum().cpu().double()])
                         .to(context.device)).cpu()
    total_rows = float(counts[1])
    # Each rank's share: DDP's mean over W ranks then gives sum over all rows / total rows.
    loss = (rows * keep).sum() * (world / max(total_rows, 1.0))
    if symmetric and gathered is not None:
        loss = loss + _symmetric_term(energies[:, : gathered.actions.shape[0]], gathered, tau_value, world, same,
                                      is_row)
    stats = _global_stats(accelerator, e_detached, labels, neg, types, tau_value, head, rows.detach(), keep,
                          lookalikes, is_row)
    return loss, stats


def _global_tau(tau: TauLike, accelerator: Any, e_pos: Tensor, energies: Tensor, neg: Tensor) -> Tensor:
    """A number/tensor as is; a temperature module is called on global mean energies (same tau on every rank)."""
    if not callable(tau) or isinstance(tau, Tensor):
        value = torch.as_tensor(tau, dtype=torch.promote_types(energies.dtype, torch.float32), device=energies.device)
        if not bool(value.detach() > 0):
            raise ValueError(f"tau={float(value)}, expected > 0")
        return value
    sums = torch.stack([e_pos.sum(), torch.tensor(float(e_pos.numel()), device=e_pos.device, dtype=e_pos.dtype),
                        (energies * neg).sum(), neg.sum().to(energies.dtype)])
    sums = _reduce_sum(accelerator, sums)
    mean_pos = (sums[0] / sums[1].clamp(min=1)).float().reshape(1)
    mean_neg = (sums[2] / sums[3].clamp(min=1)).float().reshape(1)
    if float(sums[3]) == 0:
        return tau(mean_pos, mean_neg[:0])
    return tau(mean_pos, mean_neg)


def _symmetric_term(block: Tensor, gathered: GatheredBatch, tau: Tensor, world: int,
                    same: Optional[Tensor] = None, is_row: Optional[Tensor] = None) -> Tensor:
    """Each local action against all processes' contexts; the [N,N] matrix is built from gathered [b,N] blocks.
    `same` [b, N]: contexts whose own chunk is a look-alike of the local action are left out, as in the rows;
    padding rows (is_row False) are neither actions nor contexts."""
    real = gathered.sample_ids != PADDING_ID
    n = int(real.sum())
    full = _all_gather_with_grad(block, gathered.sizes) if world > 1 else block  # [N contexts, N actions]
    b = block.shape[0]
    cols = gathered.offset + torch.arange(b, device=block.device)
    work = torch.promote_types(full.dtype, torch.float32)
    logits = -full[:, cols].to(work).t() / tau.to(work)  # [b actions, N contexts]
    if same is not None:
        logits = logits.masked_fill(same.to(logits.device), float("-inf"))
    logits = logits.masked_fill(~real.to(logits.device)[None], float("-inf"))
    per_col = F.cross_entropy(logits, cols, reduction="none")
    if is_row is not None:
        per_col = torch.where(is_row, per_col, torch.zeros_like(per_col))
    return per_col.sum() * (world / max(n, 1))


def _global_stats(
    accelerator: Any,
    energies: Tensor,
    labels: Tensor,
    neg: Tensor,
    types: Sequence[str],
    tau: Tensor,
    head: nn.Module,
    rows: Tensor,
    keep: Tensor,
    lookalikes: Tensor,
    is_row: Tensor,
) -> dict[str, float]:
    """The statistics of losses.infonce_stat_sums (over real rows), summed over processes in one all-reduce, then
    divided."""
    cfg = getattr(head, "config", None) or getattr(getattr(head, "module", None), "config", None)
    t = float(tau.detach())
    sums = infonce_stat_sums(energies, labels, neg, t, types, cfg.energy_range if cfg is not None else None, is_row)
    sums["loss"] = ((rows.double() * keep).sum(), keep.sum().double())
    sums["false_negatives"] = ((lookalikes * is_row).sum(), is_row.sum().double())
    packed = torch.stack([torch.stack([s.double(), w.double()]) for s, w in sums.values()])
    packed = _reduce_sum(accelerator, packed.to(energies.device)).cpu()
    return finish_stats({k: (p[0], p[1]) for k, p in zip(sums, packed)}, t)
