"""Cost of the LM logits the plugin never reads: a LoRA training step with all logits vs `logits_to_keep=1`.

    python benchmarks/bench_lm_head.py [--family llava --hidden_size 256 --layers 4 --vocab 32000 --batch 8]

"all logits": backbone(**inputs, output_hidden_states=True), which computes [B, T, vocab] logits. "last logit":
vla_energy.backbones.readout.backbone_forward, which passes logits_to_keep=1. Both run the same step (forward,
plugin loss, backward, AdamW). Step time: the variants alternate step by step in one process, ratio of the medians.
Peak memory: each variant in its own child process (CPU: the rise of the peak resident set over the resident set
before the measured steps, reset through /proc/self/clear_refs, with a fixed glibc mmap threshold so that freed
tensors leave the resident set; CUDA: torch.cuda.max_memory_allocated).
The tiny checkpoint's vocabulary is resized to --vocab, as real VLM vocabularies (32k-260k ids) dwarf its own.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import backbone_forward, backbone_inputs, hidden_size_of
from vla_energy.backbones.tiny import ensure_tiny_checkpoint
from vla_energy.data import VLACollator
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin

H, DA = 8, 7


def setup(a: argparse.Namespace) -> tuple:
    """LoRA backbone with a --vocab vocabulary, plugin, optimizer and one fixed batch."""
    torch.manual_seed(0)
    path = ensure_tiny_checkpoint(a.family, hidden_size=a.hidden_size, num_hidden_layers=a.layers)
    loaded = load_backbone(str(path), dtype="float32")
    loaded.model.resize_token_embeddings(a.vocab, mean_resizing=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=16)).to(device)
    plugin = EnergyPlugin(EnergyArguments(strategy="inbatch"), hidden_size_of(loaded.model), DA, H,
                          loaded.action_token_id)
    acc = SimpleNamespace(num_processes=1, process_index=0, device=device)
    plugin.setup(acc, a.batch)
    plugin.to(device)
    opt = torch.optim.AdamW(param_groups(backbone, plugin.policy_modules(), plugin.energy_modules(), 1e-4))
    g = torch.Generator().manual_seed(0)
    examples = [{"image": (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy(),
                 "instruction": f"put the red block in bowl {i}", "actions": torch.rand(H, DA, generator=g).numpy(),
                 "sample_id": i, "episode_index": i} for i in range(a.batch)]
    batch = VLACollator(loaded.processor, H, loaded.action_token)(examples)
    batch = {k: v.to(device) for k, v in batch.items()}
    return backbone, plugin, opt, batch, acc


def step(variant: str, backbone, plugin, opt, batch, acc) -> float:
    """One training step; returns its wall time."""
    t0 = time.perf_counter()
    if variant == "all":
        out = backbone(**backbone_inputs(batch), output_hidden_states=True)
    else:
        out = backbone_forward(backbone, batch)
    loss = plugin(out, batch, acc).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del out, loss
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(a: argparse.Namespace, variant: str) -> float:
    """MiB a step adds at its peak (child process entry point)."""
    state = setup(a)
    step(variant, *state)  # warm-up: optimizer state, allocator caches
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
        base = _status_kib("VmRSS") * 1024
    for _ in range(3):
        step(variant, *state)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _status_kib("VmHWM") * 1024
    return (peak - base) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="llava")
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--memory_of", choices=["all", "last"], help=argparse.SUPPRESS)  # child process mode
    a = p.parse_args()
    if a.memory_of:
        print(json.dumps({"peak_mib": peak_memory(a, a.memory_of)}))
        return
    args = [f"--{k}={v}" for k, v in vars(a).items() if k not in ("memory_of", "steps")]
    memory = {}
    for variant in ("all", "last"):
        # A fixed mmap threshold: glibc then returns every tensor-sized block on free, so the resident set follows
        # live memory (its default dynamic threshold keeps freed blocks of up to 32 MiB resident and hides them).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, *args, f"--memory_of={variant}"], check=True,
                             capture_output=True, text=True, env=env).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])["peak_mib"]
    state = setup(a)
    times = {"all": [], "last": []}
    for i in range(2 * a.steps + 2):
        variant = "last" if i % 2 else "all"
        t = step(variant, *state)
        if i >= 2:  # the first pair warms up
            times[variant].append(t)
    t_all, t_last = statistics.median(times["all"]), statistics.median(times["last"])
    seq = state[3]["input_ids"].shape[1]
    print(f"{a.family}, hidden {a.hidden_size}, {a.layers} layers, vocab {a.vocab}, batch {a.batch} x {seq} tokens, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print("| | all logits | last logit (logits_to_keep=1) | ratio last / all |")
    print("|---|---|---|---|")
    print(f"| step time (median of {a.steps}) | {t_all * 1e3:.0f} ms | {t_last * 1e3:.0f} ms | {t_last / t_all:.2f} |")
    print(f"| peak memory of a step | {memory['all']:.0f} MiB | {memory['last']:.0f} MiB | "
          f"{memory['last'] / memory['all']:.2f} |")


if __name__ == "__main__":
    main()
