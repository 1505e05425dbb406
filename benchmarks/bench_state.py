"""Does the proprioceptive state help where the right chunk depends on it? The demo with and without use_state.

    python benchmarks/bench_state.py [--max_steps 600 --seed 0 --out runs/bench_state]

Trains the demo config (`--config demo`, 2 CPU processes through `python -m accelerate.commands.launch --multi_gpu
--num_processes 2 -m vla_energy.training.train`) on the synthetic task with `--synthetic_state goal_offset` (the goal
is the named square plus a per-episode offset that only the state (x, y, ox, oy) shows), twice with the same seed
and steps: once with `--use_state true` (state token + projector, and the projected state in the energy context),
once without. Prints a markdown table of held-out top-1 (31 chunks of other episodes as negatives) and the policy's
action L1 from each run's metrics.json, and writes it with the raw metrics to <out>/bench_state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RUNS = {"without state": [], "with state": ["--use_state", "true"]}


def launch(name: str, flags: list[str], args: argparse.Namespace) -> dict:
    """One 2-process demo run; returns its metrics.json."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(args.port), "-m", "vla_energy.training.train", "--config", "demo",
           "--synthetic_state", "goal_offset", "--max_steps", str(args.max_steps), "--seed", str(args.seed),
           "--eval_steps", "0", "--output_dir", str(args.out), "--run_name", name, "--overwrite_output_dir", "--report_to", "none",
           "--disable_tqdm", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(" ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"run {name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((Path(args.out) / name / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max_steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=29947)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_state"))
    args = parser.parse_args()
    results = {}
    for label, flags in RUNS.items():
        results[label] = launch(label.replace(" ", "_"), flags, args)
    lines = [f"| run ({args.max_steps} steps, seed {args.seed}) | held-out top-1 (chance {results['with state']['chance_acc']:.3f}) "
             "| policy action L1 |", "|---|---|---|"]
    for label, m in results.items():
        lines.append(f"| {label} | {m['top1_acc']:.3f} | {m['action_l1']:.3f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_state.json").write_text(json.dumps(
        {"table": table, **{k: {n: v for n, v in m.items() if n != "history"} for k, m in results.items()}}, indent=2))


if __name__ == "__main__":
    main()
