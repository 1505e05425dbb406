"""Checkpoint size: what training changed (vla_energy's save_state hooks) against accelerate's full save_state.

    python benchmarks/bench_checkpoint_size.py                       # the benchmark backbone (hidden 768, 12 layers)
    python benchmarks/bench_checkpoint_size.py --hidden_size 64 --layers 4 --image_size 32

The backbone is the one bench_overhead.py builds (tiny-llava of the given width/depth, LoRA r=16 on all linear
layers) with the plugin's heads, as one EnergyVLAModel. Both checkpoints are taken after the same optimizer step,
side by side: "full" is accelerator.save_state of the prepared model (every backbone weight); "trainable" is
save_checkpoint with the hooks and the policy files (adapter, plugin, processor/base reference), as the training
recipe writes it. The run's
frozen base, written once per run for tiny backbones (a real backbone is referred to by name and revision), is shown
on its own line.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.backbones.tiny import ensure_tiny_checkpoint
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import checkpoint_policy_writer
from vla_energy.training.checkpoints import register_checkpoint_hooks, save_checkpoint


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden_size", type=int, default=768, help="text model width of the tiny backbone")
    p.add_argument("--layers", type=int, default=12, help="text model layers of the tiny backbone")
    p.add_argument("--image_size", type=int, default=64, help="image side (image tokens: (side / 8)^2)")
    p.add_argument("--lora_r", type=int, default=16)
    a = p.parse_args()
    torch.manual_seed(0)
    # A bigger random checkpoint of the tiny llava family, loaded by path like any real one.
    path = ensure_tiny_checkpoint("llava", hidden_size=a.hidden_size, num_hidden_layers=a.layers,
                                  image_size=a.image_size)
    loaded = load_backbone(str(path), dtype="float32")
    params = sum(p.numel() for p in loaded.model.parameters())
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=a.lora_r))
    plugin = EnergyPlugin(EnergyArguments(), hidden_size_of(loaded.model), 7, 8, loaded.action_token_id)
    accelerator = Accelerator(cpu=True)
    model = EnergyVLAModel(backbone, plugin)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss = sum(p.float().square().sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()  # optimizer state exists, identical in both checkpoints
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        accelerator.save_state(str(run / "full"), safe_serialization=True)
        register_checkpoint_hooks(accelerator)
        writer = checkpoint_policy_writer(model, processor=loaded.processor, base=loaded.name)
        ckpt = save_checkpoint(accelerator, run / "checkpoints" / "step_0000001", 1, policy_writer=writer)
        full, ours = _bytes(run / "full"), _bytes(ckpt)
    print(f"backbone: tiny-llava, hidden {a.hidden_size}, {a.layers} layers, image {a.image_size} px, "
          f"{params / 1e6:.1f}M parameters; LoRA r={a.lora_r}; trainable (LoRA + heads) {trainable / 1e6:.2f}M")
    print("| checkpoint | MB |\n|---|---|")
    print(f"| full: accelerator.save_state of the prepared model | {full / 1e6:.1f} |")
    print(f"| trainable: save_checkpoint with the hooks, incl. policy files | {ours / 1e6:.1f} |")
    print(f"ratio trainable / full: {ours / full:.3f}")


if __name__ == "__main__":
    main()
