"""EnergyTrainer gradient-weight check, run in-process (1 process) or by `accelerate launch` (2 processes).

The energy head's gradient at the first optimizer step must equal the mean over micro-batches of
energy_loss_weight x the gradient of the micro-batch's (global) energy loss: neither doubled nor halved by the
Trainer's loss scaling (gradient accumulation, num_items_in_batch, world size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import backbone_inputs, hidden_size_of
from vla_energy.data import DataConfig, VLACollator, build_datasets
from vla_energy.losses.infonce import inbatch_infonce_loss
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.trainer import EnergyTrainer

WEIGHT = 0.7
B = 3


class _SequentialTrainer(EnergyTrainer):
    """Fixed sample order, so the reference knows which samples form each micro-batch."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class _GradCapture(TrainerCallback):
    def __init__(self, head):
        self.head = head
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.head.named_parameters()}


def build(cache_dir: str, **energy_overrides):
    torch.manual_seed(0)
    data_cfg = DataConfig(dataset="synthetic", num_episodes=12, horizon=4, cache_dir=cache_dir)
    train_ds, _, _ = build_datasets(data_cfg, progress=False)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(use_lora=False))
    settings = dict(strategy="global", energy_loss_weight=WEIGHT, l1_loss_weight=0.0, energy_hidden_dim=32,
                    action_head_dim=32)
    args = EnergyArguments(**{**settings, **energy_overrides})
    action_dim = len(train_ds[0]["actions"][0])
    plugin = EnergyPlugin(args, hidden_size_of(loaded.model), action_dim, 4, loaded.action_token_id)
    collator = VLACollator(loaded.processor, horizon=4, action_token=loaded.action_token)
    return train_ds, loaded, backbone, plugin, collator


def run(grad_accum: int, out_dir: str, cache_dir: str) -> float:
    train_ds, loaded, backbone, plugin, collator = build(cache_dir)
    initial = {k: v.clone() for k, v in plugin.energy_head.state_dict().items()}
    model = EnergyVLAModel(backbone, plugin)
    capture = _GradCapture(plugin.energy_head)
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=grad_accum, max_steps=1,
        learning_rate=1e-3, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = _SequentialTrainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator,
                                 callbacks=[capture])
    trainer.train()
    world = trainer.accelerator.num_processes

    # Reference: one process, the union of all ranks' micro-batch k = rows [k*W*B, (k+1)*W*B) in order.
    ref_head = type(plugin.energy_head)(plugin.energy_head.config)
    ref_head.load_state_dict(initial)
    ref_head.train()
    for k in range(grad_accum):
        rows = [train_ds[i] for i in range(k * world * B, (k + 1) * world * B)]
        batch = collator(rows)
        with torch.no_grad():
            out = backbone(**backbone_inputs(batch), output_hidden_states=True)
        readout = plugin.read(out, batch)
        energies = ref_head(readout.context, pool=batch["actions"], context_mask=readout.context_mask,
                            pool_action_mask=batch["action_mask"])
        loss, _ = inbatch_infonce_loss(energies, torch.arange(len(rows)), tau=plugin.args.tau)
        (WEIGHT * loss / grad_accum).backward()
    # Relative to the largest reference gradient: some entries are exactly 0 in theory (the last bias: the
    # softmax-minus-one-hot sums to zero), so a per-tensor relative error would divide float noise by noise.
    scale = max(float(p.grad.abs().max()) for p in ref_head.parameters())
    worst = max(float((capture.grads[n] - p.grad).abs().max()) for n, p in ref_head.named_parameters()) / scale
    if trainer.accelerator.is_main_process:
        with open(os.path.join(out_dir, f"grad_check_ga{grad_accum}_w{world}.json"), "w") as f:
            json.dump({"max_rel_err": worst, "world": world}, f)
    return worst


def train_and_resume(out_dir: str, cache_dir: str) -> dict:
    """2 steps with a checkpoint, then a fresh Trainer resumed from it to step 4; what each rank saw."""
    def make(max_steps: int):
        train_ds, _, backbone, plugin, collator = build(cache_dir, strategy="combined", l1_loss_weight=1.0,
                                                        bank_size=32)
        targs = TrainingArguments(
            output_dir=os.path.join(out_dir, "out"), per_device_train_batch_size=B, max_steps=max_steps,
            learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True,
            seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        model = EnergyVLAModel(backbone, plugin)
        return EnergyTrainer(model=model, args=targs, train_dataset=train_ds, data_collator=collator), plugin

    trainer, plugin = make(2)
    before = [p.detach().clone() for p in plugin.energy_head.parameters()]
    trainer.train()
    world = trainer.accelerator.num_processes
    result = {
        "world": world,
        "rank": trainer.accelerator.process_index,
        "head_moved": any(not torch.equal(a, b) for a, b in zip(before, plugin.energy_head.parameters())),
        "logged_energy": any("energy/acc" in h for h in trainer.state.log_history),
        "bank_after_2": len(plugin.bank),
        "head_after_2": [p.detach().sum().item() for p in plugin.energy_head.parameters()],
    }
    bank_saved = plugin.bank.entries()[0].clone()
    ckpt = os.path.join(out_dir, "out", "checkpoint-2")
    resumed, plugin2 = make(4)
    resumed.train(resume_from_checkpoint=ckpt)
    result.update({
        "global_step": resumed.state.global_step,
        "bank_after_4": len(plugin2.bank),
        "bank_kept": torch.equal(plugin2.bank.entries()[0][: len(bank_saved)], bank_saved),
        "checkpoint_files": sorted(os.listdir(ckpt)),
    })
    with open(os.path.join(out_dir, f"resume_rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--grad_accum", type=int, default=1)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--resume_check", action="store_true", help="train, checkpoint and resume instead")
    a = parser.parse_args()
    if a.resume_check:
        train_and_resume(a.out_dir, a.cache_dir)
        sys.exit(0)
    err = run(a.grad_accum, a.out_dir, a.cache_dir)
    sys.exit(0 if err < 1e-3 else 1)  # float32 noise ~1e-4; a doubled or halved term is >= 0.5
