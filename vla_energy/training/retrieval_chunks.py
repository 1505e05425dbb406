"""Retrieval chunks for a policy saved without them: the training split's chunks, as training writes them."""

from __future__ import annotations

import json
from pathlib import Path

from vla_energy.data import build_datasets
from vla_energy.data.pipeline import training_chunks
from vla_energy.modeling.serialization import POLICY_CONFIG, resolve_policy_dir, save_retrieval_chunks
from vla_energy.training.arguments import load_run_config

__all__ = ["add_retrieval_chunks"]


def add_retrieval_chunks(path: str | Path, count: int = 16384, progress: bool = True) -> int:
    """Write retrieval_chunks.safetensors into a saved policy (run directory, model/ or checkpoint) from the training
    split of its run_config.json, as training does; returns the chunk count. A relative dataset path in the run's
    config is read from the current directory."""
    if count < 1:
        raise ValueError(f"count={count}, expected >= 1")
    policy_dir = resolve_policy_dir(path)
    data_cfg = load_run_config(policy_dir)[1]
    train_ds, _, _ = build_datasets(data_cfg, progress=progress)
    info = json.loads((policy_dir / POLICY_CONFIG).read_text())
    count = save_retrieval_chunks(policy_dir, training_chunks(train_ds, count), info)
    (policy_dir / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    return count
