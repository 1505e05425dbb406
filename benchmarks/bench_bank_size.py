"""How many negatives pay: energy-head learning and cost against the action bank's size, on one fixed policy.

    python benchmarks/bench_bank_size.py --outputs runs/bench_head_options/outputs.pt --out runs/bench_bank_size \
        --bank_sizes 0 16 64 256 1024 --train_bank_sizes 0 16 64 256 --seeds 0 1 2 3 4 5
    python benchmarks/bench_bank_size.py --bank_sizes 0 64 --seeds 0 --steps 100 --timing_repeats 0   # a quick look

Head-only training (vla_energy.training.head_only) on the cached outputs of a finished policy (contexts, truth,
layer-wise predictions; written by benchmarks/bench_head_options.py, or collected here from --run_dir when
--outputs does not exist). Per bank size K and seed, a fresh energy head with the run's settings and
`--strategy` (default `global`: the b - 1 in-batch columns, then the bank; no explicit negatives) is trained for
the same --steps on the same seeded batches, so each row has N = batch_size - 1 + K negatives per positive and
nothing else differs. Evaluation on the validation split: top-1 of the truth against 31 other-episode chunks,
argmin RMS, and L1 of rerank / random / oracle among --sources candidates (vla_energy.evaluation.selection).

Cost, side by side in one process: one forward + backward of the loss for one batch with a full bank of K
entries (median of --timing_repeats, the K interleaved), and the training loop's seconds per step; both as ratios
to K = 0. Writes <out>/results.json (a cache across invocations: a (K, seed) measured with the same settings is not
run again) and <out>/table.md, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch


def make_plugin(energy_args, outputs: dict, bank_size: int, strategy: str):
    """A fresh EnergyPlugin with the run's energy settings, the bank size and strategy under test."""
    from vla_energy.modeling.energy_plugin import EnergyPlugin

    train = outputs["train"]
    args = replace(energy_args, bank_size=bank_size, strategy=strategy)
    return EnergyPlugin(args, train.contexts[0].shape[-1], train.actions[0].shape[-1], train.actions[0].shape[0],
                        action_token_id=0)


def time_forward_backward(energy_args, outputs: dict, bank_sizes: list[int], args: argparse.Namespace) -> dict:
    """Median seconds (wall and process CPU) of one loss forward + backward per K, with the bank full; the K
    interleaved per repeat. On a shared machine the CPU time is the steadier measure (one thread)."""
    from vla_energy.modeling.process_group import ProcessGroup
    from vla_energy.training.head_only import _batch

    train = outputs["train"]
    group = ProcessGroup(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train.actions), generator=g)
    batch = _batch(train, idx[: args.batch_size], torch.device("cpu"))
    plugins = {}
    for k in bank_sizes:
        torch.manual_seed(0)
        plugin = make_plugin(energy_args, outputs, k, args.strategy)
        plugin.setup(group, args.batch_size)
        if k:  # fill the bank with other training chunks (ids included, so the masking runs as in training)
            fill = idx[args.batch_size: args.batch_size + k]
            plugin.bank.stage(torch.stack([train.actions[i] for i in fill]),
                              torch.stack([train.action_mask[i] for i in fill]), fill)
            plugin.bank.commit()
        plugins[k] = plugin
    times: dict[int, list[float]] = {k: [] for k in bank_sizes}
    cpu: dict[int, list[float]] = {k: [] for k in bank_sizes}
    for rep in range(args.timing_repeats + 1):  # the first round warms up
        for k, plugin in plugins.items():
            readout, targets, layers = batch
            head = plugin.energy_head
            head.zero_grad(set_to_none=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            loss, _ = plugin.energy_loss(readout, targets["actions"], targets["action_mask"], targets["sample_id"],
                                         layers, group)
            loss.backward()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
            if plugin.bank is not None:
                plugin.bank.discard()
            if rep:
                times[k].append(seconds)
                cpu[k].append(cpu_seconds)
    return {str(k): {"wall_s": statistics.median(times[k]), "cpu_s": statistics.median(cpu[k])} for k in bank_sizes}


def run_one(energy_args, outputs: dict, bank_size: int, seed: int, args: argparse.Namespace, data_seed: int) -> dict:
    """Train a fresh head with bank size K on the train outputs for --steps (seeded); evaluate on val."""
    from vla_energy.evaluation.metrics import ranking_metrics
    from vla_energy.evaluation.selection import selection_metrics
    from vla_energy.training.head_only import train_energy_head

    torch.manual_seed(seed)
    plugin = make_plugin(energy_args, outputs, bank_size, args.strategy)
    start, start_cpu = time.time(), time.process_time()
    trained = train_energy_head(plugin, outputs["train"], args.steps, args.batch_size, args.learning_rate, seed=seed,
                                progress=not args.disable_tqdm)
    seconds, cpu_seconds = time.time() - start, time.process_time() - start_cpu
    head = plugin.energy_head
    start = time.time()
    ranking = ranking_metrics(head, outputs["val"], false_negative_eps=energy_args.false_negative_eps, seed=data_seed)
    selection, _ = selection_metrics(head, outputs["val"], outputs["train_chunks"], num_samples=args.num_candidates,
                                     seed=seed, sources=args.sources, num_resamples=200)
    return {"top1_acc": ranking["top1_acc"], "argmin_rms": ranking["argmin_rms"], "loss_first": trained.first,
            "loss_last": trained.last, "train_s": seconds, "step_s": seconds / args.steps,
            "step_cpu_s": cpu_seconds / args.steps,
            "eval_s": time.time() - start, **selection}


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """mean ± sd [min, max] over seeds (just the value for one seed)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return (f"{fmt.format(mean)} ± {fmt.format(statistics.stdev(values)).lstrip('+')} "
            f"[{fmt.format(min(values))}, {fmt.format(max(values))}]")


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.1f}x" if value is not None and base else "-"


def summarize(results: dict[str, list[dict]], timing: dict, batch_size: int, sources: list[str]) -> str:
    """Markdown: learning per bank size (mean ± sd [min, max] over seeds), then the cost as ratios to K = 0."""
    head = ["bank K", "negatives per row", "seeds", "top-1 (31 other episodes)", "argmin RMS"]
    head += [f"{s}: rerank − policy (oracle − policy)" for s in sources]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted((k for k in set(results) | set(timing) if k.isdigit()), key=int)  # plain bank sizes only
    for k in keys:
        runs = results.get(k, [])
        if not runs:
            continue
        row = [k, str(batch_size - 1 + int(k)), str(len(runs)), spread([r["top1_acc"] for r in runs]),
               spread([r["argmin_rms"] for r in runs])]
        for s in sources:
            gain = [100 * (r[f"l1/{s}/rerank"] / r["l1/policy"] - 1) for r in runs]
            oracle = statistics.fmean(100 * (r[f"l1/{s}/oracle"] / r["l1/policy"] - 1) for r in runs)
            row.append(f"{spread(gain, '{:+.1f}')}% ({oracle:+.1f}%)")
        lines.append("| " + " | ".join(row) + " |")

    def mean(k: str, key: str) -> float | None:
        vals = [r[key] for r in results.get(k, []) if key in r]
        return statistics.fmean(vals) if vals else None

    def fb(k: str, key: str) -> float | None:
        t = timing.get(k)
        return t.get(key) if isinstance(t, dict) else (t if key == "wall_s" else None)

    cost = ["bank K", "negatives per row", "fwd+bwd CPU s", "ratio", "fwd+bwd wall s", "ratio",
            "train step CPU s", "ratio", "train step wall s", "ratio"]
    lines += ["", "| " + " | ".join(cost) + " |", "|" + "---|" * len(cost)]
    for k in keys:
        cells = [k, str(batch_size - 1 + int(k))]
        for value, base in ((fb(k, "cpu_s"), fb("0", "cpu_s")), (fb(k, "wall_s"), fb("0", "wall_s")),
                            (mean(k, "step_cpu_s"), mean("0", "step_cpu_s")), (mean(k, "step_s"), mean("0", "step_s"))):
            cells += [f"{value:.3f}" if value is not None else "-", _ratio(value, base)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/demo", help="the finished run: its energy settings (and outputs)")
    parser.add_argument("--outputs", default="runs/bench_head_options/outputs.pt",
                        help="cached policy outputs (bench_head_options.py); collected from --run_dir if missing")
    parser.add_argument("--out", default="runs/bench_bank_size")
    parser.add_argument("--bank_sizes", nargs="+", type=int, default=[0, 16, 64, 256, 1024])
    parser.add_argument("--train_bank_sizes", nargs="+", type=int, default=None,
                        help="the K trained (default: all of --bank_sizes); the others are only timed")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--strategy", default="global", help="global: batch columns + bank only; combined adds M")
    parser.add_argument("--num_candidates", type=int, default=16)
    parser.add_argument("--sources", nargs="+", default=["retrieval", "policy_error"])
    parser.add_argument("--timing_repeats", type=int, default=3, help="0: no forward+backward timing")
    parser.add_argument("--disable_tqdm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vla_energy.training.arguments import load_run_config

    _, data_cfg, _, energy_args, _ = load_run_config(args.run_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.outputs)
    if cache.exists():
        outputs = torch.load(cache, weights_only=False)
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_head_options import collect

        outputs = collect(Path(args.run_dir), 4096, 256, not args.disable_tqdm)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(outputs, cache)
    results_path = out / "results.json"
    saved = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: dict[str, list[dict]] = saved.get("runs", {})
    timing: dict = saved.get("timing", {})
    settings = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "strategy": args.strategy, "num_candidates": args.num_candidates, "sources": list(args.sources)}
    if saved.get("settings", settings) != settings:
        results, timing = {}, {}  # another configuration: start over
    if args.timing_repeats:
        measured = time_forward_backward(energy_args, outputs, args.bank_sizes, args)
        timing.update(measured)
        print("forward+backward (CPU s, wall s): " + ", ".join(
            f"K={k} {v['cpu_s']:.3f} {v['wall_s']:.3f}" for k, v in measured.items()), flush=True)
    results_path.write_text(json.dumps({"settings": settings, "timing": timing, "runs": results}, indent=1))
    for seed in args.seeds:  # seed-major: every K gets seed 0 before any gets seed 1
        for k in args.train_bank_sizes if args.train_bank_sizes is not None else args.bank_sizes:
            runs = results.setdefault(str(k), [])
            if any(r["seed"] == seed for r in runs):
                continue
            r = run_one(energy_args, outputs, k, seed, args, data_cfg.data_seed)
            runs.append({"seed": seed, **r})
            results_path.write_text(json.dumps({"settings": settings, "timing": timing, "runs": results}, indent=1))
            print(f"K={k} seed {seed}: top-1 {r['top1_acc']:.3f}, argmin RMS {r['argmin_rms']:.4f}, policy "
                  f"{r['l1/policy']:.4f}, " + ", ".join(f"{s} rerank {r[f'l1/{s}/rerank']:.4f}" for s in args.sources)
                  + f" ({r['step_s']:.3f} s/step, eval {r['eval_s']:.0f} s)", flush=True)
    table = summarize(results, timing, args.batch_size, list(args.sources))
    (out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
