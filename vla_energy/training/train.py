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

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vla_energy.backbones.loading import LoadedBackbone, load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import backbone_forward, hidden_size_of
from vla_energy.data import VLACollator, build_datasets
from vla_energy.data.normalization import NormStats
from vla_energy.evaluation.metrics import evaluate, spread_indices
from vla_energy.evaluation.report import plot_curves, plot_energy_histograms, write_metrics, write_report
from vla_energy.inference.serialization import load_policy, save_policy
from vla_energy.training.arguments import parse_config, save_run_config
from vla_energy.training.checkpoints import (
    TrainState,
    load_states,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from vla_energy.training.nonfinite import all_finite
from vla_energy.training.plugin import EnergyPlugin
from vla_energy.training.schedule import ProgressiveSchedule


def main(argv: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, lora_args, energy_args, train = parse_config(argv)
    run_dir = Path(train.output_dir) / train.run_name
    accelerator = Accelerator(
        # Without CUDA, `accelerate launch --multi_gpu` processes must run as MULTI_CPU (gloo), not alone.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=None if train.report_to == "none" else train.report_to.split(","),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # Real checkpoints hold layers the forward skips (LLaVA reads vision layer -2): their LoRA weights get no grad.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(train.seed)  # identical initial weights on every process
    main_proc = accelerator.is_main_process

    # Data: the main process builds (and caches) the dataset first, the others read the cache.
    with accelerator.main_process_first():
        train_ds, val_ds, norm_stats = build_datasets(data_args, progress=main_proc and not train.disable_tqdm)
    action_dim = len(train_ds[0]["actions"][0])

    # Backbone + LoRA, action head and energy head; or a saved policy's backbone, adapter and action head.
    if model_args.init_from:
        backbone, loaded, action_head = start_from_policy(model_args.init_from, model_args.trust_remote_code,
                                                          lora_args, action_dim, data_args.horizon, norm_stats)
    else:
        loaded = load_backbone(model_args.backbone, model_args.trust_remote_code, model_args.action_token,
                               model_args.dtype)
        backbone, action_head = apply_lora(loaded.model, lora_args), None
    plugin = EnergyPlugin(energy_args, hidden_size_of(loaded.model), action_dim, data_args.horizon,
                          loaded.action_token_id, action_head=action_head)
    plan = plugin.setup(accelerator, train.per_device_train_batch_size)

    collator = VLACollator(loaded.processor, horizon=data_args.horizon, action_token=loaded.action_token,
                           processor_kwargs=model_args.processor_kwargs)
    train_dl = DataLoader(train_ds, batch_size=train.per_device_train_batch_size, shuffle=True, collate_fn=collator,
                          num_workers=train.dataloader_num_workers)
    # Evenly spaced over the held-out split, so that every validation episode is represented.
    eval_ds = val_ds.select(spread_indices(len(val_ds), train.eval_max_samples))
    eval_dl = DataLoader(eval_ds, batch_size=train.per_device_eval_batch_size, collate_fn=collator)

    optimizer = torch.optim.AdamW(
        param_groups(backbone, plugin.action_head, plugin.energy_modules(), train.learning_rate,
                     train.energy_lr_scale, train.weight_decay)
    )
    schedule = ProgressiveSchedule(
        train.schedule_stable_steps, train.schedule_ramp_end_step, train.schedule_start_lr_scale,
        train.schedule_end_lr_scale, train.schedule_start_max_grad_norm, train.schedule_end_max_grad_norm,
    ) if train.progressive_schedule else ProgressiveSchedule.constant(1.0, train.max_grad_norm)
    warmup = (lambda s: min(1.0, (s + 1) / train.warmup_steps)) if train.warmup_steps else None
    lr_scheduler = schedule.make_lr_scheduler(optimizer, group_index=len(optimizer.param_groups) - 1,
                                              base_lambda=warmup)

    # Every trained module goes through prepare (DDP) so that all ranks keep identical weights. The scheduler is
    # stepped by hand once per optimizer step: its steps are optimizer steps, whatever the world size.
    # A frozen backbone (use_lora false) only moves to the device: DDP refuses a module without trainable parameters.
    frozen_backbone = not any(p.requires_grad for p in backbone.parameters())
    if frozen_backbone:
        backbone.to(accelerator.device)
    else:
        backbone = accelerator.prepare(backbone)
    plugin.action_head = accelerator.prepare(plugin.action_head)
    plugin.energy_head = accelerator.prepare(plugin.energy_head)
    optimizer, train_dl = accelerator.prepare(optimizer, train_dl)
    if any(p.requires_grad for p in plugin.temperature.parameters()):
        plugin.temperature = accelerator.prepare(plugin.temperature)  # a learnable tau must stay equal on all ranks
    # Saved beside accelerate's state as safetensors + JSON (accelerate would pickle registered objects).
    state = TrainState()
    extra_states = {"lr_scheduler": lr_scheduler, "energy_plugin": plugin, "train_state": state}
    policy_params = [p for m in (backbone, plugin.action_head) for p in m.parameters() if p.requires_grad]
    energy_params = [p for m in plugin.energy_modules() for p in m.parameters() if p.requires_grad]

    if train.resume_from_checkpoint:
        checkpoint = resolve_resume(train.resume_from_checkpoint, run_dir)
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

    def run_eval() -> tuple[dict[str, float], object]:
        """Ranking accuracy on the held-out split, computed on the main process with the unwrapped modules."""
        for m in (backbone, plugin.action_head, plugin.energy_head):
            m.eval()
        with torch.no_grad():
            heads = (plugin.action_head, plugin.energy_head)
            plugin.action_head, plugin.energy_head = (accelerator.unwrap_model(m) for m in heads)
            batches = ({k: v.to(accelerator.device) for k, v in b.items()} for b in eval_dl)
            metrics, outputs = evaluate(accelerator.unwrap_model(backbone), plugin, batches,
                                        train.eval_num_negatives, seed=data_args.data_seed, progress=False)
            plugin.action_head, plugin.energy_head = heads
        for m in (backbone, plugin.action_head, plugin.energy_head):
            m.train()
        return metrics, outputs

    batches_per_epoch = len(train_dl)
    stop_at = min(train.max_steps, state.step + train.stop_after_steps) if train.stop_after_steps else train.max_steps
    progress = tqdm(total=train.max_steps, initial=state.step, disable=not (main_proc and not train.disable_tqdm),
                    desc=f"train [{plan.name}]")
    skip_window = False  # a non-finite loss anywhere in the accumulation window skips the whole step
    running: dict[str, float] = {}
    while state.step < stop_at:
        epoch, done_in_epoch = divmod(state.micro_step, batches_per_epoch)
        train_dl.set_epoch(epoch)
        epoch_dl = accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        for batch in epoch_dl:
            with accelerator.accumulate(backbone, plugin.action_head, plugin.energy_head):
                outputs = backbone_forward(backbone, batch)
                loss, metrics = plugin.compute_loss(outputs, batch, accelerator)
                # All ranks agree on finiteness before backward, so no rank waits in an all-reduce alone.
                if not all_finite(accelerator, loss):
                    if train.on_nonfinite == "raise":
                        raise FloatingPointError(f"non-finite loss at step {state.step}: {metrics}")
                    skip_window = True
                else:
                    accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and not skip_window:
                    grad_norm = accelerator.clip_grad_norm_(policy_params, train.max_grad_norm)
                    accelerator.clip_grad_norm_(energy_params, schedule.max_grad_norm(state.step))
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
                n = train.gradient_accumulation_steps
                local = torch.tensor([v / n for v in running.values()], device=accelerator.device)
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

            if train.eval_steps and state.step % train.eval_steps == 0 and state.step < train.max_steps:
                if main_proc:
                    ev, _ = run_eval()
                    accelerator.log({f"eval/{k}": v for k, v in ev.items()}, step=state.step)
                    state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in ev.items()}})
                accelerator.wait_for_everyone()
            stopping = state.step >= stop_at
            if (train.save_steps and state.step % train.save_steps == 0) or (stopping and stop_at < train.max_steps):
                save_checkpoint(accelerator, run_dir / "checkpoints" / f"step_{state.step:07d}", state.step,
                                extra_states)
                if main_proc:
                    rotate_checkpoints(run_dir / "checkpoints", train.save_total_limit)
            if stopping:
                break
    progress.close()
    if state.step < train.max_steps:  # stop_after_steps: the next launch resumes from the checkpoint
        accelerator.print(f"stopped at step {state.step} of {train.max_steps}; resume with --resume_from_checkpoint latest")
        backbone, plugin = release_ddp(accelerator, backbone, plugin)
        gc.collect()
        accelerator.end_training()
        return {}

    final: dict[str, float] = {}
    if main_proc:
        final, outputs = run_eval()
        accelerator.log({f"eval/{k}": v for k, v in final.items()}, step=state.step)
        state.history.append({"step": state.step, **{f"eval/{k}": v for k, v in final.items()}})
        save_policy(run_dir / "model", accelerator.unwrap_model(backbone), plugin, norm_stats, loaded,
                    unwrap=accelerator.unwrap_model)
        final.update({
            "steps": float(state.step), "world_size": float(accelerator.num_processes),
            "local_batch": float(train.per_device_train_batch_size), "grad_accum": float(train.gradient_accumulation_steps),
            "skipped_steps": float(state.skipped_steps), "strategy": plan.name,
            "bank_entries": float(len(plugin.bank)) if plugin.bank is not None else 0.0,
            "negatives_per_positive": next((h["energy/num_negatives"] for h in reversed(state.history)
                                            if "energy/num_negatives" in h), math.nan),
        })
        write_outputs(run_dir, final, state.history, outputs, train.eval_num_negatives)
        accelerator.print(f"top-1 accuracy {final['top1_acc']:.3f} (chance {final['chance_acc']:.3f}); "
                          f"report: {run_dir / 'report.md'}")
    backbone, plugin = release_ddp(accelerator, backbone, plugin)
    gc.collect()  # DDP wrappers sit in reference cycles: free them while every process still holds the group
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def release_ddp(accelerator: Accelerator, backbone: torch.nn.Module, plugin: EnergyPlugin
                ) -> tuple[torch.nn.Module, EnergyPlugin]:
    """Drop the DDP wrappers before the process group is destroyed; returns the unwrapped modules.

    A DDP reducer that is only freed at interpreter exit destroys the gloo group while holding the GIL, and gloo's
    worker thread, still freeing the last barrier's tensors, waits for the GIL: rank 0 hung after its final report
    (gdb stack in docs/reliability.md). Freed first (the caller collects the cycles), the group outlives the reducer
    and end_training destroys it.
    """
    backbone = accelerator.unwrap_model(backbone)
    for name in ("action_head", "energy_head", "temperature"):
        setattr(plugin, name, accelerator.unwrap_model(getattr(plugin, name)))
    accelerator.free_memory()
    return backbone, plugin


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
    """metrics.json, learning curves, energy histograms and report.md."""
    write_metrics(run_dir / "metrics.json", {**final, "history": history})
    plot_curves(run_dir / "loss.png", history, ["loss", "l1", "energy_loss", "energy/loss_floor"], "training loss")
    plot_curves(run_dir / "accuracy.png", history, ["energy/acc", "eval/top1_acc", "eval/chance_acc"], "accuracy")
    e = outputs.ranking_energies
    plot_energy_histograms(run_dir / "energy_hist.png",
                           {"positive": e[:, 0].tolist(), "other episodes": e[:, 1:].flatten().tolist()},
                           "held-out energies")
    write_report(run_dir / "report.md", f"vla_energy run `{run_dir.name}`", final,
                 ["loss.png", "accuracy.png", "energy_hist.png"],
                 notes=[f"Top-1 ranking of the true chunk among {num_negatives + 1} chunks "
                        f"({num_negatives} from other episodes)."])


if __name__ == "__main__":
    main()
