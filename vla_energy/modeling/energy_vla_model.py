"""EnergyVLAModel: the backbone and both heads in one module, trained by the recipe and the Trainer alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from vla_energy.backbones.param_groups import trainable_parameters
from vla_energy.backbones.readout import backbone_forward
from vla_energy.modeling.process_group import ProcessGroup
from vla_energy.modeling.state_projector import inject_state_embedding
from vla_energy.training.plugin import EnergyPlugin

__all__ = ["EnergyVLAModel", "EnergyVLAOutput", "CANDIDATE_KEYS"]

# Batch keys of the held-out ranking (vla_energy.evaluation.ranking): candidate chunks, the true one first.
CANDIDATE_KEYS = ("candidate_actions", "candidate_mask")


@dataclass
class EnergyVLAOutput(ModelOutput):
    """loss (what is trained), its parts, flat float metrics; in eval with candidates, their energies."""

    loss: Optional[Tensor] = None
    l1: Optional[Tensor] = None
    energy_loss: Optional[Tensor] = None
    head_loss: Optional[Tensor] = None
    lm_loss: Optional[Tensor] = None
    policy: Optional[Tensor] = None
    ranking_energies: Optional[Tensor] = None
    metrics: Optional[dict] = None


class EnergyVLAModel(nn.Module):
    """Backbone, action head, energy head and temperature in one module: one prepare (DDP/FSDP2/DeepSpeed) covers all.

    `model(**batch)` finds the process group itself (accelerate's PartialState) for the global InfoNCE. In eval
    mode (`model.eval()`) it computes the same losses and metrics but stages nothing into the action bank and
    leaves an adaptive temperature's running gap alone; a batch with `candidate_actions` [B,K,H,Da] (true chunk
    first) also returns their energies [B,K].

    With a state projector (use_state) the batch must carry `state` [B,Ds]: its projection replaces the input
    embedding of the state token for the duration of the backbone's forward.
    """

    supports_gradient_checkpointing = True

    def __init__(self, backbone: nn.Module, plugin: EnergyPlugin) -> None:
        super().__init__()
        self.backbone = backbone
        self.action_head = plugin.action_head
        self.energy_head = plugin.energy_head
        self.temperature = plugin.temperature
        self.state_projector = plugin.state_projector
        self.plugin = plugin
        # FSDP's TRANSFORMER_BASED_WRAP shards the blocks the backbone names (its decoder / vision layers).
        self._no_split_modules = list(getattr(self._base_backbone(), "_no_split_modules", None) or [])

    def point_plugin_at_heads(self) -> None:
        """Make the plugin compute with the heads this module holds now (peft's modules_to_save swaps them for
        wrappers whose trained copy must be the one scored and optimized)."""
        self.plugin.action_head, self.plugin.energy_head = self.action_head, self.energy_head
        self.plugin.temperature = self.temperature
        self.plugin.state_projector = self.state_projector

    def policy_heads(self) -> list[nn.Module]:
        """The policy's modules besides the backbone: the action head and, with use_state, the state projector."""
        return [m for m in (self.action_head, self.state_projector) if m is not None]

    def policy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the policy (backbone LoRA + action head + state projector)."""
        return trainable_parameters([self.backbone, *self.policy_heads()])

    def energy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the energy side (head, learnable temperature)."""
        return trainable_parameters([self.energy_head, self.temperature])

    def _base_backbone(self) -> nn.Module:
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **kwargs: Any) -> None:
        """Activation checkpointing in the backbone (peft-wrapped or not); the small heads are not checkpointed."""
        ckpt = {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        base = self._base_backbone()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        else:
            raise ValueError(f"the backbone {type(base).__name__} cannot checkpoint activations")
        if ckpt.get("use_reentrant", True) and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad (LoRA)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      **kwargs: Any) -> None:
        """The older name of activation_checkpointing_enable."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn the backbone's activation checkpointing off."""
        base = self._base_backbone()
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the backbone checkpoints activations."""
        base = self._base_backbone()
        name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"  # transformers 5 renamed it
        return bool(getattr(base, name, False))

    def forward(self, **inputs: Tensor) -> EnergyVLAOutput:
        """Backbone forward (with the model's own loss when `labels` are given) plus the plugin's losses."""
        if "accelerator" in inputs:
            raise TypeError("EnergyVLAModel.forward takes no accelerator: it finds the process group itself")
        self.point_plugin_at_heads()
        candidates = {k: inputs.pop(k) for k in CANDIDATE_KEYS if k in inputs}
        if "actions" not in inputs:
            raise ValueError(f"the batch has no 'actions' (keys: {sorted(inputs)}): the energy loss needs them")
        group = ProcessGroup(inputs["actions"].device)
        if self.plugin.plan is None:
            self.plugin.setup(group, inputs["actions"].shape[0])
        state_embedding = self.plugin.project_state(inputs)
        with inject_state_embedding(self.backbone, self.plugin.state_token_id, state_embedding):
            outputs = backbone_forward(self.backbone, inputs)
        with self.plugin.evaluating(not self.training):
            head_loss, metrics = self.plugin.compute_loss(outputs, inputs, group, state_embedding)
        parts, self.plugin.last_parts = self.plugin.last_parts, None  # hold no graph past this call
        lm_loss = getattr(outputs, "loss", None) if "labels" in inputs else None
        ranking = self._rank(parts.readout, candidates) if candidates and not self.training else None
        return EnergyVLAOutput(
            loss=head_loss if lm_loss is None else head_loss + lm_loss, l1=parts.l1, energy_loss=parts.energy_loss,
            head_loss=head_loss, lm_loss=lm_loss, policy=parts.policy, ranking_energies=ranking, metrics=metrics,
        )

    def _rank(self, readout: Any, candidates: dict[str, Tensor]) -> Tensor:
        """Energies [B,K] of the candidate chunks (true chunk first) under this batch's contexts."""
        cands = candidates.get("candidate_actions")
        if cands is None or cands.dim() != 4:
            got = None if cands is None else tuple(cands.shape)
            raise ValueError(f"candidate_actions has shape {got}, expected (B, K, H, Da)")
        with torch.no_grad():
            return self.energy_head(readout.context, cands, context_mask=readout.context_mask,
                                    action_mask=candidates.get("candidate_mask"))
