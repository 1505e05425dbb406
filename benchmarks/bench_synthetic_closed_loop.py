"""Closed-loop success on the synthetic task, unimodal and multimodal: the demo config trained on each, then rolled
out on the same 100 unseen episodes in every mode (policy, rerank, mean, refine) with Gaussian candidates, and in
policy, rerank, mean with retrieved candidates (the training chunks nearest to the policy's).

    python benchmarks/bench_synthetic_closed_loop.py [--episodes 100 --out runs]
    python benchmarks/bench_synthetic_closed_loop.py --unimodal_run runs/demo --multimodal_run runs/demo_targets

runs, on 2 CPU processes (skipping a training whose run directory already has a model/; the second form rolls out
runs trained before, e.g. by `make demo`):

    vla-energy train --num_processes 2 --config demo --output_dir runs --run_name synth_none --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --output_dir runs --run_name synth_targets --report_to none
    vla-energy rollout runs/synth_none --episodes 100 --batch_size 100 --out_dir runs/synth_none/rollout_100
    vla-energy rollout runs/synth_none --episodes 100 --batch_size 100 --modes policy,rerank,mean --candidates retrieval --out_dir runs/synth_none/rollout_100_retrieval

(the same two rollouts for runs/synth_targets) and prints the markdown table of docs/sim.md (success [95% Wilson
interval] per mode, the paired difference to the policy [95% bootstrap interval]), each mode's mean final distance
to the nearest valid target and how many failed episodes ended nearer the midpoint of their two valid squares than
either square, also written to <out>/bench_synthetic_closed_loop.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

MODES = ("policy", "rerank", "mean", "refine")
VARIANTS = {"none": [], "targets": ["--synthetic_modes", "targets"]}
CANDIDATES = {"gaussian": MODES, "retrieval": ("policy", "rerank", "mean")}


def vla_energy(*args: str) -> None:
    """Run the `vla-energy` command of this environment, echoing it."""
    exe = Path(sys.executable).with_name("vla-energy")
    print("$ vla-energy " + " ".join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(exe), *args], env=env, check=True)


def between_squares(failures: list[dict]) -> list[int]:
    """[failures that ended nearer the midpoint of their two valid squares than either square, failures with two]."""
    count, pairs = 0, [e for e in failures if len(e.get("goals", [])) == 2]
    for e in pairs:
        mid = [(e["goals"][0][i] + e["goals"][1][i]) / 2 for i in range(2)]
        count += math.dist(e["agent"], mid) < min(math.dist(e["agent"], g) for g in e["goals"])
    return [count, len(pairs)]


def row(name: str, out: Path, seconds: float) -> tuple[str, dict]:
    """One markdown row of a rollout's report directory (modes it did not run: -) and its numbers."""
    metrics = json.loads((out / "metrics.json").read_text())
    episodes = json.loads((out / "episodes.json").read_text())
    modes = [m for m in MODES if f"success/{m}/overall" in metrics]
    cells = []
    for mode in MODES:
        k, d = f"success/{mode}/overall", f"delta/{mode}/overall"
        cell = f"{metrics[k]:.2f} [{metrics[k + '/low']:.2f}, {metrics[k + '/high']:.2f}]" if k in metrics else "-"
        if d in metrics:
            cell += f", {metrics[d]:+.2f} [{metrics[d + '/low']:+.2f}, {metrics[d + '/high']:+.2f}]"
        cells.append(cell)
    distance = {m: sum(e["distance"] for e in episodes if e["mode"] == m) / sum(e["mode"] == m for e in episodes)
                for m in modes}
    between = {m: between_squares([e for e in episodes if e["mode"] == m and not e["success"]]) for m in modes}
    numbers = {"metrics": metrics, "mean_final_distance": distance, "failures_between_squares": between,
               "rollout_seconds": seconds}
    return f"| {name} | " + " | ".join(cells) + " |", numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--unimodal_run", type=Path, default=None, help="a trained demo run to use as the unimodal one")
    parser.add_argument("--multimodal_run", type=Path, default=None,
                        help="a demo run trained with --synthetic_modes targets to use as the multimodal one")
    args = parser.parse_args()
    lines = ["| task, candidates | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    results = {}
    for variant, flags in VARIANTS.items():
        given = args.unimodal_run if variant == "none" else args.multimodal_run
        run = given or args.out / f"synth_{variant}"
        if not (run / "model").is_dir():
            vla_energy("train", "--num_processes", "2", "--config", "demo", *flags, "--output_dir", str(run.parent),
                       "--run_name", run.name, "--report_to", "none")
        for candidates, modes in CANDIDATES.items():
            out = run / (f"rollout_{args.episodes}" + ("" if candidates == "gaussian" else f"_{candidates}"))
            start = time.perf_counter()
            vla_energy("rollout", str(run), "--episodes", str(args.episodes), "--batch_size", str(args.episodes),
                       "--modes", ",".join(modes), "--candidates", candidates, "--out_dir", str(out), "--disable_tqdm")
            key = f"{variant}, {candidates}"
            line, results[key] = row(f"{key} (`{run}`)", out, time.perf_counter() - start)
            lines.append(line)
    table = "\n".join(lines)
    print(table)
    for key, numbers in results.items():
        print(f"{key}: mean final distance to a valid target per mode "
              + ", ".join(f"{m} {d:.3f}" for m, d in numbers["mean_final_distance"].items())
              + ("; failures that ended between two valid squares " + ", ".join(
                  f"{m} {b}/{n}" for m, (b, n) in numbers["failures_between_squares"].items())
                 if not key.startswith("none") else "")
              + f"; rollout {numbers['rollout_seconds']:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_synthetic_closed_loop.json").write_text(json.dumps({"table": table, **results}, indent=1))


if __name__ == "__main__":
    main()
