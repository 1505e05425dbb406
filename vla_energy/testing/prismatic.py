"""A tiny model built like OpenVLA / Prismatic: image patch embeddings inserted after BOS inside its forward."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["TinyPrismaticConfig", "TinyPrismaticForConditionalGeneration"]


class TinyPrismaticConfig(PretrainedConfig):
    """Vision patch size and width, and the Llama text config."""

    model_type = "tiny_prismatic"
    sub_configs = {"text_config": LlamaConfig}

    def __init__(self, text_config: Optional[dict[str, Any]] = None, image_size: int = 32, patch_size: int = 8,
                 vision_hidden_size: int = 32, **kwargs: Any) -> None:
        self.text_config = LlamaConfig(**(text_config or {})) if not isinstance(text_config, LlamaConfig) \
            else text_config
        self.image_size, self.patch_size, self.vision_hidden_size = image_size, patch_size, vision_hidden_size
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Patch embeddings inserted per image."""
        return (self.image_size // self.patch_size) ** 2


class TinyPrismaticForConditionalGeneration(PreTrainedModel):
    """Patchify -> MLP projector -> [BOS, patches, rest of the prompt] -> Llama; no image token in input_ids."""

    config_class = TinyPrismaticConfig
    base_model_prefix = "prismatic"

    def __init__(self, config: TinyPrismaticConfig) -> None:
        super().__init__(config)
        d = config.text_config.hidden_size
        self.vision_backbone = nn.Conv2d(3, config.vision_hidden_size, config.patch_size, stride=config.patch_size)
        self.projector = nn.Sequential(nn.Linear(config.vision_hidden_size, d), nn.GELU(), nn.Linear(d, d))
        self.language_model = LlamaForCausalLM(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def forward(self, input_ids: Tensor, pixel_values: Tensor, attention_mask: Optional[Tensor] = None,
                output_hidden_states: Optional[bool] = None, logits_to_keep: int = 0, **kwargs: Any) -> Any:
        """The Llama output over the multimodal sequence (T + num_patches long)."""
        patches = self.projector(self.vision_backbone(pixel_values).flatten(2).transpose(1, 2))
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                   output_hidden_states=output_hidden_states, logits_to_keep=logits_to_keep)
