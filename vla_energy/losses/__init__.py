"""Losses: InfoNCE rows and statistics, the global InfoNCE, negatives, the action bank, temperatures, strategies."""

from vla_energy.losses.bank import ActionBank
from vla_energy.losses.global_infonce import gather_actions, global_infonce_loss
from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss, loss_floor
from vla_energy.losses.policy_l1 import masked_l1

__all__ = ["ActionBank", "gather_actions", "global_infonce_loss", "inbatch_infonce_loss", "infonce_loss",
           "loss_floor", "masked_l1"]
