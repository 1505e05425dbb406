"""Held-out evaluation: top-1 ranking of the true chunk against a fixed pool of chunks from other episodes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vla_energy.checks import real_steps
from vla_energy.losses.distances import rowwise_rms
from vla_energy.losses.negatives import false_negative_mask
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.modeling.energy_vla_model import EnergyVLAModel

__all__ = [
    "fixed_negative_pool", "EvalResult", "collect_eval_outputs", "ranking_metrics",
    "summarize_ranking", "metrics_by_negative_type", "chunk_spread", "MIN_POLICY_SPREAD",
]


def fixed_negative_pool(episode_index: Tensor, num_negatives: int = 31, seed: int = 0) -> Tensor:
    """For every sample, `num_negatives` indices of samples from other episodes, fixed by `seed` -> [N, M]."""
    episode_index = episode_index.cpu()
    n = episode_index.shape[0]
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(n, num_negatives, dtype=torch.long)
    for i in range(n):
        others = (episode_index != episode_index[i]).nonzero().flatten()
        if others.numel() < num_negatives:
            raise ValueError(
                f"the evaluation split has {others.numel()} samples outside episode {int(episode_index[i])}, "
                f"need at least {num_negatives} for the ranking pool: use more validation episodes"
            )
        pool[i] = others[torch.randperm(others.numel(), generator=g)[:num_negatives]]
    return pool


@dataclass
class EvalResult:
    """Per-sample outputs of the backbone + heads on an evaluation split (kept on CPU)."""

    contexts: list[Tensor] = field(default_factory=list)  # each [S_i, D] (real tokens only)
    actions: list[Tensor] = field(default_factory=list)  # ground truth [H, Da]
    action_mask: list[Tensor] = field(default_factory=list)  # [H]
    policy: list[Tensor] = field(default_factory=list)  # policy chunk [H, Da]
    layer_actions: list[Tensor] = field(default_factory=list)  # [L, H, Da]
    samples: list[Tensor] = field(default_factory=list)  # [N, H, Da] a flow head's draws (flow_samples > 0)
    episode_index: list[int] = field(default_factory=list)
    ranking_energies: Optional[Tensor] = None  # [N, 1+M] from ranking_metrics, true chunk first


@torch.no_grad()
def collect_eval_outputs(model: EnergyVLAModel, batches: Iterable[Mapping[str, Tensor]], progress: bool = True,
                         total: Optional[int] = None, flow_samples: int = 0, seed: int = 0) -> EvalResult:
    """Encode each eval batch once (model.encode) and keep contexts (unpadded), policy and layer predictions; with a
    flow head and flow_samples > 0 also that many samples per row (from one generator seeded by `seed`)."""
    out = EvalResult()
    sampling = flow_samples > 0 and model.plugin.is_flow
    generator = None
    for batch in tqdm(batches, desc="encoding", disable=not progress, leave=False, total=total):
        readout = model.encode(**batch)
        policy, layers = model.plugin.predict_actions(readout)
        if sampling:
            generator = generator or torch.Generator(device=policy.device).manual_seed(seed)
            samples = model.plugin.sample_actions(readout, flow_samples, generator).float().cpu()
            out.samples.extend(samples.unbind(0))
        masks = real_steps(batch.get("action_mask"), batch["actions"].shape[:2])
        for i in range(readout.context.shape[0]):
            keep = readout.context_mask[i]
            out.contexts.append(readout.context[i][keep].float().cpu())
            out.actions.append(batch["actions"][i].float().cpu())
            out.action_mask.append(masks[i].cpu())
            out.policy.append(policy[i].float().cpu())
            out.layer_actions.append(torch.stack([la[i] for la in layers]).float().cpu())
            out.episode_index.append(int(batch["episode_index"][i]))
    return out


def _pad_contexts(contexts: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Right-pad variable-length contexts to [B, S_max, D] with a mask."""
    s = max(c.shape[0] for c in contexts)
    d = contexts[0].shape[1]
    ctx = contexts[0].new_zeros(len(contexts), s, d)
    mask = torch.zeros(len(contexts), s, dtype=torch.bool)
    for i, c in enumerate(contexts):
        ctx[i, : c.shape[0]] = c
        mask[i, : c.shape[0]] = True
    return ctx, mask


@torch.no_grad()
def ranking_metrics(
    head: nn.Module,
    result: EvalResult,
    num_negatives: int = 31,
    seed: int = 0,
    batch_size: int = 64,
    false_negative_eps: float = 1e-2,
) -> dict[str, float]:
    """The ranking metrics of in-memory eval outputs (`vla-energy evaluate`); summarize_ranking is the shared definition.

    The true chunk competes with `num_negatives` chunks of other episodes (fixed by `seed`); every chunk is scored
    with its own action_mask. Pool chunks within `false_negative_eps` RMS of the truth (over its real steps) are
    look-alikes: masked, as in training. top1_acc: the truth has lower energy than every unmasked pool chunk;
    argmin_rms: RMS distance to the truth of the lowest-energy chunk (truth or unmasked pool); lookalikes: masked
    pool chunks per sample; action_l1: the policy's L1 over real steps (losses.policy_l1.masked_l1); policy_spread:
    how much the policy's chunks differ across samples against how much the demonstrated ones do (chunk_spread of
    each; near 0: the policy gives every observation the same chunk).
    """
    n = len(result.actions)
    if n == 0:
        raise ValueError("the evaluation split is empty")
    episodes = torch.tensor(result.episode_index)
    pool = fixed_negative_pool(episodes, num_negatives, seed)
    actions = torch.stack(result.actions)
    masks = torch.stack(result.action_mask)
    device = next(head.parameters()).device
    e_all = []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        ctx, cmask = _pad_contexts([result.contexts[i] for i in idx])
        cands = torch.cat([actions[idx, None], actions[pool[idx]]], dim=1)  # [b, 1+M, H, Da], true chunk first
        cmasks = torch.cat([masks[idx, None], masks[pool[idx]]], dim=1)
        e = head(ctx.to(device), cands.to(device), context_mask=cmask.to(device), action_mask=cmasks.to(device))
        e_all.append(e.float().cpu())
    e = torch.cat(e_all)
    result.ranking_energies = e
    cands = torch.cat([actions[:, None], actions[pool]], dim=1)
    cmasks = torch.cat([masks[:, None], masks[pool]], dim=1)
    return summarize_ranking(e, cands, cmasks, torch.stack(result.policy), false_negative_eps)


def summarize_ranking(energies: Tensor, candidates: Tensor, candidate_mask: Tensor, policy: Tensor,
                      false_negative_eps: float = 1e-2) -> dict[str, float]:
    """The ranking metrics from the energies [N,1+M] of candidates [N,1+M,H,Da] (true chunk first, with its
    action mask [N,1+M,H]) and the policy's chunks [N,H,Da]: what every evaluation path reports (see
    ranking_metrics for the definitions)."""
    n = energies.shape[0]
    if n == 0:
        raise ValueError("the evaluation split is empty")
    e, candidates, candidate_mask = energies.float().cpu(), candidates.float().cpu(), candidate_mask.bool().cpu()
    actions, masks = candidates[:, 0], candidate_mask[:, 0]
    keep = false_negative_mask(actions, candidates[:, 1:], masks, false_negative_eps)
    dist = rowwise_rms(actions, candidates, masks)
    e_pos, e_neg = e[:, 0], e[:, 1:]
    usable = torch.cat([torch.ones(n, 1, dtype=torch.bool), keep], dim=1)
    choice = e.masked_fill(~usable, float("inf")).argmin(dim=1)
    lowest_other = e_neg.masked_fill(~keep, float("inf")).min(dim=1).values
    return {
        "top1_acc": float((e_pos < lowest_other).float().mean()),
        "chance_acc": 1.0 / e.shape[1],
        "e_pos": float(e_pos.mean()),
        "e_neg": float(e_neg[keep].mean()) if bool(keep.any()) else float("nan"),
        "gap": float(e_neg[keep].mean() - e_pos.mean()) if bool(keep.any()) else float("nan"),
        "lookalikes": float((~keep).sum(dim=1).double().mean()),
        "argmin_rms": float(dist[torch.arange(n), choice].mean()),
        "action_l1": float(masked_l1(policy.float().cpu(), actions, masks)),
        "policy_spread": float(chunk_spread(policy.float().cpu(), masks)
                               / chunk_spread(actions, masks).clamp(min=1e-12)),
        "eval_samples": float(n),
    }


# Below this policy_spread the policy's chunk barely depends on the observation (training warns).
MIN_POLICY_SPREAD = 0.1


def chunk_spread(chunks: Tensor, mask: Tensor) -> Tensor:
    """How much chunks [N,H,Da] differ across samples: the RMS over steps and action dims of their standard deviation
    over the N samples, on real steps (mask [N,H])."""
    w = mask.float()[..., None]
    count = w.sum(dim=0).clamp(min=1.0)
    mean = (chunks * w).sum(dim=0) / count
    return ((chunks - mean).square() * w).sum(dim=0).div(count).mean().sqrt()


@torch.no_grad()
def metrics_by_negative_type(
    head: nn.Module,
    result: EvalResult,
    noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.4),
    num_negatives: int = 31,
    seed: int = 0,
    batch_size: int = 64,
    false_negative_eps: float = 1e-2,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """ranking_metrics (the same numbers as training's evaluation), plus top-1 and energy gap per negative type.

    Types: `other_episodes` (the fixed pool), `layer` (layer-wise predictions except the last, which is the
    policy), `noise<sigma>` for each sigma, `shuffle`; look-alikes of the truth are masked in every type.
    Returns (metrics, energies per type incl. `positive`).
    """
    from vla_energy.losses.negatives import build_negatives

    metrics = ranking_metrics(head, result, num_negatives, seed, batch_size, false_negative_eps)
    n = len(result.actions)
    actions, masks = torch.stack(result.actions), torch.stack(result.action_mask)
    layers = torch.stack(result.layer_actions)[:, :-1]  # [N,L-1,H,Da]
    device = next(head.parameters()).device
    g = torch.Generator().manual_seed(seed)
    energies: dict[str, list[Tensor]] = {}
    keeps: dict[str, list[Tensor]] = {}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        ctx, cmask = (t.to(device) for t in _pad_contexts([result.contexts[i] for i in idx]))
        pos, am = actions[idx], masks[idx]
        explicit = build_negatives(pos, None, num_negatives=len(noise_sigmas) + 1, layer_mode="none",
                                   noise_sigmas=tuple(noise_sigmas), shuffle=True, false_negative_eps=0.0,
                                   action_mask=am, generator=g)
        groups = {"layer": layers[idx]}
        for j, kind in enumerate(explicit.types):
            groups.setdefault(kind, explicit.actions[:, j : j + 1])
        cands = torch.cat(list(groups.values()), dim=1)
        cand_mask = am[:, None].expand(-1, cands.shape[1], -1)
        e = head(ctx, cands.to(device), context_mask=cmask, action_mask=cand_mask.to(device)).float().cpu()
        keep = false_negative_mask(pos, cands, am, false_negative_eps)
        col = 0
        for kind, block in groups.items():
            energies.setdefault(kind, []).append(e[:, col : col + block.shape[1]])
            keeps.setdefault(kind, []).append(keep[:, col : col + block.shape[1]])
            col += block.shape[1]
    e_rank = result.ranking_energies
    joined = {"positive": e_rank[:, :1], "other_episodes": e_rank[:, 1:]}
    joined.update({k: torch.cat(v) for k, v in energies.items()})
    e_pos = e_rank[:, 0]
    metrics["acc/other_episodes"] = metrics["top1_acc"]
    metrics["gap/other_episodes"] = metrics["gap"]
    for kind, parts in keeps.items():
        e, keep = joined[kind], torch.cat(parts)
        if e.shape[1] == 0:
            continue
        metrics[f"acc/{kind}"] = float((e_pos < e.masked_fill(~keep, float("inf")).min(dim=1).values).float().mean())
        metrics[f"gap/{kind}"] = float(e[keep].mean() - e_pos.mean()) if bool(keep.any()) else float("nan")
    return metrics, joined
