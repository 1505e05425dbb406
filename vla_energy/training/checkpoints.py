"""Atomic checkpoints around accelerator.save_state, finding the latest complete one, and the loop's state.

Checkpoints hold what training changes: `register_checkpoint_hooks` makes accelerator.save_state write, per prepared
model, only its trainable parameters and its buffers (LoRA adapter and heads; the full backbone only when it is
trained in full); load_state restores them onto a model whose frozen part was rebuilt from the base checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate import Accelerator, PartialState
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["TrainState", "LossState", "save_checkpoint", "latest_checkpoint", "resolve_resume", "save_states", "load_states",
           "COMPLETE_MARKER", "rotate_checkpoints", "register_checkpoint_hooks", "trainable_keys",
           "find_resume_checkpoint"]

COMPLETE_MARKER = "checkpoint_complete.json"


@dataclass
class TrainState:
    """Loop counters and the metric history, saved with every checkpoint (register_for_checkpointing)."""

    step: int = 0
    micro_step: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(asdict(self))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values = json.loads(state["json"])
        self.step, self.micro_step = int(values["step"]), int(values["micro_step"])
        self.skipped_steps, self.history = int(values["skipped_steps"]), list(values["history"])


class LossState:
    """The plugin's loss state (bank, running policy error, negative draws) as a checkpointable object."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin

    def state_dict(self) -> dict[str, Any]:
        return self.plugin.loss_state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plugin.load_loss_state_dict(state)


def save_states(folder: Path, objects: dict[str, Any]) -> None:
    """state_dict() of each object as `<name>.safetensors` (tensors) + `<name>.json` (the rest): no pickle."""
    for name, obj in objects.items():
        tensors, meta = _flatten(obj.state_dict())
        save_file(tensors, str(folder / f"{name}.safetensors"))
        (folder / f"{name}.json").write_text(json.dumps(meta))


def load_states(folder: Path, objects: dict[str, Any]) -> None:
    """Restore what save_states wrote; a missing or unreadable file is a clear error."""
    for name, obj in objects.items():
        path = folder / f"{name}.safetensors"
        if not path.exists() or not (folder / f"{name}.json").exists():
            raise FileNotFoundError(f"{folder} has no {name}.safetensors/.json: incomplete or foreign checkpoint")
        try:
            tensors, meta = load_file(str(path)), json.loads((folder / f"{name}.json").read_text())
        except Exception as e:  # safetensors / JSON parse errors of a truncated file
            raise ValueError(f"{path} (or its .json) is corrupted: {e}") from e
        obj.load_state_dict(_unflatten(tensors, meta))


def _flatten(state: dict, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if "/" in str(key):
            raise ValueError(f"state key {key!r} contains '/'")
        if isinstance(value, dict):
            t, m = _flatten(value, name + "/")
            tensors.update(t)
            meta.update(m)
        elif isinstance(value, Tensor):
            tensors[name] = value.detach().cpu().contiguous()
        else:
            meta[name] = value
    return tensors, meta


def _unflatten(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict:
    out: dict = {}
    for name, value in [*tensors.items(), *meta.items()]:
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def trainable_keys(model: nn.Module) -> set[str]:
    """State-dict keys that training changes: parameters with requires_grad (every alias) and all buffers."""
    keys = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return keys | {n for n, _ in model.named_buffers(remove_duplicate=False)}


def _weights_name(index: int) -> str:
    """accelerate's own file names (model.safetensors, model_1.safetensors, ...)."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def _save_trainable(models: list[nn.Module], weights: list[dict[str, Tensor]], output_dir: str) -> None:
    """save_state pre-hook: write each model's trainable part, then leave accelerate no full state dict to write."""
    if PartialState().is_main_process:
        for i, (model, state) in enumerate(zip(models, weights)):
            keep = trainable_keys(model)
            # clone: tied aliases share storage, which safetensors refuses to write
            kept = {k: v.detach().cpu().clone().contiguous() for k, v in state.items() if k in keep}
            save_file(kept, str(Path(output_dir) / _weights_name(i)),
                      metadata={"format": "pt", "vla_energy": "trainable", "frozen_entries": str(len(state) - len(kept))})
    weights.clear()


def _load_trainable(models: list[nn.Module], input_dir: str) -> None:
    """load_state pre-hook: load each model's saved part; everything missing must be frozen (it comes from the base)."""
    for i, model in enumerate(models):
        path = Path(input_dir) / _weights_name(i)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint has fewer models than were prepared")
        hint = "was it written with other LoRA / use_lora options?"
        try:
            missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
        except RuntimeError as e:  # shape mismatches raise even when strict=False
            raise ValueError(f"{path} does not fit prepared model {i} ({type(model).__name__}): {hint}\n"
                             f"{str(e)[:1000]}") from e
        frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        lost = [k for k in missing if k not in frozen]
        if unexpected or lost:
            raise ValueError(f"{path} does not fit prepared model {i} ({type(model).__name__}): {hint} Trainable "
                             f"entries missing {lost[:5]}, unknown entries {unexpected[:5]}")
    models.clear()  # loaded here: accelerate has nothing left to load


def register_checkpoint_hooks(accelerator: Accelerator) -> None:
    """Make save_state/load_state keep only what training changes (works for separately prepared modules and for
    one prepared model; FSDP and DeepSpeed save through their own paths and are left to them)."""
    accelerator.register_save_state_pre_hook(_save_trainable)
    accelerator.register_load_state_pre_hook(_load_trainable)


def save_checkpoint(accelerator: Accelerator, directory: str | Path, step: int,
                    states: Optional[dict[str, Any]] = None,
                    policy_writer: Optional[Callable[[Path], Any]] = None) -> Path:
    """accelerator.save_state (+ `states` as safetensors/JSON) into `directory.tmp`, a marker, an atomic rename.

    `policy_writer(tmp_dir)`, run on the main process, adds the policy files, so that the checkpoint
    also loads with EnergyPolicy.from_pretrained.
    """
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_states(tmp, states or {})
        if policy_writer is not None:
            policy_writer(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(checkpoints_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under `checkpoints_dir` (half-written ones are ignored)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    done = []
    for d in root.iterdir():
        marker = d / COMPLETE_MARKER
        if d.is_dir() and not d.name.endswith(".tmp") and marker.exists():
            done.append((int(json.loads(marker.read_text())["step"]), d))
    return max(done)[1] if done else None


def rotate_checkpoints(checkpoints_dir: str | Path, limit: Optional[int]) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit` (save_total_limit); returns what was deleted."""
    if limit is None:
        return []
    root = Path(checkpoints_dir)
    done = sorted((int(json.loads((d / COMPLETE_MARKER).read_text())["step"]), d) for d in root.iterdir()
                  if d.is_dir() and not d.name.endswith(".tmp") and (d / COMPLETE_MARKER).exists())
    stale = [d for _, d in done[: max(0, len(done) - limit)]]
    for d in stale:
        shutil.rmtree(d)
    return stale


def resolve_resume(resume_from: str, run_dir: Path) -> Path:
    """`latest` -> the newest complete checkpoint of this run; a path must be a complete checkpoint."""
    if resume_from == "latest":
        found = latest_checkpoint(run_dir / "checkpoints")
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'} to resume from")
        return found
    path = Path(resume_from)
    if not (path / COMPLETE_MARKER).exists():
        raise ValueError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER}); it may be truncated by a killed save. "
            f"Use --resume_from_checkpoint latest to pick the newest complete one"
        )
    return path


def find_resume_checkpoint(resume_from: Optional[str], run_dir: Path,
                           log: Callable[[str], Any] = print) -> Optional[Path]:
    """The checkpoint to resume from, or None: `latest` before any checkpoint exists (a requeued job's first
    launch) starts fresh with a log line instead of failing."""
    if not resume_from:
        return None
    if resume_from == "latest" and latest_checkpoint(run_dir / "checkpoints") is None:
        log(f"--resume_from_checkpoint latest: no complete checkpoint under {run_dir / 'checkpoints'} yet, "
            "starting from step 0")
        return None
    return resolve_resume(resume_from, run_dir)
