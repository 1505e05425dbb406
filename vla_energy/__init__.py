"""vla_energy: an energy head for HuggingFace VLA finetuning, trained with global InfoNCE.

The public names are imported lazily, so that `import vla_energy` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "EnergyHead": "vla_energy.modeling.modeling_energy_head",
    "EnergyHeadConfig": "vla_energy.modeling.configuration_energy_head",
    "ActionHead": "vla_energy.modeling.action_head",
    "ActionHeadConfig": "vla_energy.modeling.action_head",
    "FlowActionHead": "vla_energy.modeling.flow_action_head",
    "FlowActionHeadConfig": "vla_energy.modeling.flow_action_head",
    "EnergyVLAModel": "vla_energy.modeling.energy_vla_model",
    "global_infonce_loss": "vla_energy.losses.global_infonce",
    "gather_actions": "vla_energy.losses.global_infonce",
    "infonce_loss": "vla_energy.losses.infonce",
    "inbatch_infonce_loss": "vla_energy.losses.infonce",
    "loss_floor": "vla_energy.losses.infonce",
    "ActionBank": "vla_energy.losses.bank",
    "EnergyPlugin": "vla_energy.modeling.energy_plugin",
    "EnergyArguments": "vla_energy.modeling.configuration_energy",
    "EnergyTrainer": "vla_energy.training.trainer",
    "EnergyLossMixin": "vla_energy.training.trainer",
    "EnergyPolicy": "vla_energy.inference.policy",
    "load_backbone": "vla_energy.backbones.loading",
    "build_datasets": "vla_energy.data.pipeline",
    "VLACollator": "vla_energy.data.collator",
    "DataConfig": "vla_energy.data.arguments",
}

__all__ = [
    "ActionBank",
    "ActionHead",
    "ActionHeadConfig",
    "DataConfig",
    "EnergyArguments",
    "EnergyHead",
    "EnergyHeadConfig",
    "EnergyLossMixin",
    "EnergyPlugin",
    "EnergyPolicy",
    "EnergyTrainer",
    "EnergyVLAModel",
    "FlowActionHead",
    "FlowActionHeadConfig",
    "VLACollator",
    "build_datasets",
    "gather_actions",
    "global_infonce_loss",
    "inbatch_infonce_loss",
    "infonce_loss",
    "load_backbone",
    "loss_floor",
]

if TYPE_CHECKING:
    from vla_energy.backbones.loading import load_backbone
    from vla_energy.data.arguments import DataConfig
    from vla_energy.data.collator import VLACollator
    from vla_energy.data.pipeline import build_datasets
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.losses.bank import ActionBank
    from vla_energy.losses.global_infonce import gather_actions, global_infonce_loss
    from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss, loss_floor
    from vla_energy.modeling.action_head import ActionHead, ActionHeadConfig
    from vla_energy.modeling.configuration_energy import EnergyArguments
    from vla_energy.modeling.configuration_energy_head import EnergyHeadConfig
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.modeling.energy_vla_model import EnergyVLAModel
    from vla_energy.modeling.flow_action_head import FlowActionHead, FlowActionHeadConfig
    from vla_energy.modeling.modeling_energy_head import EnergyHead
    from vla_energy.training.trainer import EnergyLossMixin, EnergyTrainer


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vla_energy' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
