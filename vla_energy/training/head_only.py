"""Train an energy head alone on a finished policy's collected outputs (frozen contexts and layer-wise predictions).

With `detach_context` (the default) the energy loss never moves the backbone, so a head trained on the contexts of
the finished policy meets the same inputs as at inference, and variants of the head can be compared on one fixed
policy: the benchmarks of docs/selection.md do this. The loss is the plugin's own (`EnergyPlugin.energy_loss`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vla_energy.backbones.readout import BackboneReadout
from vla_energy.evaluation.metrics import EvalResult, _pad_contexts
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.process_group import ProcessGroup

__all__ = ["HeadOnlyResult", "train_energy_head", "collect_run_outputs", "retrain_energy_head", "default_head_dir"]


@dataclass
class HeadOnlyResult:
    """Losses of a head-only run: the first and last logged mean energy loss, and every step's."""

    losses: list[float]

    @property
    def first(self) -> float:
        return self.losses[0]

    @property
    def last(self) -> float:
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def _batch(result: EvalResult, idx: Tensor, device: torch.device) -> tuple[BackboneReadout, dict[str, Tensor], list]:
    """Readout (padded contexts), targets and the layer-wise chunks; the energy loss reads no placeholder states (the
    layer predictions are given), so the readout carries none."""
    ctx, cmask = _pad_contexts([result.contexts[i] for i in idx])
    layers = torch.stack([result.layer_actions[i] for i in idx], dim=1).to(device)  # [L,B,H,Da]
    readout = BackboneReadout(context=ctx.to(device), context_mask=cmask.to(device),
                              action_hidden=ctx.new_zeros(0, len(idx), layers.shape[2], ctx.shape[-1]))
    targets = {
        "actions": torch.stack([result.actions[i] for i in idx]).to(device),
        "action_mask": torch.stack([result.action_mask[i] for i in idx]).to(device),
        "sample_id": idx.to(device),
    }
    return readout, targets, list(layers.unbind(0))


def train_energy_head(
    plugin: EnergyPlugin,
    result: EvalResult,
    max_steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> HeadOnlyResult:
    """AdamW on the plugin's energy modules over shuffled batches of `result` (seeded); the plugin's energy loss."""
    n = len(result.actions)
    if n < 2:
        raise ValueError(f"head-only training needs at least 2 samples, got {n}")
    if max_steps < 1 or batch_size < 2:
        raise ValueError(f"max_steps={max_steps} and batch_size={batch_size}: expected >= 1 and >= 2")
    device = torch.device(device)
    group = ProcessGroup(device)
    plugin.to(device)
    plugin.setup(group, min(batch_size, n))
    plugin.generator.manual_seed(seed)
    modules = plugin.energy_modules()
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order, pos, losses = torch.randperm(n, generator=g), 0, []
    for _ in tqdm(range(max_steps), desc="energy head", disable=not progress, leave=False):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx, pos = order[pos:pos + batch_size], pos + batch_size
        readout, targets, layers = _batch(result, idx, device)
        loss, _ = plugin.energy_loss(readout, targets["actions"], targets["action_mask"], targets["sample_id"],
                                     layers, group)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        plugin.after_optimizer_step()
        losses.append(float(loss.detach()))
    for m in modules:
        m.eval()
    return HeadOnlyResult(losses)


def collect_run_outputs(loaded: Any, run_config: tuple, splits: dict[str, int], device: str = "cpu",
                        progress: bool = True) -> dict[str, Any]:
    """A loaded policy's outputs (EvalResult) on up to N evenly spread samples of each split {"train": N, "val": M}
    of its run's dataset, and "train_chunks": every training chunk [N,H,Da]."""
    from torch.utils.data import DataLoader

    from vla_energy.data import build_datasets
    from vla_energy.data.split import spread_indices
    from vla_energy.evaluation.metrics import collect_eval_outputs

    data_cfg = run_config[1]
    train_ds, val_ds, _ = build_datasets(data_cfg, progress=progress)
    collator = loaded.collator()
    out: dict[str, Any] = {}
    for name, count in splits.items():
        ds = {"train": train_ds, "val": val_ds}[name]
        loader = DataLoader(ds.select(spread_indices(len(ds), count)), batch_size=64, collate_fn=collator)
        batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
        out[name] = collect_eval_outputs(loaded.model, batches, progress=progress, total=len(loader))
    out["train_chunks"] = train_ds.select_columns(["actions"]).with_format("torch")[:]["actions"].float()
    return out


def default_head_dir(path: str | Path) -> Path:
    """Where `vla-energy train-head PATH` writes by default: beside the policy, `<policy dir>_head` (a run
    directory's model/ -> model_head/)."""
    from vla_energy.modeling.serialization import resolve_policy_dir

    if not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{path!r} is not a local directory: pass where to write the new policy (output_dir)")
    policy_dir = resolve_policy_dir(path)
    return policy_dir.with_name(policy_dir.name + "_head")


def retrain_energy_head(
    path: str | Path,
    max_steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    max_samples: int = 4096,
    seed: int = 0,
    overrides: Optional[dict[str, Any]] = None,
    device: str = "cpu",
    progress: bool = True,
    output_dir: Optional[str | Path] = None,
    overwrite_output_dir: bool = False,
) -> Path:
    """Train a fresh energy head on a saved policy's own contexts (its run's training split, up to max_samples
    evenly spread) and write a new policy with it (`vla-energy train-head`); the saved policy stays as it was.

    `output_dir` (default: default_head_dir) must not hold anything unless overwrite_output_dir; its model card
    and policy_config.json record the head-only training and carry none of the old head's metrics. `overrides`:
    EnergyArguments changes for this head (e.g. {"candidate_ranking": 16}); the head's size follows the run's
    options. Returns the new policy directory.
    """
    from vla_energy.modeling.model_card import write_model_card
    from vla_energy.modeling.serialization import POLICY_CONFIG, load_policy, resolve_policy_dir
    from vla_energy.training.arguments import load_run_config

    if max_samples < 2:
        raise ValueError(f"max_samples={max_samples}, expected >= 2")
    policy_dir = resolve_policy_dir(path)
    out = Path(output_dir) if output_dir is not None else default_head_dir(path)
    if out.resolve() == policy_dir.resolve():
        raise ValueError(f"output_dir {out} is the policy being retrained: write the new policy elsewhere (the "
                         "run's metrics, report and evaluations describe the old head)")
    if out.exists() and any(out.iterdir()) and not overwrite_output_dir:
        raise FileExistsError(f"{out} already holds files: pass --overwrite_output_dir to replace them, or another "
                              "--output_dir")
    run_config = load_run_config(policy_dir)
    loaded = load_policy(policy_dir, device=device)
    outputs = collect_run_outputs(loaded, run_config, {"train": max_samples}, device, progress)
    train = outputs["train"]
    old = loaded.plugin
    torch.manual_seed(seed)
    plugin = EnergyPlugin.from_config_dict({**old.config_dict(), "args": asdict(replace(old.args, **(overrides or {})))})
    # The policy's own parts stay as trained; only the energy side starts fresh.
    for name in ("action_head", "state_projector"):
        if getattr(old, name) is not None:
            getattr(plugin, name).load_state_dict(getattr(old, name).state_dict())
    result = train_energy_head(plugin, train, max_steps, batch_size, learning_rate, seed=seed, device=device,
                               progress=progress)
    loaded.model.plugin = plugin.to(device=device, dtype=next(old.parameters()).dtype)
    loaded.save(out)
    info = json.loads((out / POLICY_CONFIG).read_text())
    info["energy_head_retrained"] = {"from": str(policy_dir), "max_steps": max_steps, "batch_size": batch_size,
                                     "learning_rate": learning_rate, "samples": len(train.actions), "seed": seed,
                                     "loss_first": result.first, "loss_last": result.last}
    (out / POLICY_CONFIG).write_text(json.dumps(info, indent=2))
    write_model_card(out)
    return out
