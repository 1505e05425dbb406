"""Closed loop on the synthetic task with several valid modes (two valid squares, the expert choosing either) and,
as the control, with one: can the energy head pick a mode where the L1 policy averages them, and does it cost
anything where there is one way to act? An L1 run and a flow-head run of the demo config on the multimodal task
(the flow head also on the L1 run's backbone: plain, with its samples as energy negatives, and with the energy head
trained to rank its samples; then each of the plain and the ranking runs trained 1800 steps more) and an L1 run on
the one-target task, rolled out on the same unseen episodes with each candidate source, with the failure signal of
each mode.

    python benchmarks/bench_multimodal_closed_loop.py [--episodes 100 --out runs]
    python benchmarks/bench_multimodal_closed_loop.py --l1_run runs/mm_l1 --flow_run runs/mm_flow \
        --flow_init_run runs/mm_flow_init --flow_init_sn_run runs/mm_flow_init_sn \
        --flow_init_rank_run runs/mm_flow_init_rank --flow_init_long_run runs/mm_flow_init_long \
        --flow_init_rank2_run runs/mm_flow_init_rank2 --unimodal_run runs/uni_l1

runs (skipping a training whose run directory already has a model/):

    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --retrieval_contexts true --output_dir runs --run_name mm_l1 --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --output_dir runs --run_name mm_flow --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --init_from runs/mm_l1 --output_dir runs --run_name mm_flow_init --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --init_from runs/mm_l1 --sample_negatives 8 --output_dir runs --run_name mm_flow_init_sn --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --init_from runs/mm_l1 --candidate_ranking 16 --ranking_candidates samples --output_dir runs --run_name mm_flow_init_rank --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --init_from runs/mm_flow_init --max_steps 1800 --output_dir runs --run_name mm_flow_init_long --report_to none
    vla-energy train --num_processes 2 --config demo --synthetic_modes targets --action_head flow --init_from runs/mm_flow_init_rank --candidate_ranking 16 --ranking_candidates samples --max_steps 1800 --output_dir runs --run_name mm_flow_init_rank2 --report_to none
    vla-energy train --num_processes 2 --config demo --retrieval_contexts true --output_dir runs --run_name uni_l1 --report_to none
    python -c "from vla_energy.training.retrieval_chunks import add_retrieval_chunks as a; a('RUN', contexts=True)"
    vla-energy rollout RUN --episodes 100 --batch_size 100 --modes policy,rerank,mean --candidates SOURCE --out_dir RUN/rollout_SOURCE
    vla-energy rollout RUN --episodes 100 --batch_size 100 --modes policy,refine --out_dir RUN/rollout_refine

(add_retrieval_chunks when a run saved no training contexts, which candidates neighbors needs), for the L1 runs
with SOURCE gaussian, retrieval and neighbors and once with refine, for the flow runs with samples (best of N among
its samples), and prints a markdown table: success [95% Wilson interval] per mode, the paired difference to the policy
[95% bootstrap interval], and the failure AUROC of each mode's energies and relative energies; for neighbors and
samples also rerank's control, a uniformly random pick among the same candidates. Under the table, per rollout:
each mode's mean final distance to the nearest valid target, how many failures ended nearer the midpoint of their
two valid squares than either square, and the energies on shifted observations. Written also to
<out>/bench_multimodal_closed_loop.json.
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
# The modes a candidate source serves; "refine" below is no source: one rollout of refine, which takes none.
CANDIDATE_MODES = ("policy", "rerank", "mean")
SOURCES = {"l1": ("gaussian", "retrieval", "neighbors", "refine"), "flow": ("samples",), "flow_init": ("samples",),
           "flow_init_sn": ("samples",), "flow_init_rank": ("samples",),
           "flow_init_long": ("samples",), "flow_init_rank2": ("samples",), "unimodal": ("gaussian", "retrieval", "neighbors", "refine")}
MULTIMODAL = ["--synthetic_modes", "targets"]
# flow_init: the flow head on the L1 run's backbone and adapter (init_from), which already see the task.
TRAIN_FLAGS = {"l1": [*MULTIMODAL, "--retrieval_contexts", "true"], "flow": [*MULTIMODAL, "--action_head", "flow"],
               "flow_init": [*MULTIMODAL, "--action_head", "flow", "--init_from", "{l1_run}"],
               "flow_init_sn": [*MULTIMODAL, "--action_head", "flow", "--init_from", "{l1_run}", "--sample_negatives",
                                "8"],
               "flow_init_rank": [*MULTIMODAL, "--action_head", "flow", "--init_from", "{l1_run}", "--candidate_ranking",
                                  "16", "--ranking_candidates", "samples"],
               # 1800 more steps of the flow policy, with a fresh energy head: plain, and ranking the samples.
               "flow_init_long": [*MULTIMODAL, "--action_head", "flow", "--init_from", "{flow_init}", "--max_steps",
                                  "1800"],
               "flow_init_rank2": [*MULTIMODAL, "--action_head", "flow", "--init_from", "{flow_init_rank}",
                                   "--candidate_ranking", "16", "--ranking_candidates", "samples", "--max_steps",
                                   "1800"],
               "unimodal": ["--retrieval_contexts", "true"]}
# Sources whose rerank is also run with a random pick: what the energy adds to the candidates themselves.
RANDOM_CONTROL = ("neighbors", "samples")


def vla_energy(*args: str) -> None:
    """Run the `vla-energy` command of this environment, echoing it."""
    exe = Path(sys.executable).with_name("vla-energy")
    print("$ vla-energy " + " ".join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(exe), *args], env=env, check=True)


def cell(metrics: dict, key: str, signed: bool = False) -> str:
    """`value [low, high]` of a metric with its interval, or - when absent."""
    if key not in metrics:
        return "-"
    f = "{:+.2f}" if signed else "{:.2f}"
    return f"{f.format(metrics[key])} [{f.format(metrics[key + '/low'])}, {f.format(metrics[key + '/high'])}]"


def row(name: str, metrics: dict) -> str:
    """One markdown row: success per mode (with the paired difference), the failure AUROC per mode of the energy
    and of the relative energy."""
    cells = [cell(metrics, f"success/{m}/overall") + (f", {cell(metrics, f'delta/{m}/overall', True)}"
                                                       if f"delta/{m}/overall" in metrics else "") for m in MODES]
    cells += [f"{cell(metrics, f'failure_auroc/{m}')}; {cell(metrics, f'relative_failure_auroc/{m}')}"
              for m in MODES]
    return f"| {name} | " + " | ".join(cells) + " |"


def between_squares(failures: list[dict]) -> list[int]:
    """[failures that ended nearer the midpoint of their two valid squares than either square, failures with two]."""
    count, pairs = 0, [e for e in failures if len(e.get("goals", [])) == 2]
    for e in pairs:
        mid = [(e["goals"][0][i] + e["goals"][1][i]) / 2 for i in range(2)]
        count += math.dist(e["agent"], mid) < min(math.dist(e["agent"], g) for g in e["goals"])
    return [count, len(pairs)]


def where_episodes_end(out: Path) -> dict:
    """Per mode of a rollout: the mean final distance to the nearest valid target, and how many failures ended
    between two valid squares (the averaged direction)."""
    episodes = json.loads((out / "episodes.json").read_text())
    modes = sorted({e["mode"] for e in episodes})
    return {m: {"distance": sum(e["distance"] for e in episodes if e["mode"] == m)
                / sum(e["mode"] == m for e in episodes),
                "between": between_squares([e for e in episodes if e["mode"] == m and not e["success"]])}
            for m in modes}


def random_pick_rollout(run: Path, out: Path, episodes: int, source: str) -> dict:
    """The control of rerank: the same rollout with the candidate chosen uniformly at random instead of by energy
    (EnergyPolicy's rerank replaced for this call only; seeded)."""
    import torch

    from vla_energy.inference import policy as policy_module
    from vla_energy.inference.rerank import RerankResult
    from vla_energy.sim.rollout import rollout

    g = torch.Generator().manual_seed(0)
    by_energy = policy_module.rerank

    def pick(head, context, candidates, **kwargs):
        if candidates.shape[1] == 1:  # the executed chunk's energy, for the report
            return by_energy(head, context, candidates, **kwargs)
        energies = torch.rand(candidates.shape[:2], generator=g).to(candidates.device)
        index = energies.argmin(dim=1)
        return RerankResult(candidates[torch.arange(len(index)), index], index, energies)

    policy_module.rerank = pick
    try:
        return rollout(run, out, episodes=episodes, modes=["policy", "rerank"], batch_size=episodes, progress=False,
                       candidates=source, shifts=())
    finally:
        policy_module.rerank = by_energy


def has_contexts(run: Path) -> bool:
    """Whether the run's policy saved the training contexts that candidates='neighbors' needs."""
    info = json.loads((run / "model" / "policy_config.json").read_text())
    return bool(info.get("retrieval_contexts"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--l1_run", type=Path, default=None, help="a demo run trained with --synthetic_modes targets")
    parser.add_argument("--flow_run", type=Path, default=None, help="the same with --action_head flow")
    parser.add_argument("--flow_init_run", type=Path, default=None,
                        help="the same with --action_head flow --init_from <the L1 run>")
    parser.add_argument("--flow_init_sn_run", type=Path, default=None,
                        help="the same with --sample_negatives 8 (the flow head's samples as energy negatives)")
    parser.add_argument("--flow_init_rank_run", type=Path, default=None,
                        help="the same with --candidate_ranking 16 --ranking_candidates samples (the energy head "
                             "trained to rank the flow head's samples by their distance to the demonstration)")
    parser.add_argument("--flow_init_long_run", type=Path, default=None,
                        help="--init_from <the flow_init run> --max_steps 1800: the flow policy trained longer, with a "
                             "fresh energy head")
    parser.add_argument("--flow_init_rank2_run", type=Path, default=None,
                        help="the same from <the flow_init_rank run>, with the energy head ranking the samples")
    parser.add_argument("--unimodal_run", type=Path, default=None, help="a demo run on the one-target task")
    parser.add_argument("--reuse_rollouts", action="store_true",
                        help="read a rollout whose RUN/rollout_SOURCE/metrics.json exists instead of running it again")
    args = parser.parse_args()
    lines = ["| run, candidates | " + " | ".join(MODES) + " | "
             + " | ".join(f"failure AUROC {m}: energy; relative" for m in MODES) + " |",
             "|---|" + "---|" * (2 * len(MODES))]
    runs = {"l1": args.l1_run, "flow": args.flow_run, "flow_init": args.flow_init_run,
            "flow_init_sn": args.flow_init_sn_run, "flow_init_rank": args.flow_init_rank_run,
            "flow_init_long": args.flow_init_long_run, "flow_init_rank2": args.flow_init_rank2_run,
            "unimodal": args.unimodal_run}
    defaults = {"l1": "mm_l1", "flow": "mm_flow", "flow_init": "mm_flow_init", "flow_init_sn": "mm_flow_init_sn",
                "flow_init_rank": "mm_flow_init_rank", "flow_init_long": "mm_flow_init_long",
                "flow_init_rank2": "mm_flow_init_rank2", "unimodal": "uni_l1"}
    results = {}
    for kind, sources in SOURCES.items():
        run = runs[kind] or args.out / defaults[kind]
        if not (run / "model").is_dir():
            paths = {k: runs[k] or args.out / defaults[k] for k in runs}
            flags = [f.format(l1_run=paths["l1"], **paths) for f in TRAIN_FLAGS[kind]]
            vla_energy("train", "--num_processes", "2", "--config", "demo", *flags, "--output_dir",
                       str(run.parent), "--run_name", run.name, "--report_to", "none", "--disable_tqdm")
        if "neighbors" in sources and not has_contexts(run):
            from vla_energy.training.retrieval_chunks import add_retrieval_chunks

            print(f"adding the training contexts to {run}", flush=True)
            add_retrieval_chunks(run, contexts=True)
        for source in sources:
            out = run / f"rollout_{source}"
            start, reused = time.perf_counter(), args.reuse_rollouts and (out / "metrics.json").exists()
            if not reused:
                modes = ("policy", "refine") if source == "refine" else CANDIDATE_MODES
                vla_energy("rollout", str(run), "--episodes", str(args.episodes), "--batch_size", str(args.episodes),
                           "--modes", ",".join(modes), "--candidates", "gaussian" if source == "refine" else source,
                           "--out_dir", str(out), "--disable_tqdm")
            metrics = json.loads((out / "metrics.json").read_text())
            results[f"{kind}, {source}"] = {"metrics": metrics, "ends": where_episodes_end(out),
                                            **({} if reused else {"seconds": time.perf_counter() - start})}
            lines.append(row(f"{kind}, {source} (`{run}`)", metrics))
            if source in RANDOM_CONTROL:
                print(f"$ the same with a uniformly random pick among the candidates: {run}/rollout_{source}_random",
                      flush=True)
                random_out = run / f"rollout_{source}_random"
                metrics = json.loads((random_out / "metrics.json").read_text()) if args.reuse_rollouts and (
                    random_out / "metrics.json").exists() else random_pick_rollout(run, random_out, args.episodes,
                                                                                  source)
                results[f"{kind}, {source}, random pick"] = {"metrics": metrics, "ends": where_episodes_end(random_out)}
                lines.append(row(f"{kind}, {source}, random pick in place of rerank", metrics))
    table = "\n".join(lines)
    print(table)
    for key, r in results.items():
        m = r["metrics"]
        shifts = "; ".join(f"{s} AUROC {cell(m, f'shift_auroc/{s}')} (relative {cell(m, f'relative_shift_auroc/{s}')})"
                           for s in ("noisy_images", "other_instruction") if f"shift_auroc/{s}" in m)
        took = f"rollout {r['seconds']:.0f} s; " if "seconds" in r else ""
        ends = "; ".join(f"{m} {e['distance']:.3f}" + (f", {e['between'][0]}/{e['between'][1]} failures between "
                                                        "the squares" if e["between"][1] else "")
                         for m, e in r["ends"].items())
        print(f"{key}: {took}mean final distance to a valid target: {ends}; energies on shifted observations: "
              f"{shifts or '-'}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_multimodal_closed_loop.json").write_text(json.dumps({"table": table, **results}, indent=1))


if __name__ == "__main__":
    main()
