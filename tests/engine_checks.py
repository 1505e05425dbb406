"""Multi-process checks of the engine paths, run by `accelerate launch` from test_engine_paths.py.

    engine_checks.py fsdp_bf16 OUT        FSDP2 with a bf16 MixedPrecisionPolicy: the loss sees float32 targets
    engine_checks.py eval OUT BATCH       the recipe's evaluation of 10 held-out samples at a local batch BATCH
    engine_checks.py fp16_skip OUT        the recipe in fp16 on a GPU, the loss scaler skipping the second step
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data import DataConfig, VLACollator, build_datasets
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.process_group import ProcessGroup

B, H = 2, 4


def fsdp_bf16(out: Path) -> None:
    """One forward of the FSDP2-sharded model under a bf16 MixedPrecisionPolicy that casts forward inputs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    state = PartialState(cpu=True)  # gloo processes, as the recipe makes them on a machine without GPUs
    torch.manual_seed(0)
    train_ds, _, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=8, horizon=H,
                                               cache_dir=str(out / "cache")), progress=False)
    loaded = load_backbone("tiny-llava")
    plugin = EnergyPlugin(EnergyArguments(strategy="combined", energy_hidden_dim=32, action_head_dim=32),
                          hidden_size_of(loaded.model), len(train_ds[0]["actions"][0]), H, loaded.action_token_id)
    model = EnergyVLAModel(apply_lora(loaded.model, LoraArguments(lora_r=4)), plugin)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.backbone.get_base_model().model.language_model.layers:
        fully_shard(layer, mesh=init_device_mesh("cpu", (state.num_processes,)), mp_policy=policy)
    fully_shard(model, mesh=init_device_mesh("cpu", (state.num_processes,)), mp_policy=policy)
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token)
    start = state.process_index * B
    batch = collator([train_ds[i] for i in range(start, start + B)])
    batch["actions"] = torch.full_like(batch["actions"], 0.987654)  # bf16 rounds it to 0.98828125
    exact = batch["actions"].clone()
    seen = {}

    def capture(module, args, kwargs):
        seen["actions"] = args[1]["actions"].detach().clone()

    plugin.register_forward_pre_hook(capture, with_kwargs=True)
    out_ = model(**batch)
    got = seen["actions"]
    l1 = masked_l1(out_.policy.float(), exact, batch["action_mask"], ProcessGroup(got.device))
    report = {"dtype": str(got.dtype), "equal": bool(torch.equal(got.float(), exact)),
              "max_err": float((got.float() - exact).abs().max()),
              "l1": float(out_.l1), "l1_exact_targets": float(l1)}
    (out / f"fsdp_bf16_{state.process_index}.json").write_text(json.dumps(report))


def evaluation(out: Path, batch_size: int) -> dict:
    """run_evaluation of the recipe on 10 samples of the held-out split (the last batch padded by even_batches when
    10 is not a multiple of the global batch)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from vla_energy.data.split import spread_indices
    from vla_energy.evaluation.ranking import RankingCollator, RankingDataset
    from vla_energy.training.train import run_evaluation

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    _, val_ds, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=16, horizon=H, val_fraction=0.5,
                                             cache_dir=str(out / "cache")), progress=False)
    loaded = load_backbone("tiny-llava")
    # Global columns only: explicit negatives are drawn per process, so they differ between layouts by design.
    plugin = EnergyPlugin(EnergyArguments(strategy="global", energy_hidden_dim=32, action_head_dim=32),
                          hidden_size_of(loaded.model), len(val_ds[0]["actions"][0]), H, loaded.action_token_id)
    model = EnergyVLAModel(apply_lora(loaded.model, LoraArguments(lora_r=4)), plugin)
    plugin.setup(accelerator, batch_size)
    rows = RankingDataset(val_ds.select(spread_indices(len(val_ds), 10)), 4, seed=0)
    collator = RankingCollator(VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token))
    model, loader = accelerator.prepare(model, DataLoader(rows, batch_size=batch_size, collate_fn=collator))
    metrics, _ = run_evaluation(accelerator, model, loader, 1e-2)
    if accelerator.is_main_process:
        (out / f"eval_{accelerator.num_processes}.json").write_text(json.dumps(metrics))
    return metrics


class _InfGradient(torch.autograd.Function):
    """The identity whose backward is infinite: a finite loss with overflowing gradients, as fp16 meets them."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def fp16_skip(out: Path) -> None:
    """3 optimizer steps of the recipe in fp16 where the loss scaler must skip the second micro-step's update."""
    from vla_energy.training.train import main

    forward, calls = EnergyPlugin.forward, []

    def overflow_second(self, *args, **kwargs):
        parts = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 and self.training:
            parts.loss = _InfGradient.apply(parts.loss)
        return parts

    EnergyPlugin.forward = overflow_second
    metrics = main(["--backbone", "tiny-llava", "--dataset", "synthetic", "--num_episodes", "12", "--horizon", str(H),
                    "--per_device_train_batch_size", "4", "--max_steps", "3", "--eval_strategy", "no",
                    "--lora_r", "4", "--energy_hidden_dim", "16", "--action_head_dim", "16", "--report_to", "none",
                    "--disable_tqdm", "--bank_size", "64", "--logging_steps", "1", "--warmup_steps", "10",
                    "--output_dir", str(out), "--run_name", "fp16", "--cache_dir", str(out / "cache")])
    (out / "fp16_skip.json").write_text(json.dumps({**metrics, "forwards": len(calls)}))


if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "fsdp_bf16":
        fsdp_bf16(where)
    elif mode == "eval":
        evaluation(where, int(sys.argv[3]))
    elif mode == "fp16_skip":
        fp16_skip(where)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
