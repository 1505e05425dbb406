"""Candidate chunks from the policy, reranking them by energy, refining them by descending the energy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from vla_energy.checks import check_tensor

__all__ = [
    "RerankResult", "rerank", "energy_weighted_mean", "propose_candidates", "refine", "refine_line_search",
    "PREDICT_MODES", "CANDIDATE_SOURCES",
]

PREDICT_MODES = ("policy", "rerank", "mean", "refine")
# Where rerank / mean candidates come from: the policy's layers + Gaussian perturbations, or the training chunks
# nearest to the policy's chunk (saved with the policy).
CANDIDATE_SOURCES = ("gaussian", "retrieval")
# A bound: a number, a per-action-dimension tensor [Da], or None (unbounded on that side).
Bound = Union[float, Tensor, None]


def _check_bounds(low: Bound, high: Bound) -> None:
    if low is not None and high is not None and bool(torch.any(torch.as_tensor(low) > torch.as_tensor(high))):
        raise ValueError(f"low={low} > high={high}: the bounds are empty")


def _clamp(x: Tensor, low: Bound, high: Bound) -> Tensor:
    """x clamped to [low, high] (tensor bounds broadcast over the last dim); unchanged when both are None."""
    if low is None and high is None:
        return x
    if isinstance(low, Tensor) or isinstance(high, Tensor):  # torch.clamp takes two numbers or two tensors
        low, high = (None if b is None else torch.as_tensor(b).to(x) for b in (low, high))
    return x.clamp(low, high)


@dataclass
class RerankResult:
    """The lowest-energy candidate per sample, its index and all candidates' energies."""

    best: Tensor  # [B,H,Da]
    index: Tensor  # [B]
    energies: Tensor  # [B,K]


@torch.no_grad()
def rerank(
    head: nn.Module,
    context: Tensor,
    candidates: Tensor,
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
) -> RerankResult:
    """Score K candidates per sample [B,K,H,Da] in one pass and keep the lowest-energy one."""
    check_tensor("candidates", candidates, ("B", "K", "H", "Da"), B=context.shape[0])
    energies = head(context, candidates, context_mask=context_mask, action_mask=action_mask)
    index = energies.argmin(dim=1)
    best = candidates[torch.arange(candidates.shape[0], device=candidates.device), index]
    return RerankResult(best=best, index=index, energies=energies)


def energy_weighted_mean(candidates: Tensor, energies: Tensor, tau: float) -> Tensor:
    """[B,H,Da]: the candidates [B,K,H,Da] averaged with weights softmax(-E / tau) over K.

    The mean action of the head's own distribution p(a) ~ exp(-E(a) / tau) over the candidates (tau: the training
    temperature). Averaging also cancels the candidates' independent errors (e.g. the noise of retrieved chunks),
    which choosing one of them cannot.
    """
    check_tensor("candidates", candidates, ("B", "K", "H", "Da"))
    if tuple(energies.shape) != tuple(candidates.shape[:2]):
        raise ValueError(f"energies has shape {tuple(energies.shape)}, expected {tuple(candidates.shape[:2])}")
    if tau <= 0:
        raise ValueError(f"tau={tau}, expected > 0")
    weights = torch.softmax(-energies.float() / tau, dim=1).to(candidates.dtype)
    return (weights[..., None, None] * candidates).sum(dim=1)


def propose_candidates(
    policy: Tensor,
    layer_actions: Optional[Sequence[Tensor]] = None,
    num_samples: int = 16,
    sigma: float = 0.1,
    low: Bound = -1.0,
    high: Bound = 1.0,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, list[str]]:
    """Candidates [B,K,H,Da]: the policy chunk, its layer-wise predictions, Gaussian perturbations; in bounds
    (floats, per-dimension tensors [Da], or None for no bound)."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    _check_bounds(low, high)
    if sigma < 0 or num_samples < 0:
        raise ValueError(f"sigma={sigma} and num_samples={num_samples} must be >= 0")
    cands, types = [policy], ["policy"]
    # `or []` would call bool() on a stacked [L,B,H,Da] tensor, which raises.
    for i, layer in enumerate([] if layer_actions is None else layer_actions):
        check_tensor(f"layer_actions[{i}]", layer, ("B", "H", "Da"), B=policy.shape[0], H=policy.shape[1],
                     Da=policy.shape[2])
        cands.append(layer)
        types.append(f"layer{i}")
    for k in range(num_samples):
        noise = torch.randn(policy.shape, generator=generator, device=policy.device, dtype=policy.dtype)
        cands.append(policy + sigma * noise)
        types.append(f"perturb{k}")
    return _clamp(torch.stack(cands, dim=1), low, high), types


def refine(
    head: nn.Module,
    context: Tensor,
    actions: Tensor,
    steps: int = 10,
    step_size: float = 0.05,
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
    max_step: float = 0.1,
    low: Bound = -1.0,
    high: Bound = 1.0,
) -> tuple[Tensor, Tensor]:
    """Gradient descent on E(context, a) w.r.t. a [B,H,Da]; per-step clipped and kept in [low, high].

    A step that would raise a sample's energy is rejected and that sample's step size halves, so the energy
    never increases. No parameter gradients are created. Returns (refined actions, energies [steps+1, B]).
    """
    check_tensor("actions", actions, ("B", "H", "Da"), B=context.shape[0])
    _check_bounds(low, high)
    if steps < 0 or step_size <= 0 or max_step <= 0:
        raise ValueError(f"steps={steps}, step_size={step_size}, max_step={max_step}: need >= 0, > 0, > 0")
    a = _clamp(actions.detach(), low, high).clone()
    lr = torch.full((a.shape[0], 1, 1), float(step_size), device=a.device, dtype=a.dtype)
    with torch.no_grad():
        energy = head(context, a, context_mask=context_mask, action_mask=action_mask)
    trace = [energy]
    for _ in range(steps):
        with torch.enable_grad():
            x = a.clone().requires_grad_(True)
            e = head(context, x, context_mask=context_mask, action_mask=action_mask)
            (grad,) = torch.autograd.grad(e.sum(), x)
        proposal = _clamp(a - (lr * grad).clamp(-max_step, max_step), low, high)
        with torch.no_grad():
            new_energy = head(context, proposal, context_mask=context_mask, action_mask=action_mask)
        better = new_energy <= energy
        a = torch.where(better[:, None, None], proposal, a)
        energy = torch.where(better, new_energy, energy)
        lr = torch.where(better[:, None, None], lr, lr * 0.5)
        trace.append(energy)
    return a, torch.stack(trace)


def refine_line_search(
    head: nn.Module,
    context: Tensor,
    actions: Tensor,
    steps: int = 10,
    step_sizes: Sequence[float] = (0.2, 0.1, 0.05, 0.02, 0.01),
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
    low: float = -1.0,
    high: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Descend E along -grad with a line search: every step size is scored, the best is kept only if it is lower.

    actions [B,H,Da] or [B,K,H,Da] (K starts per context, scored without copying the context). The direction is
    the gradient scaled to RMS 1 per chunk, so step sizes are RMS displacements in action units. The energy never
    increases. Returns (refined actions, energies [steps+1, B(,K)]).
    """
    single = actions.dim() == 3
    chunks = actions[:, None] if single else actions
    check_tensor("actions", chunks, ("B", "K", "H", "Da"), B=context.shape[0])
    sizes = [float(s) for s in step_sizes]
    if steps < 0 or not sizes or min(sizes) <= 0:
        raise ValueError(f"steps={steps}, step_sizes={step_sizes}: need steps >= 0 and step sizes > 0")
    if low > high:
        raise ValueError(f"low={low} > high={high}: the bounds are empty")
    b, k = chunks.shape[:2]
    mask = None
    if action_mask is not None:
        mask = action_mask[:, None].expand(b, k, -1) if action_mask.dim() == 2 else action_mask

    def energy(x: Tensor) -> Tensor:
        reps = x.shape[1] // k
        m = None if mask is None else mask.repeat(1, reps, 1)
        return head(context, x, context_mask=context_mask, action_mask=m)

    a = chunks.detach().clamp(low, high).clone()
    with torch.no_grad():
        e = energy(a)
    trace = [e]
    scale = torch.tensor(sizes, dtype=a.dtype, device=a.device)[:, None, None, None, None]  # [J,1,1,1,1]
    for _ in range(steps):
        with torch.enable_grad():
            x = a.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        direction = grad / grad.square().mean(dim=(-2, -1), keepdim=True).sqrt().clamp(min=1e-12)
        proposals = (a[None] - scale * direction[None]).clamp(low, high)  # [J,B,K,H,Da]
        with torch.no_grad():
            e_new = energy(proposals.transpose(0, 1).reshape(b, len(sizes) * k, *a.shape[2:]))
        e_new = e_new.view(b, len(sizes), k)
        best, j = e_new.min(dim=1)  # [B,K]
        better = best < e
        rows, cols = torch.arange(b, device=a.device)[:, None], torch.arange(k, device=a.device)[None]
        picked = proposals.permute(1, 2, 0, 3, 4)[rows, cols, j]
        a = torch.where(better[..., None, None], picked, a)
        e = torch.where(better, best, e)
        trace.append(e)
    out, trace_t = a, torch.stack(trace)
    return (out[:, 0], trace_t[..., 0]) if single else (out, trace_t)
