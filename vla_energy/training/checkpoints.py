"""Atomic checkpoints around accelerator.save_state, finding the latest complete one, and the loop's state."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = ["TrainState", "save_checkpoint", "latest_checkpoint", "resolve_resume", "save_states", "load_states",
           "COMPLETE_MARKER", "rotate_checkpoints"]

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


def save_checkpoint(accelerator: Accelerator, directory: str | Path, step: int,
                    states: Optional[dict[str, Any]] = None) -> Path:
    """accelerator.save_state (+ `states` as safetensors/JSON) into `directory.tmp`, a marker, an atomic rename."""
    final = Path(directory)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_states(tmp, states or {})
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
            f"Use --resume_from latest to pick the newest complete one"
        )
    return path
