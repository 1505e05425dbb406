"""Overhead of the energy loss on a LoRA finetuning step of a tiny VLM (one process, interleaved runs).

    python benchmarks/bench_overhead.py [--steps 30 --batch 8]
    python benchmarks/bench_overhead.py --hidden_size 768 --layers 12 --image_size 64   # a ~100M-parameter backbone

"without": backbone forward + action head + L1 + backward + AdamW step. "with": the same plus the plugin's
energy loss (combined strategy: gathered batch + 8 explicit negatives). The two variants alternate step by step
so that machine noise hits both alike; the ratio of the medians is reported.
"""

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import backbone_inputs, hidden_size_of
from vla_energy.backbones.tiny import ensure_tiny_checkpoint
from vla_energy.data import DataConfig, VLACollator, build_datasets
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--backbone", default="tiny-llava")
    p.add_argument("--hidden_size", type=int, default=64, help="text model width of the tiny backbone")
    p.add_argument("--layers", type=int, default=4, help="text model layers of the tiny backbone")
    p.add_argument("--image_size", type=int, default=32, help="image side (image tokens: (side / 8)^2)")
    a = p.parse_args()
    torch.manual_seed(0)
    train, _, _ = build_datasets(DataConfig(dataset="synthetic"), progress=False)
    name = a.backbone
    if (a.hidden_size, a.layers, a.image_size) != (64, 4, 32):  # a bigger random checkpoint of the same family
        name = str(ensure_tiny_checkpoint(a.backbone.removeprefix("tiny-"), hidden_size=a.hidden_size,
                                          num_hidden_layers=a.layers, image_size=a.image_size))
    loaded = load_backbone(name)
    params = sum(p.numel() for p in loaded.model.parameters())
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=16))
    plugin = EnergyPlugin(EnergyArguments(strategy="combined"), hidden_size_of(loaded.model),
                          len(train[0]["actions"][0]), 8, loaded.action_token_id)
    plugin.setup(SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu")), a.batch)
    opt = torch.optim.AdamW(param_groups(backbone, plugin.policy_modules(), plugin.energy_modules(), 1e-3))
    batches = iter(DataLoader(train, batch_size=a.batch, shuffle=True, collate_fn=VLACollator(loaded.processor, 8, loaded.action_token)))
    acc = SimpleNamespace(num_processes=1, process_index=0)
    times = {"without": [], "with": []}
    for step in range(2 * a.steps + 2):
        batch = next(batches)
        variant = "with" if step % 2 else "without"
        t0 = time.perf_counter()
        out = backbone(**backbone_inputs(batch), output_hidden_states=True)
        if variant == "with":
            loss = plugin(out, batch, acc).loss
        else:
            policy, _ = plugin.predict_actions(plugin.read(out, batch))
            loss = masked_l1(policy, batch["actions"], batch["action_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step >= 2:  # the first pair warms up
            times[variant].append(time.perf_counter() - t0)
    base, full = statistics.median(times["without"]), statistics.median(times["with"])
    print(f"backbone: {a.backbone}, hidden {a.hidden_size}, {a.layers} layers, image {a.image_size} px, "
          f"{params / 1e6:.1f}M parameters, batch {a.batch}")
    print("| variant | median step s |\n|---|---|")
    print(f"| LoRA step, L1 only | {base:.4f} |\n| + energy plugin (combined) | {full:.4f} |")
    print(f"overhead: {100 * (full / base - 1):.1f}%")


if __name__ == "__main__":
    main()
