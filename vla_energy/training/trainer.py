"""transformers.Trainer integration: EnergyVLAModel (backbone + heads), EnergyLossMixin, EnergyTrainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.checkpoints import load_states, save_states
from vla_energy.training.plugin import EnergyPlugin
from vla_energy.training.schedule import ProgressiveSchedule

__all__ = ["EnergyLossMixin", "EnergyTrainer", "ProgressiveScheduleCallback", "PLUGIN_STATE"]

PLUGIN_STATE = "energy_plugin_state"


class ProgressiveScheduleCallback(TrainerCallback):
    """The progressive schedule in a Trainer: lr scale on the energy group, max_grad_norm per step."""

    def __init__(self, schedule: ProgressiveSchedule, energy_group: int = -1) -> None:
        self.schedule = schedule
        self.energy_group = energy_group

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if lambdas is None:
            raise ValueError(f"the progressive schedule needs a LambdaLR scheduler, got {type(lr_scheduler).__name__}")
        i = self.energy_group % len(lambdas)
        if not getattr(lambdas[i], "_vla_energy_scaled", False):
            base = lambdas[i]

            def scaled(step: int, base=base) -> float:
                return base(step) * self.schedule.lr_scale(step)

            scaled._vla_energy_scaled = True
            lambdas[i] = scaled
            # LambdaLR set the group's lr at construction; apply the scaled lambda to the current step now.
            group = optimizer.param_groups[i]
            group["lr"] = lr_scheduler.base_lrs[i] * scaled(lr_scheduler.last_epoch)
        args.max_grad_norm = self.schedule.max_grad_norm(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        # The Trainer clips all parameters with args.max_grad_norm; the schedule's clip follows the step.
        args.max_grad_norm = self.schedule.max_grad_norm(state.global_step)


class _BankCallback(TrainerCallback):
    """Enqueue the gathered actions into the bank after each optimizer step."""

    def __init__(self, plugin: EnergyPlugin) -> None:
        self.plugin = plugin

    def on_step_end(self, args, state, control, **kwargs):
        self.plugin.after_optimizer_step()


def _energy_model(model: nn.Module) -> EnergyVLAModel:
    """The EnergyVLAModel itself or inside a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, EnergyVLAModel):
        raise ValueError(f"EnergyLossMixin needs an EnergyVLAModel (optionally peft-wrapped), got {type(model).__name__}")
    return base


class EnergyLossMixin:
    """Adds the energy loss to a Trainer subclass: `class MyTrainer(EnergyLossMixin, SomeTrainer)`.

    The model must be an EnergyVLAModel. The returned loss is a per-micro-batch mean: the Trainer divides it by
    the accumulation steps and never rescales it by num_items_in_batch or the world size, so the energy term keeps
    exactly its configured weight.
    """

    # Read by transformers >= 5.x: our loss is a per-batch mean (the Trainer divides by accumulation steps).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, energy_lr_scale: float = 0.1, schedule: Optional[ProgressiveSchedule] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        model = _energy_model(self.model)
        self.energy_plugin: EnergyPlugin = model.plugin
        model.point_plugin_at_heads()  # before create_optimizer reads the plugin's energy modules
        self.energy_lr_scale = energy_lr_scale
        # Older Trainers decide GA scaling from this flag: False = "the Trainer divides by accumulation steps".
        self.model_accepts_loss_kwargs = False
        if self.args.remove_unused_columns:
            # The forward takes **inputs, so the Trainer would drop `actions` & co; the collator picks columns.
            self.args.remove_unused_columns = False
        self._energy_metrics: dict[str, float] = {}
        self._energy_count = 0
        self.add_callback(_BankCallback(self.energy_plugin))
        if schedule is not None:
            self.add_callback(ProgressiveScheduleCallback(schedule))

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """AdamW with the energy head (and a learnable temperature) in its own group at lr x energy_lr_scale."""
        if self.optimizer is None:
            from vla_energy.backbones.param_groups import param_groups

            net = _energy_model(self.model)
            groups = param_groups(net.backbone, net.action_head, self.energy_plugin.energy_modules(),
                                  self.args.learning_rate, self.energy_lr_scale, self.args.weight_decay)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, net)
            kwargs.pop("lr", None)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Model's own loss (with labels) + L1 + energy_loss_weight x global InfoNCE with the Trainer's accelerator."""
        if self.energy_plugin.plan is None:
            self.energy_plugin.setup(self.accelerator, self.args.per_device_train_batch_size)
        outputs = model(accelerator=self.accelerator, **inputs)
        if model.training:
            for k, v in outputs["metrics"].items():
                self._energy_metrics[k] = self._energy_metrics.get(k, 0.0) + v
            self._energy_count += 1
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add the energy metrics since the last log, averaged over steps and processes."""
        if self._energy_count and "loss" in logs:
            keys = sorted(self._energy_metrics)
            local = torch.tensor([self._energy_metrics[k] / self._energy_count for k in keys],
                                 device=self.accelerator.device)
            mean = self.accelerator.reduce(local, reduction="mean")
            # The plugin's total is `head_loss` here: `loss` is the Trainer's own (it includes an LM loss).
            logs.update({"head_loss" if k == "loss" else k: float(v) for k, v in zip(keys, mean)})
            self._energy_metrics.clear()
            self._energy_count = 0
        super().log(logs, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            save_states(folder, {PLUGIN_STATE: self.energy_plugin})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_states(Path(resume_from_checkpoint), {PLUGIN_STATE: self.energy_plugin})


class EnergyTrainer(EnergyLossMixin, Trainer):
    """transformers.Trainer with the energy loss; pass model=EnergyVLAModel(backbone, plugin)."""
