"""EnergyPolicy: a saved policy (backbone, adapter, heads, normalization) that predicts action chunks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_energy.backbones.readout import backbone_forward
from vla_energy.inference.rerank import PREDICT_MODES, propose_candidates, refine, rerank

__all__ = ["EnergyPolicy"]


class EnergyPolicy:
    """A saved policy (backbone + adapter, action head, energy head, normalization) that predicts action chunks."""

    def __init__(self, loaded: Any, device: str | torch.device = "cpu") -> None:
        from vla_energy.data import VLACollator

        self.loaded = loaded
        self.device = torch.device(device)
        plugin = loaded.plugin
        self.collator = VLACollator(loaded.processor, horizon=plugin.horizon,
                                    action_token=loaded.info["action_token"])

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, device: str | torch.device = "cpu",
                        trust_remote_code: bool = False) -> EnergyPolicy:
        """Load from a run directory (runs/<name>/) or its model/ directory."""
        from vla_energy.inference.serialization import load_policy

        return cls(load_policy(run_dir, device=device, trust_remote_code=trust_remote_code), device)

    @property
    def plugin(self):
        return self.loaded.plugin

    @torch.no_grad()
    def encode(self, images: Sequence[Any], instructions: Sequence[str]):
        """Backbone readout for raw images + instructions."""
        from vla_energy.data import to_pil_image

        if len(images) != len(instructions):
            raise ValueError(f"got {len(images)} images and {len(instructions)} instructions, expected as many")
        texts = [self.collator.prompt(t) for t in instructions]
        pil = [to_pil_image(im) for im in images]
        inputs = self.loaded.processor(text=texts, images=pil, return_tensors="pt", padding=True)
        batch = {k: v.to(self.device) for k, v in dict(inputs).items() if k != "labels"}  # PaliGemma adds labels
        outputs = backbone_forward(self.loaded.backbone, batch)
        return self.plugin.read(outputs, batch)

    def predict(
        self,
        images: Sequence[Any],
        instructions: Sequence[str],
        mode: str = "policy",
        num_samples: int = 16,
        sigma: float = 0.1,
        refine_steps: int = 10,
        step_size: float = 0.05,
        seed: int = 0,
        normalized: bool = False,
    ) -> np.ndarray:
        """Action chunks [B,H,Da] (unnormalized unless normalized=True) from the policy, rerank or refine."""
        if mode not in PREDICT_MODES:
            raise ValueError(f"mode={mode!r}, expected one of {PREDICT_MODES}")
        readout = self.encode(images, instructions)
        with torch.no_grad():
            policy, layers = self.plugin.predict_actions(readout)
        head, ctx, cmask = self.plugin.energy_head, readout.context, readout.context_mask
        chunk = policy
        if mode == "rerank":
            g = torch.Generator(device=policy.device).manual_seed(seed)
            cands, _ = propose_candidates(policy, layers[:-1], num_samples, sigma, generator=g)
            chunk = rerank(head, ctx, cands, context_mask=cmask).best
        elif mode == "refine":
            chunk, _ = refine(head, ctx, policy, refine_steps, step_size, context_mask=cmask)
        out = chunk.float().cpu().numpy()
        if normalized or self.loaded.norm_stats is None:
            return out
        return self.loaded.norm_stats.unnormalize(out)
