"""Retrieval chunks for a policy saved without them: the training split's chunks, as training writes them; and the
context keys of their samples (candidates="neighbors"), encoded by the trained model."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vla_energy.data import build_datasets
from vla_energy.data.pipeline import retrieval_rows, training_chunks
from vla_energy.inference.candidates import context_key
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import (
    POLICY_CONFIG,
    load_policy,
    resolve_policy_dir,
    save_retrieval_chunks,
)
from vla_energy.training.arguments import load_run_config

__all__ = ["add_retrieval_chunks", "encode_context_keys"]


@torch.no_grad()
def encode_context_keys(model: EnergyVLAModel, batches: Iterable[Mapping[str, Tensor]], total: Optional[int] = None,
                        progress: bool = True, gather: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """[N,D] context keys (context_key of model.encode, in eval mode) of every sample of `batches`, in order; with
    `gather` (accelerator.gather_for_metrics) every process's share of each batch, joined."""
    was_training = model.training
    model.eval()
    keys = []
    try:
        for batch in tqdm(batches, desc="encoding retrieval contexts", total=total, disable=not progress):
            readout = model.encode(**batch)
            key = context_key(readout.context, readout.context_mask)
            keys.append((key if gather is None else gather(key)).cpu())
    finally:
        model.train(was_training)
    return torch.cat(keys)


def add_retrieval_chunks(path: str | Path, count: int = 16384, progress: bool = True, contexts: bool = False,
                         device: str = "cpu", batch_size: int = 32) -> int:
    """Write retrieval_chunks.safetensors into a saved policy (run directory, model/ or checkpoint) from the training
    split of its run_config.json, as training does; returns the chunk count. contexts: also the context keys of
    their samples (candidates="neighbors"), encoded by the policy on `device`, batch_size samples at a time. A
    relative dataset path in the run's config is read from the current directory."""
    if count < 1:
        raise ValueError(f"count={count}, expected >= 1")
    policy_dir = resolve_policy_dir(path)
    data_cfg = load_run_config(policy_dir)[1]
    train_ds, _, _ = build_datasets(data_cfg, progress=progress)
    keys = None
    if contexts:
        from torch.utils.data import DataLoader

        loaded = load_policy(policy_dir, device=device)
        loader = DataLoader(retrieval_rows(train_ds, count), batch_size=batch_size, collate_fn=loaded.collator())
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        keys = encode_context_keys(loaded.model, batches, len(loader), progress)
    info = json.loads((policy_dir / POLICY_CONFIG).read_text())
    count = save_retrieval_chunks(policy_dir, training_chunks(train_ds, count), info, keys)
    (policy_dir / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    return count
