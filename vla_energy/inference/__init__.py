"""Inference: EnergyPolicy (save / load, predict), candidate proposal, rerank and refine."""
