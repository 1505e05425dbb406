"""Loading a backbone and its processor: a tiny offline VLM by name, or any HF vision-language checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vla_energy.backbones.action_token import add_action_token

__all__ = ["LoadedBackbone", "load_backbone"]


@dataclass
class LoadedBackbone:
    """A backbone, its processor and the action placeholder token."""

    model: nn.Module
    processor: Any
    action_token: str
    action_token_id: int
    name: str
    tiny_kind: str | None = None


def load_backbone(
    name: str,
    trust_remote_code: bool = False,
    action_token: str = "<|action|>",
    dtype: str = "float32",
    seed: int = 0,
) -> LoadedBackbone:
    """`tiny-<kind>` builds an offline random tiny VLM; anything else loads with AutoProcessor / AutoModel."""
    if name.startswith("tiny-"):  # the test/demo backbones: only then is vla_energy.testing imported
        from vla_energy.testing.tiny_vlms import make_tiny_vlm, resolve_backbone_name

        kind = resolve_backbone_name(name)
        tiny = make_tiny_vlm(kind, seed=seed)
        proc = tiny.processor
        return LoadedBackbone(tiny.model, proc, proc.action_token, proc.action_token_id, name, kind)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype={dtype!r}, expected float32 | bfloat16 | float16")
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    token_id = add_action_token(processor, model, action_token)
    return LoadedBackbone(model, processor, action_token, token_id, name)
