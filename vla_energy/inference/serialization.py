"""Save / load a finetuned policy directory: LoRA adapter, heads (safetensors), normalization, plugin config."""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from vla_energy.backbones.loading import LoadedBackbone
from vla_energy.backbones.lora import is_peft
from vla_energy.modeling.action_head import ActionHead
from vla_energy.modeling.modeling_energy_head import EnergyHead
from vla_energy.training.plugin import EnergyArguments, EnergyPlugin

__all__ = ["save_policy", "load_policy", "LoadedPolicy", "POLICY_CONFIG"]

POLICY_CONFIG = "policy_config.json"


def save_policy(
    out_dir: str | Path,
    backbone: nn.Module,
    plugin: EnergyPlugin,
    norm_stats: Any,
    loaded: LoadedBackbone,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    merge_lora: bool = False,
) -> Path:
    """Write the policy directory atomically (a temp directory, then a rename)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    info: dict[str, Any] = {
        "backbone": loaded.name, "action_token": loaded.action_token,
        "action_token_id": loaded.action_token_id, "has_adapter": is_peft(backbone), "plugin": plugin.config_dict(),
    }
    # A real tokenizer got a new action token: its (randomly initialised) embedding row is part of the policy.
    emb = backbone.get_input_embeddings().weight[loaded.action_token_id].detach().cpu().contiguous()
    save_file({"action_token_embedding": emb}, str(tmp / "action_token_embedding.safetensors"))
    if is_peft(backbone):
        backbone.save_pretrained(tmp / "adapter")
    if merge_lora and is_peft(backbone):
        copy.deepcopy(backbone).merge_and_unload().save_pretrained(tmp / "merged")
    unwrap(plugin.action_head).save_pretrained(tmp / "action_head")
    unwrap(plugin.energy_head).save_pretrained(tmp / "energy_head")
    if norm_stats is not None:
        norm_stats.save(tmp / "norm_stats.json")
    (tmp / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


@dataclass
class LoadedPolicy:
    """Everything needed to run a saved policy."""

    backbone: nn.Module
    processor: Any
    plugin: EnergyPlugin
    norm_stats: Optional[Any]
    info: dict[str, Any]


    def loaded_backbone(self) -> LoadedBackbone:
        """The backbone (without adapter) and its action token, as load_backbone returns them."""
        base = self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone
        info = self.info
        return LoadedBackbone(base, self.processor, info["action_token"], info["action_token_id"], info["backbone"])


def load_policy(
    path: str | Path, device: str | torch.device = "cpu", trust_remote_code: bool = False, trainable: bool = False
) -> LoadedPolicy:
    """Load what save_policy wrote; a run directory (with model/) works too. trainable: LoRA and heads in train mode."""
    path = Path(path)
    if not (path / POLICY_CONFIG).exists() and (path / "model" / POLICY_CONFIG).exists():
        path = path / "model"
    if not (path / POLICY_CONFIG).exists():
        raise FileNotFoundError(f"{path} is not a saved vla_energy policy (no {POLICY_CONFIG})")
    info = json.loads((path / POLICY_CONFIG).read_text())
    from vla_energy.backbones.loading import load_backbone

    loaded = load_backbone(info["backbone"], trust_remote_code=trust_remote_code,
                           action_token=info["action_token"])
    backbone, processor = loaded.model, loaded.processor
    row = load_file(str(path / "action_token_embedding.safetensors"))["action_token_embedding"]
    with torch.no_grad():
        backbone.get_input_embeddings().weight[loaded.action_token_id] = row.to(
            backbone.get_input_embeddings().weight.dtype)
    if info["has_adapter"]:
        backbone = PeftModel.from_pretrained(backbone, path / "adapter", is_trainable=trainable)
    plugin_cfg = info["plugin"]
    plugin = EnergyPlugin.from_pretrained_heads(
        EnergyArguments(**plugin_cfg["args"]),
        ActionHead.from_pretrained(path / "action_head"),
        EnergyHead.from_pretrained(path / "energy_head"),
        plugin_cfg["action_token_id"],
    )
    norm_stats = None
    if (path / "norm_stats.json").exists():
        from vla_energy.data import NormStats

        norm_stats = NormStats.load(path / "norm_stats.json")
    for module in (backbone, plugin.action_head, plugin.energy_head):
        module.to(device).train(trainable)
    return LoadedPolicy(backbone, processor, plugin, norm_stats, info)
