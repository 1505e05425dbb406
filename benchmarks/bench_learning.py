"""The seed 002 symptom: same samples seen, different layouts; held-out top-1 accuracy vs 31 negatives.

    python benchmarks/bench_learning.py [--seeds 0 1 2 --max_steps 120 --layouts 1x24_inbatch 8x3_local ...]

First one policy is trained with the L1 loss only (--pretrain_steps, 2 processes x 12, LoRA), because the energy
head can only rank chunks once the backbone's features carry the task, and the policy part of training is the same
for every layout (W x b takes the same gradient step as 1 x Wb). Then every layout starts from that policy with the
backbone frozen (`--init_from ... --use_lora false`) and trains the action head and a fresh energy head:
`accelerate launch --multi_gpu --num_processes W recipes/train_energy.py` on CPU (gloo) with the layout's config
from benchmarks/configs/ plus the overrides below, so every layout sees max_steps x 24 samples (the accumulation
layout sees twice as many per step: its optimizer batch is 48). --pretrain_steps 0 trains every layout from
scratch with LoRA instead. Results: a table of mean and spread over seeds, learning curves (PNG) and raw JSON in
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

UNSYNCED = ROOT / "benchmarks" / "train_unsynced_head.py"

# name: (processes, config, extra flags); the unsynced layout runs the recipe through train_unsynced_head.py
LAYOUTS = {
    "1x24_inbatch": (1, "layout_1x24_inbatch.yaml", []),
    "8x3_local": (8, "layout_8x3_local.yaml", []),
    "8x3_global": (8, "layout_8x3_global.yaml", []),
    "8x3_combined": (8, "layout_8x3_combined.yaml", []),
    "8x3_bank": (8, "layout_8x3_bank.yaml", []),
    "4x6_global": (4, "layout_4x6_global.yaml", []),
    "2x12_global": (2, "layout_2x12_global.yaml", []),
    "8x3_accum2": (8, "layout_8x3_accum2.yaml", []),
    "8x3_local_unsynced": (8, "layout_8x3_local.yaml", ["--script", str(UNSYNCED)]),
}


def launch(procs: int, run_name: str, config: str, flags: list[str], args: argparse.Namespace, port: int) -> dict:
    """One recipe run with real processes; returns its metrics.json (plus wall_seconds)."""
    script = ROOT / "recipes" / "train_energy.py"
    if "--script" in flags:
        i = flags.index("--script")
        script, flags = Path(flags[i + 1]), flags[:i] + flags[i + 2:]
    launcher = ["--multi_gpu", "--num_processes", str(procs)] if procs > 1 else ["--num_processes", "1"]
    task = ["--synthetic_view", args.view, "--num_episodes", str(args.num_episodes), "--num_targets",
            str(args.num_targets), "--min_episode_length", "10", "--max_episode_length", "20"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), "--config", str(ROOT / "benchmarks" / "configs" / config),
           "--output_dir", str(args.out), "--run_name", run_name, "--overwrite_output_dir", "--report_to", "none",
           "--disable_tqdm",
           "--backbone", args.backbone, *task, *flags, *args.extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{run_name} ran past --run_timeout {args.run_timeout}s (hung?)") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{run_name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((args.out / run_name / "metrics.json").read_text())
    metrics["wall_seconds"] = time.time() - t0
    return metrics


def pretrain(args: argparse.Namespace, port: int) -> Path:
    """The shared starting policy: L1 only, LoRA, 2 processes x 12 (the same updates as 1 x 24)."""
    flags = ["--seed", "0", "--max_steps", str(args.pretrain_steps), "--eval_steps", "0", "--energy_loss_weight", "0",
             "--per_device_train_batch_size", "12", "--strategy", "global", "--learning_rate", "1e-3"]
    m = launch(2, "pretrain", "layout_2x12_global.yaml", flags, args, port)
    print(f"pretrained policy: held-out action L1 {m['action_l1']:.3f} after {args.pretrain_steps} steps "
          f"({m['wall_seconds']:.0f}s)", flush=True)
    return args.out / "pretrain" / "model"


def run_one(name: str, seed: int, args: argparse.Namespace, port: int, policy: Path | None) -> dict:
    procs, config, extra = LAYOUTS[name]
    start = ["--init_from", str(policy), "--use_lora", "false"] if policy is not None else []
    flags = ["--seed", str(seed), "--max_steps", str(args.max_steps), "--eval_steps", str(args.eval_steps),
             *start, *extra]
    return launch(procs, f"{name}_s{seed}", config, flags, args, port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max_steps", type=int, default=120)
    p.add_argument("--eval_steps", type=int, default=30)
    p.add_argument("--run_timeout", type=int, default=1800, help="seconds before one run counts as hung")
    p.add_argument("--pretrain_steps", type=int, default=900, help="L1-only steps of the shared starting policy")
    p.add_argument("--view", default="wrist", choices=["wrist", "top_down"], help="synthetic camera (docs/data.md)")
    p.add_argument("--num_episodes", type=int, default=400)
    p.add_argument("--num_targets", type=int, default=1)
    p.add_argument("--backbone", default="tiny-llava")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_learning")
    p.add_argument("extra", nargs="*", help="more recipe flags after --, e.g. -- --tau 0.2")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    port = 29700
    policy = pretrain(args, port) if args.pretrain_steps else None
    for name in args.layouts:
        for seed in args.seeds:
            port += 1
            m = run_one(name, seed, args, port, policy)
            results.setdefault(name, []).append(m)
            print(f"{name} seed {seed}: top1 {m['top1_acc']:.3f} gap {m['gap']:.3f} action L1 {m['action_l1']:.3f} "
                  f"({m['wall_seconds']:.0f}s)",
                  flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n| layout | top-1 acc (mean ± sd over {len(args.seeds)} seeds) | energy gap | negatives/positive |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        acc = [r["top1_acc"] for r in runs]
        gap = [r["gap"] for r in runs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        gsd = statistics.stdev(gap) if len(gap) > 1 else 0.0
        print(f"| {name} | {statistics.mean(acc):.3f} ± {sd:.3f} | {statistics.mean(gap):.3f} ± {gsd:.3f} | "
              f"{runs[0]['negatives_per_positive']:.0f} |")
    print(f"chance: {runs[0]['chance_acc']:.3f}")
    plot(results, args.out / "learning_curves.png")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Held-out top-1 accuracy against optimizer steps, mean over seeds, one line per layout."""
    from vla_energy.evaluation.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in results.items():
        curves = [{h["step"]: h["eval/top1_acc"] for h in r["history"] if "eval/top1_acc" in h} for r in runs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], marker="o", label=name)
    ax.axhline(1 / 32, color="k", ls="--", lw=1, label="chance")
    ax.set_xlabel("optimizer step (24 samples each)")
    ax.set_ylabel("held-out top-1 acc (32-way)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
