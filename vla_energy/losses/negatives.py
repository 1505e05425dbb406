"""Explicit negatives that do not depend on the batch size: layer-wise predictions, noise, a temporal shuffle.

The default (layer mode "fixed") builds, in this order, layers [0, L//3, L//2, -2] of the policy's layer-wise
action predictions, ground truth + N(0, sigma^2) for sigma in (0.1, 0.2, 0.4), one temporal shuffle of the chunk,
then more noise with sigma = 0.3 + 0.1 * k (k = number of negatives so far) until M, and keeps the first M. Layer
mode "mid_energy" instead takes one layer: the one of middle mean energy among all but the final layer.

Padded steps (action_mask False) are perturbed and shuffled like real ones; the false-negative distance counts
only real steps, so padding never makes a negative look far from its positive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from vla_energy.checks import check_mask, check_tensor, real_steps
from vla_energy.losses.distances import rowwise_rms
from vla_energy.losses.perturbation import perturb

__all__ = [
    "LAYER_MODES",
    "Negatives",
    "build_negatives",
    "false_negative_mask",
    "fixed_layer_indices",
    "noise_negatives",
    "select_layer_negatives",
    "temporal_shuffle",
]

LAYER_MODES = ("fixed", "mid_energy", "none")
EnergyFn = Callable[[Tensor], Tensor]


@dataclass
class Negatives:
    """actions [B,M,H,Da] (detached), one type tag per slot, mask [B,M] (True = usable, False = too close)."""

    actions: Tensor
    types: list[str]
    mask: Tensor

    def __post_init__(self) -> None:
        check_tensor("actions", self.actions, ("B", "M", "H", "Da"))
        b, m = self.actions.shape[:2]
        if len(self.types) != m:
            raise ValueError(f"types has {len(self.types)} entries, expected M={m}")
        if self.mask.dtype != torch.bool or tuple(self.mask.shape) != (b, m):
            raise ValueError(f"mask has shape {tuple(self.mask.shape)} and dtype {self.mask.dtype}, "
                             f"expected (B={b}, M={m}) bool")


def _check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device}, expected {device.type} (the device of actions)")


def _check_layers(layer_actions: Sequence[Tensor], actions: Tensor) -> list[Tensor]:
    b, h, da = actions.shape
    layers = list(layer_actions)
    for i, layer in enumerate(layers):
        check_tensor(f"layer_actions[{i}]", layer, ("B", "H", "Da"), device=actions.device, B=b, H=h, Da=da)
    return layers


def fixed_layer_indices(num_layers: int) -> list[int]:
    """The layers [0, L//3, L//2, -2] as non-negative indices, deduplicated, never the final layer.

    The final layer is the policy's own prediction, so it is left out: L=1 gives no layer, L=2 gives [0],
    L=3 gives [0, 1], L=32 gives [0, 10, 16, 30].
    """
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers}, expected >= 0")
    picked = []
    for idx in (0, num_layers // 3, num_layers // 2, -2):
        idx = idx % num_layers if num_layers else idx
        if 0 <= idx < num_layers - 1 and idx not in picked:
            picked.append(idx)
    return picked


def select_layer_negatives(
    layer_actions: Sequence[Tensor],
    mode: str = "fixed",
    energy_fn: Optional[EnergyFn] = None,
) -> tuple[list[Tensor], list[str]]:
    """Layer predictions used as negatives and their tags "layer{i}"; the final layer is never one of them.

    mode "fixed": fixed_layer_indices. "mid_energy": score every layer but the last with
    energy_fn ([B,H,Da] -> [B], without gradient), sort by mean energy and take the middle one. "none": nothing.
    """
    if mode not in LAYER_MODES:
        raise ValueError(f"layer_mode {mode!r} is unknown, expected one of {LAYER_MODES}")
    if mode == "mid_energy" and energy_fn is None:
        raise ValueError("layer_mode='mid_energy' needs energy_fn (a callable [B,H,Da] -> [B] energies)")
    layers = list(layer_actions)
    if layers:
        check_tensor("layer_actions[0]", layers[0], ("B", "H", "Da"))
        _check_layers(layers, layers[0])
    if mode == "none" or len(layers) < 2:
        return [], []
    if mode == "fixed":
        picked = fixed_layer_indices(len(layers))
        return [layers[i] for i in picked], [f"layer{i}" for i in picked]
    means = []
    with torch.no_grad():
        for i, layer in enumerate(layers[:-1]):
            energy = energy_fn(layer)
            check_tensor(f"energy_fn(layer_actions[{i}])", energy, ("B",), B=layer.shape[0])
            means.append(float(energy.double().mean()))
    # Stable sort: equal means keep layer order, so the choice is deterministic.
    order = sorted(range(len(means)), key=lambda i: means[i])
    mid = order[len(order) // 2]
    return [layers[mid]], [f"layer{mid}"]


def _check_sigma(sigma: float) -> float:
    sigma = float(sigma)
    if not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"noise sigma={sigma}, expected a finite number > 0")
    return sigma


def noise_negatives(
    actions: Tensor, sigmas: Sequence[float] = (0.1, 0.2, 0.4), generator: Optional[torch.Generator] = None
) -> tuple[list[Tensor], list[str]]:
    """actions + N(0, sigma^2) for each sigma (drawn on actions' device), tagged "noise{sigma}"."""
    check_tensor("actions", actions, ("B", "H", "Da"))
    _check_generator(generator, actions.device)
    sigmas = [_check_sigma(s) for s in sigmas]
    return [perturb(actions, s, generator) for s in sigmas], [f"noise{s:g}" for s in sigmas]


def temporal_shuffle(actions: Tensor, generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """The chunk with its H steps permuted (one permutation for the batch, never the identity); None if H = 1."""
    check_tensor("actions", actions, ("B", "H", "Da"))
    _check_generator(generator, actions.device)
    h = actions.shape[1]
    if h < 2:
        return None
    identity = torch.arange(h, device=actions.device)
    # Rejection sampling gives a uniform non-identity permutation; it is accepted with probability >= 1/2.
    while True:
        perm = torch.randperm(h, generator=generator, device=actions.device)
        if not bool((perm == identity).all()):
            return actions[:, perm]


def false_negative_mask(
    actions: Tensor, negatives: Tensor, action_mask: Optional[Tensor] = None, eps: float = 1e-2
) -> Tensor:
    """[B,M] True where a negative is farther than eps (RMS over real steps and action dims) from its positive.

    A sample with no real step has no distance to measure: all its negatives are masked.
    """
    check_tensor("actions", actions, ("B", "H", "Da"))
    b, h, da = actions.shape
    check_tensor("negatives", negatives, ("B", "M", "H", "Da"), device=actions.device, B=b, H=h, Da=da)
    if eps < 0:
        raise ValueError(f"false_negative_eps={eps}, expected >= 0")
    real = real_steps(action_mask, (b, h), actions.device)
    rms = rowwise_rms(actions, negatives, real)
    return (rms > eps) & real.any(dim=1, keepdim=True)


def build_negatives(
    actions: Tensor,
    layer_actions: Optional[Sequence[Tensor]] = None,
    *,
    num_negatives: int = 8,
    layer_mode: str = "fixed",
    noise_sigmas: Sequence[float] = (0.1, 0.2, 0.4),
    shuffle: bool = True,
    energy_fn: Optional[EnergyFn] = None,
    false_negative_eps: float = 1e-2,
    action_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Negatives:
    """M = num_negatives negatives per positive: layers, then noise, then a shuffle, then fill noise; the first M.

    actions [B,H,Da] is the ground truth; layer_actions the policy's L layer-wise predictions, each [B,H,Da]
    (None: no layer negatives). Fill slot k (k = negatives so far) has sigma 0.3 + 0.1 * k.
    Pass a seeded `generator` (on actions' device) for reproducible noise and shuffles.
    """
    check_tensor("actions", actions, ("B", "H", "Da"))
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives={num_negatives}, expected an int >= 1")
    if layer_mode not in LAYER_MODES:
        raise ValueError(f"layer_mode {layer_mode!r} is unknown, expected one of {LAYER_MODES}")
    if layer_mode == "mid_energy" and energy_fn is None:
        raise ValueError("layer_mode='mid_energy' needs energy_fn (a callable [B,H,Da] -> [B] energies)")
    if false_negative_eps < 0:
        raise ValueError(f"false_negative_eps={false_negative_eps}, expected >= 0")
    if action_mask is not None:
        check_mask("action_mask", action_mask, tuple(actions.shape[:2]), device=actions.device)
    _check_generator(generator, actions.device)
    sigmas = [_check_sigma(s) for s in noise_sigmas]

    negs: list[Tensor] = []
    types: list[str] = []
    if layer_actions is not None:
        layers = _check_layers(layer_actions, actions)
        negs, types = select_layer_negatives(layers, layer_mode, energy_fn)
    # Candidates past M would be cut off (only the first M are kept): they are not drawn at all.
    for sigma in sigmas:
        if len(negs) >= num_negatives:
            break
        negs.append(perturb(actions, sigma, generator))
        types.append(f"noise{sigma:g}")
    if shuffle and len(negs) < num_negatives:
        shuffled = temporal_shuffle(actions, generator)
        if shuffled is not None:
            negs.append(shuffled)
            types.append("shuffle")
    while len(negs) < num_negatives:
        sigma = 0.3 + 0.1 * len(negs)
        negs.append(perturb(actions, sigma, generator))
        types.append(f"noise{sigma:g}")
    negs, types = negs[:num_negatives], types[:num_negatives]
    stacked = torch.stack([n.to(actions.dtype) for n in negs], dim=1).detach()
    mask = false_negative_mask(actions.detach(), stacked, action_mask, false_negative_eps)
    return Negatives(stacked, types, mask)
