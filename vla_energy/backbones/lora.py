"""LoRA on the backbone through peft (LoraConfig / get_peft_model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

__all__ = ["LoraArguments", "apply_lora", "VISION_MODULES_PATTERN"]

# Module-name pattern of the vision towers of the supported VLM families (Idefics3/SmolVLM, PaliGemma, Llava:
# vision_tower / vision_model; Qwen2-VL: visual).
VISION_MODULES_PATTERN = r".*(vision_tower|vision_model|visual)\..*"


@dataclass
class LoraArguments:
    """LoRA settings (defaults after OpenVLA-OFT: r=32, alpha=min(r, 16), all linear layers, no dropout)."""

    use_lora: bool = field(default=True, metadata={"help": "Finetune the backbone with LoRA (False: freeze it)."})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (OpenVLA-OFT: 32)."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha; default min(r, 16)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (OpenVLA-OFT: 0)."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "peft target_modules: 'all-linear' or comma-separated names."}
    )
    lora_exclude_vision: bool = field(
        default=False, metadata={"help": "Leave the vision tower out of LoRA (only the language model adapts)."}
    )


def apply_lora(model: nn.Module, args: LoraArguments) -> nn.Module:
    """Wrap the backbone with peft LoRA (or freeze it when use_lora is False); heads are not touched."""
    if not args.use_lora:
        model.requires_grad_(False)
        return model
    targets = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else min(args.lora_r, 16),
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()],
        exclude_modules=VISION_MODULES_PATTERN if args.lora_exclude_vision else unused_vision_modules_pattern(model),
        bias="none",
    )
    return get_peft_model(model, config)


def unused_vision_modules_pattern(model: nn.Module) -> Optional[str]:
    """Regex of vision-tower modules that take no part in the forward, so LoRA leaves them out (DDP would wait for
    their gradients): encoder layers past `vision_feature_layer` (Llava: -2 skips the last) and SigLIP's pooling
    `head` (PaliGemma reads the patch states)."""
    parts = [r".*(vision_tower|vision_model)\..*\.head\..*"]
    layer = getattr(model.config, "vision_feature_layer", None)
    vision_config = getattr(model.config, "vision_config", None)
    n = getattr(vision_config, "num_hidden_layers", None)
    if n is not None and layer is not None:
        layers = layer if isinstance(layer, (list, tuple)) else [layer]
        last_used = max(int(k) % (n + 1) for k in layers) - 1  # hidden_states[k] is layer k-1's output
        unused = [str(i) for i in range(last_used + 1, n)]
        if unused:
            parts.append(r".*(vision_tower|vision_model)\..*layers\.(" + "|".join(unused) + r")\..*")
    return "|".join(f"(?:{p})" for p in parts)


def is_peft(model: nn.Module) -> bool:
    """Whether the backbone is a peft model (adapters to save with save_pretrained)."""
    return isinstance(model, PeftModel)
