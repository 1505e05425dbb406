"""Control rate: latency per `predict_action_chunk` call of each mode against the policy alone, batch 1.

    OMP_NUM_THREADS=2 python benchmarks/bench_latency.py                    # the benchmark backbone (hidden 768, 12 layers)
    python benchmarks/bench_latency.py --device cuda                        # on a GPU
    OMP_NUM_THREADS=2 python benchmarks/bench_latency.py --hidden_size 64 --layers 4 --image_size 32   # tiny demo

The backbone is the one bench_overhead.py and bench_checkpoint_size.py build (tiny-llava of the given width and
depth, LoRA r=16) with a plugin of default options (EnergyArguments()). It is saved with save_policy (with q01_q99
statistics, so candidates are bounded to [-1, 1], and 16384 retrieval chunks) and loaded back with
EnergyPolicy.from_pretrained, as a user runs a trained policy. Every round times one call of each case, in an order
rotated per round, so that machine noise hits all alike; the table gives the medians and their ratios to `policy`.

A case is `mode` or `mode:candidates` (`--cases`): rerank and mean take any candidate source EnergyPolicy offers,
so a new source (e.g. best-of-N samples of a flow head) is timed by naming it, `rerank:samples`. A `+graphs` suffix
times the same call on EnergyPolicy(..., cuda_graphs=True) (CUDA only; default there: `refine+graphs`). A case that
fails on its first call is reported and left out. On the CPU the table also gives the process CPU time per call,
which other processes on a shared machine disturb less than the wall time.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.backbones.tiny import ensure_tiny_checkpoint
from vla_energy.data.normalization import NormStats
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import save_policy

DEFAULT_CASES = ("policy", "rerank:gaussian", "rerank:layers", "rerank:retrieval", "mean:retrieval", "refine")
CUDA_CASES = ("refine+graphs",)
# The targets: ratio of a mode's latency to the policy's (refine 2x, every choice among candidates 1.2x).
TARGETS = {"policy": 1.0, "rerank": 1.2, "mean": 1.2, "refine": 2.0}


def build_policy(a: argparse.Namespace, tmp: str) -> tuple[EnergyPolicy, int]:
    """The benchmark backbone + a default plugin, saved and loaded as a policy; also the backbone's parameter count."""
    path = ensure_tiny_checkpoint("llava", hidden_size=a.hidden_size, num_hidden_layers=a.layers,
                                  image_size=a.image_size)
    loaded = load_backbone(str(path), dtype="float32")
    params = sum(p.numel() for p in loaded.model.parameters())
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=16))
    plugin = EnergyPlugin(EnergyArguments(action_head=a.action_head), hidden_size_of(loaded.model), a.action_dim, a.horizon,
                          loaded.action_token_id)
    da = a.action_dim
    stats = NormStats(mode="q01_q99", mean=[0.0] * da, std=[1.0] * da, q01=[-1.0] * da, q99=[1.0] * da,
                      min=[-1.5] * da, max=[1.5] * da, count=a.retrieval_chunks)
    g = torch.Generator().manual_seed(0)
    chunks = torch.rand(a.retrieval_chunks, a.horizon, da, generator=g) * 2 - 1
    out = save_policy(f"{tmp}/policy", EnergyVLAModel(backbone, plugin), loaded.processor, stats,
                      base=str(path), retrieval_chunks=chunks)
    return EnergyPolicy.from_pretrained(out, device=a.device, dtype=a.dtype), params


def parse_case(case: str) -> tuple[str, str, bool]:
    """`mode[:candidates][+graphs]` -> (mode, candidates or "", whether with CUDA graphs)."""
    call, _, graphs = case.partition("+")
    if graphs not in ("", "graphs"):
        raise ValueError(f"case {case!r}: expected mode[:candidates][+graphs]")
    mode, _, source = call.partition(":")
    return mode, source, bool(graphs)


def timed_calls(policy: EnergyPolicy, observation: dict[str, Any], cases: list[str], num_samples: int
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """One zero-argument call per case: predict_action_chunk(observation, mode=..., candidates=...) of `policy` or,
    for +graphs, of the same loaded model as EnergyPolicy(..., cuda_graphs=True)."""
    graphed = functools.cache(lambda: EnergyPolicy(policy.loaded, policy.device, cuda_graphs=True))
    calls = {}
    for case in cases:
        mode, source, graphs = parse_case(case)
        kwargs: dict[str, Any] = {"num_samples": num_samples}
        if source:
            kwargs["candidates"] = source
        calls[case] = (lambda g=graphs, m=mode, kw=kwargs:
                       (graphed() if g else policy).predict_action_chunk(observation, mode=m, **kw))
    return calls


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer stops after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(calls: dict[str, Callable[[], torch.Tensor]], rounds: int, warmup: int, device: torch.device
            ) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds per call of each case over `rounds` rounds, in an order rotated per round, after
    `warmup` rounds."""
    names = list(calls)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            calls[name]()
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a call dispatches, views and aliases left out: about the kernels it launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        returns = func._schema.returns
        if not (returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write):
            self.count += func.overloadpacket.__name__ not in ("lift_fresh", "_unsafe_view")
        return func(*args, **(kwargs or {}))


def count_ops(call: Callable[[], torch.Tensor]) -> int:
    """Operators (not views) one call dispatches: on a GPU at batch 1 its time grows with their number."""
    with _OpCounter() as counter:
        call()
    return counter.count


def drop_failing(calls: dict[str, Callable[[], torch.Tensor]]) -> dict[str, Callable[[], torch.Tensor]]:
    """The calls whose first run works; the others are reported with their error."""
    working = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as e:  # reported, so that one broken case does not lose the others' numbers
            print(f"case {name} failed and is left out: {type(e).__name__}: {e}")
            continue
        working[name] = call
    return working


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="dtype to load the policy in (default: its own, float32)")
    p.add_argument("--hidden_size", type=int, default=768, help="text model width of the tiny backbone")
    p.add_argument("--layers", type=int, default=12, help="text model layers of the tiny backbone")
    p.add_argument("--image_size", type=int, default=64, help="image side (image tokens: (side / 8)^2)")
    p.add_argument("--action_dim", type=int, default=7)
    p.add_argument("--horizon", type=int, default=8)
    p.add_argument("--action_head", default="l1", choices=["l1", "flow"],
                   help="flow: a flow-matching head, whose samples `rerank:samples` / `mean:samples` choose among")
    p.add_argument("--num_samples", type=int, default=16, help="candidates K of rerank / mean")
    p.add_argument("--retrieval_chunks", type=int, default=16384, help="training chunks saved for retrieval")
    p.add_argument("--cases", nargs="+", default=None,
                   help=f"mode[:candidates][+graphs], e.g. rerank:samples once a source of that name exists (default: "
                        f"{' '.join(DEFAULT_CASES)}, on CUDA also {' '.join(CUDA_CASES)})")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--count_ops", action="store_true",
                   help="also count the operators each case dispatches per call (not views): a proxy of GPU time")
    a = p.parse_args()
    device = torch.device(a.device)
    if a.cases is None:
        a.cases = [*DEFAULT_CASES, *(CUDA_CASES if device.type == "cuda" else ())]
    if "policy" not in a.cases:
        a.cases = ["policy", *a.cases]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        policy, params = build_policy(a, tmp)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (a.image_size, a.image_size, 3), dtype=np.uint8)
    observation = {"observation.image": image, "task": "go to the red square"}
    calls = drop_failing(timed_calls(policy, observation, a.cases, a.num_samples))
    ops = {n: count_ops(c) for n, c in calls.items()} if a.count_ops else None
    times = measure(calls, a.rounds, a.warmup, device)
    cpu = device.type == "cpu"
    wall = {n: statistics.median(t[0] for t in ts) for n, ts in times.items()}
    proc = {n: statistics.median(t[1] for t in ts) for n, ts in times.items()}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"backbone: tiny-llava, hidden {a.hidden_size}, {a.layers} layers, image {a.image_size} px, "
          f"{params / 1e6:.1f}M parameters; energy head default, action head {a.action_head}; batch 1; {a.device} ({where}); "
          f"torch {torch.__version__}; {a.rounds} rounds after {a.warmup} warm-up")
    head = "| mode | candidates | median ms | ratio to policy |" + (" CPU ms | CPU ratio |" if cpu else "") + \
        (" operators | ratio |" if ops else "")
    print(head + " target | met |\n" + "|---" * (head.count("|") + 1) + "|")
    for case in times:
        mode, source, graphs = parse_case(case)
        if mode in ("rerank", "mean"):
            source = f"{source or 'gaussian'} ({a.layers if source == 'layers' else a.num_samples})"
        else:
            source = "-"
        ratio = wall[case] / wall["policy"]
        cells = [mode + (", CUDA graphs" if graphs else ""), source, f"{1e3 * wall[case]:.1f}", f"{ratio:.2f}x"]
        if cpu:
            cells += [f"{1e3 * proc[case]:.1f}", f"{proc[case] / proc['policy']:.2f}x"]
        if ops:
            cells += [str(ops[case]), f"{ops[case] / ops['policy']:.2f}x"]
        target = TARGETS.get(mode)
        met = "" if mode == "policy" or target is None else ("yes" if ratio <= target else "no")
        cells += ["" if mode == "policy" or target is None else f"{target}x", met]
        print("| " + " | ".join(cells) + " |")
    print(f"command: {shlex.join(['python', *sys.argv])}")


if __name__ == "__main__":
    main()
