"""Reading an HF backbone: energy-head context and the hidden states at the action placeholders, per layer."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vla_energy.checks import real_steps

__all__ = [
    "ENERGY_BATCH_KEYS",
    "BackboneReadout",
    "read_backbone",
    "backbone_inputs",
    "backbone_forward",
    "takes_logits_to_keep",
    "hidden_size_of",
    "num_layers_of",
]

# Batch keys that belong to the energy plugin, not to the backbone's forward.
ENERGY_BATCH_KEYS = ("actions", "action_mask", "sample_id", "sample_mask", "episode_index", "state")


@dataclass
class BackboneReadout:
    """What the plugin reads from one backbone forward."""

    context: Tensor  # [B,S,D] hidden states of the chosen layer
    context_mask: Tensor  # [B,S] bool, True = a real (non-padding) token
    action_hidden: Tensor  # [L,B,H,D] hidden states at the H placeholders for layers 1..L


def backbone_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch without the plugin's keys: what `backbone(**inputs, output_hidden_states=True)` takes."""
    return {k: v for k, v in batch.items() if k not in ENERGY_BATCH_KEYS}


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Whether the (DDP- / peft-wrapped) model's forward has a `logits_to_keep` argument."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, accelerate wrappers
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def backbone_forward(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """The backbone's forward for the readout: hidden states, and LM logits only for the last position.

    The plugin reads hidden states only; `logits_to_keep=1` spares the [B, T, vocab] logits (vocabularies of
    VLMs reach 150k-260k ids). A batch with `labels` keeps all logits: the model's own LM loss needs them.
    """
    inputs = backbone_inputs(batch)
    if "labels" not in inputs and takes_logits_to_keep(model):
        inputs["logits_to_keep"] = 1
    return model(**inputs, output_hidden_states=True)


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if getter is not None else config


def _text_config_int(model: nn.Module, names: Sequence[str], what: str) -> int:
    text = _text_config(model.config)
    for attr in names:
        if getattr(text, attr, None):
            return int(getattr(text, attr))
    raise ValueError(f"cannot find the {what} in the config of {type(model).__name__} (looked for {list(names)})")


def hidden_size_of(model: nn.Module) -> int:
    """Hidden size of the language model of an HF (vision-)language model."""
    return _text_config_int(model, ("hidden_size", "d_model", "n_embd"), "hidden size")


def num_layers_of(model: nn.Module) -> int:
    """Number of transformer layers of the language model."""
    return _text_config_int(model, ("num_hidden_layers", "n_layer", "num_layers"), "number of layers")


def read_backbone(
    hidden_states: Sequence[Tensor] | None,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    action_token_id: int,
    horizon: int,
    context_layer: int = -1,
    detach_context: bool = True,
    include_placeholders: bool = True,
) -> BackboneReadout:
    """Context for the energy head and the per-layer hidden states at the H action placeholders.

    A model that inserts tokens inside its forward (OpenVLA / Prismatic: the image patches after BOS) returns hidden
    states longer than input_ids by the same count k for every row. The placeholders follow the insertion, so each
    sits k positions later; the inserted tokens count as real context. This needs right padding (the HF default).
    """
    if hidden_states is None or len(hidden_states) < 2:
        raise ValueError(
            "the backbone returned no hidden_states: call it with output_hidden_states=True "
            "(a model that cannot return them cannot be used with vla_energy)"
        )
    last = hidden_states[-1]
    b, t = input_ids.shape
    if last.dim() != 3 or last.shape[0] != b or last.shape[1] < t:
        raise ValueError(
            f"hidden_states[-1] has shape {tuple(last.shape)}, expected (B, T', D) with B = {b} and T' >= T = {t} of "
            f"input_ids {tuple(input_ids.shape)} (a model that drops input tokens cannot be read)"
        )
    inserted = last.shape[1] - t
    is_action = input_ids == action_token_id
    counts = is_action.sum(dim=1)
    if bool((counts != horizon).any()):
        bad = (counts != horizon).nonzero().flatten().tolist()
        raise ValueError(
            f"batch rows {bad} have {[int(counts[i]) for i in bad]} action placeholders (token id "
            f"{action_token_id}), expected horizon={horizon} per row: append the placeholders to each prompt "
            "(the VLACollator does)"
        )
    real = real_steps(attention_mask, tuple(input_ids.shape), input_ids.device, "attention_mask")
    if inserted:
        if bool((~real[:, 0]).any()):
            raise ValueError(
                f"the backbone inserted {inserted} tokens inside its forward (hidden states {last.shape[1]} long, "
                f"input_ids {t}) and input_ids are left-padded: where the inserted tokens went is then unknown; pad "
                "on the right (processor.tokenizer.padding_side = 'right')"
            )
        # Right padding: row i's real tokens become its first n_i + k positions; placeholders shift by k.
        lengths = real.sum(dim=1, keepdim=True) + inserted
        real = torch.arange(t + inserted, device=input_ids.device).expand(b, -1) < lengths
        is_action = torch.cat([is_action.new_zeros(b, inserted), is_action], dim=1)
        t += inserted
    # Stable order of placeholder positions per row, whatever the padding side.
    order = torch.arange(t, device=input_ids.device).expand(b, t)
    positions = torch.where(is_action, order, t + order).sort(dim=1).values[:, :horizon]
    # Layers 1..L (index 0 is the embedding output): one prediction per transformer layer.
    index = positions[:, :, None].expand(b, horizon, last.shape[-1])
    action_hidden = torch.stack([h.gather(1, index) for h in hidden_states[1:]], dim=0)
    context = hidden_states[context_layer]
    return BackboneReadout(
        context=context.detach() if detach_context else context,
        context_mask=real if include_placeholders else real & ~is_action,
        action_hidden=action_hidden,
    )
