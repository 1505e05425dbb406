"""Closed loop in Meta-World with multimodal demonstrations: experts that take one of two routes (a via-point on
either side of the straight path) on three tasks outside MT10, the demo config trained on them, then the policy
against rerank and the energy-weighted mean among the chunks of the nearest training contexts, and rerank's
control (a uniformly random pick among the same candidates). Needs vla_energy[sim] and a GL backend
(MUJOCO_GL=osmesa).

    MUJOCO_GL=osmesa python benchmarks/bench_metaworld_routes.py [--episodes 20 --out runs]

runs (skipping the demonstrations or the training when their directory already holds them):

    vla-energy sim-demos --tasks reach-wall-v3,coffee-button-v3,plate-slide-v3 --episodes_per_task 40 --routes 2 --out data/mw_routes
    vla-energy train --num_processes 2 --config demo --dataset data/mw_routes --use_state true --retrieval_contexts true --output_dir runs --run_name mw_routes --report_to none
    vla-energy rollout runs/mw_routes --episodes 20 --batch_size 20 --modes policy,rerank,mean --candidates neighbors --out_dir runs/mw_routes/rollout_neighbors

and prints success [95% Wilson interval] per task and mode with the paired differences, the failure AUROC of each
mode's energies, and the random pick's success; written also to <out>/bench_metaworld_routes.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench_multimodal_closed_loop import cell, random_pick_rollout, vla_energy

TASKS = ("reach-wall-v3", "coffee-button-v3", "plate-slide-v3")
MODES = ("policy", "rerank", "mean")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=20, help="per task and mode")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--data", type=Path, default=Path("data/mw_routes"))
    args = parser.parse_args()
    if not (args.data / "meta").is_dir():
        vla_energy("sim-demos", "--tasks", ",".join(TASKS), "--episodes_per_task", "40", "--routes", "2", "--out",
                   str(args.data))
    run = args.out / "mw_routes"
    if not (run / "model").is_dir():
        vla_energy("train", "--num_processes", "2", "--config", "demo", "--dataset", str(args.data), "--use_state",
                   "true", "--retrieval_contexts", "true", "--output_dir", str(args.out), "--run_name", run.name,
                   "--report_to", "none", "--disable_tqdm")
    out = run / "rollout_neighbors"
    if not (out / "metrics.json").exists():
        vla_energy("rollout", str(run), "--episodes", str(args.episodes), "--batch_size", str(args.episodes),
                   "--modes", ",".join(MODES), "--candidates", "neighbors", "--out_dir", str(out), "--disable_tqdm")
    metrics = json.loads((out / "metrics.json").read_text())
    random_out = run / "rollout_neighbors_random"
    random = json.loads((random_out / "metrics.json").read_text()) if (random_out / "metrics.json").exists() else \
        random_pick_rollout(run, random_out, args.episodes, "neighbors")
    lines = ["| task | " + " | ".join(MODES) + " | random pick |", "|---|" + "---|" * (len(MODES) + 1)]
    for task in (*TASKS, "overall"):
        cells = [cell(metrics, f"success/{m}/{task}") for m in MODES] + [cell(random, f"success/rerank/{task}")]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines.append("| paired difference to the policy | | " + " | ".join(
        cell(metrics, f"delta/{m}/overall", True) for m in MODES[1:]) + f" | {cell(random, 'delta/rerank/overall', True)} |")
    lines.append("| failure AUROC | " + " | ".join(cell(metrics, f"failure_auroc/{m}") for m in MODES) + " | |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_metaworld_routes.json").write_text(json.dumps({"table": table, "metrics": metrics,
                                                                     "random_pick": random}, indent=1))


if __name__ == "__main__":
    main()
