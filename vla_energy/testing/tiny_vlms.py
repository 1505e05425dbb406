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

TINY_VLM_KINDS = ("llava", "paligemma", "qwen2_vl", "idefics3")
PAD, BOS, EOS, IMAGE, ACTION = 0, 1, 2, 3, 4
_CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,!?-'"
_UNK = 5 + len(_CHARS)
# Family-specific special tokens, in the unused ids above the characters.
FAKE_IMAGE, GLOBAL_IMAGE = 58, 59  # Idefics3: <fake_token_around_image>, <global-img>
VISION_START, VISION_END, VIDEO = 60, 61, 62  # Qwen2-VL: <|vision_start|>, <|vision_end|>, <|video_pad|>
VOCAB_SIZE = 64
assert _UNK < FAKE_IMAGE and VIDEO < VOCAB_SIZE
_NAMES = {PAD: "", BOS: "<s>", EOS: "</s>", IMAGE: "<image>", _UNK: "?",
          FAKE_IMAGE: "<fake_token_around_image>", GLOBAL_IMAGE: "<global-img>",
          VISION_START: "<|vision_start|>", VISION_END: "<|vision_end|>", VIDEO: "<|video_pad|>"}


class TinyProcessor:
    """A processor-equivalent: image -> pixel_values, text -> character ids, image tokens inserted up front.

    Per kind it returns what the real HF processor of that family returns (all rows right-padded):
    llava: input_ids, attention_mask, pixel_values [B,3,S,S]; paligemma: the same plus token_type_ids (all 0);
    qwen2_vl: pixel_values as flattened patches [B*(S/p)^2, 3*t*p*p], image_grid_thw [B,3] = (1, S/p, S/p) and
    mm_token_type_ids (1 at image tokens); idefics3: pixel_values [B,1,3,S,S] and pixel_attention_mask [B,1,S,S].
    """

    action_token = "<act>"
    action_token_id = ACTION
    pad_token_id = PAD

    def __init__(self, kind: str, image_size: int, num_image_tokens: int, patch_size: int = 8,
                 merge_size: int = 2, temporal_patch_size: int = 2) -> None:
        self.kind, self.image_size, self.num_image_tokens = kind, int(image_size), int(num_image_tokens)
        # Qwen2-VL only: the patch geometry of its Qwen2VLImageProcessor.
        self.patch_size, self.merge_size = int(patch_size), int(merge_size)
        self.temporal_patch_size = int(temporal_patch_size)

    @property
    def model_input_names(self) -> tuple[str, ...]:
        """The keys __call__ returns."""
        extra = {"paligemma": ("token_type_ids",), "qwen2_vl": ("image_grid_thw", "mm_token_type_ids"),
                 "idefics3": ("pixel_attention_mask",)}.get(self.kind, ())
        return ("input_ids", "attention_mask", "pixel_values", *extra)

    def tokenize(self, text: str) -> list[int]:
        """Characters to ids; every `<act>` becomes one action token."""
        ids: list[int] = []
        for i, part in enumerate(text.split(self.action_token)):
            if i:
                ids.append(ACTION)
            ids += [5 + _CHARS.index(c) if c in _CHARS else _UNK for c in part.lower()]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        names = {**_NAMES, ACTION: self.action_token}
        return "".join(names.get(int(i), _CHARS[int(i) - 5] if 5 <= int(i) < _UNK else "?") for i in ids)

    def pixels(self, image: Any) -> torch.Tensor:
        """[3, S, S] in [-1, 1]; never exactly 0, as uint8 x maps to x / 127.5 - 1 and no x is 127.5."""
        img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        arr = np.asarray(img.convert("RGB").resize((self.image_size, self.image_size)), dtype=np.float32)
        return torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)

    def image_prefix(self) -> list[int]:
        """The ids before the text, laid out as the family's processor (without a chat template) does."""
        image = [IMAGE] * self.num_image_tokens
        if self.kind == "paligemma":  # image tokens before BOS
            return image + [BOS]
        if self.kind == "qwen2_vl":  # no BOS; the image between vision start/end
            return [VISION_START] + image + [VISION_END]
        if self.kind == "idefics3":  # BOS, then an unsplit image: <fake><global-img><image>*n<fake>
            return [BOS, FAKE_IMAGE, GLOBAL_IMAGE] + image + [FAKE_IMAGE]
        return [BOS] + image  # llava

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B*(S/p)^2, 3*t*p*p]: Qwen2VLImageProcessor's patches (merge windows contiguous, image
        repeated t times per patch)."""
        b, c, s, _ = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        g = s // p
        x = pixels.reshape(b, c, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(b * g * g, c * t * p * p)

    def image_features(self, images: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The image tensors of this kind for one image per row."""
        pixel_values = torch.stack([self.pixels(im) for im in images])
        b, s = len(images), self.image_size
        if self.kind == "qwen2_vl":
            grid = s // self.patch_size
            return {"pixel_values": self.patchify(pixel_values),
                    "image_grid_thw": torch.tensor([[1, grid, grid]] * b, dtype=torch.long)}
        if self.kind == "idefics3":
            # Idefics3 drops images whose pixel_values are all 0 (its image padding); pixels() never makes one.
            if not bool((pixel_values != 0).flatten(1).any(1).all()):
                raise RuntimeError("an all-zero image would be dropped by Idefics3 as padding")
            return {"pixel_values": pixel_values[:, None],
                    "pixel_attention_mask": torch.ones(b, 1, s, s, dtype=torch.long)}
        return {"pixel_values": pixel_values}

    def __call__(self, text: Sequence[str], images: Sequence[Any], return_tensors: str = "pt",
                 padding: bool = True, **_: Any) -> BatchFeature:
        if isinstance(text, str):
            text = [text]
        if len(text) != len(images):
            raise ValueError(f"got {len(text)} texts and {len(images)} images, expected one image per text")
        prefix = self.image_prefix()
        rows = [prefix + self.tokenize(t) for t in text]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        features = {"input_ids": ids, "attention_mask": mask, **self.image_features(images)}
        if self.kind == "paligemma":  # every token is prefix (bidirectional), as PaliGemma treats its prompt
            features["token_type_ids"] = torch.zeros_like(ids)
        if self.kind == "qwen2_vl":  # each token's modality (0 text, 1 image): Qwen2-VL's 3D rope index needs it
            features["mm_token_type_ids"] = (ids == IMAGE).long()
        return BatchFeature(features)

    def to_dict(self) -> dict[str, Any]:
        info = {"kind": self.kind, "image_size": self.image_size, "num_image_tokens": self.num_image_tokens}
        if self.kind == "qwen2_vl":
            info.update(patch_size=self.patch_size, merge_size=self.merge_size,
                        temporal_patch_size=self.temporal_patch_size)
        return info


@dataclass
class TinyVLM:
    """A tiny model with its processor."""

    model: nn.Module
    processor: TinyProcessor
    kind: str


def _llama(hidden_size: int, num_hidden_layers: int) -> Any:
    """A tiny Llama text config over the character vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)


def _llava(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, dict[str, int]]:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    patch = 8
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=patch, projection_dim=32)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama(hidden_size, num_hidden_layers),
                      image_token_index=IMAGE, vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg), {"num_image_tokens": (image_size // patch) ** 2}


def _paligemma(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, dict[str, int]]:
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
    return PaliGemmaForConditionalGeneration(cfg), {"num_image_tokens": (image_size // patch) ** 2}


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dim, in the proportions of Qwen2-VL's [16, 24, 24]."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen2_vl(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, dict[str, int]]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    patch, merge, temporal = 8, 2, 2
    if image_size % (patch * merge):
        raise ValueError(f"image_size={image_size}, expected a multiple of patch * merge = {patch * merge} "
                         "for qwen2_vl")
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2,
                                 patch_size=patch, spatial_merge_size=merge, temporal_patch_size=temporal)
    heads = 4
    text = Qwen2VLTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                             num_hidden_layers=num_hidden_layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=512,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": _mrope_section(hidden_size // heads)},
                             pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    grid = image_size // patch
    return Qwen2VLForConditionalGeneration(cfg), {"num_image_tokens": grid * grid // merge**2, "patch_size": patch,
                                                  "merge_size": merge, "temporal_patch_size": temporal}


def _idefics3(hidden_size: int, num_hidden_layers: int, image_size: int) -> tuple[nn.Module, dict[str, int]]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    patch, scale = 8, 2
    if (image_size // patch) % scale or image_size % patch:
        raise ValueError(f"image_size={image_size}, expected a multiple of patch * scale_factor = {patch * scale} "
                         "for idefics3")
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=image_size, patch_size=patch)
    cfg = Idefics3Config(vision_config=vision, text_config=_llama(hidden_size, num_hidden_layers),
                         image_token_id=IMAGE, scale_factor=scale, pad_token_id=PAD)
    return Idefics3ForConditionalGeneration(cfg), {"num_image_tokens": (image_size // patch) ** 2 // scale**2}


_BUILDERS = {"llava": _llava, "paligemma": _paligemma, "qwen2_vl": _qwen2_vl, "idefics3": _idefics3}


def make_tiny_vlm(kind: str = "llava", seed: int = 0, hidden_size: int = 64, num_hidden_layers: int = 4,
                  image_size: int = 32) -> TinyVLM:
    """A deterministic random tiny VLM of `kind` (see TINY_VLM_KINDS)."""
    if kind not in TINY_VLM_KINDS:
        raise ValueError(f"kind={kind!r}, expected one of {TINY_VLM_KINDS}")
    torch.manual_seed(seed)
    model, settings = _BUILDERS[kind](hidden_size, num_hidden_layers, image_size)
    return TinyVLM(model.eval(), TinyProcessor(kind, image_size, **settings), kind)


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
