"""Multi-process checks of the one-module model, run by `accelerate launch` from test_fsdp.py.

    dist_model_check.py fsdp  OUT    FSDP2 (fully_shard, gloo) vs DDP: loss and gathered gradients over 2 steps
    dist_model_check.py llava OUT CKPT   Llava (vision_feature_layer -2) + LoRA on the vision tower under DDP
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data import DataConfig, VLACollator, build_datasets
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel

B, H = 2, 4


def _parts(name: str, cache: str, lora: LoraArguments):
    torch.manual_seed(0)
    train_ds, _, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=8, horizon=H, cache_dir=cache),
                                    progress=False)
    loaded = load_backbone(name)
    backbone = apply_lora(loaded.model, lora)
    args = EnergyArguments(strategy="combined", bank_size=8, energy_hidden_dim=32, action_head_dim=32)
    plugin = EnergyPlugin(args, hidden_size_of(loaded.model), len(train_ds[0]["actions"][0]), H,
                          loaded.action_token_id)
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token)
    return train_ds, EnergyVLAModel(backbone, plugin), collator


def _batch(train_ds, collator, step: int, rank: int) -> dict:
    start = (step * 2 + rank) * B
    return collator([train_ds[i] for i in range(start, start + B)])


def fsdp_vs_ddp(out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    state = PartialState()
    rank = state.process_index
    train_ds, model, collator = _parts("tiny-llava", str(out / "cache"), LoraArguments(lora_r=4))
    twin = copy.deepcopy(model)  # the plugin and its heads are submodules: copied with it
    ddp = DistributedDataParallel(model)
    for layer in twin.backbone.get_base_model().model.language_model.layers:
        fully_shard(layer, mesh=init_device_mesh("cpu", (2,)))
    fully_shard(twin, mesh=init_device_mesh("cpu", (2,)))
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (ddp, twin)]
    report = {"loss_err": [], "grad_err": [], "grads": 0}
    for step in range(2):
        batch = _batch(train_ds, collator, step, rank)
        losses = []
        for m in (ddp, twin):
            loss = m(**batch).loss
            loss.backward()
            losses.append(float(state_reduce(loss.detach())))
        report["loss_err"].append(abs(losses[0] - losses[1]))
        worst = 0.0
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.requires_grad:
                full = b.grad.full_tensor()
                worst = max(worst, float((a.grad - full).abs().max()) / (float(a.grad.abs().max()) + 1e-12))
                report["grads"] += 1
        report["grad_err"].append(worst)
        for opt in opts:
            opt.step()
            opt.zero_grad()
    report["loss"] = losses
    if rank == 0:
        (out / "fsdp.json").write_text(json.dumps(report))


def state_reduce(t: torch.Tensor) -> torch.Tensor:
    from accelerate.utils import reduce

    return reduce(t, reduction="mean")


def llava_ddp(out: Path, ckpt: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from vla_energy.training.unused import check_unused_parameters, unused_parameters

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    train_ds, model, collator = _parts(ckpt, str(out / "cache"), LoraArguments(lora_r=4, lora_exclude_vision=False))
    vision_lora = [n for n, p in model.named_parameters() if "vision_tower" in n and "lora_" in n]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    net = accelerator.unwrap_model(model)
    before = {n: p.detach().clone() for n, p in net.named_parameters() if n in vision_lora}
    losses = []
    for step in range(3):
        loss = model(**_batch(train_ds, collator, step, accelerator.process_index)).loss
        accelerator.backward(loss)
        check_unused_parameters(net, False)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    moved = sum(not torch.equal(before[n], p) for n, p in net.named_parameters() if n in before)
    # The control: LoRA on every vision layer leaves the last one's adapters without gradient.
    from peft import LoraConfig, get_peft_model

    loaded = load_backbone(ckpt)
    everything = get_peft_model(loaded.model, LoraConfig(r=4, target_modules="all-linear"))
    plugin = EnergyPlugin(EnergyArguments(strategy="global", energy_hidden_dim=32, action_head_dim=32),
                          hidden_size_of(loaded.model), 3, H, loaded.action_token_id)
    control = EnergyVLAModel(everything, plugin)
    control(**_batch(train_ds, collator, 0, accelerator.process_index)).loss.backward()
    try:
        check_unused_parameters(control, False)
        message = ""
    except RuntimeError as e:
        message = str(e)
    if accelerator.is_main_process:
        (out / "llava.json").write_text(json.dumps({
            "losses": losses, "vision_lora": len(vision_lora), "moved": moved, "control_error": message,
            "control_unused": unused_parameters(control)}))
    accelerator.wait_for_everyone()
    accelerator.free_memory()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "fsdp":
        fsdp_vs_ddp(out)
    elif mode == "llava":
        llava_ddp(out, sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}: fsdp | llava")
