"""Backbones: loading (AutoProcessor / AutoModel*), hidden-state readout, the action token, LoRA, parameter groups."""
