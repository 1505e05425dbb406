"""vla_energy: an energy head for HuggingFace VLA finetuning, trained with global InfoNCE."""

from .head import EnergyHead, EnergyHeadConfig
from .losses import inbatch_infonce_loss, infonce_loss, loss_floor

__version__ = "0.1.0"

__all__ = ["EnergyHead", "EnergyHeadConfig", "inbatch_infonce_loss", "infonce_loss", "loss_floor"]
