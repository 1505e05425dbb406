"""Held-out evaluation: top-1 ranking of the true chunk against a fixed pool of chunks from other episodes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vla_energy.backbones.readout import backbone_forward
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.training.plugin import EnergyPlugin

__all__ = ["spread_indices", "fixed_negative_pool", "EvalResult", "collect_eval_outputs", "ranking_metrics", "evaluate"]


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices evenly spaced over `total` rows, so that every episode of a split is represented."""
    count = min(total, count)
    return torch.linspace(0, total - 1, count).long().tolist() if count > 0 else []


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
    episode_index: list[int] = field(default_factory=list)
    ranking_energies: Optional[Tensor] = None  # [N, 1+M] from ranking_metrics, true chunk first


@torch.no_grad()
def collect_eval_outputs(
    backbone: nn.Module, plugin: EnergyPlugin, batches: Iterable[Mapping[str, Tensor]], progress: bool = True
) -> EvalResult:
    """Run the backbone once per eval batch and keep contexts (unpadded), policy and layer predictions."""
    out = EvalResult()
    for batch in tqdm(batches, desc="eval", disable=not progress, leave=False):
        outputs = backbone_forward(backbone, batch)
        readout = plugin.read(outputs, batch)
        policy, layers = plugin.predict_actions(readout)
        for i in range(readout.context.shape[0]):
            keep = readout.context_mask[i]
            out.contexts.append(readout.context[i][keep].float().cpu())
            out.actions.append(batch["actions"][i].float().cpu())
            mask = batch.get("action_mask")
            out.action_mask.append(
                mask[i].bool().cpu() if mask is not None else torch.ones(plugin.horizon, dtype=torch.bool)
            )
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
    head: nn.Module, result: EvalResult, num_negatives: int = 31, seed: int = 0, batch_size: int = 64
) -> dict[str, float]:
    """top1_acc against the fixed pool, chance_acc, e_pos, e_neg, gap, action_l1 of the policy."""
    n = len(result.actions)
    if n == 0:
        raise ValueError("the evaluation split is empty")
    episodes = torch.tensor(result.episode_index)
    pool = fixed_negative_pool(episodes, num_negatives, seed)
    actions = torch.stack(result.actions)
    masks = torch.stack(result.action_mask)
    device = next(head.parameters()).device
    e_pos, e_neg, wins = [], [], []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        ctx, cmask = _pad_contexts([result.contexts[i] for i in idx])
        cands = torch.cat([actions[idx, None], actions[pool[idx]]], dim=1)  # [b, 1+M, H, Da], true chunk first
        cmasks = torch.cat([masks[idx, None], masks[pool[idx]]], dim=1)
        e = head(ctx.to(device), cands.to(device), context_mask=cmask.to(device), action_mask=cmasks.to(device))
        e = e.float().cpu()
        e_pos.append(e[:, 0])
        e_neg.append(e[:, 1:])
        wins.append(e[:, 0] < e[:, 1:].min(dim=1).values)
    e_pos_t, e_neg_t = torch.cat(e_pos), torch.cat(e_neg)
    result.ranking_energies = torch.cat([e_pos_t[:, None], e_neg_t], dim=1)
    policy = torch.stack(result.policy)
    return {
        "top1_acc": float(torch.cat(wins).float().mean()),
        "chance_acc": 1.0 / (num_negatives + 1),
        "e_pos": float(e_pos_t.mean()),
        "e_neg": float(e_neg_t.mean()),
        "gap": float(e_neg_t.mean() - e_pos_t.mean()),
        "action_l1": float(masked_l1(policy, actions, masks)),
        "eval_samples": float(n),
    }


def evaluate(
    backbone: nn.Module,
    plugin: EnergyPlugin,
    batches: Iterable[Mapping[str, Tensor]],
    num_negatives: int = 31,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, float], EvalResult]:
    """Collect outputs on the split and compute the ranking metrics with the plugin's energy head."""
    result = collect_eval_outputs(backbone, plugin, batches, progress)
    return ranking_metrics(plugin.energy_head, result, num_negatives, seed), result


@torch.no_grad()
def metrics_by_negative_type(
    head: nn.Module,
    result: EvalResult,
    noise_sigmas: tuple[float, ...] = (0.1, 0.2, 0.4),
    num_negatives: int = 31,
    seed: int = 0,
    batch_size: int = 32,
    rerank_samples: int = 16,
    rerank_sigma: float = 0.1,
    refine_steps: int = 10,
    refine_step_size: float = 0.05,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Top-1 accuracy and energy gap of the true chunk per negative type; L1 of policy vs rerank vs refine.

    Types: `other_episodes` (the fixed pool), `layer` (layer-wise predictions except the last, which is the
    policy), `noise<sigma>` for each sigma, `shuffle`. Returns (metrics, energies per type incl. `positive`).
    """
    from vla_energy.inference.rerank import propose_candidates, refine, rerank
    from vla_energy.losses.negatives import build_negatives

    n = len(result.actions)
    pool = fixed_negative_pool(torch.tensor(result.episode_index), num_negatives, seed)
    actions, masks = torch.stack(result.actions), torch.stack(result.action_mask)
    policy, layers = torch.stack(result.policy), torch.stack(result.layer_actions)  # [N,H,Da], [N,L,H,Da]
    device = next(head.parameters()).device
    g = torch.Generator().manual_seed(seed)
    energies: dict[str, list[Tensor]] = {}
    l1 = {"policy": [], "rerank": [], "refine": []}
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        ctx, cmask = (t.to(device) for t in _pad_contexts([result.contexts[i] for i in idx]))
        pos, am = actions[idx], masks[idx]
        explicit = build_negatives(pos, None, num_negatives=len(noise_sigmas) + 1, layer_mode="none",
                                   noise_sigmas=tuple(noise_sigmas), shuffle=True, false_negative_eps=0.0,
                                   action_mask=am, generator=g)
        groups = {"positive": pos[:, None], "other_episodes": actions[pool[idx]], "layer": layers[idx, :-1]}
        for j, kind in enumerate(explicit.types):
            groups.setdefault(kind, explicit.actions[:, j : j + 1])
        cands = torch.cat(list(groups.values()), dim=1).to(device)
        e = head(ctx, cands, context_mask=cmask).float().cpu()
        col = 0
        for kind, block in groups.items():
            energies.setdefault(kind, []).append(e[:, col : col + block.shape[1]])
            col += block.shape[1]
        pol = policy[idx].to(device)
        gen = torch.Generator(device=device).manual_seed(seed + start)
        proposals, _ = propose_candidates(pol, [layers[idx, i].to(device) for i in range(layers.shape[1] - 1)],
                                          rerank_samples, rerank_sigma, generator=gen)
        chosen = rerank(head, ctx, proposals, context_mask=cmask).best.cpu()
        refined = refine(head, ctx, pol, refine_steps, refine_step_size, context_mask=cmask)[0].cpu()
        for name, chunk in (("policy", policy[idx]), ("rerank", chosen), ("refine", refined)):
            # Sums, so that the final value weights every real step alike, as masked_l1 does in training.
            l1[name].append(torch.stack([((chunk - pos).abs() * am[..., None]).sum(), am.sum() * pos.shape[-1]]))
    joined = {k: torch.cat(v) for k, v in energies.items()}
    e_pos = joined["positive"][:, 0]
    metrics: dict[str, float] = {"chance_acc": 1.0 / (num_negatives + 1), "eval_samples": float(n)}
    for kind, e in joined.items():
        if kind == "positive" or e.shape[1] == 0:
            continue
        metrics[f"acc/{kind}"] = float((e_pos < e.min(dim=1).values).float().mean())
        metrics[f"gap/{kind}"] = float(e.mean() - e_pos.mean())
    metrics["top1_acc"] = metrics["acc/other_episodes"]
    metrics["e_pos"] = float(e_pos.mean())
    for name, values in l1.items():
        total, count = torch.stack(values).sum(dim=0)
        metrics[f"action_l1/{name}"] = float(total / count)
    return metrics, joined
