"""The head's calibration against the policy, offline and in closed loop: each energy head that
`bench_head_options.py` trained head-only on one fixed policy (variants x seeds) is put into that policy, which is
then rolled out on its synthetic task with rerank among the chunks of the nearest training contexts.

    python benchmarks/bench_head_options.py --run_dir runs/mm_l1 --out runs/head_options_mm --steps 400 \
        --variants base policy_error_negatives policy_negative candidate_ranking
    python benchmarks/bench_calibration_closed_loop.py --run_dir runs/mm_l1 --heads runs/head_options_mm

For every head in <heads>/heads/<variant>_seed<k> a policy is written to <heads>/policies/<variant>_seed<k> (the
run's policy with that head: its backbone, action head and training chunks unchanged) and rolled out like

    vla-energy rollout POLICY --episodes 100 --batch_size 100 --modes policy,rerank --candidates neighbors --shifts none

(seeds 1000..1099, the same for every head). Prints a markdown table per variant: how often the head prefers the
policy's chunk to the demonstrated one where the policy is most wrong (offline, from <heads>/results_k16.json),
held-out top-1, rerank's closed-loop success and its paired difference to the policy, each as the mean over seeds
with [min, max]; written also to <heads>/calibration_closed_loop.json.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch


def write_policy_with_head(run_dir: Path, head_dir: Path, overrides: dict, out: Path) -> Path:
    """The run's policy with the energy head saved in head_dir (trained with the EnergyArguments `overrides`)."""
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.modeling.modeling_energy_head import EnergyHead
    from vla_energy.modeling.serialization import load_policy

    loaded = load_policy(run_dir)
    old = loaded.plugin
    plugin = EnergyPlugin.from_config_dict({**old.config_dict(), "args": asdict(replace(old.args, **overrides))})
    plugin.load_state_dict(old.state_dict())
    plugin.energy_head.load_state_dict(EnergyHead.from_pretrained(head_dir).state_dict())
    loaded.model.plugin = plugin.to(dtype=next(old.parameters()).dtype)
    loaded.save(out)
    return out


def spread(values: list[float], signed: bool = False) -> str:
    """Mean [min, max] of per-seed values."""
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(sum(values) / len(values))} [{f.format(min(values))}, {f.format(max(values))}]"


def main() -> None:
    from bench_head_options import VARIANTS

    from vla_energy.sim.rollout import rollout

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, default=Path("runs/mm_l1"))
    parser.add_argument("--heads", type=Path, default=Path("runs/head_options_mm"))
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--candidates", default="neighbors")
    args = parser.parse_args()
    torch.set_num_threads(1)
    offline = json.loads((args.heads / "results_k16.json").read_text())
    rows: dict[str, list[dict]] = {}
    for head_dir in sorted((args.heads / "heads").iterdir()):
        variant, seed = head_dir.name.rsplit("_seed", 1)
        measured = next((r for r in offline.get(variant, []) if r["seed"] == int(seed)), None)
        if measured is None:
            print(f"{head_dir.name}: not evaluated offline yet (bench_head_options.py), left out", flush=True)
            continue
        policy_dir = args.heads / "policies" / head_dir.name
        if not (policy_dir / "policy_config.json").exists():
            write_policy_with_head(args.run_dir, head_dir, VARIANTS[variant], policy_dir)
        out = policy_dir / f"rollout_{args.candidates}"
        if (out / "metrics.json").exists():
            metrics = json.loads((out / "metrics.json").read_text())
        else:
            metrics = rollout(policy_dir, out, episodes=args.episodes, modes=["policy", "rerank"],
                              batch_size=args.episodes, progress=False, candidates=args.candidates, shifts=())
        rows.setdefault(variant, []).append({
            "seed": int(seed), "prefers_policy_wrong": measured["calibration/prefers_policy/policy_wrong"],
            "prefers_policy_all": measured["calibration/prefers_policy/all"], "top1": measured["top1_acc"],
            "policy": metrics["success/policy/overall"], "rerank": metrics["success/rerank/overall"],
            "delta": metrics["delta/rerank/overall"]})
        print(f"{head_dir.name}: prefers the policy where it is wrong {rows[variant][-1]['prefers_policy_wrong']:.2f}, "
              f"rerank {metrics['success/rerank/overall']:.2f} (policy {metrics['success/policy/overall']:.2f})",
              flush=True)
    lines = ["| head (head-only, seeds) | prefers the policy's chunk, policy most wrong | all samples | top-1 | "
             f"rerank success ({args.candidates}) | paired difference to the policy |", "|---|---|---|---|---|---|"]
    for variant, runs in rows.items():
        lines.append(f"| {variant} ({len(runs)}) | {spread([r['prefers_policy_wrong'] for r in runs])} | "
                     f"{spread([r['prefers_policy_all'] for r in runs])} | {spread([r['top1'] for r in runs])} | "
                     f"{spread([r['rerank'] for r in runs])} | {spread([r['delta'] for r in runs], True)} |")
    table = "\n".join(lines)
    print(table)
    (args.heads / "calibration_closed_loop.json").write_text(json.dumps({"table": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
