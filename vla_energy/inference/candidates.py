"""Where candidate chunks come from: the one place that makes them, for EnergyPolicy and for evaluation alike.

Every source returns [B,K,H,Da] with the policy's own chunk first, so a choice among them can always fall back
to the policy. Sources: gaussian (the policy + Gaussian perturbations), layers (the policy + its layer-wise
predictions), retrieval (the policy + the training chunks nearest to it), neighbors (the policy + the chunks of the
training samples whose contexts are nearest to the current one), samples (the policy + a flow head's samples), and,
for evaluation against ground truth, policy_error (perturbations at the policy's own error scale) and
residuals (other samples' errors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vla_energy.checks import check_mask, check_tensor
from vla_energy.inference.rerank import Bound, check_bounds, clamp_to_bounds
from vla_energy.losses.perturbation import perturb

__all__ = ["CANDIDATE_SOURCES", "make_candidates", "gaussian_candidates", "layer_candidates", "sample_candidates",
           "leave_one_group_out_error", "error_scaled_candidates", "residual_candidates", "retrieve_nearest",
           "context_key", "neighbor_candidates", "nearest_indices"]

# The sources EnergyPolicy offers (evaluation adds policy_error and residuals, which need ground truth).
CANDIDATE_SOURCES = ("gaussian", "layers", "retrieval", "neighbors", "samples")
# sampler(num, generator) -> [B,num,H,Da]: draws of a stochastic policy for the same contexts (EnergyPlugin.sample_actions).
Sampler = Callable[[int, Optional[torch.Generator]], Tensor]


def make_candidates(
    source: str,
    policy: Tensor,
    num_samples: int,
    *,
    layer_actions: Optional[Sequence[Tensor]] = None,
    sigma: float = 0.1,
    chunks: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    low: Bound = -1.0,
    high: Bound = 1.0,
    sampler: Optional[Sampler] = None,
    contexts: Optional[Tensor] = None,
    query: Optional[Tensor] = None,
) -> Tensor:
    """[B,K,H,Da] candidates of `source` (CANDIDATE_SOURCES) around the policy chunk [B,H,Da], the policy first.

    gaussian: K = num_samples (sigma, generator); layers: the policy's layer-wise predictions (layer_actions, the
    last being the policy itself); retrieval: K = num_samples, the training `chunks` [N,H,Da] nearest to the policy;
    neighbors: K = num_samples, the `chunks` of the training samples whose context keys `contexts` [N,D] are nearest
    to the current context's key `query` [B,D] (context_key); samples: K = num_samples, the policy and K-1 draws of
    a flow head (`sampler`, generator).
    """
    if source == "gaussian":
        return gaussian_candidates(policy, num_samples, sigma, generator, low, high)
    if source == "layers":
        if layer_actions is None:
            raise ValueError("candidates='layers' needs the policy's layer-wise predictions (layer_actions)")
        return layer_candidates(policy, layer_actions)
    if source == "retrieval":
        if chunks is None:
            raise ValueError("candidates='retrieval' needs the training chunks saved with the policy "
                             "(retrieval_chunks.safetensors, written by training with --retrieval_chunks > 0)")
        return retrieve_nearest(policy, chunks, num_samples)
    if source == "neighbors":
        if chunks is None or contexts is None:
            raise ValueError("candidates='neighbors' needs the training chunks and their context keys saved with the "
                             "policy (retrieval_chunks.safetensors with 'contexts'): train with --retrieval_contexts, "
                             "or add them to a saved policy with add_retrieval_chunks(path, contexts=True)")
        if query is None:
            raise ValueError("candidates='neighbors' needs the current context's key (query=context_key(...))")
        return neighbor_candidates(policy, query, contexts, chunks, num_samples)
    if source == "samples":
        if sampler is None:
            raise ValueError("candidates='samples' needs a stochastic action head's sampler: train the policy with "
                             "--action_head flow")
        return sample_candidates(policy, num_samples, sampler, generator, low, high)
    raise ValueError(f"candidates={source!r}, expected one of {CANDIDATE_SOURCES}")


def gaussian_candidates(policy: Tensor, num_samples: int, sigma: float = 0.1,
                        generator: Optional[torch.Generator] = None, low: Bound = -1.0, high: Bound = 1.0) -> Tensor:
    """[B,K,H,Da]: the policy chunk and K-1 draws policy + sigma * N(0, 1), within [low, high] (numbers,
    per-dimension tensors [Da], or None)."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_bounds(low, high)
    if sigma < 0 or num_samples < 1:
        raise ValueError(f"sigma={sigma} and num_samples={num_samples}: expected >= 0 and >= 1")
    draws = [perturb(policy, sigma, generator) for _ in range(num_samples - 1)]
    return clamp_to_bounds(torch.stack([policy, *draws], dim=1), low, high)


def sample_candidates(policy: Tensor, num_samples: int, sampler: Sampler,
                      generator: Optional[torch.Generator] = None, low: Bound = -1.0, high: Bound = 1.0) -> Tensor:
    """[B,K,H,Da]: the policy chunk and K-1 draws sampler(K-1, generator) [B,K-1,H,Da], within [low, high]."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_bounds(low, high)
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}, expected >= 1")
    draws = sampler(num_samples - 1, generator) if num_samples > 1 else policy.new_zeros(policy.shape[0], 0,
                                                                                         *policy.shape[1:])
    b, h, da = policy.shape
    check_tensor("sampler(...) draws", draws, ("B", "K", "H", "Da"), B=b, K=num_samples - 1, H=h, Da=da)
    return clamp_to_bounds(torch.cat([policy[:, None], draws.to(policy)], dim=1), low, high)


def layer_candidates(policy: Tensor, layer_actions: Sequence[Tensor]) -> Tensor:
    """[B,L,H,Da]: the policy chunk and its layer-wise predictions but the last (which is the policy's own)."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    layers = list(layer_actions)
    for i, layer in enumerate(layers):
        check_tensor(f"layer_actions[{i}]", layer, ("B", "H", "Da"), B=policy.shape[0], H=policy.shape[1],
                     Da=policy.shape[2])
    return torch.stack([policy, *(layer.to(policy) for layer in layers[:-1])], dim=1)


def leave_one_group_out_error(policy: Tensor, truth: Tensor, mask: Tensor, groups: Tensor) -> Tensor:
    """[N,H,Da] RMS policy error per step and dim, each sample's estimated from the other groups (episodes) only.

    So a sample's noise scale never uses its own ground truth. Steps without data in the other groups get the
    overall RMS error.
    """
    check_tensor("policy", policy, ("N", "H", "Da"))
    check_tensor("truth", truth, ("N", "H", "Da"), N=policy.shape[0], H=policy.shape[1], Da=policy.shape[2])
    m = check_mask("mask", mask, tuple(policy.shape[:2])).double()[..., None]  # [N,H,1]
    sq = (policy.double() - truth.double()).square() * m
    ids, inverse = torch.unique(groups, return_inverse=True)
    if ids.numel() < 2:
        raise ValueError("leave-one-group-out needs samples from at least 2 groups (episodes)")
    per_sq = torch.zeros(ids.numel(), *sq.shape[1:], dtype=torch.float64).index_add_(0, inverse, sq)
    per_n = torch.zeros(ids.numel(), *m.shape[1:], dtype=torch.float64).index_add_(0, inverse, m)
    rest_sq, rest_n = sq.sum(0) - per_sq[inverse], m.sum(0) - per_n[inverse]
    overall = (sq.sum() / (m.sum() * sq.shape[-1]).clamp(min=1)).sqrt()
    scale = torch.where(rest_n > 0, (rest_sq / rest_n.clamp(min=1)).sqrt(), overall)
    return scale.to(policy.dtype)


def error_scaled_candidates(
    policy: Tensor, scale: Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
    low: float = -1.0, high: float = 1.0,
) -> Tensor:
    """[B,K,H,Da]: the policy chunk + K-1 draws of policy + scale * N(0, 1), scale [B,H,Da] or [H,Da]; in bounds."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}, expected >= 1")
    draws = perturb(policy, scale, generator, num=num_samples - 1)
    return torch.cat([policy[:, None], draws], dim=1).clamp(low, high)


def residual_candidates(
    policy: Tensor, residuals: Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
    exclude: Optional[Tensor] = None, low: float = -1.0, high: float = 1.0,
) -> Tensor:
    """[B,K,H,Da]: the policy chunk + K-1 chunks policy + (truth - policy) of other samples (whole, correlated errors).

    residuals [N,H,Da] is the pool; exclude [B,N] True where a residual must not be used for a row (its own
    episode).
    """
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_tensor("residuals", residuals, ("N", "H", "Da"), H=policy.shape[1], Da=policy.shape[2])
    b, n = policy.shape[0], residuals.shape[0]
    weights = torch.ones(b, n, dtype=torch.float64)
    if exclude is not None:
        weights = weights.masked_fill(exclude.cpu(), 0.0)
    if bool((weights.sum(dim=1) == 0).any()):
        raise ValueError("a row has no residual left to draw from (every residual is excluded)")
    idx = torch.multinomial(weights, num_samples - 1, replacement=True, generator=generator) if num_samples > 1 \
        else torch.zeros(b, 0, dtype=torch.long)
    draws = policy[:, None] + residuals[idx.to(residuals.device)].to(policy.device, policy.dtype)
    return torch.cat([policy[:, None], draws], dim=1).clamp(low, high)


def retrieve_nearest(policy: Tensor, chunks: Tensor, num_samples: int, batch_size: int = 4096) -> Tensor:
    """[B,K,H,Da]: the policy chunk + the K-1 chunks of `chunks` [N,H,Da] (e.g. the training set) nearest to it (L2)."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_tensor("chunks", chunks, ("N", "H", "Da"), H=policy.shape[1], Da=policy.shape[2])
    k = num_samples - 1
    if k > chunks.shape[0]:
        raise ValueError(f"num_samples={num_samples} needs {k} retrieved chunks, but chunks holds {chunks.shape[0]}")
    flat_p = policy.reshape(policy.shape[0], -1).float()
    idx = nearest_indices(flat_p, chunks.reshape(chunks.shape[0], -1), k, torch.cdist, batch_size)
    near = chunks[idx.to(chunks.device)].to(policy.device, policy.dtype)
    return torch.cat([policy[:, None], near], dim=1)


def context_key(context: Tensor, context_mask: Tensor) -> Tensor:
    """[B,D] float32: the mean of a readout's context [B,T,D] over its real tokens (context_mask [B,T]), L2-normalised;
    the key of candidates='neighbors', for the saved training samples and the current observation alike."""
    check_tensor("context", context, ("B", "T", "D"))
    mask = check_mask("context_mask", context_mask, tuple(context.shape[:2])).to(context.device, torch.float32)
    mean = (context.float() * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    return F.normalize(mean, dim=-1)


def neighbor_candidates(policy: Tensor, query: Tensor, contexts: Tensor, chunks: Tensor, num_samples: int,
                        batch_size: int = 4096) -> Tensor:
    """[B,K,H,Da]: the policy chunk + the `chunks` [N,H,Da] of the K-1 samples whose context keys `contexts` [N,D] are
    nearest (cosine) to `query` [B,D], whatever chunk the policy predicts: similar observations with each of their
    demonstrated actions, so every mode among them is a candidate."""
    check_tensor("policy", policy, ("B", "H", "Da"))
    check_tensor("query", query, ("B", "D"), B=policy.shape[0])
    check_tensor("contexts", contexts, ("N", "D"), D=query.shape[1])
    check_tensor("chunks", chunks, ("N", "H", "Da"), N=contexts.shape[0], H=policy.shape[1], Da=policy.shape[2])
    k = num_samples - 1
    if k > contexts.shape[0]:
        raise ValueError(f"num_samples={num_samples} needs {k} neighbours, but the policy holds the contexts of "
                         f"{contexts.shape[0]} training samples")
    idx = nearest_indices(F.normalize(query.float(), dim=-1), contexts, k, _cosine_distance, batch_size)
    near = chunks[idx.to(chunks.device)].to(policy.device, policy.dtype)
    return torch.cat([policy[:, None], near], dim=1)


def _cosine_distance(query: Tensor, keys: Tensor) -> Tensor:
    """[B,n] 1 - cosine similarity of unit-norm queries [B,D] and keys [n,D] (normalised here)."""
    return 1 - query @ F.normalize(keys, dim=-1).T


def nearest_indices(query: Tensor, pool: Tensor, k: int, distance: Callable[[Tensor, Tensor], Tensor],
                    batch_size: int = 4096) -> Tensor:
    """[B,k] indices of the k rows of `pool` [N,F] nearest to each row of `query` [B,F] by `distance` ([B,F], [n,F]
    -> [B,n]), nearest first; the pool is read batch_size rows at a time."""
    best_d = torch.zeros(query.shape[0], 0)
    best_i = torch.zeros(query.shape[0], 0, dtype=torch.long)
    for start in range(0, pool.shape[0], batch_size):
        block = pool[start:start + batch_size].to(query)
        d = distance(query, block).float().cpu()
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, torch.arange(start, start + block.shape[0]).expand_as(d)], 1)
        best_d, pick = d.topk(min(k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, pick)
    return best_i
