"""Tiny random checkpoints of real HF VLM classes (model + processor), built offline and deterministically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import transformers

__all__ = ["TINY_FAMILIES", "FORMAT_VERSION", "build_tiny_checkpoint", "ensure_tiny_checkpoint", "tiny_name",
           "tiny_checkpoint_dir", "processor_unavailable"]

TINY_FAMILIES = ("idefics3", "paligemma", "llava", "qwen2_vl", "qwen2_5_vl")
# Bump when the files written by build_tiny_checkpoint change, so cached checkpoints are rebuilt.
FORMAT_VERSION = 1
_COMPLETE = ".tiny_checkpoint.json"
_CHARS = [c for c in string.printable if c not in " \t\n\r\x0b\x0c"]  # the 94 visible ASCII characters
_PATCH = 8
_VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2)

_SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# PaliGemma checkpoints ship no template; this one renders PaliGemma's documented "<image>" + prefix form, so the
# processor finds its image token instead of warning and guessing (it then adds BOS and the trailing newline).
_PALIGEMMA_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}"
)
_QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def processor_unavailable(family: str) -> Optional[str]:
    """Why AutoProcessor cannot load `family`'s processor in this environment, or None when it can."""
    import importlib.util

    if family.startswith("qwen") and importlib.util.find_spec("torchvision") is None:
        return ("transformers' Qwen2VLVideoProcessor requires torchvision: AutoProcessor.from_pretrained raises "
                "ImportError from AutoVideoProcessor for the Qwen-VL families")
    return None


def _byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2 style byte-level BPE, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def _vocab(tokens: list[str]) -> dict[str, int]:
    """Ids in list order."""
    return {tok: i for i, tok in enumerate(tokens)}


def _special(tokens: list[str]) -> list[Any]:
    """Tokens never split nor normalized."""
    from tokenizers import AddedToken

    return [AddedToken(t, special=True, normalized=False) for t in tokens]


_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece-style byte fallback pieces


def _gpt2_tokenizer(base: list[str], added: list[str], **kwargs: Any) -> Any:
    """SmolVLM's GPT2Tokenizer (byte-level BPE): `base` specials, the 256 bytes, then `added` special tokens."""
    from transformers import GPT2Tokenizer

    tok = GPT2Tokenizer(vocab=_vocab(base + _byte_level_alphabet()), merges=[], **kwargs)
    tok.add_special_tokens({"additional_special_tokens": _special(base + added)})
    return tok


def _qwen2_tokenizer() -> Any:
    """Qwen2Tokenizer (byte-level BPE with Qwen's split regex): the 256 bytes, then Qwen2-VL's special tokens."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    tok = Qwen2Tokenizer(vocab=_vocab(_byte_level_alphabet() + specials[:1]), merges=[], unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": _special(specials)})
    return tok


def _idefics3_processor(image_size: int) -> Any:
    """SmolVLM-style: GPT2Tokenizer, Idefics3 image processor (no splitting by default), SmolVLM's template."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    added = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
             + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
    tokenizer = _gpt2_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], added,
                                bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                                unk_token="<|endoftext|>")
    # do_image_splitting=True (a user's choice) cuts an image into at most 2 x 2 tiles plus the global image.
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size},
        do_image_splitting=False, do_pad=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    scale = 2
    image_seq_len = (image_size // _PATCH) ** 2 // scale**2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=_SMOLVLM_TEMPLATE)


def _paligemma_processor(image_size: int) -> Any:
    """GemmaTokenizer (character BPE, byte fallback), SigLIP image processor, a "<image>" + prompt template."""
    from transformers import GemmaTokenizer, PaliGemmaProcessor
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    base = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "\t"] + _BYTE_TOKENS + ["▁"] + _CHARS
    tokenizer = GemmaTokenizer(vocab=_vocab(base), merges=[])
    # PaliGemma's order: Gemma's vocabulary, the <locXXXX>/<segXXX> tokens, then <image> (the processor would add them
    # all anyway).
    tokenizer.add_tokens(EXTRA_TOKENS)
    tokenizer.add_special_tokens({"additional_special_tokens": _special(["<image>"])})
    image_processor = SiglipImageProcessorPil(
        do_resize=True, size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    # PaliGemmaProcessor reads the image sequence length from the image processor, as the hub configs set it.
    image_processor.image_seq_length = (image_size // _PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=_PALIGEMMA_TEMPLATE)


def _llava_processor(image_size: int) -> Any:
    """llava-hf style: LlamaTokenizer (character BPE, byte fallback, <image>, <pad>), CLIP image processor."""
    from transformers import LlamaTokenizer, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    base = ["<unk>", "<s>", "</s>"] + _BYTE_TOKENS + ["▁"] + _CHARS
    tokenizer = LlamaTokenizer(vocab=_vocab(base), merges=[], add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": _special(["<image>"]), "pad_token": "<pad>"})
    image_processor = CLIPImageProcessorPil(
        do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
        crop_size={"height": image_size, "width": image_size})
    # Vision feature strategy "default" drops CLS, so an image gives (S/p)^2 tokens.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=_LLAVA_TEMPLATE)


@dataclass
class _ProcessorParts:
    """A processor's parts, saved in the hub layout of Qwen2-VL repos (no processor instance needed)."""

    tokenizer: Any
    image_processor: Any
    chat_template: str

    def save_pretrained(self, path: Path) -> None:
        """Tokenizer files, preprocessor_config.json and chat_template.jinja, as on the hub."""
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (Path(path) / "chat_template.jinja").write_text(self.chat_template)


def _qwen_processor(family: str, image_size: int) -> _ProcessorParts:
    """Qwen2Tokenizer, Qwen2-VL image processor fixed to image_size^2 pixels, Qwen's chat template."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=_PATCH, temporal_patch_size=2,
        merge_size=2)
    tokenizer = _qwen2_tokenizer()
    tokenizer._set_processor_class("Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor")
    # Parts, not a Qwen2VLProcessor: constructing one checks its video processor against VideoProcessorMixin, which
    # transformers only exposes with torchvision installed. The hub layout (preprocessor_config.json, no video config)
    # lets AutoProcessor derive the video processor from the image settings where torchvision is present.
    return _ProcessorParts(tokenizer, image_processor, _QWEN_VL_TEMPLATE)


def _llama_config(tokenizer: Any, hidden_size: int, num_hidden_layers: int) -> Any:
    """A tiny Llama text config covering every id of `tokenizer`."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def _idefics3_model(processor: Any, hidden_size: int, num_hidden_layers: int, image_size: int) -> Any:
    """Idefics3 (SigLIP-like vision, pixel shuffle 2, Llama text)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    tok = processor.tokenizer
    vision = Idefics3VisionConfig(num_hidden_layers=1, image_size=image_size, patch_size=_PATCH, **_VISION)
    cfg = Idefics3Config(vision_config=vision, text_config=_llama_config(tok, hidden_size, num_hidden_layers),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2,
                         pad_token_id=tok.pad_token_id)
    return Idefics3ForConditionalGeneration(cfg)


def _paligemma_model(processor: Any, hidden_size: int, num_hidden_layers: int, image_size: int) -> Any:
    """PaliGemma (SigLIP vision, Gemma text)."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        SiglipVisionConfig,
    )

    tok = processor.tokenizer
    vision = SiglipVisionConfig(num_hidden_layers=1, image_size=image_size, patch_size=_PATCH, **_VISION)
    # len(tok) includes the 1152 <locXXXX>/<segXXX> tokens PaliGemmaProcessor always adds, as real vocabs do.
    text = GemmaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=4,
                       head_dim=hidden_size // 4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                          projection_dim=hidden_size)
    return PaliGemmaForConditionalGeneration(cfg)


def _llava_model(processor: Any, hidden_size: int, num_hidden_layers: int, image_size: int) -> Any:
    """LLaVA (CLIP vision, Llama text), configured like llava-hf checkpoints."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    # Two layers, so vision_feature_layer=-2 (llava-hf's choice) selects a real, non-final layer.
    vision = CLIPVisionConfig(num_hidden_layers=2, image_size=image_size, patch_size=_PATCH, projection_dim=32,
                              **_VISION)
    cfg = LlavaConfig(vision_config=vision, text_config=_llama_config(tok, hidden_size, num_hidden_layers),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=tok.pad_token_id)
    return LlavaForConditionalGeneration(cfg)


def _mrope_section(head_dim: int) -> list[int]:
    """Temporal/height/width split of the rotary half-dim, in the proportions of Qwen2-VL's [16, 24, 24]."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text_kwargs(tok: Any, hidden_size: int, num_hidden_layers: int) -> dict[str, Any]:
    """Text-config arguments shared by the Qwen families."""
    heads = 4
    return dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": _mrope_section(hidden_size // heads)},
                pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)


def _qwen_ids(tok: Any) -> dict[str, int]:
    """The vision special-token ids a Qwen VL config needs."""
    return {"image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def _qwen2_vl_model(processor: Any, hidden_size: int, num_hidden_layers: int, image_size: int) -> Any:
    """Qwen2-VL (patch 8, merge 2, M-RoPE text)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

    tok = processor.tokenizer
    vision = Qwen2VLVisionConfig(depth=1, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2,
                                 patch_size=_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    text = Qwen2VLTextConfig(**_qwen_text_kwargs(tok, hidden_size, num_hidden_layers))
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tok)))


def _qwen2_5_vl_model(processor: Any, hidden_size: int, num_hidden_layers: int, image_size: int) -> Any:
    """Qwen2.5-VL (windowed + full-attention vision blocks, M-RoPE text)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    tok = processor.tokenizer
    # Two blocks: block 0 windowed (windows of 2 x 2 merged tokens), block 1 full attention, as Qwen2.5-VL mixes them.
    vision = Qwen2_5_VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                    out_hidden_size=hidden_size, patch_size=_PATCH, spatial_merge_size=2,
                                    temporal_patch_size=2, window_size=4 * _PATCH, fullatt_block_indexes=[1])
    text = Qwen2_5_VLTextConfig(**_qwen_text_kwargs(tok, hidden_size, num_hidden_layers))
    return Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_qwen_ids(tok)))


_PROCESSORS: dict[str, Callable[[int], Any]] = {
    "idefics3": _idefics3_processor, "paligemma": _paligemma_processor, "llava": _llava_processor,
    "qwen2_vl": lambda size: _qwen_processor("qwen2_vl", size),
    "qwen2_5_vl": lambda size: _qwen_processor("qwen2_5_vl", size)}
_MODELS: dict[str, Callable[..., Any]] = {
    "idefics3": _idefics3_model, "paligemma": _paligemma_model, "llava": _llava_model,
    "qwen2_vl": _qwen2_vl_model, "qwen2_5_vl": _qwen2_5_vl_model}


def _check(family: str, image_size: int) -> None:
    """Reject an unknown family or an image size the patch geometry cannot tile."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"family={family!r}, expected one of {TINY_FAMILIES}")
    if image_size <= 0 or image_size % (2 * _PATCH):
        raise ValueError(f"image_size={image_size}, expected a positive multiple of {2 * _PATCH} "
                         f"(patch {_PATCH} x merge/scale 2)")


def build_tiny_checkpoint(family: str, path: Union[str, Path], *, seed: int = 0, hidden_size: int = 64,
                          num_hidden_layers: int = 4, image_size: int = 32) -> Path:
    """Write a tiny random `family` model (safetensors) and its real processor to `path`; returns `path`."""
    _check(family, image_size)
    if hidden_size % 8:
        raise ValueError(f"hidden_size={hidden_size}, expected a multiple of 8 (4 heads, even rotary halves)")
    path = Path(path)
    processor = _PROCESSORS[family](image_size)
    with torch.random.fork_rng(devices=[]):  # seed the weights without resetting the caller's RNG
        torch.manual_seed(seed)
        model = _MODELS[family](processor, hidden_size, num_hidden_layers, image_size).eval()
    # Under a process group save_pretrained writes weights on global rank 0 only; a cache is built by whichever
    # process misses it (every node has its own), so this process writes the whole checkpoint.
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(path)
    processor.save_pretrained(path)
    missing = [name for name in ("config.json", "model.safetensors") if not (path / name).is_file()]
    if missing:
        raise RuntimeError(f"building the tiny {family} checkpoint in {path} left out {missing}")
    return path


def _arguments(family: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of a build, defaults filled in, plus what decides the file format."""
    args = {"seed": 0, "hidden_size": 64, "num_hidden_layers": 4, "image_size": 32}
    unknown = set(kwargs) - set(args)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}, expected some of {sorted(args)}")
    args.update(kwargs)
    return {"family": family, **args, "format_version": FORMAT_VERSION, "transformers": transformers.__version__}


def tiny_checkpoint_dir(family: str, cache_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> Path:
    """Where ensure_tiny_checkpoint keeps the checkpoint of these arguments."""
    if cache_dir is None:
        root = os.environ.get("VLA_ENERGY_CACHE")
        cache_dir = Path(root) if root else Path.home() / ".cache" / "vla_energy"
        cache_dir = cache_dir / "tiny_checkpoints"
    key = json.dumps(_arguments(family, kwargs), sort_keys=True)
    return Path(cache_dir) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def tiny_name(path: Union[str, Path]) -> Optional[str]:
    """`tiny-<family>` when `path` is the default cached checkpoint a tiny name loads (so a policy records the name,
    which loads anywhere, not this machine's cache path); else None."""
    path = Path(path).resolve()
    for family in TINY_FAMILIES:
        if path == tiny_checkpoint_dir(family).resolve():
            return f"tiny-{family}"
    return None


def ensure_tiny_checkpoint(family: str, cache_dir: Optional[Union[str, Path]] = None, **kwargs: Any) -> Path:
    """The cached checkpoint of these arguments, built (atomically, race-safe) on first use."""
    _check(family, kwargs.get("image_size", 32))
    final = tiny_checkpoint_dir(family, cache_dir, **kwargs)
    if (final / _COMPLETE).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be readable like a hub cache
    try:
        build_tiny_checkpoint(family, tmp, **kwargs)
        (tmp / _COMPLETE).write_text(json.dumps(_arguments(family, kwargs), sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its complete build into place first (rename onto a non-empty dir fails).
            if not (final / _COMPLETE).is_file():
                raise RuntimeError(f"{final} exists but is not a complete tiny checkpoint; delete it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
