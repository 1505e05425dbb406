"""Loading a backbone and its processor: any HF vision-language checkpoint, or a tiny offline one by name."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vla_energy.backbones.action_token import add_action_token

__all__ = ["LoadedBackbone", "load_backbone", "check_backbone_available", "resolve_backbone", "resolve_dtype", "TINY_PREFIX", "DTYPES"]

TINY_PREFIX = "tiny-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedBackbone:
    """A backbone, its processor and the action placeholder token."""

    model: nn.Module
    processor: Any
    action_token: str
    action_token_id: int
    name: str


def resolve_dtype(dtype: str) -> torch.dtype:
    """`auto` -> bfloat16 with CUDA, float32 without; else float32 | bfloat16 | float16."""
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}, expected auto | {' | '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_backbone(name: str) -> str:
    """`tiny-<family>` -> its real-format checkpoint directory (built into $VLA_ENERGY_CACHE once); else `name`."""
    if not name.startswith(TINY_PREFIX):
        return name
    # Only the tiny names build checkpoints (transformers' model classes of five families).
    from vla_energy.backbones.tiny import TINY_FAMILIES, ensure_tiny_checkpoint

    family = name[len(TINY_PREFIX):]
    if family not in TINY_FAMILIES:
        raise ValueError(f"backbone={name!r}: the tiny backbones are {[TINY_PREFIX + f for f in TINY_FAMILIES]}")
    return str(ensure_tiny_checkpoint(family))


def _offline_hint(name: str) -> str | None:
    """Why `name` cannot load offline and how to fix it, when offline mode is the reason; else None."""
    from huggingface_hub import constants, try_to_load_from_cache

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if not offline or Path(name).exists():
        return None
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None  # cached: the error is about something else
    except ValueError:  # not a valid repo id
        pass
    return (f"backbone={name!r} is not a local directory nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            "and HF_HUB_OFFLINE=1 forbids downloading it: download it once with network access "
            f"(`hf download {name}`), or unset HF_HUB_OFFLINE, or pass a local checkpoint directory")


def check_backbone_available(name: str, hub: bool = True) -> None:
    """Raise before any loading when `name` cannot load: a path (/, ./, ../, ~) that is no directory or a directory
    without config.json (FileNotFoundError), or, offline, a name neither local nor in the Hugging Face cache (OSError)."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"backbone={name!r}: no such checkpoint directory")
    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"backbone={name!r} is a directory without config.json: not a checkpoint saved by "
                                "save_pretrained")
    hint = _offline_hint(name) if hub else None
    if hint is not None:
        raise OSError(hint)


def load_backbone(
    name: str,
    trust_remote_code: bool = False,
    action_token: str = "<|action|>",
    dtype: str = "auto",
) -> LoadedBackbone:
    """AutoProcessor + AutoModelForImageTextToText + the action token; `tiny-<family>` names a tiny local checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = resolve_dtype(dtype)
    path = resolve_backbone(name)
    check_backbone_available(path, hub=False)  # a hub name's offline problem is explained where loading fails
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                            trust_remote_code=trust_remote_code)
    except OSError as e:
        hint = _offline_hint(path)
        if hint is None:
            raise
        raise OSError(hint) from e
    token_id = add_action_token(processor, model, action_token)
    return LoadedBackbone(model, processor, action_token, token_id, name)
