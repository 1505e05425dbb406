"""Does the energy head pay off? Policy vs random / rerank / refine / oracle choices per candidate source, with CIs.

Every source's candidates start with the policy chunk itself, so each selection can fall back to the policy and
the oracle is never worse than it. Candidates are scored with the truth's action_mask, as in training. L1 is the
mean absolute error over real steps (losses.policy_l1.masked_l1): per-sample sums and counts, so intervals
resample samples and keep every real step's weight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vla_energy.evaluation.intervals import bootstrap_interval, wilson_interval
from vla_energy.evaluation.metrics import EvalResult, _pad_contexts
from vla_energy.inference.candidates import (
    error_scaled_candidates,
    leave_one_group_out_error,
    make_candidates,
    residual_candidates,
)
from vla_energy.inference.rerank import REFINE_STEP_SIZES, energy_weighted_mean, refine

__all__ = ["SELECTIONS", "SOURCES", "l1_sums", "choose", "selection_metrics", "calibration_metrics", "plot_selection"]

SELECTIONS = ("random", "uniform", "rerank", "mean", "refine", "oracle")
SOURCES = ("gaussian", "policy_error", "residuals", "layers", "retrieval", "samples", "multistart")


def l1_sums(chunks: Tensor, truth: Tensor, mask: Tensor) -> Tensor:
    """[B,K] summed |chunk - truth| over real steps and dims, chunks [B,K,H,Da] (float64)."""
    diff = (chunks.double() - truth.double()[:, None]).abs().sum(dim=-1)  # [B,K,H]
    return (diff * mask.double()[:, None]).sum(dim=-1)


def choose(energies: Tensor, l1: Tensor, generator: Optional[torch.Generator] = None) -> dict[str, Tensor]:
    """Indices [B] per rule: random (uniform), rerank (lowest energy), oracle (lowest L1), worst (highest L1)."""
    b, k = l1.shape
    return {
        "random": torch.randint(k, (b,), generator=generator),
        "rerank": energies.argmin(dim=1).cpu(),
        "oracle": l1.argmin(dim=1).cpu(),
        "worst": l1.argmax(dim=1).cpu(),
    }


def _drawn(draws: Tensor) -> Callable[[int, Optional[torch.Generator]], Tensor]:
    """A candidate sampler that returns draws made earlier (collect_eval_outputs' flow samples)."""
    return lambda _num, _generator: draws


@torch.no_grad()
def selection_metrics(
    head: nn.Module,
    result: EvalResult,
    train_chunks: Optional[Tensor] = None,
    num_samples: int = 16,
    sigma: float = 0.1,
    refine_steps: int = 10,
    step_sizes: Sequence[float] = REFINE_STEP_SIZES,
    seed: int = 0,
    batch_size: int = 16,
    num_resamples: int = 1000,
    sources: Sequence[str] = SOURCES,
    tau: float = 0.3,
    progress: bool = False,
) -> tuple[dict[str, float], dict[str, dict[str, tuple[float, float, float]]]]:
    """L1 (mean, 95% low, high) of the policy, of `refine` from the policy, and per source of each selection.

    Sources (K = num_samples candidates each, the policy chunk first): gaussian (policy + sigma noise),
    policy_error (noise scaled per step and dim to the policy's error on other episodes), residuals (policy +
    whole error chunks of other episodes), layers (the layer-wise predictions), retrieval (training chunks nearest
    to the policy chunk; needs train_chunks), samples (the policy + a flow head's draws, result.samples: a policy
    with action_head flow, collected with flow_samples >= num_samples - 1), multistart (the policy + the other
    policy_error candidates, each refined). Sources without their data (retrieval, samples) are left out. Selections:
    random, rerank (lowest energy), refine (line search from the rerank choice), oracle (lowest L1).
    Returns (flat metrics, table[source][selection] = (mean, low, high)); also delta vs policy per cell.
    progress: a bar over the batches.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"sources {unknown} are unknown, expected some of {SOURCES}")
    if "retrieval" in sources and train_chunks is None:
        sources = [s for s in sources if s != "retrieval"]
    if "samples" in sources and not result.samples:
        sources = [s for s in sources if s != "samples"]
    samples = torch.stack(result.samples) if "samples" in sources else None
    if samples is not None and samples.shape[1] < num_samples - 1:
        raise ValueError(f"source 'samples' with num_samples={num_samples} needs {num_samples - 1} flow samples per "
                         f"row, the evaluation outputs hold {samples.shape[1]}: collect them with flow_samples >= "
                         f"{num_samples - 1}")
    n = len(result.actions)
    truth, masks = torch.stack(result.actions), torch.stack(result.action_mask)
    policy, layers = torch.stack(result.policy), torch.stack(result.layer_actions)
    episodes = torch.tensor(result.episode_index)
    scale = leave_one_group_out_error(policy, truth, masks, episodes)
    residuals = (truth - policy) * masks[..., None]
    device = next(head.parameters()).device
    g = torch.Generator().manual_seed(seed)
    counts = masks.double().sum(dim=1) * truth.shape[-1]
    sums: dict[tuple[str, str], list[Tensor]] = {}
    policy_first: list[Tensor] = []

    def add(source: str, selection: str, value: Tensor) -> None:
        sums.setdefault((source, selection), []).append(value.double().cpu())

    for start in tqdm(range(0, n, batch_size), desc="selection", disable=not progress, leave=False):
        idx = torch.arange(start, min(start + batch_size, n))
        ctx, cmask = (t.to(device) for t in _pad_contexts([result.contexts[i] for i in idx]))
        pol, tr, am = policy[idx].to(device), truth[idx], masks[idx]
        amd = am.to(device)
        add("policy", "policy", l1_sums(pol[:, None].cpu(), tr, am)[:, 0])
        pair = torch.stack([pol, tr.to(pol)], dim=1)  # calibration: the policy's chunk against the truth
        e_pair = head(ctx, pair, context_mask=cmask, action_mask=amd[:, None].expand(-1, 2, -1)).float().cpu()
        policy_first.append(e_pair[:, 0] < e_pair[:, 1])
        refined, _ = refine(head, ctx, pol, refine_steps, step_sizes, context_mask=cmask, action_mask=amd)
        add("policy", "refine", l1_sums(refined[:, None].cpu(), tr, am)[:, 0])
        cands: dict[str, Tensor] = {}
        for source in sources:
            if source in ("gaussian", "retrieval"):
                cands[source] = make_candidates(source, pol.cpu(), num_samples, sigma=sigma, chunks=train_chunks,
                                                generator=g)
            elif source in ("policy_error", "multistart") and "policy_error" not in cands:
                cands["policy_error"] = error_scaled_candidates(pol.cpu(), scale[idx], num_samples, generator=g)
            elif source == "residuals":
                exclude = episodes[idx, None] == episodes[None, :]
                cands[source] = residual_candidates(pol.cpu(), residuals, num_samples, g, exclude)
            elif source == "layers":
                cands[source] = make_candidates(source, pol.cpu(), num_samples, layer_actions=layers[idx].unbind(1))
            elif source == "samples":
                cands[source] = make_candidates(source, pol.cpu(), num_samples,
                                                sampler=_drawn(samples[idx, : num_samples - 1]))
        if "multistart" in sources:
            starts = cands["policy_error"][:, 1:].to(device)
            moved = refine(head, ctx, starts, refine_steps, step_sizes, context_mask=cmask,
                                       action_mask=amd)[0].cpu()
            cands["multistart"] = torch.cat([pol[:, None].cpu(), moved], dim=1)
        for source in sources:
            c = cands[source]
            e = head(ctx, c.to(device), context_mask=cmask, action_mask=amd[:, None].expand(-1, c.shape[1], -1))
            l1 = l1_sums(c, tr, am)
            rows = torch.arange(len(idx))
            for name, pick in choose(e.float().cpu(), l1, g).items():
                add(source, name, l1[rows, pick])
            add(source, "uniform", l1_sums(c.mean(dim=1, keepdim=True), tr, am)[:, 0])
            add(source, "mean", l1_sums(energy_weighted_mean(c, e.cpu(), tau)[:, None], tr, am)[:, 0])
            best = c[rows, e.argmin(dim=1).cpu()].to(device)
            ref, _ = refine(head, ctx, best, refine_steps, step_sizes, context_mask=cmask, action_mask=amd)
            add(source, "refine", l1_sums(ref[:, None].cpu(), tr, am)[:, 0])

    joined = {key: torch.cat(v) for key, v in sums.items()}
    base = joined[("policy", "policy")]
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    metrics: dict[str, float] = {"selection_samples": float(n), "candidates": float(num_samples)}
    metrics.update(calibration_metrics(torch.cat(policy_first), base / counts))
    for (source, selection), values in joined.items():
        cell = bootstrap_interval(values, counts, num_resamples, seed)
        table.setdefault(source, {})[selection] = cell
        key = "policy" if source == selection else f"{source}/{selection}"
        metrics[f"l1/{key}"], metrics[f"l1/{key}_lo"], metrics[f"l1/{key}_hi"] = cell
        if key != "policy":
            # Paired: the same samples resampled for both, so the interval is of the difference itself.
            delta = bootstrap_interval(values - base, counts, num_resamples, seed)
            metrics[f"delta/{key}"], metrics[f"delta/{key}_lo"], metrics[f"delta/{key}_hi"] = delta
    return metrics, table


def calibration_metrics(policy_first: Tensor, policy_l1: Tensor) -> dict[str, float]:
    """How often the head gives the policy's own chunk a lower energy than the demonstrated one (policy_first [N]
    bool), over all samples and over the half where the policy is most wrong (policy_l1 [N] above its median),
    each with its 95% Wilson interval: a head calibrated against the policy prefers the truth where the policy
    errs."""
    metrics: dict[str, float] = {}
    worse = policy_l1 > policy_l1.median()
    for name, rows in (("all", torch.ones_like(worse)), ("policy_wrong", worse)):
        if not bool(rows.any()):
            continue
        wins, total = int(policy_first[rows].sum()), int(rows.sum())
        key = f"calibration/prefers_policy/{name}"
        metrics[key] = wins / total
        metrics[f"{key}_lo"], metrics[f"{key}_hi"] = wilson_interval(wins, total)
    return metrics


def plot_selection(path: str | Path, table: dict[str, dict[str, tuple[float, float, float]]], title: str) -> Path:
    """Grouped bars: per source, L1 of each selection with its 95% interval; the policy as a line with its band."""
    from vla_energy.evaluation.report import pyplot

    plt = pyplot()

    sources = [s for s in table if s != "policy"]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(sources) + 2), 3.8))
    width = 0.8 / len(SELECTIONS)
    for j, sel in enumerate(SELECTIONS):
        xs = [i + (j - (len(SELECTIONS) - 1) / 2) * width for i in range(len(sources))]
        cells = [table[s][sel] for s in sources]
        ax.bar(xs, [c[0] for c in cells], width, label=sel,
               yerr=[[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]], capsize=2)
    mean, lo, hi = table["policy"]["policy"]
    ax.axhline(mean, color="k", lw=1, label="policy")
    ax.axhspan(lo, hi, color="k", alpha=0.1)
    ax.set_xticks(range(len(sources)), sources, rotation=20)
    ax.set_ylabel("action L1 (normalized units)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
