"""Does the energy head pick better chunks than the policy? Train the demo setup briefly, then compare selections.

    python benchmarks/bench_selection.py [--max_steps 450 --max_samples 256 --out runs/bench_selection]
    python benchmarks/bench_selection.py --run_dir runs/demo      # only evaluate an existing run

Trains `--config demo` with 2 CPU processes (`accelerate launch -m vla_energy.training.train`, gloo) for
--max_steps, then runs `vla-energy evaluate` (vla_energy.evaluation.evaluate.evaluate_run) on the validation split and
prints a markdown table: action L1 of policy / random / rerank / refine / oracle per candidate source with 95%
bootstrap intervals, the paired difference rerank - policy, and the ranking metrics. Extra recipe options
(e.g. a variant to compare) follow `--`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(args: argparse.Namespace, extra: list[str]) -> Path:
    """The demo recipe with fewer steps, 2 processes on the CPU; returns the run directory."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(args.port),
           "-m", "vla_energy.training.train", "--config", "demo", "--max_steps", str(args.max_steps),
           "--eval_steps", "0", "--output_dir", str(args.out), "--run_name", args.run_name, "--overwrite_output_dir",
           "--disable_tqdm", "true",
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env)
    return Path(args.out) / args.run_name


def table(metrics: dict[str, float]) -> str:
    """Markdown: one row per candidate source, L1 [95% CI] per selection, and rerank - policy."""
    def cell(key: str) -> str:
        return f"{metrics[key]:.4f} [{metrics[key + '_lo']:.4f}, {metrics[key + '_hi']:.4f}]"

    lines = [f"policy L1 {cell('l1/policy')}; refine from the policy {cell('l1/policy/refine')}; "
             f"top-1 {metrics['top1_acc']:.3f} (chance {metrics['chance_acc']:.3f}), argmin RMS "
             f"{metrics['argmin_rms']:.4f}, {int(metrics['eval_samples'])} samples, "
             f"{int(metrics['candidates'])} candidates per source", "",
             "| source | random | uniform | rerank | mean | refine | oracle | rerank - policy | mean - policy |",
             "|---|---|---|---|---|---|---|---|---|"]
    sources = sorted({k.split("/")[1] for k in metrics if k.startswith("l1/") and k.count("/") == 2
                      and not k.startswith("l1/policy/")})
    for source in sources:
        row = [cell(f"l1/{source}/{sel}") for sel in ("random", "uniform", "rerank", "mean", "refine", "oracle")]
        lines.append(f"| {source} | " + " | ".join(row) + f" | {cell(f'delta/{source}/rerank')} | "
                     f"{cell(f'delta/{source}/mean')} |")
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=450)
    parser.add_argument("--max_samples", type=int, default=256)
    parser.add_argument("--num_candidates", type=int, default=16)
    parser.add_argument("--out", default="runs/bench_selection")
    parser.add_argument("--run_name", default="selection")
    parser.add_argument("--run_dir", default=None, help="evaluate this run instead of training one")
    parser.add_argument("--port", type=int, default=29861)
    args = parser.parse_args(argv)
    from vla_energy.evaluation.evaluate import evaluate_run

    start = time.time()
    run_dir = Path(args.run_dir) if args.run_dir else train(args, extra)
    trained = time.time()
    metrics = evaluate_run(run_dir, "val", max_samples=args.max_samples, progress=False,
                           num_candidates=args.num_candidates)
    print(table(metrics))
    print(f"\ntrain {trained - start:.0f} s, evaluate {time.time() - trained:.0f} s; run {run_dir}; "
          f"recipe options {extra}")
    (run_dir / "eval_val" / "selection_table.md").write_text(table(metrics) + "\n")


if __name__ == "__main__":
    main()
