"""Tiny, randomly initialised, fully offline VLMs and processors for the tests and the demo."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature

__all__ = ["TINY_VLM_KINDS", "TinyVLM", "TinyProcessor", "make_tiny_vlm", "save_tiny_vlm", "load_tiny_vlm",
           "resolve_backbone_name"]

TINY_VLM_KINDS = ("llava", "paligemma")
PAD, BOS, EOS, IMAGE, ACTION = 0, 1, 2, 3, 4
_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"
_UNK = 5 + len(_CHARS)
VOCAB_SIZE = 64


class TinyProcessor:
    """A processor-equivalent: image -> pixel_values, text -> character ids, image tokens inserted up front."""

    action_token = "<act>"
    action_token_id = ACTION
    pad_token_id = PAD
    model_input_names = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, kind: str, image_size: int, num_image_tokens: int) -> None:
        self.kind, self.image_size, self.num_image_tokens = kind, int(image_size), int(num_image_tokens)

    def tokenize(self, text: str) -> list[int]:
        """Characters to ids; every `<act>` becomes one action token."""
        ids: list[int] = []
        for i, part in enumerate(text.split(self.action_token)):
            if i:
                ids.append(ACTION)
            ids += [5 + _CHARS.index(c) if c in _CHARS else _UNK for c in part.lower()]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        names = {PAD: "", BOS: "<s>", EOS: "</s>", IMAGE: "<image>", ACTION: self.action_token, _UNK: "?"}
        return "".join(names.get(int(i), _CHARS[int(i) - 5] if 5 <= int(i) < _UNK else "?") for i in ids)

    def pixels(self, image: Any) -> torch.Tensor:
        """[3, S, S] in [-1, 1]."""
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        arr = np.asarray(img.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float32)
        return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)

    def __call__(self, text: Sequence[str], images: Sequence[Any], return_tensors: str = "pt",
                 padding: bool = True, **_: Any) -> BatchFeature:
        if isinstance(text, str):
            text = [text]
        if len(text) != len(images):
            raise ValueError(f"got {len(text)} texts and {len(images)} images, expected one image per text")
        image = [IMAGE] * self.num_image_tokens
        # PaliGemma's layout puts the image tokens before BOS; Llava's after it.
        prefix = image + [BOS] if self.kind == "paligemma" else [BOS] + image
        rows = [prefix + self.tokenize(t) for t in text]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        pixel_values = torch.stack([self.pixels(im) for im in images])
        features = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
        if self.kind == "paligemma":  # every token is prefix (bidirectional), as PaliGemma treats its prompt
            features["token_type_ids"] = torch.zeros_like(ids)
        return BatchFeature(features)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_size": self.image_size, "num_image_tokens": self.num_image_tokens}


@dataclass
class TinyVLM:
    """A tiny model with its processor."""

    model: nn.Module
    processor: TinyProcessor
    kind: str


def _llava(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, int]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE,
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg), (image_size // patch) ** 2


def _paligemma(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, int]:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    patch = 8
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=image_size, patch_size=patch)
    text = GemmaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                       head_dim=hidden_size // 4, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, projection_dim=hidden_size)
    return PaliGemmaForConditionalGeneration(cfg), (image_size // patch) ** 2


_BUILDERS = {"llava": _llava, "paligemma": _paligemma}


def make_tiny_vlm(kind: str = "llava", seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 4,
                  image_size: int = 32) -> TinyVLM:
    """A deterministic random tiny VLM of `kind` (see TINY_VLM_KINDS)."""
    if kind not in TINY_VLM_KINDS:
        raise ValueError(f"kind={kind!r}, expected one of {TINY_VLM_KINDS}")
    torch.manual_seed(seed)
    model, n_img = _BUILDERS[kind](hidden_size, num_hidden_layers, image_size)
    return TinyVLM(model.eval(), TinyProcessor(kind, image_size, n_img), kind)


def save_tiny_vlm(tiny: TinyVLM, path: str | Path) -> Path:
    """The model (safetensors) and the processor settings as JSON."""
    path = Path(path)
    tiny.model.save_pretrained(path)
    (path / "tiny_processor.json").write_text(json.dumps(tiny.processor.to_dict()))
    return path


def load_tiny_vlm(path: str | Path) -> TinyVLM:
    """What save_tiny_vlm wrote."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    info = json.loads((path / "tiny_processor.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(path)
    return TinyVLM(model.eval(), TinyProcessor(**info), info["kind"])


def resolve_backbone_name(name: str) -> Optional[str]:
    """`tiny-<kind>` -> kind; any other name -> None (a real HF model)."""
    if not name.startswith("tiny-"):
        return None
    kind = name[len("tiny-"):]
    if kind not in TINY_VLM_KINDS:
        raise ValueError(f"backbone={name!r}: tiny backbones are {[f'tiny-{k}' for k in TINY_VLM_KINDS]}")
    return kind
