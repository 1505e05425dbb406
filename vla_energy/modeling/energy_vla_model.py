"""EnergyVLAModel: the backbone and the plugin in one module, trained by the recipe and the Trainer alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from vla_energy.backbones.param_groups import trainable_parameters
from vla_energy.backbones.readout import BackboneReadout, backbone_forward
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.process_group import ProcessGroup
from vla_energy.modeling.state_projector import inject_state_embedding

__all__ = ["EnergyVLAModel", "EnergyVLAOutput", "CANDIDATE_KEYS", "TARGET_KEYS"]

# Batch keys of the held-out ranking (vla_energy.evaluation.ranking): candidate chunks, the true one first.
CANDIDATE_KEYS = ("candidate_actions", "candidate_mask")
# Float batch entries that are targets, not inputs: they reach the loss in float32 whatever the compute dtype.
TARGET_KEYS = ("actions", "candidate_actions")


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


class _Targets:
    """Target tensors carried past the forward-input cast of FSDP2's MixedPrecisionPolicy, which converts every
    floating tensor it finds in the arguments (in dicts, lists, dataclasses) to the compute dtype, but leaves
    other objects alone."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors


class EnergyVLAModel(nn.Module):
    """The backbone and the EnergyPlugin (action head, energy head, temperature, state projector) in one module, so
    one prepare (DDP/FSDP2/DeepSpeed) covers all.

    `model(**batch)` finds the process group itself (accelerate's PartialState) for the global InfoNCE. In eval
    mode (`model.eval()`) it computes the same losses and metrics but stages nothing into the action bank and
    leaves an adaptive temperature's running gap alone; a batch with `candidate_actions` [B,K,H,Da] (true chunk
    first) also returns their energies [B,K]. `model.encode(**batch)` is the one path from model inputs to the
    energy head's context.

    Towards a `transformers.Trainer` (and TRL's trainers) it behaves like a transformers model, as peft's PeftModel
    does for its base: `config`, `generation_config`, `add_model_tags`, the embeddings and gradient checkpointing
    are the backbone's; `save_pretrained` writes a policy directory.
    """

    supports_gradient_checkpointing = True
    main_input_name = "input_ids"
    base_model_prefix = "backbone"

    def __init__(self, backbone: nn.Module, plugin: EnergyPlugin) -> None:
        super().__init__()
        self.backbone = backbone
        self.plugin = plugin
        # FSDP's TRANSFORMER_BASED_WRAP shards the blocks the backbone names (its decoder / vision layers).
        self._no_split_modules = list(getattr(self.base_backbone, "_no_split_modules", None) or [])

    # A transformers model towards a Trainer ---------------------------------------------------------------------

    @property
    def base_backbone(self) -> nn.Module:
        """The backbone without a peft wrapper (the transformers model)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    @property
    def config(self) -> Any:
        """The backbone's config."""
        return self.base_backbone.config

    @property
    def generation_config(self) -> Any:
        """The backbone's generation config."""
        return self.base_backbone.generation_config

    @property
    def name_or_path(self) -> str:
        """Where the backbone was loaded from."""
        return getattr(self.base_backbone, "name_or_path", "")

    def add_model_tags(self, tags: list[str] | str) -> None:
        """Tags of the model card (TRL's trainers add theirs), kept on the backbone as transformers does."""
        if hasattr(self.base_backbone, "add_model_tags"):
            self.base_backbone.add_model_tags(tags)

    def get_input_embeddings(self) -> nn.Module:
        return self.base_backbone.get_input_embeddings()

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.base_backbone.get_output_embeddings()

    def enable_input_require_grads(self) -> None:
        """Make the backbone's input embeddings require grad (reentrant checkpointing with a frozen base)."""
        self.base_backbone.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        **kwargs: Any) -> None:
        """Activation checkpointing in the backbone (peft-wrapped or not); the small heads are not checkpointed."""
        ckpt = {"use_reentrant": False} if activation_checkpointing_kwargs is None else activation_checkpointing_kwargs
        base = self.base_backbone
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
        base = self.base_backbone
        if hasattr(base, "activation_checkpointing_disable"):
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the backbone checkpoints activations."""
        base = self.base_backbone
        name = "is_activation_checkpointing" if hasattr(type(base), "is_activation_checkpointing") else \
            "is_gradient_checkpointing"  # transformers 5 renamed it
        return bool(getattr(base, name, False))

    def save_pretrained(self, save_directory: str, processor: Any = None, norm_stats: Any = None, **kwargs: Any
                        ) -> Any:
        """Write the policy files into `save_directory` (created if needed; other files in it stay), which
        EnergyPolicy.from_pretrained loads: the base's name and revision, the adapter, the plugin, and the processor
        and action normalization when given. kwargs go to modeling.serialization.write_policy."""
        from pathlib import Path

        from vla_energy.modeling.serialization import write_policy

        Path(save_directory).mkdir(parents=True, exist_ok=True)
        return write_policy(save_directory, self, processor, norm_stats, **kwargs)

    # Parameters -------------------------------------------------------------------------------------------------

    def policy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the policy (backbone LoRA + action head + state projector)."""
        return trainable_parameters([self.backbone, *self.plugin.policy_modules()])

    def energy_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the energy side (head, learnable temperature)."""
        return trainable_parameters(self.plugin.energy_modules())

    # Forward ------------------------------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Before any forward pre-hook (FSDP2's input cast is one): float targets travel in a container it skips.
        targets = {k: kwargs.pop(k) for k in TARGET_KEYS if isinstance(kwargs.get(k), Tensor)}
        if targets:
            kwargs["_targets"] = _Targets(targets)
        return super().__call__(*args, **kwargs)

    def _backbone_outputs(self, inputs: dict[str, Any]) -> tuple[Any, Optional[Tensor]]:
        """The backbone's output (with hidden states) and, with use_state, the state token's embedding."""
        state_embedding = self.plugin.project_state(inputs)
        with inject_state_embedding(self.backbone, self.plugin.state_token_id, state_embedding):
            outputs = backbone_forward(self.backbone, inputs)
        return outputs, state_embedding

    def encode(self, **inputs: Any) -> BackboneReadout:
        """The energy head's context and the placeholders' hidden states of a batch of model inputs (+ `state`)."""
        outputs, state_embedding = self._backbone_outputs(inputs)
        return self.plugin.read(outputs, inputs, state_embedding)

    def forward(self, _targets: Optional[_Targets] = None, **inputs: Any) -> EnergyVLAOutput:
        """Backbone forward (with the model's own loss when `labels` are given) plus the plugin's losses."""
        if _targets is not None:
            inputs.update({k: v.float() if v.is_floating_point() else v for k, v in _targets.tensors.items()})
        if "accelerator" in inputs:
            raise TypeError("EnergyVLAModel.forward takes no accelerator: it finds the process group itself")
        candidates = {k: inputs.pop(k) for k in CANDIDATE_KEYS if k in inputs}
        if "actions" not in inputs:
            raise ValueError(f"the batch has no 'actions' (keys: {sorted(inputs)}): the energy loss needs them")
        group = ProcessGroup(inputs["actions"].device)
        if self.plugin.plan is None:
            self.plugin.setup(group, inputs["actions"].shape[0])
        outputs, state_embedding = self._backbone_outputs(inputs)
        with self.plugin.evaluating(not self.training):
            parts = self.plugin(outputs, inputs, group, state_embedding)
        lm_loss = getattr(outputs, "loss", None) if "labels" in inputs else None
        ranking = self._rank(parts.readout, candidates) if candidates and not self.training else None
        return EnergyVLAOutput(
            loss=parts.loss if lm_loss is None else parts.loss + lm_loss, l1=parts.l1,
            energy_loss=parts.energy_loss, head_loss=parts.loss, lm_loss=lm_loss, policy=parts.policy,
            ranking_energies=ranking, metrics=parts.metrics,
        )

    def _rank(self, readout: BackboneReadout, candidates: dict[str, Tensor]) -> Tensor:
        """Energies [B,K] of the candidate chunks (true chunk first) under this batch's contexts."""
        cands = candidates.get("candidate_actions")
        if cands is None or cands.dim() != 4:
            got = None if cands is None else tuple(cands.shape)
            raise ValueError(f"candidate_actions has shape {got}, expected (B, K, H, Da)")
        with torch.no_grad():
            return self.plugin.energy_head(readout.context, cands, context_mask=readout.context_mask,
                                           action_mask=candidates.get("candidate_mask"))
