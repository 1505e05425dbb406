"""Finetune a VLA backbone (LoRA) with an action head and an energy head trained by global InfoNCE.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml -m vla_energy.training.train \
        --config demo [--max_steps 100 ...]

The same loop runs as `vla-energy train ...` and `recipes/train_energy.py ...`. Every option is a field of the
dataclasses in vla_energy/training/arguments.py (YAML keys and --flags alike); `--config` takes a YAML file or the
name of a shipped config (vla_energy/training/configs/).
"""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path
from typing import Callable

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
from vla_energy.data.normalization import NormStats
from vla_energy.data.pipeline import training_chunks
from vla_energy.evaluation.metrics import spread_indices
from vla_energy.evaluation.ranking import RankingCollator, RankingDataset, RankingTally
from vla_energy.evaluation.report import (
    add_results_to_policy,
    plot_curves,
    plot_energy_histograms,
    plots_available,
    write_metrics,
    write_report,
)
from vla_energy.inference.serialization import checkpoint_policy_writer, load_policy, save_policy
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.arguments import RUN_CONFIG, parse_config, save_run_config
from vla_energy.training.checkpoints import (
    TrainState,
    find_resume_checkpoint,
    load_states,
    register_checkpoint_hooks,
    rotate_checkpoints,
    save_checkpoint,
)
from vla_energy.training.clipping import clip_group_
from vla_energy.training.nonfinite import all_finite
from vla_energy.training.plugin import EnergyPlugin
from vla_energy.training.preflight import check_evaluation, check_trackers
from vla_energy.training.schedule import ProgressiveSchedule
from vla_energy.training.unused import check_unused_parameters

# Where DDP wraps the model (and stops on a trainable parameter without gradient).
DDP_TYPES = (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, lora_args, energy_args, train = parse_config(argv)
    run_dir = Path(train.output_dir) / train.run_name
    check_trackers(train.report_to)
    accelerator = Accelerator(
        # Without CUDA, `accelerate launch --multi_gpu` processes must run as MULTI_CPU (gloo), not alone.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=None if train.report_to == "none" else train.report_to.split(","),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=train.ddp_find_unused_parameters)],
    )
    register_checkpoint_hooks(accelerator)  # checkpoints hold what training changes, not the frozen base
    set_seed(train.seed)  # identical initial weights on every process
    main_proc = accelerator.is_main_process
    engine_clips = accelerator.distributed_type == DistributedType.DEEPSPEED
    if engine_clips:
        warnings.warn("DeepSpeed clips all gradients together with its config's gradient_clipping; the per-group "
                      "norms (max_grad_norm for the policy, the schedule's for the energy head) do not apply "
                      "(docs/distributed.md)", stacklevel=2)
        if train.on_nonfinite == "skip":
            # The engine steps inside backward at the window's end: a window cannot be left out after the fact.
            warnings.warn("DeepSpeed steps inside backward, so a non-finite loss cannot be skipped: on_nonfinite is "
                          "raise under DeepSpeed", stacklevel=2)
            train.on_nonfinite = "raise"

    # Data: the main process builds (and caches) the dataset first, the others read the cache.
    with accelerator.main_process_first():
        train_ds, val_ds, norm_stats = build_datasets(data_args, progress=main_proc and not train.disable_tqdm)
    action_dim = len(train_ds[0]["actions"][0])
    # Only the main process writes policies and checkpoints' policy files.
    retrieval = training_chunks(train_ds, train.retrieval_chunks) if main_proc else None
    state_dim = state_dim_of(train_ds) if data_args.use_state else None

    def build_model() -> tuple[EnergyVLAModel, LoadedBackbone]:
        """Backbone + LoRA, action head and energy head; or a saved policy's backbone, adapter and action head."""
        if model_args.init_from:
            backbone, loaded, action_head = start_from_policy(model_args.init_from, model_args.trust_remote_code,
                                                              lora_args, action_dim, data_args.horizon, norm_stats)
        else:
            loaded = load_backbone(model_args.backbone, model_args.trust_remote_code, model_args.action_token,
                                   model_args.dtype)
            backbone, action_head = None, None
        # The state token joins the vocabulary (it may grow the embeddings) before a fresh backbone gets LoRA.
        state_token_id = add_state_token(loaded.processor, loaded.model, model_args.state_token) if state_dim else None
        if backbone is None:
            backbone = apply_lora(loaded.model, lora_args)
        plugin = EnergyPlugin(energy_args, hidden_size_of(loaded.model), action_dim, data_args.horizon,
                              loaded.action_token_id, action_head=action_head, state_dim=state_dim,
                              state_token_id=state_token_id)
        return EnergyVLAModel(backbone, plugin), loaded

    # The main process loads first, so that a tiny-* checkpoint built into the cache on first use is built once.
    with accelerator.main_process_first():
        model, loaded = build_model()
    plugin = model.plugin
    plan = plugin.setup(accelerator, train.per_device_train_batch_size)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    collator = VLACollator(loaded.processor, horizon=data_args.horizon, action_token=loaded.action_token,
                           processor_kwargs=model_args.processor_kwargs,
                           state_token=model_args.state_token if state_dim else None)
    train_dl = DataLoader(train_ds, batch_size=train.per_device_train_batch_size, shuffle=True, collate_fn=collator,
                          num_workers=train.dataloader_num_workers)
    # Evenly spaced over the held-out split, so that every validation episode is represented; each sample carries
    # its ranking candidates, so that every rank evaluates its share through the (possibly sharded) model.
    eval_rows = val_ds.select(spread_indices(len(val_ds), train.eval_max_samples))
    # Pre-flight: an evaluation that cannot run fails now, not after training.
    evaluating = check_evaluation(train.eval_strategy, eval_rows["episode_index"] if len(eval_rows) else [],
                                  train.eval_num_negatives, log=accelerator.print)
    eval_dl = None
    if evaluating:
        eval_ds = RankingDataset(eval_rows, train.eval_num_negatives, seed=data_args.data_seed)
        eval_dl = DataLoader(eval_ds, batch_size=train.per_device_eval_batch_size,
                             collate_fn=RankingCollator(collator))

    optimizer = torch.optim.AdamW(
        param_groups(model.backbone, model.policy_heads(), plugin.energy_modules(), train.learning_rate,
                     train.energy_lr_scale, train.weight_decay)
    )
    schedule = ProgressiveSchedule(
        train.schedule_stable_steps, train.schedule_ramp_end_step, train.schedule_start_lr_scale,
        train.schedule_end_lr_scale, train.schedule_start_max_grad_norm, train.schedule_end_max_grad_norm,
    ) if train.progressive_schedule else ProgressiveSchedule.constant(1.0, train.max_grad_norm)
    warmup = (lambda s: min(1.0, (s + 1) / train.warmup_steps)) if train.warmup_steps else None
    lr_scheduler = schedule.make_lr_scheduler(optimizer, group_index=len(optimizer.param_groups) - 1,
                                              base_lambda=warmup)

    # One prepare: the whole model with its optimizer (FSDP2 shards both together; DeepSpeed builds one engine).
    # The scheduler is stepped by hand once per optimizer step, so its steps are optimizer steps at any world size.
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    net = accelerator.unwrap_model(model)
    # After prepare: FSDP2 has swapped the parameters for sharded DTensors.
    policy_params, energy_params = net.policy_parameters(), net.energy_parameters()
    # Saved beside accelerate's state as safetensors + JSON (accelerate would pickle registered objects).
    state = TrainState()
    extra_states = {"lr_scheduler": lr_scheduler, "energy_plugin": plugin, "train_state": state}

    # `latest` on a requeued job's first launch (no checkpoint yet) starts fresh.
    checkpoint = find_resume_checkpoint(train.resume_from_checkpoint, run_dir, log=accelerator.print)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        load_states(checkpoint, extra_states)
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(run_dir, (model_args, data_args, lora_args, energy_args, train))
    accelerator.init_trackers(train.run_name, config={
        "strategy": plan.name, "world_size": accelerator.num_processes, "local_batch": train.per_device_train_batch_size,
        "grad_accum": train.gradient_accumulation_steps, "tau": energy_args.tau, "lr": train.learning_rate,
    })

    def run_eval() -> tuple[dict[str, float], RankingTally]:
        """Ranking accuracy and losses on the held-out split; every rank evaluates its share, results gathered."""
        model.eval()
        tally, losses = RankingTally(energy_args.false_negative_eps), []
        with torch.no_grad():
            for batch in eval_dl:
                out = model(**batch)
                tally.add(*accelerator.gather_for_metrics(
                    (out.ranking_energies, batch["candidate_actions"], batch["candidate_mask"], out.policy)))
                losses.append(torch.stack([out.loss.detach().float(), out.energy_loss.float()]))
        model.train()
        metrics = tally.metrics()
        mean = accelerator.reduce(torch.stack(losses).mean(dim=0), reduction="mean").tolist()
        metrics.update({"loss": mean[0], "energy_loss": mean[1]})
        return metrics, tally

    batches_per_epoch = len(train_dl)
    accum = train.gradient_accumulation_steps
    stop_at = min(train.max_steps, state.step + train.stop_after_steps) if train.stop_after_steps else train.max_steps
    progress = tqdm(total=train.max_steps, initial=state.step, disable=not (main_proc and not train.disable_tqdm),
                    desc=f"train [{plan.name}]")
    skip_window = False  # a non-finite loss anywhere in the accumulation window skips the whole step
    checked_unused = state.step > 0
    running: dict[str, float] = {}
    while state.step < stop_at:
        epoch, done_in_epoch = divmod(state.micro_step, batches_per_epoch)
        train_dl.set_epoch(epoch)
        epoch_dl = accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        for batch in epoch_dl:
            # An epoch's last window can hold fewer micro-batches than gradient_accumulation_steps; accelerate divides
            # each loss by gradient_accumulation_steps regardless, so rescale to a mean over the window's real size
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
            if skip_window:  # nothing moves: weights, bank, schedule and step counter stay as they were
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
                local = torch.tensor([v / window for v in running.values()], device=accelerator.device)
                logged = dict(zip(running, accelerator.reduce(local, reduction="mean").tolist()))
                logged.update({"lr": optimizer.param_groups[0]["lr"], "lr_energy": optimizer.param_groups[-1]["lr"],
                               "max_grad_norm_energy": schedule.max_grad_norm(state.step - 1),
                               "skipped_steps": float(state.skipped_steps)})
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                accelerator.log(logged, step=state.step)
                state.history.append({"step": state.step, **logged})
                progress.set_postfix(loss=f"{logged['loss']:.3f}", acc=f"{logged.get('energy/acc', 0):.2f}")
            running.clear()

            if evaluating and train.eval_steps and state.step % train.eval_steps == 0 and state.step < train.max_steps:
                ev, _ = run_eval()
                accelerator.log({f"eval/{k}": v for k, v in ev.items()}, step=state.step)
                state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in ev.items()}})
            stopping = state.step >= stop_at
            if (train.save_steps and state.step % train.save_steps == 0) or (stopping and stop_at < train.max_steps):
                # Every checkpoint is also a policy (EnergyPolicy.from_pretrained(<checkpoint>)); with sharded weights
                # only the final model/ is (no rank holds the full weights at a checkpoint).
                writer = None if weights_sharded(accelerator) else checkpoint_policy_writer(
                    run_dir, net.backbone, plugin, norm_stats, loaded, unwrap=accelerator.unwrap_model,
                    retrieval_chunks=retrieval)
                save_checkpoint(accelerator, run_dir / "checkpoints" / f"step_{state.step:07d}", state.step,
                                extra_states, policy_writer=writer)
                if main_proc:
                    rotate_checkpoints(run_dir / "checkpoints", train.save_total_limit)
            if stopping:
                break
    progress.close()
    if state.step < train.max_steps:  # stop_after_steps: the next launch resumes from the checkpoint
        accelerator.print(f"stopped at step {state.step} of {train.max_steps}; resume with --resume_from_checkpoint latest")
        model = net = release_ddp(accelerator, model)
        gc.collect()
        accelerator.end_training()
        return {}

    saved = policy_module(accelerator, model, build_model)  # every rank takes part when weights are sharded
    if main_proc:
        # Saved before the final evaluation: an evaluation error does not lose the trained policy.
        save_policy(run_dir / "model", saved.backbone, saved.plugin, norm_stats, loaded, run_config=run_dir / RUN_CONFIG,
                    retrieval_chunks=retrieval)
    final: dict[str, float] = {}
    tally = None
    if evaluating:
        final, tally = run_eval()
        accelerator.log({f"eval/{k}": v for k, v in final.items()}, step=state.step)
        state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in final.items()}})
    if main_proc:
        final.update({
            "steps": float(state.step), "world_size": float(accelerator.num_processes),
            "local_batch": float(train.per_device_train_batch_size), "grad_accum": float(train.gradient_accumulation_steps),
            "skipped_steps": float(state.skipped_steps), "strategy": plan.name,
            "bank_entries": float(len(plugin.bank)) if plugin.bank is not None else 0.0,
            "negatives_per_positive": next((h["energy/num_negatives"] for h in reversed(state.history)
                                            if "energy/num_negatives" in h), math.nan),
        })
        write_outputs(run_dir, final, state.history, tally, train.eval_num_negatives)
        add_results_to_policy(run_dir / "model", final, run_dir)
        accelerator.print(f"top-1 accuracy {final['top1_acc']:.3f} (chance {final['chance_acc']:.3f}); "
                          f"report: {run_dir / 'report.md'}" if evaluating else
                          f"no evaluation; report: {run_dir / 'report.md'}")
    model = net = saved = release_ddp(accelerator, model)
    gc.collect()  # DDP wrappers sit in reference cycles: free them while every process still holds the group
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def state_dim_of(train_ds) -> int:
    """Ds of the training split's `state` column (use_state); a clear error when the dataset has none."""
    row = train_ds[0]
    if row.get("state") is None:
        raise ValueError(f"use_state is on but the training examples have no 'state' (columns: {sorted(row)}): "
                         "set state_key to the dataset's state column")
    return len(row["state"])


def weights_sharded(accelerator: Accelerator) -> bool:
    """Whether no single process holds the full weights (FSDP, DeepSpeed ZeRO-3)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def policy_module(accelerator: Accelerator, model: torch.nn.Module, build: Callable[[], tuple]) -> EnergyVLAModel:
    """The trained model with full weights for saving: the unwrapped model, or (sharded) a fresh copy on the main
    process filled from accelerator.get_state_dict, which every rank must call."""
    if not weights_sharded(accelerator):
        return accelerator.unwrap_model(model)
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return accelerator.unwrap_model(model)
    fresh, _ = build()
    fresh.load_state_dict(full)  # the temperature is a submodule: its state comes with the rest
    return fresh


def release_ddp(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """Drop the DDP wrapper before the process group is destroyed; returns the unwrapped model.

    A DDP reducer that is only freed at interpreter exit destroys the gloo group while holding the GIL, and gloo's
    worker thread, still freeing the last barrier's tensors, waits for the GIL: rank 0 hung after its final report
    (gdb stack in docs/reliability.md). Freed first (the caller collects the cycles), the group outlives the reducer
    and end_training destroys it.
    """
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model


def start_from_policy(path: str, trust_remote_code: bool, lora_args: LoraArguments, action_dim: int, horizon: int,
                      norm_stats: NormStats | None) -> tuple[torch.nn.Module, LoadedBackbone, torch.nn.Module]:
    """Backbone (LoRA trainable iff use_lora), LoadedBackbone and action head of a saved policy, in train mode."""
    policy = load_policy(path, trust_remote_code=trust_remote_code, trainable=lora_args.use_lora)
    head_cfg = policy.plugin.action_head.config
    if (head_cfg.action_dim, head_cfg.horizon) != (action_dim, horizon):
        raise ValueError(f"init_from {path}: its action head predicts (horizon, action_dim) = "
                         f"{(head_cfg.horizon, head_cfg.action_dim)}, the data has {(horizon, action_dim)}")
    if policy.norm_stats is not None and policy.norm_stats != norm_stats:
        warnings.warn(f"init_from {path}: the policy was trained with other action normalization statistics than "
                      "this dataset's; its action head starts from actions scaled differently", stacklevel=2)
    backbone = policy.backbone
    if not lora_args.use_lora:
        backbone.requires_grad_(False)
    elif not policy.info["has_adapter"]:
        backbone = apply_lora(backbone, lora_args)
    return backbone.train(), policy.loaded_backbone(), policy.plugin.action_head.train()


def write_outputs(run_dir: Path, final: dict, history: list[dict], outputs, num_negatives: int) -> None:
    """metrics.json, learning curves, energy histograms (with the plots extra) and report.md; `outputs` is None
    when the run did not evaluate."""
    write_metrics(run_dir / "metrics.json", {**final, "history": history})
    if not plots_available():
        print("matplotlib is not installed: no plots (pip install 'vla_energy[plots]')")
        write_report(run_dir / "report.md", f"vla_energy run `{run_dir.name}`", final, [])
        return
    plot_curves(run_dir / "loss.png", history, ["loss", "l1", "energy_loss", "energy/loss_floor"], "training loss")
    plot_curves(run_dir / "accuracy.png", history, ["energy/acc", "eval/top1_acc", "eval/chance_acc"], "accuracy")
    if outputs is None:
        write_report(run_dir / "report.md", f"vla_energy run `{run_dir.name}`", final, ["loss.png", "accuracy.png"],
                     notes=["No evaluation (eval_strategy no, or no validation split)."])
        return
    e = outputs.ranking_energies()
    plot_energy_histograms(run_dir / "energy_hist.png",
                           {"positive": e[:, 0].tolist(), "other episodes": e[:, 1:].flatten().tolist()},
                           "held-out energies")
    write_report(run_dir / "report.md", f"vla_energy run `{run_dir.name}`", final,
                 ["loss.png", "accuracy.png", "energy_hist.png"],
                 notes=[f"Top-1 ranking of the true chunk among {num_negatives + 1} chunks "
                        f"({num_negatives} from other episodes)."])


if __name__ == "__main__":
    main()
