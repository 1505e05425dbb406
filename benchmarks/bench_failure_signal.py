"""The energy of the executed chunks as a failure signal, over many episodes and over training seeds: does an
episode's mean chunk energy (and relative energy) predict its failure, and do energies rise on observations the
policy never saw?

    python benchmarks/bench_failure_signal.py --episodes 400 --runs runs/mm_l1 runs/uni_l1 \
        --groups plain=runs/mm_flow_init_long,runs/mm_flow_init_long_s1,runs/mm_flow_init_long_s2 \
        bound=runs/mm_flow_init_long_b_s0,runs/mm_flow_init_long_b_s1,runs/mm_flow_init_long_b_s2 \
        rank=runs/mm_flow_init_rank2,runs/mm_flow_init_rank2_s1,runs/mm_flow_init_rank2_s2

Each run is rolled out in policy mode on the same unseen episodes (seeds 1000..) unless RUN/rollout_policy<episodes>
already holds a metrics.json:

    vla-energy rollout RUN --episodes E --batch_size 200 --modes policy --out_dir RUN/rollout_policy<E>

(the runs' training commands: bench_multimodal_closed_loop.py and docs/sim.md). Prints a markdown table per run:
success [Wilson 95%], the failure AUROC of the episode's mean energy and of its mean relative energy, and the AUROC
of shifted observations (noisy images, another episode's instruction) against the same observations unshifted
[bootstrap 95%]; and per group the mean over its runs [min, max]. Written also to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

COLUMNS = {"success": "success/policy/overall", "failure AUROC, energy": "failure_auroc/policy",
           "failure AUROC, relative energy": "relative_failure_auroc/policy",
           "noisy images": "shift_auroc/noisy_images", "other instruction": "shift_auroc/other_instruction"}


def rollout_metrics(run: Path, episodes: int, batch_size: int) -> dict:
    """The metrics of RUN's policy-mode rollout over `episodes` episodes, rolling it out first where it is missing."""
    out_dir = run / f"rollout_policy{episodes}"
    if not (out_dir / "metrics.json").exists():
        command = [sys.executable, "-m", "vla_energy.cli", "rollout", str(run), "--episodes", str(episodes),
                   "--batch_size", str(batch_size), "--modes", "policy", "--out_dir", str(out_dir)]
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads((out_dir / "metrics.json").read_text())


def cell(metrics: dict, key: str) -> str:
    """'value [low, high]' of one metric and its interval."""
    return f"{metrics[key]:.2f} [{metrics[key + '/low']:.2f}, {metrics[key + '/high']:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", type=Path, default=[], help="runs reported alone")
    parser.add_argument("--groups", nargs="+", default=[], metavar="NAME=RUN,RUN,...",
                        help="runs trained with other seeds, reported alone and summarised together")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_failure_signal.json"))
    args = parser.parse_args()
    groups = {name: [Path(r) for r in runs.split(",")] for name, runs in (g.split("=", 1) for g in args.groups)}
    runs = list(args.runs) + [r for members in groups.values() for r in members if r not in args.runs]
    if not runs:
        parser.error("name runs with --runs or --groups")
    missing = [str(r) for r in runs if not (r / "model").is_dir()]
    if missing:
        parser.error(f"no trained model in {', '.join(missing)} (train them first: see the docstring)")

    metrics = {str(run): rollout_metrics(run, args.episodes, args.batch_size) for run in runs}
    lines = [f"{args.episodes} episodes per run, policy mode", "",
             "| run | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {run} | " + " | ".join(cell(m, key) for key in COLUMNS.values()) + " |" for run, m in metrics.items()]
    summary = {}
    for name, members in groups.items():
        summary[name] = {}
        for column, key in COLUMNS.items():
            values = [metrics[str(r)][key] for r in members]
            summary[name][column] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
        lines.append(f"| {name} ({len(members)} seed{'s' * (len(members) > 1)}: mean [min, max]) | " + " | ".join(
            f"{s['mean']:.2f} [{s['min']:.2f}, {s['max']:.2f}]" for s in summary[name].values()) + " |")
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"episodes": args.episodes, "runs": {r: {c: m[k] for c, k in COLUMNS.items()}
                                                                         for r, m in metrics.items()},
                                    "groups": summary, "table": lines}, indent=1))


if __name__ == "__main__":
    main()
