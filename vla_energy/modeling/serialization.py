"""Save / load a self-contained policy directory: base reference or weights, processor, LoRA adapter, the plugin
(one config, one safetensors file), normalization statistics, the inputs' layout, run configuration, model card.

Layout (policy_config.json says which parts are present):

    policy_config.json       base (name, revision), action token, dtype, the plugin's config, the inputs' layout
    processor/               the processor with the action token
    merged/                  merge_lora: the backbone with the adapter merged (loaded instead of base + adapter)
    adapter/                 peft LoRA adapter
    action_token_embedding.safetensors   the action token's embedding row
    plugin.safetensors                   action head, energy head, temperature, state projector
    retrieval_chunks.safetensors         normalized training action chunks: candidates="retrieval" at inference;
                                         with "contexts", their samples' context keys: candidates="neighbors"
    norm_stats.json  run_config.json  README.md
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from vla_energy.backbones.loading import DTYPES, TINY_PREFIX, LoadedBackbone
from vla_energy.backbones.lora import is_peft
from vla_energy.backbones.tiny import tiny_name
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel

__all__ = ["save_policy", "write_policy", "save_retrieval_chunks", "checkpoint_policy_writer", "load_policy",
           "resolve_policy_dir", "base_reference", "shareable_base", "LoadedPolicy", "POLICY_CONFIG", "POLICY_PATTERNS",
           "PLUGIN_WEIGHTS"]

POLICY_CONFIG = "policy_config.json"
PLUGIN_WEIGHTS = "plugin.safetensors"
FORMAT_VERSION = 3
# What belongs to a policy (a checkpoint directory also holds optimizer, RNG and trainable-state files).
POLICY_PATTERNS = [POLICY_CONFIG, "processor/*", "merged/*", "adapter/*", PLUGIN_WEIGHTS, "action_head/*",
                   "energy_head/*", "state_projector/*", "action_token_embedding.safetensors", "norm_stats.json",
                   "run_config.json", "retrieval_chunks.safetensors", "README.md", "metrics.json", "*.png"]


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


def _hub_cache_snapshot(path: Path) -> Optional[tuple[str, str]]:
    """(repo id, commit) of a directory that is a model snapshot in a hub cache (models--org--name/snapshots/sha)."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        repo = parts[-3][len("models--"):].split("--")
        if len(repo) == 2:
            return "/".join(repo), parts[-1]
    return None


def base_reference(source: str, base: Optional[str] = None, revision: Optional[str] = None, config: Any = None
                   ) -> dict[str, Optional[str]]:
    """How a policy names its base model: {"backbone", "revision", "backbone_local_path"}.

    `source` is what the backbone was loaded from: a hub id, a tiny-* name or a local directory. A local copy is
    named by `base` (its hub id) and `revision` when given, or by the hub cache it sits in; then the local path is
    kept as well, to be loaded from where it still exists. A local directory known by nothing else is recorded by
    its absolute path: the policy then loads only where that path exists.
    """
    local = Path(source).expanduser()
    tiny = tiny_name(local) if base is None and local.is_dir() else None
    if not local.is_dir() or tiny:
        name = base or tiny or source
        return {"backbone": name, "revision": revision if revision is not None else base_revision(name, config),
                "backbone_local_path": None}
    local = local.resolve()
    cached = _hub_cache_snapshot(local)
    if base is None and cached is not None:
        base, revision = cached[0], revision or cached[1]
    if base is None:
        return {"backbone": str(local), "revision": None, "backbone_local_path": None}
    if revision is None and cached is not None and cached[0] == base:
        revision = cached[1]
    return {"backbone": base, "revision": revision, "backbone_local_path": str(local)}


def shareable_base(info: Mapping[str, Any]) -> Optional[str]:
    """Why others could not load a policy with this config from the hub (None when they can): its base is a local
    directory, and the LoRA is not merged into saved weights."""
    name = info["backbone"]
    if info.get("merged") or name.startswith(TINY_PREFIX):
        return None
    if Path(name).is_absolute() or Path(name).expanduser().exists() or name.count("/") != 1:
        return (f"its base model is the local directory {name!r}, which others do not have: train it with "
                "--base_model_id org/name --base_model_revision <commit> (the hub model that directory is a copy "
                "of), or set \"backbone\" and \"revision\" in its policy_config.json to them, or save it with "
                "merge_lora=True")
    return None


def write_policy(
    out: str | Path,
    model: EnergyVLAModel,
    processor: Any = None,
    norm_stats: Any = None,
    base: Optional[str] = None,
    revision: Optional[str] = None,
    merge_lora: bool = False,
    run_config: Optional[str | Path | Mapping[str, Any]] = None,
    retrieval_chunks: Optional[torch.Tensor] = None,
    inputs: Optional[dict[str, Any]] = None,
    base_local_path: Optional[str] = None,
    retrieval_contexts: Optional[torch.Tensor] = None,
) -> Path:
    """Write the policy files of `model` into the existing directory `out`.

    The base is referred to by `base` (default: base_reference of where the backbone was loaded from) and
    `revision` (default: the hub commit it was loaded at), and `base_local_path`, a local copy loaded instead where
    it exists; processor: with the action token (None: the base's is used at load time); run_config: the run's
    options (a mapping, or a run_config.json to copy); retrieval_chunks [N,H,Da]: normalized training chunks, the
    candidates of `candidates="retrieval"`; retrieval_contexts [N,D]: the context keys of those chunks' samples
    (inference.candidates.context_key), the nearest of which give `candidates="neighbors"`; inputs: the layout of
    the model inputs (processor_kwargs, cameras, camera_layout) that EnergyPolicy rebuilds.
    """
    out = Path(out)
    backbone, plugin = model.backbone, model.plugin
    base_model = model.base_backbone
    if base is None:
        ref = base_reference(getattr(base_model, "name_or_path", "") or base_model.config._name_or_path,
                             revision=revision, config=base_model.config)
    else:
        # A local copy's revision is what the caller says; the hub's refs/main need not be what the copy holds.
        if revision is None and base_local_path is None:
            revision = base_revision(base, base_model.config)
        ref = {"backbone": base, "revision": revision, "backbone_local_path": base_local_path}
    tokenizer = None if processor is None else getattr(processor, "tokenizer", processor)
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "backbone": ref["backbone"], "revision": ref["revision"],
        **({"backbone_local_path": ref["backbone_local_path"]} if ref["backbone_local_path"] else {}),
        "processor": None, "merged": bool(merge_lora and is_peft(backbone)),
        "action_token": None if tokenizer is None else tokenizer.convert_ids_to_tokens(plugin.action_token_id),
        "action_token_id": plugin.action_token_id, "has_adapter": is_peft(backbone),
        "dtype": _dtype_name(next(base_model.parameters()).dtype), "plugin": plugin.config_dict(),
        "inputs": dict(inputs or {}),
    }
    if plugin.state_token_id is not None:
        info["state_token_id"] = plugin.state_token_id
        info["state_token"] = None if tokenizer is None else tokenizer.convert_ids_to_tokens(plugin.state_token_id)
    if processor is not None:
        processor.save_pretrained(out / "processor")
        info["processor"] = "processor"
    # The tokenizer got a new action token: its (randomly initialised) embedding row is part of the policy.
    emb = base_model.get_input_embeddings().weight[plugin.action_token_id].detach().float().cpu().contiguous()
    save_file({"action_token_embedding": emb}, str(out / "action_token_embedding.safetensors"))
    if is_peft(backbone):
        backbone.save_pretrained(out / "adapter")
    if info["merged"]:
        copy.deepcopy(backbone).merge_and_unload().save_pretrained(out / "merged")
    weights = {k: v.detach().cpu().contiguous() for k, v in plugin.state_dict().items()}
    save_file(weights, str(out / PLUGIN_WEIGHTS), metadata={"format": "pt"})
    if norm_stats is not None:
        norm_stats.save(out / "norm_stats.json")
    if retrieval_chunks is not None:
        save_retrieval_chunks(out, retrieval_chunks, info, retrieval_contexts)
    elif retrieval_contexts is not None:
        raise ValueError("retrieval_contexts are the keys of retrieval_chunks: pass the chunks too")
    if isinstance(run_config, Mapping):
        (out / "run_config.json").write_text(json.dumps(run_config, indent=2))
    elif run_config is not None and Path(run_config).exists():
        shutil.copyfile(run_config, out / "run_config.json")
    (out / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    from vla_energy.modeling.model_card import write_model_card

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


def save_retrieval_chunks(out: Path, chunks: torch.Tensor, info: dict[str, Any],
                          contexts: Optional[torch.Tensor] = None) -> int:
    """retrieval_chunks.safetensors in `out` ("chunks" [N,H,Da], and "contexts" [N,D], the keys of the chunks'
    samples, when given), the counts recorded in the policy config `info`; returns the chunk count."""
    tensors = {"chunks": chunks.detach().float().cpu().contiguous()}
    info.pop("retrieval_contexts", None)
    info.pop("retrieval_context_dim", None)
    if contexts is not None:
        if contexts.dim() != 2 or contexts.shape[0] != chunks.shape[0]:
            raise ValueError(f"retrieval contexts have shape {tuple(contexts.shape)}, expected (N, D) with N = "
                             f"{chunks.shape[0]}, one key per chunk")
        tensors["contexts"] = contexts.detach().float().cpu().contiguous()
        info["retrieval_contexts"], info["retrieval_context_dim"] = int(contexts.shape[0]), int(contexts.shape[1])
    save_file(tensors, str(out / "retrieval_chunks.safetensors"))
    info["retrieval_chunks"] = int(chunks.shape[0])
    return info["retrieval_chunks"]


def checkpoint_policy_writer(model: EnergyVLAModel, **kwargs: Any) -> Callable[[Path], Path]:
    """save_checkpoint's policy_writer: the policy files into a checkpoint, without a copy of the frozen base (it is
    referred to by name and revision); kwargs go to write_policy."""

    def write(tmp: Path) -> Path:
        return write_policy(tmp, model, **kwargs)

    return write


@dataclass
class LoadedPolicy:
    """Everything needed to run a saved policy."""

    model: EnergyVLAModel
    processor: Any
    norm_stats: Optional[Any]
    info: dict[str, Any]
    path: Optional[Path] = None
    retrieval_chunks: Optional[torch.Tensor] = None  # [N,H,Da] normalized training chunks
    retrieval_contexts: Optional[torch.Tensor] = None  # [N,D] context keys of the chunks' samples

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def plugin(self) -> EnergyPlugin:
        return self.model.plugin

    def loaded_backbone(self) -> LoadedBackbone:
        """The backbone (without adapter) and its action token, as load_backbone returns them."""
        info = self.info
        return LoadedBackbone(self.model.base_backbone, self.processor, info["action_token"], info["action_token_id"],
                              info["backbone"])

    def run_config(self) -> Optional[dict[str, Any]]:
        """The training run's options (run_config.json), when the policy carries them."""
        path = None if self.path is None else self.path / "run_config.json"
        return json.loads(path.read_text()) if path is not None and path.exists() else None

    def inputs(self) -> dict[str, Any]:
        """The layout of the model inputs in training: processor_kwargs, cameras (None: one unnamed image) and
        camera_layout; read from the run's options for a policy that does not record them."""
        if self.info.get("inputs"):
            return self.info["inputs"]
        run = self.run_config() or {}
        image_key = (run.get("DataConfig") or {}).get("image_key")
        return {"processor_kwargs": (run.get("ModelArguments") or {}).get("processor_kwargs"),
                "cameras": [k.strip() for k in image_key.split(",") if k.strip()] if image_key else None,
                "camera_layout": (run.get("DataConfig") or {}).get("camera_layout", "tile")}

    def save(self, out_dir: str | Path) -> Path:
        """Write this policy (as loaded, with any change made to its model) to `out_dir`, which may be its own."""
        if self.info.get("merged"):
            raise ValueError(f"{self.path} holds merged LoRA weights (merged/); re-saving it is not supported: save "
                             "the run's unmerged policy instead")
        run_config = None if self.path is None else self.path / "run_config.json"
        return save_policy(out_dir, self.model, self.processor, self.norm_stats, base=self.info["backbone"],
                           revision=self.info.get("revision"), run_config=run_config,
                           retrieval_chunks=self.retrieval_chunks, inputs=self.inputs(),
                           base_local_path=self.info.get("backbone_local_path"),
                           retrieval_contexts=self.retrieval_contexts)

    def collator(self) -> Any:
        """The VLACollator of training: the prompt, the action (and state) token and the processor options."""
        from vla_energy.data import VLACollator

        return VLACollator(self.processor, horizon=self.plugin.horizon, action_token=self.info["action_token"],
                           state_token=self.info.get("state_token"),
                           processor_kwargs=self.inputs().get("processor_kwargs") or None)


def resolve_policy_dir(path_or_repo: str | Path, revision: Optional[str] = None) -> Path:
    """A local policy directory (a run directory's model/ too), or a hub repo id through snapshot_download
    (offline, HF_HUB_OFFLINE=1, it is served from the local hub cache)."""
    from vla_energy.checks import means_local_path, missing_path

    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not (path / POLICY_CONFIG).exists() and (path / "model" / POLICY_CONFIG).exists():
            path = path / "model"
        if not (path / POLICY_CONFIG).exists():
            raise FileNotFoundError(f"{path} is not a saved vla_energy policy (no {POLICY_CONFIG}, nor "
                                    f"model/{POLICY_CONFIG} of a run directory)")
        return path
    name = str(path_or_repo)
    if name.count("/") != 1 or means_local_path(name):
        raise FileNotFoundError(f"policy {name!r}: {missing_path(name)}") from None
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(name, revision=revision, allow_patterns=POLICY_PATTERNS))
    except Exception as e:  # offline without a cached copy, unknown repo, ...: its chain is long, the cause is here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"policy {name!r}: {missing_path(name)}, and downloading it from the hub failed "
                                f"({type(e).__name__}: {first})") from None
    if not (local / POLICY_CONFIG).exists():
        raise FileNotFoundError(f"hub repo {name!r} has no {POLICY_CONFIG}: not a vla_energy policy")
    return local


def _base_source(path: Path, info: dict[str, Any]) -> tuple[str, Optional[str]]:
    """Where to load a policy's base from, and at which revision: its local copy where that exists, else its name
    (a tiny-* checkpoint is built here); a local base that is gone is a clear error."""
    from vla_energy.backbones.loading import resolve_backbone

    local = info.get("backbone_local_path")
    if local and Path(local).is_dir():
        return local, None
    name = info["backbone"]
    if Path(name).is_absolute() and not Path(name).exists():
        raise FileNotFoundError(
            f"{path}: the policy's base model is the local directory {name}, which does not exist here. Copy the "
            "base there, or set \"backbone\" (and \"revision\") in its policy_config.json to the hub model it is a "
            "copy of; train with --base_model_id org/name --base_model_revision <commit> to record that")
    return resolve_backbone(name), info.get("revision")


def _load_real_base(path: Path, info: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool
                    ) -> tuple[nn.Module, Any]:
    """The base named in the policy (at its recorded revision) or the merged weights, with the saved processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = info["backbone"]
    processor_dir = path / (info.get("processor") or "processor")
    if processor_dir.is_dir():
        processor = AutoProcessor.from_pretrained(processor_dir, trust_remote_code=trust_remote_code)
    else:
        source, source_revision = _base_source(path, info)
        processor = AutoProcessor.from_pretrained(source, revision=source_revision, trust_remote_code=trust_remote_code)
    base, revision = (str(path / "merged"), None) if info.get("merged") else _base_source(path, info)
    model = AutoModelForImageTextToText.from_pretrained(base, revision=revision, dtype=dtype,
                                                        trust_remote_code=trust_remote_code)
    tokenizer = getattr(processor, "tokenizer", processor)
    if info["action_token"] is None:
        raise ValueError(f"{path}: the policy was saved without its processor, so the action token's name is "
                         "unknown: save it with the processor (EnergyVLAModel.save_pretrained(dir, processor=...))")
    if info["action_token"] not in tokenizer.get_vocab():  # a policy saved without processor/
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


def _load_plugin(path: Path, info: dict[str, Any]) -> EnergyPlugin:
    """The plugin of a policy: from its config and plugin.safetensors, or (policies saved before the plugin was one
    file) from the heads' own directories."""
    config = dict(info["plugin"])
    if (path / PLUGIN_WEIGHTS).exists():
        plugin = EnergyPlugin.from_config_dict(config)
        plugin.load_state_dict(load_file(str(path / PLUGIN_WEIGHTS)))
        return plugin
    from vla_energy.modeling.action_head import ActionHead
    from vla_energy.modeling.modeling_energy_head import EnergyHead
    from vla_energy.modeling.state_projector import StateProjector

    has_state = (path / "state_projector").is_dir()
    if has_state != (config.get("state_token_id") is not None):
        raise ValueError(f"{path}: state_projector/ is {'present' if has_state else 'missing'} but the plugin "
                         f"configuration has state_token_id={config.get('state_token_id')}: incomplete policy")
    heads = {"action_head": ActionHead.from_pretrained(path / "action_head"),
             "energy_head": EnergyHead.from_pretrained(path / "energy_head")}
    if has_state:
        heads["state_projector"] = StateProjector.from_pretrained(path / "state_projector")
    # The sizes of these heads are what they were saved with, whatever the saved options said.
    head_cfg, action_cfg = heads["energy_head"].config, heads["action_head"].config
    args = EnergyArguments(**{**config["args"], "energy_hidden_dim": head_cfg.hidden_dim,
                              "energy_num_heads": head_cfg.num_heads, "energy_num_layers": head_cfg.num_layers,
                              "action_head_dim": action_cfg.mlp_dim})
    plugin = EnergyPlugin(args, head_cfg.context_dim, head_cfg.action_dim, head_cfg.horizon, config["action_token_id"],
                          heads["state_projector"].config.state_dim if has_state else None,
                          config.get("state_token_id"))
    for name, head in heads.items():
        getattr(plugin, name).load_state_dict(head.state_dict())
    return plugin


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
    model = EnergyVLAModel(backbone, _load_plugin(path, info)).to(device=device, dtype=torch_dtype).train(trainable)
    norm_stats = None
    if (path / "norm_stats.json").exists():
        from vla_energy.data import NormStats

        norm_stats = NormStats.load(path / "norm_stats.json")
    retrieval = {}
    if (path / "retrieval_chunks.safetensors").exists():
        retrieval = {k: v.to(device) for k, v in load_file(str(path / "retrieval_chunks.safetensors")).items()}
    return LoadedPolicy(model, processor, norm_stats, info, path, retrieval.get("chunks"), retrieval.get("contexts"))
