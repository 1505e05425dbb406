"""Tiny real-format checkpoints: real classes through the Auto* loaders, prompts, forwards, action token, cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
from transformers.utils import logging as hf_logging

from vla_energy.backbones.action_token import add_action_token
from vla_energy.backbones.tiny import TINY_FAMILIES, build_tiny_checkpoint, ensure_tiny_checkpoint

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
QWEN = ("qwen2_vl", "qwen2_5_vl")
CLASSES = {
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor", "Idefics3ImageProcessor", "<image>"),
    "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor", "SiglipImageProcessor", "<image>"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor", "CLIPImageProcessor", "<image>"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessor", "<|image_pad|>"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2VLImageProcessor",
                   "<|image_pad|>"),
}
# Image tokens per 32 x 32 image: Idefics3 (32/8)^2 / 2^2, PaliGemma and LLaVA (32/8)^2, Qwen (32/8)^2 / 2^2.
IMAGE_TOKENS = {"idefics3": 4, "paligemma": 16, "llava": 16, "qwen2_vl": 4, "qwen2_5_vl": 4}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "pick up the red block"}]}]
NO_TORCHVISION = ("transformers' Qwen2VLVideoProcessor requires torchvision: AutoProcessor.from_pretrained raises "
                  "ImportError from AutoVideoProcessor, and Qwen2VLProcessor(...) itself raises AttributeError "
                  "(VIDEO_PROCESSOR_MAPPING is a torchvision dummy) in its sub-processor class check")


def needs_processor(family: str) -> None:
    """Skip a Qwen family's processor test where transformers cannot build a Qwen processor."""
    if family in QWEN and not HAS_TORCHVISION:
        pytest.skip(NO_TORCHVISION)


def image(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per family, shared by the module's tests (they do not write into it)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_checkpoint(family, root / family) for family in TINY_FAMILIES}


def forward(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True)


def qwen_inputs(path: Path, texts: list[str], images: list[Image.Image], tokenizer: Any) -> dict[str, torch.Tensor]:
    """What Qwen2VLProcessor returns, from the saved tokenizer and image processor (no torchvision needed)."""
    image_processor = AutoImageProcessor.from_pretrained(path)
    pixels = image_processor(images=images, return_tensors="pt")
    counts = (pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist()
    expanded = [t.replace("<|image_pad|>", "<|image_pad|>" * n) for t, n in zip(texts, counts)]
    enc = tokenizer(expanded, return_tensors="pt", padding=True)
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {**enc, **pixels, "mm_token_type_ids": (enc["input_ids"] == image_id).long()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_auto_processor_and_model_forward(built: dict[str, Path], family: str) -> None:
    needs_processor(family)
    model_cls, processor_cls, image_processor_cls, image_token = CLASSES[family]
    processor = AutoProcessor.from_pretrained(built[family])
    model = AutoModelForImageTextToText.from_pretrained(built[family]).eval()
    assert type(model).__name__ == model_cls and type(processor).__name__ == processor_cls
    assert type(processor.image_processor).__name__ in (image_processor_cls, image_processor_cls + "Pil")
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt.count(image_token) == 1 and "pick up the red block" in prompt
    inputs = processor(text=[prompt, prompt + " now"], images=[image(0), image(1)], return_tensors="pt",
                       padding=True)
    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [IMAGE_TOKENS[family]] * 2
    out = forward(model, inputs)
    cfg = model.config.get_text_config()
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1 == 5
    assert all(h.shape == (2, inputs["input_ids"].shape[1], cfg.hidden_size) for h in out.hidden_states)


@pytest.mark.parametrize("family", QWEN)
def test_qwen_parts_load_and_forward(built: dict[str, Path], family: str) -> None:
    model_cls, _, image_processor_cls, image_token = CLASSES[family]
    path = built[family]
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert type(model).__name__ == model_cls and type(tokenizer).__name__ == "Qwen2Tokenizer"
    assert type(AutoImageProcessor.from_pretrained(path)).__name__ in (image_processor_cls, image_processor_cls + "Pil")
    template = (path / "chat_template.jinja").read_text()
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False,
                                           chat_template=template)
    assert "<|vision_start|><|image_pad|><|vision_end|>pick up the red block<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = qwen_inputs(path, [prompt, prompt + " now"], [image(0), image(1)], tokenizer)
    assert (inputs["mm_token_type_ids"].sum(1) == IMAGE_TOKENS[family]).all()
    out = forward(model, inputs)
    assert len(out.hidden_states) == 5
    assert all(h.shape == (2, inputs["input_ids"].shape[1], 64) for h in out.hidden_states)


def test_idefics3_image_splitting_on_request(built: dict[str, Path]) -> None:
    processor = AutoProcessor.from_pretrained(built["idefics3"])
    model = AutoModelForImageTextToText.from_pretrained(built["idefics3"]).eval()
    assert processor.image_processor.do_image_splitting is False
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[image(0, (48, 64))], do_image_splitting=True, return_tensors="pt")
    tiles = inputs["pixel_values"].shape[1]
    assert tiles > 1  # the 2 x 2 tiles (or fewer, by aspect) plus the global image
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 4 * tiles
    assert forward(model, inputs).hidden_states[-1].shape[:2] == inputs["input_ids"].shape


def test_paligemma_template_has_image_token_so_no_warning(built: dict[str, Path],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    processor = AutoProcessor.from_pretrained(built["paligemma"])
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == "<image>pick up the red block"
    warned = []
    for text in ([prompt], ["pick up the red block"]):  # the second, without <image>, shows the check sees the warning
        caplog.clear()
        hf_logging.enable_propagation()  # transformers' loggers do not propagate to caplog's root handler by default
        try:
            with caplog.at_level("WARNING"):
                inputs = processor(text=text, images=[image()], return_tensors="pt")
        finally:
            hf_logging.disable_propagation()
        warned.append("`<image>` tokens" in caplog.text)
    assert warned == [False, True]
    inputs = processor(text=[prompt], images=[image()], return_tensors="pt")
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0])
    assert tokens[:17] == ["<image>"] * 16 + ["<bos>"] and tokens[-1] == "\n"


def test_llava_uses_second_to_last_vision_layer(built: dict[str, Path]) -> None:
    model = AutoModelForImageTextToText.from_pretrained(built["llava"])
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.vision_config.num_hidden_layers == 2


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_build_is_deterministic(tmp_path: Path, family: str) -> None:
    a = build_tiny_checkpoint(family, tmp_path / "a", seed=3)
    b = build_tiny_checkpoint(family, tmp_path / "b", seed=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_checkpoint(family, tmp_path / "c", seed=4)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_action_token_is_one_id(tmp_path: Path, family: str) -> None:
    path = build_tiny_checkpoint(family, tmp_path / family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor_loadable = family not in QWEN or HAS_TORCHVISION
    processor = AutoProcessor.from_pretrained(path) if processor_loadable else AutoTokenizer.from_pretrained(path)
    tokenizer = getattr(processor, "tokenizer", processor)
    assert "<|action|>" not in tokenizer.get_vocab()  # real checkpoints have no action token
    before = len(tokenizer)
    action_id = add_action_token(processor, model, "<|action|>")
    assert action_id == before and len(tokenizer) == before + 1
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    n = 5
    if processor_loadable:
        prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt + "<|action|>" * n], images=[image()], return_tensors="pt")
    else:
        template = (path / "chat_template.jinja").read_text()
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False,
                                               chat_template=template)
        inputs = qwen_inputs(path, [prompt + "<|action|>" * n], [image()], tokenizer)
    ids = inputs["input_ids"][0]
    assert int((ids == action_id).sum()) == n
    positions = (ids == action_id).nonzero().flatten()
    assert (positions.diff() == 1).all()  # one id per placeholder, nothing between them
    assert tokenizer("go<|action|>go", add_special_tokens=False)["input_ids"].count(action_id) == 1
    assert forward(model, inputs).hidden_states[-1].shape[1] == ids.shape[0]


def test_ensure_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLA_ENERGY_CACHE", str(tmp_path / "env"))
    first = ensure_tiny_checkpoint("llava")
    assert first.parent == tmp_path / "env" / "tiny_checkpoints" and first.name.startswith("llava-")
    stamp = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    assert ensure_tiny_checkpoint("llava") == first
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dirs left behind
    other = ensure_tiny_checkpoint("llava", cache_dir=tmp_path / "explicit", seed=1)
    assert other.parent == tmp_path / "explicit" and other.name != first.name
    AutoModelForImageTextToText.from_pretrained(other)
    AutoProcessor.from_pretrained(other)
