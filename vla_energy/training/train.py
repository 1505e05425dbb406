"""Finetune a VLA backbone (LoRA) with an action head and an energy head trained by global InfoNCE.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m vla_energy.training.train \
        --config demo [--max_steps 100 ...]

The same loop runs as `vla-energy train ...` and `recipes/train_energy.py ...`. Every option is a field of the
option dataclasses gathered in vla_energy/training/arguments.py (CONFIG_CLASSES; YAML keys and --flags alike); `--config` takes a YAML file or the
name of a shipped config (vla_energy/training/configs/). `main` reads like accelerate's examples: each step is one
function below it, the accelerator does device placement, DDP/FSDP/DeepSpeed and accumulation.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vla_energy.backbones.action_token import add_state_token
from vla_energy.backbones.loading import LoadedBackbone, load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data import VLACollator, build_datasets
from vla_energy.data.loading import image_columns
from vla_energy.data.normalization import NormStats
from vla_energy.data.pipeline import retrieval_rows, training_chunks
from vla_energy.data.split import spread_indices
from vla_energy.evaluation.metrics import MIN_POLICY_SPREAD
from vla_energy.evaluation.ranking import RankingCollator, RankingDataset, RankingTally
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import (
    base_reference,
    checkpoint_policy_writer,
    load_policy,
    resolve_policy_dir,
    save_policy,
    shareable_base,
)
from vla_energy.training.arguments import ModelArguments, TrainArguments, run_config_dict, save_run_config
from vla_energy.training.checkpoints import (
    LossState,
    TrainState,
    find_resume_checkpoint,
    load_states,
    register_checkpoint_hooks,
    rotate_checkpoints,
    save_checkpoint,
)
from vla_energy.training.clipping import clip_group_
from vla_energy.training.nonfinite import all_finite
from vla_energy.training.preflight import (
    ConfigError,
    check_evaluation,
    check_resume_options,
    check_trackers,
    checked_config,
    clear_run_dir,
)
from vla_energy.training.retrieval_chunks import encode_context_keys
from vla_energy.training.run_report import add_results_to_policy, write_outputs
from vla_energy.training.schedule import ProgressiveSchedule
from vla_energy.training.unused import check_unused_parameters

__all__ = ["main", "run", "make_accelerator", "uses_cpu", "ERROR_DIR_ENV"]

# Set by `vla-energy train` when it launches processes: each failing rank writes its error's line there, so that the
# launcher ends with why the run failed.
ERROR_DIR_ENV = "VLA_ENERGY_ERROR_DIR"

# Where DDP wraps the model (and stops on a trainable parameter without gradient).
DDP_TYPES = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


@dataclass
class RunData:
    """What the data step gives the rest of the run."""

    train_ds: Any
    val_ds: Any
    norm_stats: NormStats
    action_dim: int
    state_dim: Optional[int]
    retrieval: Optional[torch.Tensor]  # normalized training chunks saved with the policy (main process only)
    cameras: list[str]  # the source's image columns the examples are built from, in camera order


def main(argv: list[str] | None = None) -> dict[str, float]:
    configs = checked_config(argv)
    model_args, data_args, lora_args, energy_args, train = configs
    run_dir = Path(train.output_dir) / train.run_name
    skipped: list[str] = []
    trackers = check_trackers(train.report_to, log=skipped.append)
    accelerator = make_accelerator(train, run_dir, trackers)
    check_retrieval_contexts(accelerator, train)
    run_config = run_config_dict(configs)  # after make_accelerator, which may change an option (DeepSpeed)
    for line in skipped:
        accelerator.print(line)
    if accelerator.is_main_process:
        clear_run_dir(train)  # overwrite_output_dir: nothing of an earlier run stays beside this one
    accelerator.wait_for_everyone()
    set_seed(train.seed)  # identical initial weights on every process

    data = load_data(accelerator, data_args, train)
    # The main process loads first, so that a tiny-* checkpoint built into the cache on first use is built once.
    with accelerator.main_process_first():
        model, loaded = build_model(model_args, lora_args, energy_args, data_args.horizon, data)
    base = policy_base(model_args, loaded, log=accelerator.print if accelerator.is_main_process else None)
    files = policy_files(loaded, data, run_config, model_args, data_args, base)
    plan = model.plugin.setup(accelerator, train.per_device_train_batch_size)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    collator = VLACollator(loaded.processor, horizon=data_args.horizon, action_token=loaded.action_token,
                           processor_kwargs=model_args.processor_kwargs,
                           state_token=model_args.state_token if data.state_dim else None)
    train_dl, eval_dl = make_dataloaders(accelerator, data, collator, train, data_args.data_seed)
    optimizer, schedule, lr_scheduler = make_optimizer(model, train)

    # One prepare: the whole model with its optimizer (FSDP2 shards both together; DeepSpeed builds one engine).
    # The scheduler is stepped by hand once per optimizer step, so its steps are optimizer steps at any world size.
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    net = accelerator.unwrap_model(model)

    # Saved beside accelerate's state as safetensors + JSON (accelerate would pickle registered objects).
    state = TrainState()
    extra_states = {"lr_scheduler": lr_scheduler, "energy_plugin": LossState(net.plugin), "train_state": state}
    resume(accelerator, train, run_dir, extra_states, run_config)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(train.run_name, config={
        "strategy": plan.name, "world_size": accelerator.num_processes, "local_batch": train.per_device_train_batch_size,
        "grad_accum": accelerator.gradient_accumulation_steps, "tau": energy_args.tau, "lr": train.learning_rate,
    })

    def evaluate() -> tuple[dict[str, float], RankingTally]:
        return run_evaluation(accelerator, model, eval_dl, energy_args.false_negative_eps)

    def write_checkpoint(step: int) -> None:
        # Every checkpoint is also a policy (EnergyPolicy.from_pretrained(<checkpoint>)); with sharded weights only
        # the final model/ is (no rank holds the full weights at a checkpoint). Either way it holds its options.
        writer = (lambda tmp: save_run_config(tmp, run_config)) if weights_sharded(accelerator) else \
            checkpoint_policy_writer(net, **files)
        save_checkpoint(accelerator, run_dir / "checkpoints" / f"step_{step:07d}", step, extra_states,
                        policy_writer=writer)
        if accelerator.is_main_process:
            rotate_checkpoints(run_dir / "checkpoints", train.save_total_limit)

    train_loop(accelerator, model, optimizer, lr_scheduler, schedule, train_dl, train, state,
               evaluate if eval_dl is not None else None, write_checkpoint)
    if state.step < train.max_steps:  # stop_after_steps: the next launch resumes from the checkpoint
        accelerator.print(f"stopped at step {state.step} of {train.max_steps}; resume with --resume_from_checkpoint latest")
        model = accelerator.unwrap_model(model)  # the closures above see this too: no DDP wrapper stays referenced
        finish(accelerator)
        return {}

    if train.retrieval_contexts:
        files["retrieval_contexts"] = retrieval_contexts(accelerator, model, data, collator, train)
    # Saved before the final evaluation: an evaluation error does not lose the trained policy.
    saved = policy_module(accelerator, model, lambda: build_model(model_args, lora_args, energy_args,
                                                                  data_args.horizon, data)[0])
    if accelerator.is_main_process:
        # The run's options are written with the model they describe, never beside another run's model.
        save_policy(run_dir / "model", saved, **files)
        save_run_config(run_dir, run_config)
    final, tally = {}, None
    if eval_dl is not None:
        final, tally = evaluate()
        accelerator.log({f"eval/{k}": v for k, v in final.items()}, step=state.step)
        state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in final.items()}})
    if accelerator.is_main_process:
        final.update(run_summary(accelerator, train, state, net.plugin))
        write_outputs(run_dir, final, state.history, tally, train.eval_num_negatives)
        add_results_to_policy(run_dir / "model", final, run_dir)
        accelerator.print(f"top-1 accuracy {final['top1_acc']:.3f} (chance {final['chance_acc']:.3f}); "
                          f"report: {run_dir / 'report.md'}" if tally is not None else
                          f"no evaluation; report: {run_dir / 'report.md'}")
        if final.get("policy_spread", MIN_POLICY_SPREAD) < MIN_POLICY_SPREAD:
            accelerator.print(f"warning: the policy gives nearly every held-out observation the same chunk "
                              f"(policy_spread {final['policy_spread']:.3g}: the spread of its chunks across samples "
                              "relative to the demonstrated ones'): the backbone has not learned to tell observations "
                              "apart, and an energy head cannot rank chunks on its contexts either. Train longer, or "
                              "start from a policy that sees the task (--init_from)")
    model = saved = accelerator.unwrap_model(model)
    finish(accelerator)
    return final


# The steps of main ------------------------------------------------------------------------------------------------


def uses_cpu() -> bool:
    """Whether the run must be told to use the CPU: no accelerator (CUDA, XPU, MPS, ...) is available. Then
    `accelerate launch --multi_gpu` processes run as MULTI_CPU (gloo) instead of alone."""
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return not acc.is_available()
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def make_accelerator(train: TrainArguments, run_dir: Path, trackers: Optional[list[str]] = None) -> Accelerator:
    """The Accelerator of the run: trackers (default: report_to's installed ones), seedable sampler, DDP options,
    checkpoint hooks; it owns accumulation."""
    trackers = check_trackers(train.report_to, log=lambda _: None) if trackers is None else trackers
    accelerator = Accelerator(
        cpu=uses_cpu(),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.ddp_find_unused_parameters)],
    )
    if accelerator.gradient_accumulation_steps != train.gradient_accumulation_steps:
        # accelerate launch exports a DeepSpeed config's value (ACCELERATE_GRADIENT_ACCUMULATION_STEPS), which
        # beats the option; the loop must not divide by one number while the engine accumulates another.
        raise ValueError(
            f"gradient accumulation: the accelerate launch configuration sets {accelerator.gradient_accumulation_steps} "
            f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS, e.g. deepspeed_config.gradient_accumulation_steps in the "
            f"--config_file YAML) but --gradient_accumulation_steps is {train.gradient_accumulation_steps}: set the "
            "same value in both")
    register_checkpoint_hooks(accelerator)  # checkpoints hold what training changes, not the frozen base
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        warnings.warn("DeepSpeed clips all gradients together with its config's gradient_clipping; the per-group "
                      "norms (max_grad_norm for the policy, the schedule's for the energy head) do not apply "
                      "(docs/distributed.md)", stacklevel=2)
        if train.on_nonfinite == "skip":
            # The engine steps inside backward at the window's end: a window cannot be left out after the fact.
            warnings.warn("DeepSpeed steps inside backward, so a non-finite loss cannot be skipped: on_nonfinite is "
                          "raise under DeepSpeed", stacklevel=2)
            train.on_nonfinite = "raise"
    return accelerator


def load_data(accelerator: Accelerator, data_args: Any, train: TrainArguments) -> RunData:
    """The split datasets (the main process builds and caches them first, the others read the cache)."""
    with accelerator.main_process_first():
        train_ds, val_ds, norm_stats = build_datasets(data_args, progress=accelerator.is_main_process and
                                                      not train.disable_tqdm)
    state_dim = None
    if data_args.use_state:
        row = train_ds[0]
        if row.get("state") is None:
            raise ValueError(f"use_state is on but the training examples have no 'state' (columns: {sorted(row)}): "
                             "set state_key to the dataset's state column")
        state_dim = len(row["state"])
    # Only the main process writes policies and checkpoints' policy files.
    retrieval = training_chunks(train_ds, train.retrieval_chunks) if accelerator.is_main_process else None
    return RunData(train_ds, val_ds, norm_stats, len(train_ds[0]["actions"][0]), state_dim, retrieval,
                   image_columns(data_args))


def build_model(model_args: ModelArguments, lora_args: LoraArguments, energy_args: Any, horizon: int,
                data: RunData) -> tuple[EnergyVLAModel, LoadedBackbone]:
    """Backbone + LoRA and a fresh plugin; with init_from, a saved policy's backbone, adapter and action head."""
    source = None
    if model_args.init_from:
        source = load_policy(model_args.init_from, trust_remote_code=model_args.trust_remote_code,
                             trainable=lora_args.use_lora)
        check_init_from(model_args.init_from, source, data, horizon)
        loaded = source.loaded_backbone()
    else:
        loaded = load_backbone(model_args.backbone, model_args.trust_remote_code, model_args.action_token,
                               model_args.dtype)
    # The state token joins the vocabulary (it may grow the embeddings) before a fresh backbone gets LoRA.
    state_token_id = add_state_token(loaded.processor, loaded.model, model_args.state_token) if data.state_dim else None
    if source is None:
        backbone = apply_lora(loaded.model, lora_args)
    else:
        backbone = source.backbone
        if not lora_args.use_lora:
            backbone.requires_grad_(False)
        elif not source.info["has_adapter"]:
            backbone = apply_lora(backbone, lora_args)
    plugin = EnergyPlugin(energy_args, hidden_size_of(loaded.model), data.action_dim, horizon, loaded.action_token_id,
                          state_dim=data.state_dim, state_token_id=state_token_id)
    plugin.set_action_bounds(*data.norm_stats.normalized_bounds())
    if source is not None and source.plugin.args.action_head != energy_args.action_head:
        # Another kind of head (an L1 policy's backbone under a flow head): the backbone is what carries over.
        warnings.warn(f"init_from {model_args.init_from}: its action head is {source.plugin.args.action_head!r}, this "
                      f"run's --action_head is {energy_args.action_head!r}: the backbone and adapter come from it, the "
                      "action head starts fresh", stacklevel=2)
    elif source is not None:  # the saved action head; the energy head starts fresh
        try:
            plugin.action_head.load_state_dict(source.plugin.action_head.state_dict())
        except RuntimeError as e:
            raise ValueError(f"init_from {model_args.init_from}: its action head was built with other sizes "
                             f"(action_head_dim {source.plugin.args.action_head_dim}); pass the same "
                             "--action_head_dim") from e
    return EnergyVLAModel(backbone, plugin).train(), loaded


def check_init_from(path: str, source: Any, data: RunData, horizon: int) -> None:
    """A clear error when the saved policy cannot start this run, a warning when its actions were scaled otherwise."""
    saved = (source.plugin.horizon, source.plugin.action_dim)
    if saved != (horizon, data.action_dim):
        raise ValueError(f"init_from {path}: its action head predicts (horizon, action_dim) = {saved}, the data has "
                         f"{(horizon, data.action_dim)}")
    if source.norm_stats is not None and source.norm_stats != data.norm_stats:
        warnings.warn(f"init_from {path}: the policy was trained with other action normalization statistics than "
                      "this dataset's; its action head starts from actions scaled differently", stacklevel=2)


def make_dataloaders(accelerator: Accelerator, data: RunData, collator: VLACollator, train: TrainArguments,
                     data_seed: int) -> tuple[DataLoader, Optional[DataLoader]]:
    """The training loader, and the held-out ranking loader (None when the run does not evaluate)."""
    train_dl = DataLoader(data.train_ds, batch_size=train.per_device_train_batch_size, shuffle=True,
                          collate_fn=collator, num_workers=train.dataloader_num_workers)
    # Evenly spaced over the held-out split, so that every validation episode is represented; each sample carries
    # its ranking candidates, so that every rank evaluates its share through the (possibly sharded) model.
    eval_rows = data.val_ds.select(spread_indices(len(data.val_ds), train.eval_max_samples))
    # Pre-flight: an evaluation that cannot run fails now, not after training.
    evaluating = check_evaluation(train.eval_strategy, eval_rows["episode_index"] if len(eval_rows) else [],
                                  train.eval_num_negatives, log=accelerator.print)
    if not evaluating:
        return train_dl, None
    eval_ds = RankingDataset(eval_rows, train.eval_num_negatives, seed=data_seed)
    return train_dl, DataLoader(eval_ds, batch_size=train.per_device_eval_batch_size,
                                collate_fn=RankingCollator(collator))


def make_optimizer(model: EnergyVLAModel, train: TrainArguments) -> tuple[torch.optim.Optimizer, ProgressiveSchedule,
                                                                          torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with the policy and energy groups, the energy group's progressive schedule, and the lr scheduler."""
    optimizer = torch.optim.AdamW(
        param_groups(model.backbone, model.plugin.policy_modules(), model.plugin.energy_modules(),
                     train.learning_rate, train.energy_lr_scale, train.weight_decay)
    )
    schedule = ProgressiveSchedule(
        train.schedule_stable_steps, train.schedule_ramp_end_step, train.schedule_start_lr_scale,
        train.schedule_end_lr_scale, train.schedule_start_max_grad_norm, train.schedule_end_max_grad_norm,
    ) if train.progressive_schedule else ProgressiveSchedule.constant(1.0, train.max_grad_norm)
    warmup = (lambda s: min(1.0, (s + 1) / train.warmup_steps)) if train.warmup_steps else None
    lr_scheduler = schedule.make_lr_scheduler(optimizer, group_index=len(optimizer.param_groups) - 1,
                                              base_lambda=warmup)
    return optimizer, schedule, lr_scheduler


def resume(accelerator: Accelerator, train: TrainArguments, run_dir: Path, extra_states: dict[str, Any],
           run_config: dict[str, Any]) -> None:
    """Restore the checkpoint named by resume_from_checkpoint (`latest` before any checkpoint starts fresh), after
    checking that it was trained with the options that shape the model and its data."""
    checkpoint = find_resume_checkpoint(train.resume_from_checkpoint, run_dir, log=accelerator.print)
    if checkpoint is not None:
        check_resume_options(checkpoint, run_config)
        accelerator.load_state(str(checkpoint))
        load_states(checkpoint, extra_states)
        accelerator.print(f"resumed from {checkpoint} at step {extra_states['train_state'].step}")


def train_loop(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
               schedule: ProgressiveSchedule, train_dl: Any, train: TrainArguments, state: TrainState,
               evaluate: Optional[Callable[[], tuple[dict[str, float], RankingTally]]],
               write_checkpoint: Callable[[int], None]) -> None:
    """Optimizer steps until max_steps (or stop_after_steps), with logging, evaluation and checkpoints on the way.

    A step is skipped everywhere (weights, bank, schedules and step counter unchanged) when a loss of its window is
    non-finite on any process (on_nonfinite skip) or when the loss scaler skipped the optimizer step (fp16).
    """
    net = accelerator.unwrap_model(model)
    plugin = net.plugin
    # After prepare: FSDP2 has swapped the parameters for sharded DTensors.
    policy_params, energy_params = net.policy_parameters(), net.energy_parameters()
    engine_clips = accelerator.distributed_type == DistributedType.DEEPSPEED
    batches_per_epoch = len(train_dl)
    accum = accelerator.gradient_accumulation_steps
    stop_at = min(train.max_steps, state.step + train.stop_after_steps) if train.stop_after_steps else train.max_steps
    main_proc = accelerator.is_main_process
    progress = tqdm(total=train.max_steps, initial=state.step, disable=not main_proc or train.disable_tqdm,
                    desc=f"train [{plugin.plan.name}]")
    skip_window = False  # a non-finite loss anywhere in the accumulation window skips the whole step
    checked_unused = state.step > 0
    running: dict[str, float] = {}
    while state.step < stop_at:
        epoch, done_in_epoch = divmod(state.micro_step, batches_per_epoch)
        train_dl.set_epoch(epoch)
        epoch_dl = accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        for batch in epoch_dl:
            # An epoch's last window can hold fewer micro-batches than the accumulation steps; accelerate divides
            # each loss by the accumulation steps regardless, so rescale to a mean over the window's real size
            # (what transformers.Trainer does), so that the step's gradient does not shrink.
            position = state.micro_step % batches_per_epoch
            window = min(accum, batches_per_epoch - (position - position % accum))
            with accelerator.accumulate(model):
                outputs = model(**batch)
                loss, metrics = outputs.loss, outputs.metrics
                # All ranks agree on finiteness before backward, so no rank waits in an all-reduce alone.
                if not all_finite(accelerator, loss):
                    if train.on_nonfinite == "raise":
                        raise FloatingPointError(f"non-finite loss at step {state.step}: {metrics}")
                    skip_window = True
                else:
                    accelerator.backward(loss if window == accum else loss * (accum / window))
                grad_norm = None
                if accelerator.sync_gradients and not skip_window:
                    if not checked_unused and accelerator.distributed_type in DDP_TYPES:
                        check_unused_parameters(net, train.ddp_find_unused_parameters)
                    checked_unused = True
                    if not engine_clips:
                        # One unscale (a GradScaler refuses a second), then each group at its own norm.
                        accelerator.unscale_gradients()
                        grad_norm = clip_group_(policy_params, train.max_grad_norm)
                        clip_group_(energy_params, schedule.max_grad_norm(state.step))
                if not skip_window:
                    optimizer.step()
                optimizer.zero_grad()
            state.micro_step += 1
            for k, v in metrics.items():
                running[k] = running.get(k, 0.0) + v
            if not accelerator.sync_gradients:
                continue
            if skip_window or accelerator.optimizer_step_was_skipped:
                # Nothing moves: weights, bank, schedules and step counter stay as they were.
                plugin.skip_step()
                state.skipped_steps += 1
                skip_window = False
                running.clear()
                continue
            lr_scheduler.step()
            plugin.after_optimizer_step()
            state.step += 1
            progress.update(1)
            if state.step % train.logging_steps == 0 or state.step == train.max_steps:
                logged = log_step(accelerator, running, window, optimizer, schedule, state, grad_norm)
                progress.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged.get('energy/acc', 0):.2f}")
                if train.disable_tqdm:  # no bar: the logged values are the run's only sign of life
                    accelerator.print(log_line(state.step, train.max_steps, logged))
            running.clear()
            if evaluate is not None and train.eval_steps and state.step % train.eval_steps == 0 \
                    and state.step < train.max_steps:
                ev, _ = evaluate()
                accelerator.log({f"eval/{k}": v for k, v in ev.items()}, step=state.step)
                state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in ev.items()}})
                if train.disable_tqdm:
                    accelerator.print(log_line(state.step, train.max_steps, ev, prefix="eval "))
            stopping = state.step >= stop_at
            if (train.save_steps and state.step % train.save_steps == 0) or (stopping and stop_at < train.max_steps):
                write_checkpoint(state.step)
            if stopping:
                break
    progress.close()


def log_step(accelerator: Accelerator, running: dict[str, float], window: int, optimizer: Any,
             schedule: ProgressiveSchedule, state: TrainState, grad_norm: Optional[torch.Tensor]) -> dict[str, float]:
    """The window's metrics averaged over its micro-batches and the processes, logged and kept in the history."""
    local = torch.tensor([v / window for v in running.values()], device=accelerator.device)
    logged = dict(zip(running, accelerator.reduce(local, reduction="mean").tolist()))
    logged.update({"lr": optimizer.param_groups[0]["lr"], "lr_energy": optimizer.param_groups[-1]["lr"],
                   "max_grad_norm_energy": schedule.max_grad_norm(state.step - 1),
                   "skipped_steps": float(state.skipped_steps)})
    if grad_norm is not None:
        logged["grad_norm"] = float(grad_norm)
    accelerator.log(logged, step=state.step)
    state.history.append({"step": state.step, **logged})
    return logged


# The values a printed log line shows, in this order, when present.
LOG_LINE_KEYS = ("loss", "l1", "energy_loss", "energy/acc", "energy/gap", "top1_acc", "chance_acc", "action_l1",
                 "policy_spread", "grad_norm", "lr")


def log_line(step: int, max_steps: int, values: dict[str, float], prefix: str = "") -> str:
    """`step 20/900 loss 0.5120 l1 0.2010 ...`: the main logged values of a step, one line."""
    shown = " ".join(f"{k} {values[k]:.4g}" for k in LOG_LINE_KEYS if k in values)
    return f"{prefix}step {step}/{max_steps} {shown}"


def run_evaluation(accelerator: Accelerator, model: torch.nn.Module, eval_dl: Any, false_negative_eps: float
                   ) -> tuple[dict[str, float], RankingTally]:
    """Ranking accuracy and losses on the held-out split; every rank evaluates its share, results gathered. The
    duplicates that `even_batches` adds to the last batch count in neither the ranking nor the losses."""
    model.eval()
    tally = RankingTally(false_negative_eps)
    sums, samples = torch.zeros(2, dtype=torch.float64, device=accelerator.device), 0
    with torch.no_grad():
        for batch in eval_dl:
            real = real_rows(accelerator, batch["actions"].shape[0])
            out = model(**batch, sample_mask=real)
            tally.add(*accelerator.gather_for_metrics(
                (out.ranking_energies, batch["candidate_actions"], batch["candidate_mask"], out.policy)))
            # Each rank's loss is its share of the batch's mean over real samples: weight batches by their size.
            count = int(accelerator.reduce(real.sum().to(accelerator.device), reduction="sum"))
            sums += count * torch.stack([out.loss.detach(), out.energy_loss]).double()
            samples += count
    model.train()
    metrics = tally.metrics()
    mean = (accelerator.reduce(sums, reduction="mean") / max(samples, 1)).tolist()
    metrics.update({"loss": mean[0], "energy_loss": mean[1]})
    return metrics, tally


def real_rows(accelerator: Accelerator, batch_size: int) -> torch.Tensor:
    """[b] True for the rows of this process's evaluation batch that are samples, False for the duplicates that
    `even_batches` adds to the last batch (gather_for_metrics drops the same rows)."""
    state = accelerator.gradient_state
    rows = torch.ones(batch_size, dtype=torch.bool, device=accelerator.device)
    if state.end_of_dataloader and state.remainder > 0:
        start = accelerator.process_index * batch_size
        rows = torch.arange(start, start + batch_size, device=accelerator.device) < state.remainder
    return rows


def policy_base(model_args: ModelArguments, loaded: LoadedBackbone, log: Optional[Callable[[str], Any]] = None
                ) -> dict[str, Optional[str]]:
    """How the policy names its base model (serialization.base_reference): base_model_id / base_model_revision for
    a local copy; with init_from, what that policy recorded. `log` gets one line when others could not load it."""
    if model_args.init_from and model_args.base_model_id is None:
        info = json.loads((resolve_policy_dir(model_args.init_from) / "policy_config.json").read_text())
        base = {k: info.get(k) for k in ("backbone", "revision", "backbone_local_path")}
    else:
        base = base_reference(loaded.name, model_args.base_model_id, model_args.base_model_revision,
                              loaded.model.config)
    if log is not None:
        if shareable_base({"backbone": base["backbone"]}) is not None:
            log(f"note: the saved policy loads only where {base['backbone']} exists: pass --base_model_id org/name "
                "--base_model_revision <commit> (the hub model that directory is a copy of) to name it")
        elif base["backbone_local_path"] and not base["revision"]:
            log(f"note: the saved policy names its base {base['backbone']} without a revision (it loads the hub's "
                "current one elsewhere): pass --base_model_revision <commit> of the local copy")
    return base


def check_retrieval_contexts(accelerator: Accelerator, train: TrainArguments) -> None:
    """Refuse retrieval_contexts with sharded weights, before training: each process encodes its share with the
    unwrapped model, outside the wrapper's forward that would gather sharded weights."""
    if train.retrieval_contexts and weights_sharded(accelerator):
        raise ConfigError("--retrieval_contexts encodes the training samples with the trained model, which needs its "
                          "full weights on every process; with sharded weights (FSDP, DeepSpeed ZeRO-3) train without "
                          "it and add the contexts to the saved policy afterwards: "
                          "vla_energy.training.retrieval_chunks.add_retrieval_chunks('<run>/model', contexts=True)")


def retrieval_contexts(accelerator: Accelerator, model: torch.nn.Module, data: RunData, collator: VLACollator,
                       train: TrainArguments) -> Optional[torch.Tensor]:
    """The context keys [N,D] of the retrieval chunks' samples under the trained model (main process; None
    elsewhere): every process encodes its share of them, gathered in order."""
    loader = accelerator.prepare(DataLoader(retrieval_rows(data.train_ds, train.retrieval_chunks),
                                            batch_size=train.per_device_eval_batch_size, collate_fn=collator))
    with accelerator.autocast():
        keys = encode_context_keys(accelerator.unwrap_model(model), loader, len(loader),
                                   accelerator.is_main_process and not train.disable_tqdm,
                                   gather=accelerator.gather_for_metrics)
    return keys if accelerator.is_main_process else None


def policy_files(loaded: LoadedBackbone, data: RunData, run_config: dict[str, Any], model_args: ModelArguments,
                 data_args: Any, base: dict[str, Optional[str]]) -> dict[str, Any]:
    """What write_policy needs beside the model: the processor, statistics, base model, inputs' layout, options."""
    return {"processor": loaded.processor, "norm_stats": data.norm_stats, "base": base["backbone"],
            "revision": base["revision"], "base_local_path": base["backbone_local_path"], "run_config": run_config,
            "retrieval_chunks": data.retrieval,
            "inputs": {"processor_kwargs": model_args.processor_kwargs, "cameras": data.cameras,
                       "camera_layout": data_args.camera_layout}}


def run_summary(accelerator: Accelerator, train: TrainArguments, state: TrainState, plugin: EnergyPlugin
                ) -> dict[str, Any]:
    """The run's layout and counters for metrics.json and the report."""
    return {
        "steps": float(state.step), "world_size": float(accelerator.num_processes),
        "local_batch": float(train.per_device_train_batch_size),
        "grad_accum": float(accelerator.gradient_accumulation_steps), "skipped_steps": float(state.skipped_steps),
        "strategy": plugin.plan.name, "bank_entries": float(len(plugin.bank)) if plugin.bank is not None else 0.0,
        "negatives_per_positive": next((h["energy/num_negatives"] for h in reversed(state.history)
                                        if "energy/num_negatives" in h), math.nan),
    }


def weights_sharded(accelerator: Accelerator) -> bool:
    """Whether no single process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def policy_module(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], EnergyVLAModel]
                  ) -> EnergyVLAModel:
    """The trained model with full weights for saving: the unwrapped model, or (sharded) a fresh copy on the main
    process filled from accelerator.get_state_dict, which every rank must call."""
    if not weights_sharded(accelerator):
        return accelerator.unwrap_model(model)
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return accelerator.unwrap_model(model)
    fresh = build()
    fresh.load_state_dict(full)
    return fresh


def finish(accelerator: Accelerator) -> None:
    """Free the DDP wrapper before the process group is destroyed (the caller holds no reference to it any more),
    then end the trackers and the group.

    A DDP reducer that is only freed at interpreter exit destroys the gloo group while holding the GIL, and gloo's
    worker thread, still freeing the last barrier's tensors, waits for the GIL: rank 0 hung after its final report
    (gdb stack in docs/reliability.md). Freed first (the cycles collected), the group outlives the reducer and
    end_training destroys it.
    """
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _report_failure(line: str) -> None:
    """The error's line where launchers read it: `vla-energy train`'s error directory, and torchrun's error file
    (its closing summary then shows this line as the root cause instead of a pointer to the docs)."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir:
        Path(error_dir, f"rank_{_rank()}.txt").write_text(f"{time.time()}\n{line}")
    torchrun_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if torchrun_file:
        Path(torchrun_file).write_text(json.dumps({"message": {"message": line, "extraInfo": {
            "py_callstack": line, "timestamp": str(int(time.time()))}}}))


def run(argv: Optional[list[str]] = None) -> int:
    """The recipe as a command: a configuration error in one line (from the first process only); any other failure
    with its traceback, then a last line naming the process and the error."""
    try:
        main(argv)
    except ConfigError as e:
        if _rank() != 0:
            # Every process finds the same error: the first reports it, the others leave it the time to do so
            # before the launcher stops them all.
            time.sleep(10)
            return 2
        print(f"error: {e}", file=sys.stderr)
        _report_failure(f"{type(e).__name__}: {e}")
        return 2
    except Exception as e:
        traceback.print_exc()
        line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _report_failure(line)
        print(f"training failed on rank {_rank()}: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
