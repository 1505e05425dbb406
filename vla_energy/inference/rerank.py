"""Choosing by energy: rerank candidates, their energy-weighted mean, refine a chunk by descending the energy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from vla_energy.checks import check_tensor
from vla_energy.losses.perturbation import Bound, bounds_like, check_bounds, clamp_to_bounds
from vla_energy.modeling.modeling_energy_head import EncodedContext

__all__ = ["RerankResult", "rerank", "energy_weighted_mean", "relative_energy", "refine", "prepare_refine", "descend", "Descent",
           "clamp_to_bounds", "check_bounds", "batch_size", "PREDICT_MODES", "REFINE_STEP_SIZES", "Bound"]

PREDICT_MODES = ("policy", "rerank", "mean", "refine")
# The step sizes refine's line search tries (RMS displacements in normalized action units).
REFINE_STEP_SIZES = (0.2, 0.1, 0.05, 0.02, 0.01)
def batch_size(context: Union[Tensor, EncodedContext]) -> int:
    """B of hidden states [B,S,D] or of a context the head encoded (EnergyHead.encode_context)."""
    return context.batch_size if isinstance(context, EncodedContext) else context.shape[0]


@dataclass
class RerankResult:
    """The lowest-energy candidate per sample, its index and all candidates' energies."""

    best: Tensor  # [B,H,Da]
    index: Tensor  # [B]
    energies: Tensor  # [B,K]


@torch.no_grad()
def rerank(
    head: nn.Module,
    context: Union[Tensor, EncodedContext],
    candidates: Tensor,
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
) -> RerankResult:
    """Score K candidates per sample [B,K,H,Da] in one pass and keep the lowest-energy one.

    context: hidden states [B,S,D] (with context_mask) or the head's encode_context of them.
    """
    check_tensor("candidates", candidates, ("B", "K", "H", "Da"), B=batch_size(context))
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


@torch.no_grad()
def relative_energy(head: nn.Module, context: Union[Tensor, EncodedContext], chunks: Tensor, references: Tensor,
                    tau: float, energy: Optional[Tensor] = None) -> Tensor:
    """[B]: each chunk's energy [B,H,Da] minus the soft minimum, -tau * log mean exp(-E / tau), of the energies of
    the same reference chunks [R,H,Da] in its context.

    InfoNCE only compares chunks within one context, so it leaves each context's energy level free; the relative
    energy removes that level. It is tau times the chunk's negative log-probability under the head's distribution
    over the references (up to log R): comparable across contexts, e.g. as a failure signal. `energy` [B]: the
    chunks' energies when already computed (only the references are scored then).
    """
    check_tensor("chunks", chunks, ("B", "H", "Da"), B=batch_size(context))
    check_tensor("references", references, ("R", "H", "Da"), H=chunks.shape[1], Da=chunks.shape[2])
    if tau <= 0:
        raise ValueError(f"tau={tau}, expected > 0")
    refs = references.to(chunks)[None].expand(chunks.shape[0], -1, -1, -1)
    if energy is None:
        e = head(context, torch.cat([chunks[:, None], refs], dim=1)).float()  # [B, 1 + R]
        energy, e_refs = e[:, 0], e[:, 1:]
    else:
        e_refs = head(context, refs).float()
    soft_min = -tau * (torch.logsumexp(-e_refs / tau, dim=1) - math.log(references.shape[0]))
    return energy.float() - soft_min


@dataclass
class Descent:
    """refine's inputs made ready for its loop (prepare_refine): checked, the context encoded, all on one device."""

    context: EncodedContext
    chunks: Tensor  # [B,K,H,Da] the starts
    scale: Tensor  # [J,1,1,1,1] the step sizes
    mask: Optional[Tensor]  # [B,K,H] the action mask, None = every step is real
    low: Bound  # numbers, or tensors like the chunks
    high: Bound
    single: bool  # the actions came as [B,H,Da]


def prepare_refine(
    head: nn.Module,
    context: Union[Tensor, EncodedContext],
    actions: Tensor,
    steps: int = 10,
    step_sizes: Sequence[float] = REFINE_STEP_SIZES,
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
    low: Bound = -1.0,
    high: Bound = 1.0,
) -> Descent:
    """refine's arguments checked and made ready for `descend` (the context encoded, bounds and step sizes moved to
    the chunks' device), so that its loop has nothing left to check or copy from the host."""
    single = actions.dim() == 3
    chunks = actions[:, None] if single else actions
    check_tensor("actions", chunks, ("B", "K", "H", "Da"), B=batch_size(context))
    sizes = [float(s) for s in step_sizes]
    if steps < 0 or not sizes or min(sizes) <= 0:
        raise ValueError(f"steps={steps}, step_sizes={step_sizes}: need steps >= 0 and step sizes > 0")
    check_bounds(low, high)
    b, k = chunks.shape[:2]
    mask = None
    if action_mask is not None:
        mask = action_mask[:, None].expand(b, k, -1) if action_mask.dim() == 2 else action_mask
    if not isinstance(context, EncodedContext):
        # Projected once: refine scores the same context 1 + 2 * steps times.
        with torch.no_grad():
            context = head.encode_context(context, context_mask)
    elif context_mask is not None:
        raise ValueError("context is already encoded (encode_context), with its mask: pass no context_mask")
    scale = torch.tensor(sizes, dtype=chunks.dtype, device=chunks.device)[:, None, None, None, None]
    return Descent(context, chunks.detach(), scale, mask, *bounds_like(chunks, low, high), single)


def descend(head: nn.Module, d: Descent, steps: int) -> tuple[Tensor, Tensor]:
    """refine's line search on prepared inputs: (chunks [B,K,H,Da], energies [steps+1,B,K]).

    Without an action mask it neither waits for the device nor copies from the host, so a CUDA graph can capture it.
    """
    b, k = d.chunks.shape[:2]
    j = d.scale.shape[0]
    proposal_mask = None if d.mask is None else d.mask.repeat(1, j, 1)
    a = clamp_to_bounds(d.chunks, d.low, d.high).clone()
    with torch.no_grad():
        e = head(d.context, a, action_mask=d.mask)
    trace = [e]
    rows, cols = torch.arange(b, device=a.device)[:, None], torch.arange(k, device=a.device)[None]
    for _ in range(steps):
        with torch.enable_grad():
            x = a.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(head(d.context, x, action_mask=d.mask).sum(), x)
        direction = grad / grad.square().mean(dim=(-2, -1), keepdim=True).sqrt().clamp(min=1e-12)
        proposals = clamp_to_bounds(a[None] - d.scale * direction[None], d.low, d.high)  # [J,B,K,H,Da]
        with torch.no_grad():
            e_new = head(d.context, proposals.transpose(0, 1).reshape(b, j * k, *a.shape[2:]),
                         action_mask=proposal_mask)
        best, pick = e_new.view(b, j, k).min(dim=1)  # [B,K]
        better = best < e
        picked = proposals.permute(1, 2, 0, 3, 4)[rows, cols, pick]
        a = torch.where(better[..., None, None], picked, a)
        e = torch.where(better, best, e)
        trace.append(e)
    return a, torch.stack(trace)


def refine(
    head: nn.Module,
    context: Union[Tensor, EncodedContext],
    actions: Tensor,
    steps: int = 10,
    step_sizes: Sequence[float] = REFINE_STEP_SIZES,
    context_mask: Optional[Tensor] = None,
    action_mask: Optional[Tensor] = None,
    low: Bound = -1.0,
    high: Bound = 1.0,
) -> tuple[Tensor, Tensor]:
    """Descend E along -grad with a line search: every step size is scored, the best is kept only if it is lower.

    actions [B,H,Da] or [B,K,H,Da] (K starts per context, scored without copying the context); context: hidden
    states [B,S,D] (with context_mask) or the head's encode_context of them. The direction is the gradient scaled
    to RMS 1 per chunk, so step sizes are RMS displacements in action units. The energy never increases; chunks
    stay within [low, high] (numbers, per-dimension tensors [Da], or None). Returns (refined actions, energies
    [steps+1, B(,K)]).
    """
    d = prepare_refine(head, context, actions, steps, step_sizes, context_mask, action_mask, low, high)
    out, trace = descend(head, d, steps)
    return (out[:, 0], trace[..., 0]) if d.single else (out, trace)
