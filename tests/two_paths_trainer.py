"""The recipe's run through EnergyTrainer: the same options (vla_energy/training/arguments.py), the same build order.

    accelerate launch --multi_gpu --num_processes 2 tests/two_paths_trainer.py <recipe options> --losses_file out.json

Writes the Trainer's per-step log (main process) to --losses_file; tests/test_two_paths.py compares it with the
recipe's metrics.json history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from transformers import TrainingArguments

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data import VLACollator, build_datasets
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.arguments import TrainArguments, parse_config
from vla_energy.training.schedule import ProgressiveSchedule
from vla_energy.training.trainer import EnergyTrainer


def training_arguments(train: TrainArguments, output_dir: str) -> TrainingArguments:
    """The recipe's optimisation settings as TrainingArguments: constant lr (the recipe's warmup is added by the
    Trainer subclass below), plain AdamW (betas 0.9/0.999, eps 1e-8), the seedable sampler seeded by `seed`."""
    return TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps, max_steps=train.max_steps,
        learning_rate=train.learning_rate, weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm,
        lr_scheduler_type="constant", optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        seed=train.seed, data_seed=None, accelerator_config={"use_seedable_sampler": True},
        logging_steps=train.logging_steps, report_to=[], save_strategy="no", eval_strategy="no",
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=train.dataloader_num_workers,
        ddp_find_unused_parameters=train.ddp_find_unused_parameters, remove_unused_columns=False,
    )


class WarmupTrainer(EnergyTrainer):
    """The recipe's linear warmup, min(1, (step + 1) / warmup_steps) on every group (the Trainer's
    constant_with_warmup starts at 0 instead: step / warmup_steps)."""

    def __init__(self, *args, warmup_steps: int = 0, **kwargs) -> None:
        self.warmup_steps = warmup_steps
        super().__init__(*args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None and self.warmup_steps:
            n = self.warmup_steps
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer or self.optimizer, lambda s: min(1.0, (s + 1) / n))
        return super().create_scheduler(num_training_steps, optimizer)


def main(argv: list[str]) -> None:
    if "--losses_file" not in argv:
        raise ValueError("--losses_file <path.json> is required: where the Trainer's per-step log goes")
    i = argv.index("--losses_file")
    losses_file, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    model_args, data_args, lora_args, energy_args, train = parse_config(argv)
    if model_args.init_from:
        raise ValueError(f"init_from={model_args.init_from!r}: this driver starts from the backbone only")
    state = PartialState(cpu=not torch.cuda.is_available())

    # The recipe's order: seed, data, backbone + LoRA, heads (the same initial weights).
    set_seed(train.seed)
    with state.main_process_first():
        train_ds, _, _ = build_datasets(data_args, progress=False)
    action_dim = len(train_ds[0]["actions"][0])
    with state.main_process_first():
        loaded = load_backbone(model_args.backbone, model_args.trust_remote_code, model_args.action_token,
                               model_args.dtype)
    backbone = apply_lora(loaded.model, lora_args)
    plugin = EnergyPlugin(energy_args, hidden_size_of(loaded.model), action_dim, data_args.horizon,
                          loaded.action_token_id)
    model = EnergyVLAModel(backbone, plugin)
    collator = VLACollator(loaded.processor, horizon=data_args.horizon, action_token=loaded.action_token,
                           processor_kwargs=model_args.processor_kwargs)
    schedule = ProgressiveSchedule(
        train.schedule_stable_steps, train.schedule_ramp_end_step, train.schedule_start_lr_scale,
        train.schedule_end_lr_scale, train.schedule_start_max_grad_norm, train.schedule_end_max_grad_norm,
    ) if train.progressive_schedule else None
    trainer = WarmupTrainer(
        model=model, args=training_arguments(train, str(Path(train.output_dir) / train.run_name)),
        train_dataset=train_ds, data_collator=collator, energy_lr_scale=train.energy_lr_scale, schedule=schedule,
        warmup_steps=train.warmup_steps,
    )
    trainer.train()
    if trainer.is_world_process_zero():
        losses_file.write_text(json.dumps(trainer.state.log_history, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
