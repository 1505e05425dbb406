"""Add the energy head to an existing transformers.Trainer run (tiny offline VLM + the synthetic dataset).

    python recipes/trainer_example.py                                 # 1 process
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/trainer_example.py   # 2 processes

With your own Trainer subclass (e.g. TRL's): `class MyTrainer(EnergyLossMixin, SFTTrainer): ...`.
"""

import torch
from transformers import TrainingArguments

from vla_energy import (
    DataConfig,
    EnergyArguments,
    EnergyPlugin,
    EnergyTrainer,
    EnergyVLAModel,
    VLACollator,
    build_datasets,
    load_backbone,
)
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.training.schedule import ProgressiveSchedule


def main() -> None:
    data_cfg = DataConfig(dataset="synthetic", horizon=8)
    train_ds, val_ds, norm_stats = build_datasets(data_cfg)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=16))
    plugin = EnergyPlugin(EnergyArguments(strategy="combined", bank_size=128), hidden_size_of(loaded.model),
                          action_dim=len(train_ds[0]["actions"][0]), horizon=8,
                          action_token_id=loaded.action_token_id)
    args = TrainingArguments(
        output_dir="runs/trainer_example", per_device_train_batch_size=8, gradient_accumulation_steps=1,
        max_steps=100, learning_rate=2e-3, logging_steps=10, save_steps=50, report_to=[],
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
    )
    trainer = EnergyTrainer(
        model=EnergyVLAModel(backbone, plugin), args=args, train_dataset=train_ds,
        data_collator=VLACollator(loaded.processor, horizon=8, action_token=loaded.action_token), energy_lr_scale=0.5,
        schedule=ProgressiveSchedule(stable_steps=30, ramp_end_step=80, start_lr_scale=0.2, end_lr_scale=1.0,
                                     start_max_grad_norm=0.5, end_max_grad_norm=1.0),
    )
    trainer.train()
    if trainer.is_world_process_zero():
        last = [h for h in trainer.state.log_history if "energy/acc" in h][-1]
        print({k: round(v, 4) for k, v in last.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
