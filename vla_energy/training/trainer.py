"""transformers.Trainer integration: EnergyLossMixin and EnergyTrainer, which train an EnergyVLAModel."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from vla_energy.data.collator import VLACollator
from vla_energy.evaluation.ranking import RankingCollator, RankingDataset, RankingTally
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.checkpoints import LossState, load_states, save_states, trainable_keys
from vla_energy.training.clipping import clip_group_
from vla_energy.training.schedule import ProgressiveSchedule

__all__ = ["EnergyLossMixin", "EnergyTrainer", "ProgressiveScheduleCallback", "PLUGIN_STATE"]

PLUGIN_STATE = "energy_plugin_state"


class ProgressiveScheduleCallback(TrainerCallback):
    """The progressive schedule in a Trainer: lr scale on the energy group; `energy_max_grad_norm(step)` is the
    energy group's clip norm (the policy keeps args.max_grad_norm), as in the recipe."""

    def __init__(self, schedule: ProgressiveSchedule, energy_group: int = -1) -> None:
        self.schedule = schedule
        self.energy_group = energy_group

    def energy_max_grad_norm(self, step: int) -> float:
        """The energy group's clip norm at optimizer step `step`."""
        return self.schedule.max_grad_norm(step)

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


class _BankCallback(TrainerCallback):
    """Enqueue the gathered actions into the bank after each optimizer step, or drop them when the loss scaler
    skipped the step (fp16)."""

    def __init__(self, plugin: EnergyPlugin, accelerator: Any) -> None:
        self.plugin = plugin
        self.accelerator = accelerator

    def on_step_end(self, args, state, control, **kwargs):
        if self.accelerator.optimizer_step_was_skipped:
            self.plugin.skip_step()
        else:
            self.plugin.after_optimizer_step()


def _energy_model(model: nn.Module) -> EnergyVLAModel:
    """The EnergyVLAModel itself or inside a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, EnergyVLAModel):
        raise ValueError(f"EnergyLossMixin needs an EnergyVLAModel (optionally peft-wrapped), got {type(model).__name__}")
    return base


def check_parts_learn(model: EnergyVLAModel) -> None:
    """A clear error when a part of the plugin that training must move has no trainable parameter (e.g. peft
    wrapped the whole model and left it out of modules_to_save)."""
    frozen = [name for name, part in model.plugin.parts_that_learn().items()
              if not any(p.requires_grad for p in part.parameters())]
    if frozen:
        raise ValueError(f"{frozen} of the energy plugin have no trainable parameter, so training would leave them "
                         "as initialised. When peft wraps the whole EnergyVLAModel, name them in modules_to_save: "
                         f"LoraConfig(..., modules_to_save={sorted(model.plugin.parts_that_learn())})")


class EnergyLossMixin:
    """Adds the energy loss to a Trainer subclass: `class MyTrainer(EnergyLossMixin, SomeTrainer)`.

    The model must be an EnergyVLAModel. The returned loss is a per-micro-batch mean: the Trainer divides it by
    the accumulation steps and never rescales it by num_items_in_batch or the world size, so the energy term keeps
    exactly its configured weight.
    """

    # Read by transformers >= 5.x: our loss is a per-batch mean (the Trainer divides by accumulation steps).
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, energy_lr_scale: float = 0.1, schedule: Optional[ProgressiveSchedule] = None,
                 eval_num_negatives: int = 31, norm_stats: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            # nn.DataParallel replicas would each compute the "global" loss over their slice alone.
            raise ValueError(f"{type(self).__name__} does not support nn.DataParallel, which the Trainer uses when one "
                             f"process sees {self.args.n_gpu} GPUs: launch with `accelerate launch` or `torchrun` "
                             "(one process per GPU), or make one GPU visible with CUDA_VISIBLE_DEVICES")
        model = _energy_model(self.model)
        check_parts_learn(model)
        self.energy_plugin: EnergyPlugin = model.plugin
        self.norm_stats = norm_stats
        if norm_stats is not None:
            self.energy_plugin.set_action_bounds(*norm_stats.normalized_bounds())
        elif self.energy_plugin.args.bound_negatives and self.energy_plugin.action_bounds is None:
            raise ValueError("bound_negatives needs the data's bounds: pass norm_stats (the NormStats the dataset was "
                             "normalized with) to EnergyTrainer, or call model.plugin.set_action_bounds first")
        self.energy_lr_scale = energy_lr_scale
        # Older Trainers decide GA scaling from this flag: False = "the Trainer divides by accumulation steps".
        self.model_accepts_loss_kwargs = False
        if self.args.remove_unused_columns:
            # The forward takes **inputs, so the Trainer would drop `actions` & co; the collator picks columns.
            self.args.remove_unused_columns = False
        self._energy_metrics: dict[str, float] = {}
        self._energy_count = 0
        self.add_callback(_BankCallback(self.energy_plugin, self.accelerator))
        self.schedule = schedule
        if schedule is not None:
            self.add_callback(ProgressiveScheduleCallback(schedule))
        self.eval_num_negatives = eval_num_negatives
        self.data_collator = RankingCollator(self.data_collator)  # passes batches without candidates through
        self._ranked: dict[int, RankingDataset] = {}
        self._eval_sums: dict[str, float] = {}
        self._eval_count = 0
        self._tally = RankingTally(self.energy_plugin.args.false_negative_eps)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            warnings.warn("DeepSpeed clips all gradients together with its config's gradient_clipping; the energy "
                          "group's own clip norm does not apply (docs/distributed.md)", stacklevel=2)

    def energy_max_grad_norm(self) -> float:
        """The energy group's clip norm at this step: the schedule's, or max_grad_norm without a schedule."""
        return self.args.max_grad_norm if self.schedule is None else self.schedule.max_grad_norm(self.state.global_step)

    def _clip_grad_norm(self, model):
        """The recipe's rule after one unscale: policy at max_grad_norm, the energy group at its own norm."""
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return super()._clip_grad_norm(model)  # the engine clips (globally) in its step
        net = _energy_model(self.model)
        self.accelerator.unscale_gradients()
        norm = clip_group_(net.policy_parameters(), self.args.max_grad_norm)
        clip_group_(net.energy_parameters(), self.energy_max_grad_norm())
        return norm.to(self.args.device)

    def _with_candidates(self, dataset: Any) -> Any:
        """A split with episode_index gets its ranking candidates (the true chunk + eval_num_negatives others)."""
        names = getattr(dataset, "column_names", None)
        if isinstance(dataset, RankingDataset) or names is None or "episode_index" not in names:
            return dataset
        if id(dataset) not in self._ranked:
            self._ranked[id(dataset)] = RankingDataset(dataset, self.eval_num_negatives, seed=self.args.seed)
        return self._ranked[id(dataset)]

    def get_eval_dataloader(self, eval_dataset=None):
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        return super().get_eval_dataloader(self._with_candidates(eval_dataset if eval_dataset is not None
                                                                 else self.eval_dataset))

    def get_test_dataloader(self, test_dataset):
        return super().get_test_dataloader(self._with_candidates(test_dataset))

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Loss (and the policy's chunk against the true one) through compute_loss, which also tallies metrics."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        loss = loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        return loss, outputs.policy, inputs["actions"]

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """The Trainer's loop plus the energy metrics and the held-out top-1 (`eval_top1_acc`)."""
        self._eval_sums, self._eval_count, self._tally = {}, 0, RankingTally(self.energy_plugin.args.false_negative_eps)
        out = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        metrics = dict(out.metrics)
        if self._eval_count:
            keys = sorted(self._eval_sums)
            local = torch.tensor([self._eval_sums[k] / self._eval_count for k in keys], device=self.accelerator.device)
            mean = self.accelerator.reduce(local, reduction="mean")
            metrics.update({f"{metric_key_prefix}_{'head_loss' if k == 'loss' else k}": float(v)
                            for k, v in zip(keys, mean)})
        if self._tally.parts["energies"]:
            metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self._tally.metrics().items()})
        return EvalLoopOutput(predictions=out.predictions, label_ids=out.label_ids, metrics=metrics,
                              num_samples=out.num_samples)

    def create_optimizer(self, model: Optional[nn.Module] = None):
        """AdamW with the energy head (and a learnable temperature) in its own group at lr x energy_lr_scale."""
        if self.optimizer is None:
            from vla_energy.backbones.param_groups import param_groups

            net = _energy_model(self.model)
            groups = param_groups(net.backbone, net.plugin.policy_modules(), net.plugin.energy_modules(),
                                  self.args.learning_rate, self.energy_lr_scale, self.args.weight_decay)
            cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, net)
            kwargs.pop("lr", None)
            self.optimizer = cls(groups, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Model's own loss (with labels) + L1 + energy_loss_weight x global InfoNCE over all processes."""
        if self.energy_plugin.plan is None:
            self.energy_plugin.setup(self.accelerator, self.args.per_device_train_batch_size)
        outputs = model(**inputs)
        if model.training:
            for k, v in outputs.metrics.items():
                self._energy_metrics[k] = self._energy_metrics.get(k, 0.0) + v
            self._energy_count += 1
        else:
            for k, v in outputs.metrics.items():
                self._eval_sums[k] = self._eval_sums.get(k, 0.0) + v
            self._eval_count += 1
            if outputs.ranking_energies is not None:
                self._tally.add(*self.accelerator.gather_for_metrics(
                    (outputs.ranking_energies, inputs["candidate_actions"], inputs["candidate_mask"], outputs.policy)))
        loss = outputs.loss
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

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """save_model(dir) writes a policy directory (EnergyPolicy.from_pretrained loads it); inside a checkpoint,
        what training changes and the plugin's loss state, before the Trainer pushes or rotates checkpoints."""
        self._in_checkpoint = _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._in_checkpoint = False
        if _internal_call and self.args.should_save:
            save_states(Path(output_dir or self.args.output_dir), {PLUGIN_STATE: LossState(self.energy_plugin)})

    def _processor(self) -> Any:
        """The processor of the run: processing_class, or the one the VLACollator holds."""
        if self.processing_class is not None:
            return self.processing_class
        collator = getattr(self.data_collator, "collator", self.data_collator)
        return getattr(collator, "processor", None)

    def _inputs(self) -> Optional[dict[str, Any]]:
        """The model inputs' layout the VLACollator builds (its image columns as the cameras, each image given to the
        processor separately), for EnergyPolicy to lay out observations the same way; None for another collator."""
        collator = getattr(self.data_collator, "collator", self.data_collator)
        if not isinstance(collator, VLACollator):
            return None
        return {"processor_kwargs": collator.processor_kwargs or None, "cameras": list(collator.image_keys),
                "camera_layout": "separate"}

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """In a checkpoint: what training changes (LoRA, heads, buffers), not the frozen backbone, which a resumed
        run rebuilds from its base. Outside one: a policy directory with the processor and the Trainer's args; with
        sharded weights (FSDP, ZeRO-3), the gathered full state dict."""
        net = self.accelerator.unwrap_model(self.model)
        if not isinstance(net, EnergyVLAModel):  # peft wraps the whole model: its adapter + modules_to_save
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        in_checkpoint = getattr(self, "_in_checkpoint", False)
        sharded = self.is_fsdp_enabled or (self.is_deepspeed_enabled and
                                           self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        if in_checkpoint or sharded:
            state_dict = net.state_dict() if state_dict is None else state_dict
            keep = trainable_keys(net) if in_checkpoint else set(state_dict)
            # clone: tied aliases (a trained embedding and its LM head) share storage, which safetensors refuses
            return super()._save(output_dir, {k: v.detach().clone() for k, v in state_dict.items() if k in keep})
        if self.args.should_save:
            net.save_pretrained(output_dir, processor=self._processor(), norm_stats=self.norm_stats,
                                inputs=self._inputs())
            torch.save(self.args, Path(output_dir) / "training_args.bin")
        return None

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        """Frozen backbone weights are missing from a checkpoint on purpose (see _save): only warn about the rest."""
        net = self.accelerator.unwrap_model(self.model)
        frozen = {n for n, p in net.named_parameters(remove_duplicate=False) if not p.requires_grad}
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if k not in frozen]
        super()._issue_warnings_after_load(load_result)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """Also the plugin's loss state: every resume path (DeepSpeed's engine load included) passes here."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            load_states(Path(checkpoint), {PLUGIN_STATE: LossState(self.energy_plugin)})


class EnergyTrainer(EnergyLossMixin, Trainer):
    """transformers.Trainer with the energy loss; pass model=EnergyVLAModel(backbone, plugin)."""
