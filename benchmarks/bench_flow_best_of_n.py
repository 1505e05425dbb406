"""Best of N from a flow head on the multimodal synthetic task, picker by picker: where the energy's choice stands
between a random sample and an oracle that knows the goals.

    python benchmarks/bench_flow_best_of_n.py --runs runs/mm_flow_init runs/mm_flow_init_rank \
        runs/mm_flow_init_long runs/mm_flow_init_rank2
    python benchmarks/bench_flow_best_of_n.py --episodes 200 --pickers random energy oracle \
        --groups plain=runs/mm_flow_init_long,runs/mm_flow_init_long_s1,runs/mm_flow_init_long_s2

Each run is a flow-head policy trained on `--synthetic_modes targets` (bench_multimodal_closed_loop.py trains them
and lists their commands).
Every picker gets the same candidates at every chunk: the policy's chunk and N-1 flow samples, within the policy's
candidate bounds, drawn with the seed `vla-energy rollout` uses (first episode seed + step), and the same unseen
episodes (seeds 1000..). Each chunk's first n_action_steps actions are executed, at most 60 steps, as in rollout.
Pickers:
- random: a uniformly random candidate (the sampler alone);
- energy: the lowest energy (mode="rerank", candidates="samples");
- coherence: the candidate whose first two actions are nearest the last two of the chunk executed before (the
  backward coherence of bidirectional decoding; random at the first chunk);
- energy+coherence: energy + `--coherence_weight` x that distance;
- oracle: the candidate that ends its executed actions nearest a valid target (it reads the environment's goals:
  the ceiling of a myopic verifier on these candidates).
Prints, per run and picker, the success rate [Wilson 95%], its paired difference to random [bootstrap 95%], how
often an episode's executed chunks switch the target they head for, and how many failures end between the two
squares; and per run how the energy orders the candidates of the states the random picker visits: the progress
towards the nearest target of the lowest-energy candidate, of the mean candidate and of the best one, and the
correlation of -energy with progress. Written also to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

PICKERS = ("random", "energy", "coherence", "energy+coherence", "oracle")
COHERENCE_STEPS = 2  # the actions compared between consecutive chunks


def end_points(agents: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """[B,K,2]: where each candidate's actions [B,K,S,Da] take each agent [B,2] (the task's dynamics)."""
    from vla_energy.data.synthetic import move_agent

    out = np.repeat(agents[:, None], chunks.shape[1], axis=1)
    for s in range(chunks.shape[2]):
        out = move_agent(out, chunks[:, :, s])
    return out


def goal_distance(points: np.ndarray, goals: list[np.ndarray]) -> np.ndarray:
    """[B,K]: distance of each point [B,K,2] to the nearest valid goal of its episode."""
    return np.stack([np.linalg.norm(p[:, None] - g[None], axis=-1).min(axis=1) for p, g in zip(points, goals)])


def heading(agents: np.ndarray, chunks: np.ndarray, goals: list[np.ndarray]) -> np.ndarray:
    """[B]: the index of the valid goal each executed chunk [B,S,Da] heads for (largest cosine)."""
    moves = chunks[:, :, :2].sum(axis=1)
    out = []
    for a, m, g in zip(agents, moves, goals):
        d = g - a
        out.append(int(np.argmax(d @ m / (np.linalg.norm(d, axis=1) * np.linalg.norm(m) + 1e-12))))
    return np.array(out)


def candidates_and_energies(policy, observation: dict, num_samples: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized candidates [B,K,H,Da], energies [B,K]): the policy's chunk and num_samples-1 flow samples, as
    EnergyPolicy's rerank over candidates="samples" builds them."""
    from functools import partial

    from vla_energy.inference.candidates import make_candidates
    from vla_energy.inference.policy import candidate_bounds
    from vla_energy.inference.rerank import rerank

    images, tasks, _ = policy._parse_observation(observation)
    states = policy.normalize_state(observation["observation.state"]) if policy.uses_state else None
    readout = policy.encode(images, tasks, states)
    low, high = candidate_bounds(policy.loaded.norm_stats)
    with torch.no_grad():
        chunk, _ = policy.plugin.predict_actions(readout)
        g = torch.Generator(device=chunk.device).manual_seed(seed)
        cands = make_candidates("samples", chunk, num_samples, generator=g, low=low, high=high,
                                sampler=partial(policy.plugin.sample_actions, readout))
        head = policy.plugin.energy_head
        energies = rerank(head, head.encode_context(readout.context, readout.context_mask),
                          cands.to(chunk.dtype)).energies.float()
    return cands.float(), energies.cpu().numpy()


def closed_loop(policy, cfg, picker: str, seeds: list[int], num_samples: int, weight: float,
                max_steps: int, probe: bool = False) -> dict:
    """One batch of episodes with `picker` choosing each chunk; probe: also how the energy orders the candidates."""
    from vla_energy.sim.synthetic_env import SyntheticEnv

    env = SyntheticEnv(cfg, len(seeds))
    observation = env.reset(seeds)
    n, steps = len(seeds), policy.n_action_steps
    rng = np.random.default_rng(0)
    done = np.zeros(n, bool)
    targets: list[list[int]] = [[] for _ in range(n)]
    previous: np.ndarray | None = None
    order = {"lowest_energy": [], "mean": [], "best": [], "correlation": []}
    for start in range(0, max_steps, steps):
        cands, energies = candidates_and_energies(policy, observation, num_samples, seeds[0] + start)
        chunks = np.asarray(policy.loaded.norm_stats.unnormalize(cands).numpy())[:, :, :steps]
        goals = [scene.goals for scene in env.scenes]
        needs_progress = picker == "oracle" or probe
        progress = (goal_distance(env.agents[:, None].repeat(chunks.shape[1], 1), goals)
                    - goal_distance(end_points(env.agents, chunks), goals)) if needs_progress else None
        coherence = np.zeros_like(energies) if previous is None else np.sqrt(
            ((cands.numpy()[:, :, :COHERENCE_STEPS] - previous[:, None, -COHERENCE_STEPS:]) ** 2).mean(axis=(2, 3)))
        if picker == "random" or (picker == "coherence" and previous is None):
            pick = rng.integers(0, chunks.shape[1], n)
        elif picker == "energy":
            pick = energies.argmin(axis=1)
        elif picker == "coherence":
            pick = coherence.argmin(axis=1)
        elif picker == "energy+coherence":
            pick = (energies + weight * coherence).argmin(axis=1)
        else:
            pick = progress.argmax(axis=1)
        if probe:
            for i in np.flatnonzero(~done):
                order["lowest_energy"].append(progress[i, energies[i].argmin()])
                order["mean"].append(progress[i].mean())
                order["best"].append(progress[i].max())
                order["correlation"].append(np.corrcoef(-energies[i], progress[i])[0, 1])
        executed = chunks[np.arange(n), pick]
        for i, h in enumerate(heading(env.agents, executed, goals)):
            if not done[i]:
                targets[i].append(int(h))
        previous = cands.numpy()[np.arange(n), pick][:, :steps]
        for s in range(min(steps, max_steps - start)):
            observation, success = env.step(executed[:, s], ~done)
            done |= success
        if done.all():
            break
    between = [bool(np.linalg.norm(a - s.goals.mean(0)) < np.linalg.norm(s.goals - a, axis=1).min())
               for a, s in zip(env.agents, env.scenes)]
    out = {"success": done.astype(float).tolist(),
           "switches": float(np.mean([sum(x != y for x, y in zip(t, t[1:])) for t in targets])),
           "failures_between": int(np.sum(np.array(between) & ~done)), "failures": int((~done).sum())}
    if probe:
        out["order"] = {k: float(np.nanmean(v)) for k, v in order.items()}
    return out


def main() -> None:
    from vla_energy.evaluation.intervals import paired_bootstrap_interval, wilson_interval
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.sim.synthetic_env import DEFAULT_MAX_STEPS, synthetic_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="*", default=[])
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--coherence_weight", type=float, default=1.0)
    parser.add_argument("--pickers", nargs="+", default=list(PICKERS), choices=PICKERS)
    parser.add_argument("--groups", nargs="+", default=[], metavar="NAME=RUN,RUN,...",
                        help="runs of one configuration with other training seeds: each group's episodes pooled")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_flow_best_of_n.json"))
    args = parser.parse_args()
    groups = {name: [Path(r) for r in runs.split(",")] for name, runs in (g.split("=", 1) for g in args.groups)}
    args.runs += [r for runs in groups.values() for r in runs if r not in args.runs]
    if not args.runs:
        parser.error("name flow-head runs with --runs or --groups")
    torch.manual_seed(0)
    seeds = list(range(1000, 1000 + args.episodes))
    lines = ["| run | picker | success | paired difference to random | target switches per episode | failures "
             "between the squares |", "|---|---|---|---|---|---|"]
    results: dict = {}
    for run in args.runs:
        policy = EnergyPolicy.from_pretrained(run / "model")
        if not policy.plugin.is_flow:
            raise SystemExit(f"{run}: its action head is {policy.plugin.args.action_head!r}, not a flow head")
        cfg = synthetic_config(json.loads((run / "run_config.json").read_text()))
        if cfg.synthetic_modes != "targets":
            raise SystemExit(f"{run}: trained with synthetic_modes={cfg.synthetic_modes!r}, not 'targets'")
        res = {p: closed_loop(policy, cfg, p, seeds, args.num_samples, args.coherence_weight, DEFAULT_MAX_STEPS,
                              probe=p == "random") for p in args.pickers}
        base = res.get("random", {}).get("success")
        for p, r in res.items():
            k = int(sum(r["success"]))
            lo, hi = wilson_interval(k, len(seeds))
            diff = "-"
            if base is not None and p != "random":
                d, dlo, dhi = paired_bootstrap_interval(r["success"], base)
                diff = f"{d:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
                r["delta"] = [d, dlo, dhi]
            lines.append(f"| {run.name} | {p} | {k / len(seeds):.2f} [{lo:.2f}, {hi:.2f}] | {diff} | "
                         f"{r['switches']:.2f} | {r['failures_between']} of {r['failures']} |")
        if "random" in res:
            o = res["random"]["order"]
            print(f"{run.name}: per chunk, progress towards the nearest target of the lowest-energy candidate "
                  f"{o['lowest_energy']:.3f}, of the mean candidate {o['mean']:.3f}, of the best {o['best']:.3f}; "
                  f"correlation of -energy with progress {o['correlation']:.2f}", flush=True)
        results[str(run)] = res
    for name, runs in groups.items():
        pooled = {p: sum((results[str(r)][p]["success"] for r in runs), []) for p in args.pickers}
        for p, success in pooled.items():
            lo, hi = wilson_interval(int(sum(success)), len(success))
            diff = "-"
            if "random" in pooled and p != "random":
                d, dlo, dhi = paired_bootstrap_interval(success, pooled["random"])
                diff = f"{d:+.2f} [{dlo:+.2f}, {dhi:+.2f}]"
            per_run = ", ".join(f"{np.mean(results[str(r)][p]['success']):.2f}" for r in runs)
            lines.append(f"| {name} ({len(runs)} runs pooled: {per_run}) | {p} | {np.mean(success):.2f} [{lo:.2f}, "
                         f"{hi:.2f}] | {diff} | {np.mean([results[str(r)][p]['switches'] for r in runs]):.2f} | "
                         f"{sum(results[str(r)][p]['failures_between'] for r in runs)} of "
                         f"{sum(results[str(r)][p]['failures'] for r in runs)} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"table": table, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
