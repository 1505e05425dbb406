"""EnergyVLAModel: the backbone and both heads in one module, trained by the recipe and the Trainer alike."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from vla_energy.backbones.readout import backbone_forward
from vla_energy.training.plugin import EnergyPlugin

__all__ = ["EnergyVLAModel"]


class EnergyVLAModel(nn.Module):
    """The backbone and both heads in one module, so the Trainer's DDP/FSDP/DeepSpeed and checkpoints cover all."""

    def __init__(self, backbone: nn.Module, plugin: EnergyPlugin) -> None:
        super().__init__()
        self.backbone = backbone
        self.action_head = plugin.action_head
        self.energy_head = plugin.energy_head
        self.temperature = plugin.temperature
        self.plugin = plugin

    def point_plugin_at_heads(self) -> None:
        """Make the plugin compute with the heads this module holds now (peft's modules_to_save swaps them for
        wrappers whose trained copy must be the one scored and optimized)."""
        self.plugin.action_head, self.plugin.energy_head = self.action_head, self.energy_head

    def forward(self, accelerator: Any = None, **inputs: Tensor) -> dict[str, Any]:
        """Backbone forward (with the model's own loss when `labels` are given) plus the plugin's losses."""
        self.point_plugin_at_heads()
        outputs = backbone_forward(self.backbone, inputs)
        head_loss, metrics = self.plugin.compute_loss(outputs, inputs, accelerator)
        lm_loss = getattr(outputs, "loss", None) if "labels" in inputs else None
        return {"loss": head_loss if lm_loss is None else head_loss + lm_loss, "head_loss": head_loss,
                "lm_loss": lm_loss, "metrics": metrics}
