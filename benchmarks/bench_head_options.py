"""Energy-head training options on one fixed policy: each variant trained head-only on the same frozen outputs, 3 seeds.

    python benchmarks/bench_head_options.py --run_dir runs/demo --out runs/bench_head_options
    python benchmarks/bench_head_options.py --run_dir runs/demo --variants base policy_negative --seeds 0 1 2

The run's policy (backbone + action head) is run once over up to --max_train_samples training samples and
--max_samples validation samples; contexts and layer-wise predictions are cached in <out>/outputs.pt. Then, per
variant and seed, a fresh energy head (the run's head settings) is trained with the plugin's own loss for --steps
(vla_energy.training.head_only) and evaluated on the validation split: ranking top-1 against 31 other-episode
chunks and the selection table (vla_energy.evaluation.selection). With the default detach_context the energy loss
never moves the backbone, so only the head differs between variants. Prints per-variant means over seeds and
writes <out>/results_k<K>.json and <out>/table_k<K>.md (K = --num_candidates); trained heads are kept in
<out>/heads/ and reused by a later call with the same training settings (e.g. to evaluate with another K).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

# Each variant: EnergyArguments overrides on top of the run's own.
VARIANTS: dict[str, dict] = {
    "base": {},
    "policy_error_negatives": {"policy_error_negatives": 2},
    "policy_negative": {"policy_negative": True},
    "grad_align": {"grad_align_weight": 1.0},
    "candidate_ranking": {"candidate_ranking": 16},
    "all": {"policy_error_negatives": 2, "policy_negative": True, "grad_align_weight": 1.0,
            "candidate_ranking": 16},
}
SOURCES = ("gaussian", "policy_error", "residuals", "layers", "retrieval")


def collect(run_dir: Path, max_train: int, max_val: int, progress: bool) -> dict:
    """The policy's outputs on both splits (contexts, truth, masks, policy and layer chunks, episodes)."""
    from vla_energy.modeling.serialization import load_policy
    from vla_energy.training.arguments import load_run_config
    from vla_energy.training.head_only import collect_run_outputs

    return collect_run_outputs(load_policy(run_dir), load_run_config(run_dir), {"train": max_train, "val": max_val},
                               progress=progress)


def run_variant(run_dir: Path, outputs: dict, overrides: dict, seed: int, args: argparse.Namespace) -> dict:
    """Train a fresh head with the run's settings + overrides on the train outputs (or load the one this command
    saved with the same training settings); evaluate it on val."""
    from vla_energy.evaluation.metrics import ranking_metrics
    from vla_energy.evaluation.selection import selection_metrics
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.modeling.modeling_energy_head import EnergyHead
    from vla_energy.training.arguments import load_run_config
    from vla_energy.training.head_only import train_energy_head

    _, data_cfg, _, energy_args, _ = load_run_config(run_dir)
    energy_args = replace(energy_args, **overrides)
    train, val = outputs["train"], outputs["val"]
    saved = Path(args.out) / "heads" / f"{args.current}_seed{seed}"
    training = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "overrides": overrides}
    info_path = saved / "training.json"
    if info_path.exists() and json.loads(info_path.read_text())["settings"] == training:
        info = json.loads(info_path.read_text())
        head = EnergyHead.from_pretrained(saved).eval()
    else:
        torch.manual_seed(seed)
        plugin = EnergyPlugin(energy_args, train.contexts[0].shape[-1], train.actions[0].shape[-1],
                              train.actions[0].shape[0], action_token_id=0)
        start = time.time()
        trained = train_energy_head(plugin, train, args.steps, args.batch_size, args.learning_rate, seed=seed,
                                    progress=not args.disable_tqdm)
        info = {"settings": training, "loss_first": trained.first, "loss_last": trained.last,
                "train_s": time.time() - start}
        head = plugin.energy_head
        head.save_pretrained(saved)
        info_path.write_text(json.dumps(info))
    ranking = ranking_metrics(head, val, false_negative_eps=energy_args.false_negative_eps, seed=data_cfg.data_seed)
    selection, _ = selection_metrics(head, val, outputs["train_chunks"], num_samples=args.num_candidates,
                                     seed=seed, sources=args.sources, num_resamples=200, tau=energy_args.tau)
    return {"top1_acc": ranking["top1_acc"], "argmin_rms": ranking["argmin_rms"], "loss_first": info["loss_first"],
            "loss_last": info["loss_last"], "train_s": info["train_s"], **selection}


def synthetic_noise_floor(run_dir: Path) -> float | None:
    """The L1 (normalized units) of the expert's mean action on the built-in synthetic task: its actions carry
    N(0, NOISE^2) on dx and dy that no model can predict, so no selection can average below this (None for other
    datasets or normalizations)."""
    from vla_energy.data import NormStats
    from vla_energy.data.synthetic import NOISE
    from vla_energy.training.arguments import load_run_config

    data_cfg = load_run_config(run_dir)[1]
    stats = NormStats.load(run_dir / "model" / "norm_stats.json")
    if data_cfg.dataset != "synthetic" or stats.mode != "q01_q99":
        return None
    half_range = [(hi - lo) / 2 for lo, hi in zip(stats.q01, stats.q99)]
    # E|N(0, s^2)| = s * sqrt(2 / pi) on the two moving dims; the grip dim is noise-free.
    per_dim = [NOISE / h * (2 / math.pi) ** 0.5 if i < 2 and h > 0 else 0.0 for i, h in enumerate(half_range)]
    return sum(per_dim) / len(per_dim)


def relative(runs: list[dict], key: str) -> str:
    """Mean over seeds of key / policy L1 - 1 in percent, [min, max] over seeds."""
    vals = [100 * (r[key] / r["l1/policy"] - 1) for r in runs]
    return f"{sum(vals) / len(vals):+.1f}% [{min(vals):+.1f}, {max(vals):+.1f}]"


def summarize(results: dict[str, list[dict]], sources: list[str]) -> str:
    """Markdown: per variant and source, mean over seeds of each selection's L1 relative to the policy."""
    lines = ["| variant | source | top-1 | random | uniform | rerank | mean | refine | oracle |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        top1 = sum(r["top1_acc"] for r in runs) / len(runs)
        lines.append(f"| {name} | policy (refine) | {top1:.3f} | | | | | {relative(runs, 'l1/policy/refine')} | |")
        for source in sources:
            cells = [relative(runs, f"l1/{source}/{sel}")
                     for sel in ("random", "uniform", "rerank", "mean", "refine", "oracle")]
            lines.append(f"| {name} | {source} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/demo")
    parser.add_argument("--out", default="runs/bench_head_options")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_train_samples", type=int, default=4096)
    parser.add_argument("--max_samples", type=int, default=256)
    parser.add_argument("--num_candidates", type=int, default=16)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--disable_tqdm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run_dir, out = Path(args.run_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "outputs.pt"
    if cache.exists():
        outputs = torch.load(cache, weights_only=False)
    else:
        outputs = collect(run_dir, args.max_train_samples, args.max_samples, not args.disable_tqdm)
        torch.save(outputs, cache)
    results_path = out / f"results_k{args.num_candidates}.json"
    results: dict[str, list[dict]] = json.loads(results_path.read_text()) if results_path.exists() else {}
    settings = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "num_candidates": args.num_candidates, "sources": list(args.sources)}
    for name in args.variants:
        for seed in args.seeds:
            if any(r.get("seed") == seed and r.get("settings") == settings for r in results.get(name, [])):
                continue  # measured already with these settings (the file is a cache across invocations)
            results[name] = [r for r in results.get(name, []) if r.get("seed") != seed]
            args.current = name
            r = run_variant(run_dir, outputs, VARIANTS[name], seed, args)
            results[name].append({"seed": seed, "settings": settings, **r})
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{name} seed {seed}: top-1 {r['top1_acc']:.3f}, policy {r['l1/policy']:.4f}, " + ", ".join(
                f"{s} rerank {r[f'l1/{s}/rerank']:.4f} mean {r[f'l1/{s}/mean']:.4f}" for s in args.sources)
                + f" (trained in {r['train_s']:.0f} s)", flush=True)
    table = summarize({k: v for k, v in results.items() if k in args.variants}, list(args.sources))
    floor = synthetic_noise_floor(run_dir)
    if floor is not None:
        policy_l1 = next(iter(results.values()))[0]["l1/policy"]
        table += (f"\n\npolicy L1 {policy_l1:.4f}; noise floor of the synthetic task (the expert's mean action) "
                  f"{floor:.4f} ({100 * (floor / policy_l1 - 1):+.1f}% vs the policy)")
    (out / f"table_k{args.num_candidates}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
