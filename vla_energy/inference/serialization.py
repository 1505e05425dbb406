"""Save / load a self-contained policy directory: base reference or weights, processor, LoRA adapter, heads
(safetensors), normalization statistics, plugin and run configuration, model card.

Layout (policy_config.json says which parts are present):

    policy_config.json       base (name, revision or a relative path), action token, dtype, plugin settings
    processor/               the processor with the action token
    merged/                  merge_lora: the backbone with the adapter merged (loaded instead of base + adapter)
    adapter/                 peft LoRA adapter
    action_token_embedding.safetensors   the action token's embedding row
    action_head/ energy_head/            heads (save_pretrained)
    state_projector/                     use_state: the state token's projector (save_pretrained)
    retrieval_chunks.safetensors         normalized training action chunks: candidates="retrieval" at inference
    norm_stats.json  run_config.json  README.md
"""

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

from vla_energy.backbones.loading import DTYPES, LoadedBackbone
from vla_energy.backbones.lora import is_peft
from vla_energy.modeling.action_head import ActionHead
from vla_energy.modeling.modeling_energy_head import EnergyHead
from vla_energy.modeling.state_projector import StateProjector
from vla_energy.training.plugin import EnergyArguments, EnergyPlugin

__all__ = ["save_policy", "write_policy", "add_retrieval_chunks", "checkpoint_policy_writer", "load_policy", "resolve_policy_dir", "LoadedPolicy",
           "POLICY_CONFIG", "POLICY_PATTERNS", "DTYPES"]

POLICY_CONFIG = "policy_config.json"
FORMAT_VERSION = 2
# What belongs to a policy (a checkpoint directory also holds optimizer, RNG and trainable-state files).
POLICY_PATTERNS = [POLICY_CONFIG, "processor/*", "merged/*", "adapter/*", "action_head/*",
                   "energy_head/*", "state_projector/*", "action_token_embedding.safetensors", "norm_stats.json", "run_config.json",
                   "retrieval_chunks.safetensors", "README.md", "metrics.json", "*.png"]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, "float32")


def _as_dtype(dtype: str | torch.dtype | None, default: str) -> torch.dtype:
    """A torch dtype from a name or dtype; a clear error naming the accepted names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = default if dtype is None else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}, expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def base_revision(name: str, config: Any) -> Optional[str]:
    """The hub commit a base model was loaded from: the config's `_commit_hash` (transformers 4), else the snapshot
    that refs/main points to in the local hub cache (what from_pretrained(name) loads); None for a local path."""
    commit = getattr(config, "_commit_hash", None)
    if commit or Path(name).exists() or name.count("/") != 1:
        return commit
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        return None
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else None


def write_policy(
    out: str | Path,
    backbone: nn.Module,
    plugin: EnergyPlugin,
    norm_stats: Any,
    loaded: LoadedBackbone,
    unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    merge_lora: bool = False,
    run_config: Optional[str | Path] = None,
    retrieval_chunks: Optional[torch.Tensor] = None,
) -> Path:
    """Write the policy files into the existing directory `out`.

    The base is referred to by name and revision (a tiny test backbone's name resolves to its cached checkpoint);
    run_config: the run's run_config.json, copied (dataset, cameras, training options); retrieval_chunks [N,H,Da]:
    normalized training chunks, the candidates of `candidates="retrieval"`.
    """
    out = Path(out)
    base = backbone.get_base_model() if isinstance(backbone, PeftModel) else backbone
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "backbone": loaded.name, "revision": None, "processor": None, "merged": bool(merge_lora and is_peft(backbone)),
        "action_token": loaded.action_token, "action_token_id": loaded.action_token_id,
        "has_adapter": is_peft(backbone), "dtype": _dtype_name(next(base.parameters()).dtype),
        "plugin": plugin.config_dict(),
    }
    info["revision"] = base_revision(loaded.name, base.config)
    if plugin.state_projector is not None:
        tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
        info["state_token"] = tokenizer.convert_ids_to_tokens(plugin.state_token_id)
        info["state_token_id"] = plugin.state_token_id
    loaded.processor.save_pretrained(out / "processor")
    info["processor"] = "processor"
    # The tokenizer got a new action token: its (randomly initialised) embedding row is part of the policy.
    emb = base.get_input_embeddings().weight[loaded.action_token_id].detach().float().cpu().contiguous()
    save_file({"action_token_embedding": emb}, str(out / "action_token_embedding.safetensors"))
    if is_peft(backbone):
        backbone.save_pretrained(out / "adapter")
    if info["merged"]:
        copy.deepcopy(backbone).merge_and_unload().save_pretrained(out / "merged")
    unwrap(plugin.action_head).save_pretrained(out / "action_head")
    unwrap(plugin.energy_head).save_pretrained(out / "energy_head")
    if plugin.state_projector is not None:
        unwrap(plugin.state_projector).save_pretrained(out / "state_projector")
    if norm_stats is not None:
        norm_stats.save(out / "norm_stats.json")
    if retrieval_chunks is not None:
        _save_retrieval_chunks(out, retrieval_chunks, info)
    if run_config is not None and Path(run_config).exists():
        shutil.copyfile(run_config, out / "run_config.json")
    (out / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    from vla_energy.evaluation.report import write_model_card

    write_model_card(out)
    return out


def save_policy(out_dir: str | Path, *args: Any, **kwargs: Any) -> Path:
    """write_policy into a temp directory, then an atomic rename to `out_dir`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_policy(tmp, *args, **kwargs)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def add_retrieval_chunks(path: str | Path, count: int = 16384, progress: bool = True) -> int:
    """Write retrieval_chunks.safetensors into a saved policy (run directory, model/ or checkpoint) from the training
    split of its run_config.json, as training does now; for policies saved without them. Returns the chunk count.
    A relative dataset path in the run's config is read from the current directory."""
    from vla_energy.data import build_datasets
    from vla_energy.data.pipeline import training_chunks
    from vla_energy.training.arguments import load_run_config

    if count < 1:
        raise ValueError(f"count={count}, expected >= 1")
    policy_dir = resolve_policy_dir(path)
    data_cfg = load_run_config(policy_dir)[1]
    train_ds, _, _ = build_datasets(data_cfg, progress=progress)
    info = json.loads((policy_dir / POLICY_CONFIG).read_text())
    count = _save_retrieval_chunks(policy_dir, training_chunks(train_ds, count), info)
    (policy_dir / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    return count


def _save_retrieval_chunks(out: Path, chunks: torch.Tensor, info: dict[str, Any]) -> int:
    """retrieval_chunks.safetensors in `out`, its count recorded in the policy config `info`; returns the count."""
    save_file({"chunks": chunks.detach().float().cpu().contiguous()}, str(out / "retrieval_chunks.safetensors"))
    info["retrieval_chunks"] = int(chunks.shape[0])
    return info["retrieval_chunks"]


def checkpoint_policy_writer(run_dir: str | Path, backbone: nn.Module, plugin: EnergyPlugin, norm_stats: Any,
                             loaded: LoadedBackbone, unwrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                             retrieval_chunks: Optional[torch.Tensor] = None) -> Callable[[Path], Path]:
    """save_checkpoint's policy_writer: the policy files into a checkpoint, without a copy of the frozen base (it is
    referred to by name and revision)."""
    run_dir = Path(run_dir)

    def write(tmp: Path) -> Path:
        return write_policy(tmp, backbone, plugin, norm_stats, loaded, unwrap, run_config=run_dir / "run_config.json",
                            retrieval_chunks=retrieval_chunks)

    return write


@dataclass
class LoadedPolicy:
    """Everything needed to run a saved policy."""

    backbone: nn.Module
    processor: Any
    plugin: EnergyPlugin
    norm_stats: Optional[Any]
    info: dict[str, Any]
    path: Optional[Path] = None
    retrieval_chunks: Optional[torch.Tensor] = None  # [N,H,Da] normalized training chunks

    def loaded_backbone(self) -> LoadedBackbone:
        """The backbone (without adapter) and its action token, as load_backbone returns them."""
        base = self.backbone.get_base_model() if isinstance(self.backbone, PeftModel) else self.backbone
        info = self.info
        return LoadedBackbone(base, self.processor, info["action_token"], info["action_token_id"], info["backbone"])

    def run_config(self) -> Optional[dict[str, Any]]:
        """The training run's options (run_config.json), when the policy carries them."""
        path = None if self.path is None else self.path / "run_config.json"
        return json.loads(path.read_text()) if path is not None and path.exists() else None


def resolve_policy_dir(path_or_repo: str | Path, revision: Optional[str] = None) -> Path:
    """A local policy directory (a run directory's model/ too), or a hub repo id through snapshot_download
    (offline, HF_HUB_OFFLINE=1, it is served from the local hub cache)."""
    path = Path(path_or_repo)
    if path.exists():
        if not (path / POLICY_CONFIG).exists() and (path / "model" / POLICY_CONFIG).exists():
            path = path / "model"
        if not (path / POLICY_CONFIG).exists():
            raise FileNotFoundError(f"{path} is not a saved vla_energy policy (no {POLICY_CONFIG})")
        return path
    if str(path_or_repo).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo!r} is neither a local directory nor a hub repo id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=POLICY_PATTERNS))
    except Exception as e:  # offline without a cached copy, unknown repo, ...
        raise FileNotFoundError(f"{path_or_repo!r} is not a local directory, and downloading it from the hub "
                                f"failed ({type(e).__name__}: {e})") from e
    if not (local / POLICY_CONFIG).exists():
        raise FileNotFoundError(f"hub repo {path_or_repo!r} has no {POLICY_CONFIG}: not a vla_energy policy")
    return local


def _load_real_base(path: Path, info: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool
                    ) -> tuple[nn.Module, Any]:
    """The base named in the policy (at its recorded revision) or the merged weights, with the saved processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vla_energy.backbones.loading import resolve_backbone

    name, revision = info["backbone"], info.get("revision")
    processor_dir = path / (info.get("processor") or "processor")
    processor = (AutoProcessor.from_pretrained(processor_dir, trust_remote_code=trust_remote_code)
                 if processor_dir.is_dir() else
                 AutoProcessor.from_pretrained(resolve_backbone(name), revision=revision,
                                               trust_remote_code=trust_remote_code))
    source = path / "merged" if info.get("merged") else resolve_backbone(name)
    model = AutoModelForImageTextToText.from_pretrained(source, revision=None if info.get("merged") else revision,
                                                        dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if info["action_token"] not in tokenizer.get_vocab():  # an old policy without processor/
        tokenizer.add_tokens([info["action_token"]], special_tokens=True)
    if info.get("state_token") and info["state_token"] not in tokenizer.get_vocab():
        tokenizer.add_tokens([info["state_token"]], special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        # The new rows are overwritten below (action token) or unused by the model; no random init needed.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if info.get("state_token") and int(tokenizer.convert_tokens_to_ids(info["state_token"])) != info["state_token_id"]:
        raise ValueError(f"{path}: the tokenizer maps {info['state_token']!r} to id "
                         f"{tokenizer.convert_tokens_to_ids(info['state_token'])}, the policy was trained with id "
                         f"{info['state_token_id']}")
    token_id = int(tokenizer.convert_tokens_to_ids(info["action_token"]))
    if token_id != info["action_token_id"]:
        raise ValueError(f"{path}: the tokenizer maps {info['action_token']!r} to id {token_id}, the policy was "
                         f"trained with id {info['action_token_id']}: the base model {name!r} changed; pin its "
                         "revision or save the policy with merge_lora")
    if not info.get("merged"):
        row = load_file(str(path / "action_token_embedding.safetensors"))["action_token_embedding"]
        with torch.no_grad():
            weight = model.get_input_embeddings().weight
            weight[token_id] = row.to(weight.dtype)
    return model, processor


def load_policy(
    path: str | Path,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    trainable: bool = False,
    dtype: str | torch.dtype | None = None,
    revision: Optional[str] = None,
) -> LoadedPolicy:
    """Load what save_policy wrote (a run directory, a checkpoint, or a hub repo id), in `dtype` (default: the
    dtype it was trained in) on `device`. trainable: LoRA and heads in train mode."""
    path = resolve_policy_dir(path, revision)
    info = json.loads((path / POLICY_CONFIG).read_text())
    if info.get("tiny_kind") is not None:
        raise ValueError(f"{path} was saved by an older vla_energy around a hand-made tiny test backbone "
                         f"({info['tiny_kind']!r}), which no longer exists: train it again (tiny-* names now load "
                         "real-format checkpoints)")
    torch_dtype = _as_dtype(dtype, info.get("dtype", "float32"))
    merged = bool(info.get("merged")) and (path / "merged").is_dir()
    info["merged"] = merged
    if merged:
        info["has_adapter"] = False  # the adapter is inside the merged weights
    backbone, processor = _load_real_base(path, info, torch_dtype, trust_remote_code)
    if info["has_adapter"] and not merged:
        backbone = PeftModel.from_pretrained(backbone, path / "adapter", is_trainable=trainable)
    plugin_cfg = info["plugin"]
    has_state = (path / "state_projector").is_dir()
    if has_state != (plugin_cfg.get("state_token_id") is not None):
        raise ValueError(f"{path}: state_projector/ is {'present' if has_state else 'missing'} but the plugin "
                         f"configuration has state_token_id={plugin_cfg.get('state_token_id')}: incomplete policy")
    plugin = EnergyPlugin.from_pretrained_heads(
        EnergyArguments(**plugin_cfg["args"]),
        ActionHead.from_pretrained(path / "action_head"),
        EnergyHead.from_pretrained(path / "energy_head"),
        plugin_cfg["action_token_id"],
        state_projector=StateProjector.from_pretrained(path / "state_projector") if has_state else None,
        state_token_id=plugin_cfg.get("state_token_id"),
    )
    norm_stats = None
    if (path / "norm_stats.json").exists():
        from vla_energy.data import NormStats

        norm_stats = NormStats.load(path / "norm_stats.json")
    for module in (backbone, plugin.action_head, plugin.energy_head, plugin.state_projector):
        if module is None:
            continue
        module.to(device=device, dtype=torch_dtype).train(trainable)
    chunks = None
    if (path / "retrieval_chunks.safetensors").exists():
        chunks = load_file(str(path / "retrieval_chunks.safetensors"))["chunks"].to(device)
    return LoadedPolicy(backbone, processor, plugin, norm_stats, info, path, chunks)
