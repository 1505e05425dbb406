"""Models users save and load: the energy head and its config, the action heads (L1, flow), the backbone+heads
model."""

from vla_energy.modeling.action_head import ActionHead, ActionHeadConfig
from vla_energy.modeling.configuration_energy_head import EnergyHeadConfig
from vla_energy.modeling.flow_action_head import FlowActionHead, FlowActionHeadConfig
from vla_energy.modeling.modeling_energy_head import EnergyHead
from vla_energy.modeling.state_projector import StateProjector, StateProjectorConfig

__all__ = ["EnergyHead", "EnergyHeadConfig", "ActionHead", "ActionHeadConfig", "FlowActionHead", "FlowActionHeadConfig",
           "StateProjector", "StateProjectorConfig"]
