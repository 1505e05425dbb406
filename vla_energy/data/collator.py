"""VLACollator: examples -> backbone inputs (processor) with H action placeholders, plus the action targets."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image as PILImage

__all__ = ["VLACollator", "to_pil_image"]

# Qwen-VL processors expand <|image_pad|> only between the vision start/end tokens their chat template writes.
_QWEN_VL_PROCESSORS = ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


def to_pil_image(value: Any, key: str = "image") -> PILImage.Image:
    """An RGB PIL image from a PIL image, a {bytes, path} dict (undecoded datasets.Image) or an HxWx3 array."""
    if isinstance(value, PILImage.Image):
        return value.convert("RGB") if value.mode != "RGB" else value
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return PILImage.open(io.BytesIO(value["bytes"])).convert("RGB")
        return PILImage.open(value["path"]).convert("RGB")
    arr = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        return PILImage.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).convert("RGB")
    raise ValueError(f"{key} has type {type(value).__name__} and shape {getattr(arr, 'shape', None)}, "
                     "expected a PIL image, a {bytes, path} dict or an (H, W, C) array")


class VLACollator:
    """Batch examples for a VLA backbone: prompt = instruction + action_token * horizon, through the processor.

    Returns the processor's tensors plus actions float32 [B,H,Da], action_mask bool [B,H], sample_id long [B],
    episode_index long [B] (and state float32 [B,Ds] when the examples have it). Picklable, so it runs in
    DataLoader workers. A processor with a chat template gets a user message (one image entry per camera +
    instruction) through apply_chat_template(add_generation_prompt=True), then the placeholders.

    Cameras: `image_key` names one column, or several in camera order (e.g. LeRobot's
    ["observation.images.top", "observation.images.wrist"]); a column may also hold a list of images. With
    one image per sample the processor gets a flat list of images, with several a list per sample.
    `state_key` names the state vector (e.g. "observation.state"), `instruction_key` the text (e.g. "task").
    Without a chat template the prompt starts with the family's image token(s), one per camera. The placeholders
    are always the last text. `processor_kwargs` go to every processor call (e.g. do_image_splitting,
    min_pixels / max_pixels).

    `state_token` (use_state, e.g. "<|state|>"): when every example has a state, each prompt gets the token once,
    right before the placeholders; the model replaces its input embedding with the projected state.
    """

    def __init__(
        self,
        processor: Any,
        horizon: int,
        action_token: Optional[str] = None,
        image_key: Union[str, Sequence[str]] = "image",
        instruction_key: str = "instruction",
        use_chat_template: Optional[bool] = None,
        state_key: str = "state",
        processor_kwargs: Optional[Mapping[str, Any]] = None,
        state_token: Optional[str] = None,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon={horizon}, expected >= 1")
        token = action_token if action_token is not None else getattr(processor, "action_token", None)
        if not token:
            raise ValueError(
                "action_token is None and the processor has no `action_token`: pass the placeholder token "
                "added to the tokenizer (e.g. '<|action|>', see vla_energy.backbones.action_token.add_action_token)"
            )
        self.processor = processor
        self.horizon = horizon
        self.action_token = token
        self.image_key = image_key
        self.image_keys = [image_key] if isinstance(image_key, str) else list(image_key)
        if not self.image_keys:
            raise ValueError("image_key names no column")
        self.instruction_key = instruction_key
        self.state_key = state_key
        if use_chat_template is None:
            use_chat_template = bool(getattr(processor, "chat_template", None)) and hasattr(
                processor, "apply_chat_template")
        self.use_chat_template = use_chat_template
        reserved = {"text", "images", "return_tensors", "padding"} & set(processor_kwargs or {})
        if reserved:
            raise ValueError(f"processor_kwargs sets {sorted(reserved)}, which the collator sets itself")
        self.processor_kwargs = dict(processor_kwargs or {})
        tokenizer = getattr(processor, "tokenizer", None)
        self.action_token_id = None if tokenizer is None else tokenizer.convert_tokens_to_ids(token)
        self.state_token = state_token or None
        self.state_token_id = None if tokenizer is None or self.state_token is None else \
            tokenizer.convert_tokens_to_ids(self.state_token)

    @property
    def placeholders(self) -> str:
        """The H action placeholders appended to every prompt."""
        return self.action_token * self.horizon

    def prompt(self, instruction: str, num_images: int = 1, with_state: bool = False) -> str:
        """Text given to the processor for one example with `num_images` camera images (and the state token)."""
        tail = (self.state_token if with_state and self.state_token else "") + self.placeholders
        if self.use_chat_template:
            images = [{"type": "image"} for _ in range(num_images)]
            messages = [{"role": "user", "content": [*images, {"type": "text", "text": instruction}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text + tail
        return self.image_prompt() * num_images + instruction + tail

    def image_prompt(self) -> str:
        """The image part of a prompt without chat template for one image, as the family's processor expects it."""
        if type(self.processor).__name__ in _QWEN_VL_PROCESSORS:
            return "<|vision_start|>" + self.processor.image_token + "<|vision_end|>"
        # Processors that expand an image token (LLaVA, PaliGemma, Idefics3) need one; others (OpenVLA/Prismatic)
        # insert the image inside the model's forward.
        return getattr(self.processor, "image_token", None) or ""

    def _check_placeholders(self, input_ids: torch.Tensor) -> None:
        """Every row must hold exactly `horizon` action ids: a processor may drop, split or truncate them."""
        if self.action_token_id is None:
            return
        counts = (input_ids == self.action_token_id).sum(dim=1)
        if bool((counts != self.horizon).any()):
            raise ValueError(
                f"{type(self.processor).__name__} turned the {self.horizon} placeholders action_token="
                f"{self.action_token!r} into {counts.tolist()} ids {self.action_token_id} per row: the tokenizer must "
                "keep it as one special token (add_action_token) and the processor must not truncate the prompt "
                "(check processor_kwargs / max_length)"
            )

    def _check_state_token(self, input_ids: torch.Tensor) -> None:
        """Every row must hold the state token exactly once."""
        if self.state_token_id is None:
            return
        counts = (input_ids == self.state_token_id).sum(dim=1)
        if bool((counts != 1).any()):
            raise ValueError(
                f"{type(self.processor).__name__} turned state_token={self.state_token!r} into {counts.tolist()} ids "
                f"{self.state_token_id} per row, expected one: add it as a special token (add_state_token)"
            )

    def _stack(self, examples: Sequence[Mapping[str, Any]], key: str, dtype: type, trailing: tuple) -> np.ndarray:
        """Stack one field of all examples; `trailing` is the per-example shape (a str names a free size)."""
        try:
            arr = np.stack([np.asarray(ex[key], dtype=dtype) for ex in examples])
        except KeyError:
            raise ValueError(
                f"example has no {key!r}; its keys are {sorted(examples[0])} (build the dataset with build_datasets "
                "or add_action_chunks)"
            ) from None
        except ValueError as e:
            shapes = sorted({np.asarray(ex[key]).shape for ex in examples})
            raise ValueError(f"{key} has shapes {shapes} across the batch, expected one shape") from e
        if len(trailing) != arr.ndim - 1 or any(isinstance(t, int) and t != s for t, s in zip(trailing, arr.shape[1:])):
            want = ", ".join(["B", *(f"H={t}" if isinstance(t, int) else t for t in trailing)])
            raise ValueError(f"{key} has shape {tuple(arr.shape)}, expected ({want})")
        return arr

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        for key in (*self.image_keys, self.instruction_key):
            if key not in examples[0]:
                raise ValueError(f"example has no {key!r}; its keys are {sorted(examples[0])}")
        has_state = all(ex.get(self.state_key) is not None for ex in examples)
        batch = self.model_inputs([self.images_of(ex) for ex in examples],
                                  [str(ex[self.instruction_key]) for ex in examples],
                                  with_state=has_state and self.state_token is not None)
        actions = self._stack(examples, "actions", np.float32, (self.horizon, "Da"))
        batch["actions"] = torch.from_numpy(actions)
        if "action_mask" in examples[0]:
            batch["action_mask"] = torch.from_numpy(self._stack(examples, "action_mask", np.bool_, (self.horizon,)))
        else:
            batch["action_mask"] = torch.ones(actions.shape[:2], dtype=torch.bool)
        batch["sample_id"] = torch.from_numpy(self._stack(examples, "sample_id", np.int64, ()))
        batch["episode_index"] = torch.from_numpy(self._stack(examples, "episode_index", np.int64, ()))
        if has_state:
            batch["state"] = torch.from_numpy(self._stack(examples, self.state_key, np.float32, ("Ds",)))
        return batch

    def model_inputs(self, images: Sequence[Sequence[PILImage.Image]], instructions: Sequence[str],
                     with_state: bool = False) -> dict[str, torch.Tensor]:
        """The backbone's inputs for each sample's camera images (in camera order) and instruction, with the state
        token when `with_state`: what training and EnergyPolicy both feed the model."""
        counts = {len(ims) for ims in images}
        if len(counts) != 1:
            raise ValueError(f"samples have {sorted(counts)} images each, expected one camera count per batch")
        texts = [self.prompt(text, len(ims), with_state) for text, ims in zip(instructions, images)]
        flat = [ims[0] for ims in images] if counts == {1} else [list(ims) for ims in images]
        inputs = self.processor(text=texts, images=flat, return_tensors="pt", padding=True, **self.processor_kwargs)
        self._check_placeholders(inputs["input_ids"])
        if with_state:
            self._check_state_token(inputs["input_ids"])
        # PaliGemma's processor returns LM labels; with them the backbone would compute a vocabulary-wide loss.
        return {k: v for k, v in inputs.items() if k != "labels"}

    def images_of(self, example: Mapping[str, Any]) -> list[PILImage.Image]:
        """The example's camera images in camera order (a column holding a list contributes all of them)."""
        out = []
        for key in self.image_keys:
            value = example[key]
            values = value if isinstance(value, (list, tuple)) else [value]
            out.extend(to_pil_image(v, key) for v in values)
        if not out:
            raise ValueError(f"example has no image in {self.image_keys}")
        return out
