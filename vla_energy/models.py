"""Loading a backbone and its processor: a tiny offline VLM by name, or any HF vision-language checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbone import add_action_token

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
    torch_dtype: str = "float32",
    seed: int = 0,
) -> LoadedBackbone:
    """`tiny-<kind>` builds an offline random tiny VLM; anything else loads with AutoProcessor / AutoModel."""
    from .testing import make_tiny_vlm, resolve_backbone_name

    kind = resolve_backbone_name(name)
    if kind is not None:
        tiny = make_tiny_vlm(kind, seed=seed)
        proc = tiny.processor
        return LoadedBackbone(tiny.model, proc, proc.action_token, proc.action_token_id, name, kind)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(torch_dtype)
    if dtype is None:
        raise ValueError(f"torch_dtype={torch_dtype!r}, expected float32 | bfloat16 | float16")
    processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
    token_id = add_action_token(processor, model, action_token)
    return LoadedBackbone(model, processor, action_token, token_id, name)
