"""Closed-loop evaluation of a trained policy in Meta-World: success rate per task and overall for each mode.

Each task runs the same seeded episodes in every mode (`policy`, `rerank`, `refine` of `EnergyPolicy`), so modes
are compared on identical initial states; the seeds must differ from the demonstrations' (checked against the
dataset's meta/metaworld.json). An episode succeeds when Meta-World reports success at any step. Writes
metrics.json, episodes.json (every episode), report.md and one GIF per task and mode (the first episode).

    vla-energy rollout runs/mw --episodes 10 --out_dir runs/mw/rollout
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
from tqdm.auto import tqdm

from vla_energy.sim.stats import paired_bootstrap_interval, wilson_interval

__all__ = ["MODES", "sim_settings", "run_episodes", "success_metrics", "rollout", "build_parser", "main"]

MODES = ("policy", "rerank", "mean", "refine")


def sim_settings(run_config: Optional[dict], tasks: Optional[Sequence[str]] = None, camera: Optional[str] = None,
                 image_size: Optional[int] = None) -> dict:
    """Tasks (name -> instruction), camera, image size and the demonstrations' seeds per task: from the run's
    dataset (meta/metaworld.json written by `vla-energy sim-demos`), each overridable."""
    from vla_energy.sim.demos import SIM_META
    from vla_energy.sim.metaworld_env import task_instruction

    dataset = ((run_config or {}).get("DataConfig") or {}).get("dataset")
    path = Path(str(dataset)) / "meta" / SIM_META if dataset else None
    meta = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    known = meta.get("tasks", {})
    names = list(tasks) if tasks else list(known)
    if not names or camera is None and "camera" not in meta or image_size is None and "image_size" not in meta:
        raise ValueError(f"the run's dataset {dataset!r} has no meta/{SIM_META} (not written by vla-energy sim-demos, "
                         "or not found from here): pass --tasks, --camera and --image_size as the dataset used them")
    return {"tasks": {t: known.get(t, {}).get("instruction", task_instruction(t)) for t in names},
            "camera": camera or meta["camera"], "image_size": int(image_size or meta["image_size"]),
            "train_seeds": {t: list(known.get(t, {}).get("seeds", [])) for t in names}}


def run_episodes(envs: Sequence[Any], policy: Any, instruction: str, camera: str, seeds: Sequence[int], mode: str,
                 max_steps: int, record: bool = False, candidates: str = "gaussian"
                 ) -> tuple[list[tuple[bool, int]], list[np.ndarray]]:
    """[(success, steps taken)] of one episode per (env, seed), run in lockstep with one batched policy call per
    step, and the frames of the first episode if record. An episode ends at its first success; a finished one is
    no longer stepped (its last observation stays in the batch)."""
    from vla_energy.sim.metaworld_env import observation_dict, render, reset_env

    if len(envs) != len(seeds):
        raise ValueError(f"{len(envs)} environments for {len(seeds)} seeds, expected one each")
    states = [reset_env(env, s) for env, s in zip(envs, seeds)]
    images = [render(env) for env in envs]
    policy.reset()
    frames = [images[0]] if record else []
    steps: list[Optional[int]] = [None] * len(envs)
    for step in range(max_steps):
        observation = observation_dict(np.stack(states), np.stack(images), [instruction] * len(envs), camera)
        # One seed per batch and step keeps the rerank candidates reproducible and the same across modes.
        actions = policy.select_action(observation, mode=mode, seed=seeds[0] + step, candidates=candidates)
        actions = np.clip(np.asarray(actions.detach().cpu() if hasattr(actions, "detach") else actions, np.float32),
                          -1, 1)
        for i, env in enumerate(envs):
            if steps[i] is not None:
                continue
            state, _, _, _, info = env.step(actions[i])
            states[i], images[i] = np.asarray(state, np.float32), render(env)
            if info["success"]:
                steps[i] = step + 1
        if record and (steps[0] is None or steps[0] == step + 1):
            frames.append(images[0])
        if all(s is not None for s in steps):
            break
    return [(s is not None, max_steps if s is None else s) for s in steps], frames


def success_metrics(episodes: Sequence[dict], modes: Sequence[str], tasks: Sequence[str]) -> dict[str, float]:
    """Success rate with its 95% Wilson interval per mode and task and overall (all episodes), the mean episode
    length, and for each mode the paired difference to `policy` over the same episodes (bootstrap interval)."""
    metrics: dict[str, float] = {}
    outcome = {(e["mode"], e["task"], e["seed"]): float(e["success"]) for e in episodes}
    for mode in modes:
        groups = {task: [e for e in episodes if e["mode"] == mode and e["task"] == task] for task in tasks}
        groups["overall"] = [e for task in tasks for e in groups[task]]
        for name, group in groups.items():
            wins = sum(bool(e["success"]) for e in group)
            low, high = wilson_interval(wins, len(group))
            metrics[f"success/{mode}/{name}"] = wins / len(group)
            metrics[f"success/{mode}/{name}/low"], metrics[f"success/{mode}/{name}/high"] = low, high
            metrics[f"steps/{mode}/{name}"] = float(np.mean([e["steps"] for e in group]))
        if mode != "policy" and "policy" in modes:
            keys = [(e["task"], e["seed"]) for e in groups["overall"]]
            mean, low, high = paired_bootstrap_interval([outcome[(mode, *k)] for k in keys],
                                                        [outcome[("policy", *k)] for k in keys])
            metrics[f"delta/{mode}/overall"] = mean
            metrics[f"delta/{mode}/overall/low"], metrics[f"delta/{mode}/overall/high"] = low, high
    return metrics


def _write_gif(path: Path, frames: Sequence[np.ndarray], scale: int = 2, ms_per_frame: int = 80) -> None:
    """An animated GIF (PIL), each frame enlarged `scale` times (nearest) for viewing."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)


def _report(path: Path, run_dir: Path, settings: dict, metrics: dict, modes: Sequence[str], episodes: int,
            seeds: Sequence[int], max_steps: int, n_action_steps: int, gifs: dict) -> None:
    def cell(mode: str, name: str) -> str:
        k = f"success/{mode}/{name}"
        return f"{metrics[k]:.2f} [{metrics[k + '/low']:.2f}, {metrics[k + '/high']:.2f}]"

    lines = [f"# Closed-loop evaluation of `{run_dir}` in Meta-World", "",
             f"{episodes} episodes per task (seeds {seeds[0]}..{seeds[-1]}, the same in every mode), at most "
             f"{max_steps} steps, a new chunk every {n_action_steps} steps; camera `{settings['camera']}` at "
             f"{settings['image_size']} px. Success rate [95% Wilson interval]:", "",
             "| task | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for name in [*settings["tasks"], "overall"]:
        lines.append(f"| {name} | " + " | ".join(cell(m, name) for m in modes) + " |")
    deltas = [m for m in modes if f"delta/{m}/overall" in metrics]
    if deltas:
        lines += ["", "Paired difference to the policy over the same episodes (95% bootstrap interval): " + "; ".join(
            f"{m} {metrics[f'delta/{m}/overall']:+.2f} [{metrics[f'delta/{m}/overall/low']:+.2f}, "
            f"{metrics[f'delta/{m}/overall/high']:+.2f}]" for m in deltas) + "."]
    lines += ["", "## One rollout per task and mode (the first seed)", ""]
    for (task, mode), name in gifs.items():
        lines.append(f"{task}, {mode}: ![{task} {mode}]({name})")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def rollout(run_dir: str | Path, out_dir: Optional[str | Path] = None, tasks: Optional[Sequence[str]] = None,
            episodes: int = 10, modes: Sequence[str] = MODES, seed: int = 1000, max_steps: int = 150,
            n_action_steps: Optional[int] = None, camera: Optional[str] = None, image_size: Optional[int] = None,
            device: str = "cpu", progress: bool = True, batch_size: int = 10,
            candidates: str = "gaussian") -> dict[str, float]:
    """Run `episodes` seeded episodes (seeds seed..seed+episodes-1) of each task in each mode, `batch_size` of them
    in lockstep (one batched policy call); write the report to out_dir (default run_dir/rollout) and return the
    metrics. `candidates`: where rerank / mean take their candidates (gaussian | retrieval)."""
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.sim.metaworld_env import MAX_PATH_LENGTH, make_env, require_metaworld

    require_metaworld()
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"modes {list(modes)}: expected some of {MODES}")
    if episodes < 1 or batch_size < 1 or not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"episodes={episodes}, batch_size={batch_size}, max_steps={max_steps}: expected >= 1, >= 1 "
                         f"and 1..{MAX_PATH_LENGTH}")
    run_dir = Path(run_dir)
    policy = EnergyPolicy.from_pretrained(run_dir, device=device, n_action_steps=n_action_steps)
    settings = sim_settings(policy.loaded.run_config(), tasks, camera, image_size)
    seeds = list(range(seed, seed + episodes))
    for task, train_seeds in settings["train_seeds"].items():
        overlap = sorted(set(seeds) & set(train_seeds))
        if overlap:
            raise ValueError(f"{task}: seeds {overlap[:5]} are demonstration episodes of the training data; pass a "
                             f"--seed past them (the demonstrations use {min(train_seeds)}..{max(train_seeds)})")
    out = Path(out_dir) if out_dir else run_dir / "rollout"
    (out / "gifs").mkdir(parents=True, exist_ok=True)
    records, gifs, seconds = [], {}, {m: 0.0 for m in modes}
    bar = tqdm(total=len(settings["tasks"]) * len(modes) * episodes, desc="rollouts", disable=not progress)
    for task, instruction in settings["tasks"].items():
        envs = [make_env(task, settings["camera"], settings["image_size"]) for _ in range(min(batch_size, episodes))]
        for mode in modes:
            start = time.perf_counter()
            for first in range(0, episodes, len(envs)):
                batch = seeds[first:first + len(envs)]
                results, frames = run_episodes(envs[:len(batch)], policy, instruction, settings["camera"], batch, mode,
                                               max_steps, record=first == 0, candidates=candidates)
                records += [{"task": task, "mode": mode, "seed": s, "success": ok, "steps": n}
                            for s, (ok, n) in zip(batch, results)]
                if frames:
                    name = f"gifs/{task}_{mode}.gif"
                    _write_gif(out / name, frames)
                    gifs[(task, mode)] = name
                bar.update(len(batch))
            seconds[mode] += time.perf_counter() - start
        for env in envs:
            env.close()
    bar.close()
    metrics = success_metrics(records, modes, list(settings["tasks"]))
    metrics.update({f"seconds/{m}": s for m, s in seconds.items()})
    metrics["episodes_per_task"] = float(episodes)
    metrics["retrieval_candidates"] = float(candidates == "retrieval")
    from vla_energy.evaluation.report import write_metrics

    write_metrics(out / "metrics.json", metrics)
    (out / "episodes.json").write_text(json.dumps(records, indent=1))
    _report(out / "report.md", run_dir, settings, metrics, modes, episodes, seeds, max_steps, policy.n_action_steps,
            gifs)
    return metrics


def build_parser(prog: str = "python -m vla_energy.sim.rollout") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Closed-loop success rates of a trained policy in Meta-World "
                                "(needs vla_energy[sim]).")
    p.add_argument("run_dir", help="a run directory (or policy / checkpoint directory)")
    p.add_argument("--out_dir", default=None, help="default: <run_dir>/rollout")
    p.add_argument("--tasks", default=None, help="comma-separated; default: the tasks of the run's dataset")
    p.add_argument("--episodes", type=int, default=10, help="seeded episodes per task and mode")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    p.add_argument("--candidates", default="gaussian", choices=["gaussian", "retrieval"],
                   help="candidates of rerank and mean: the policy's layers + Gaussian perturbations, or the training "
                        "chunks nearest to the policy's (saved with the policy)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first episode (past the demonstrations')")
    p.add_argument("--max_steps", type=int, default=150, help="steps per episode at most")
    p.add_argument("--n_action_steps", type=int, default=None, help="actions run from each chunk (default: horizon)")
    p.add_argument("--camera", default=None, help="default: the dataset's")
    p.add_argument("--image_size", type=int, default=None, help="default: the dataset's")
    p.add_argument("--batch_size", type=int, default=10, help="episodes run in lockstep, one batched policy call")
    p.add_argument("--device", default="cpu")
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    metrics = rollout(args.run_dir, args.out_dir, _names(args.tasks) if args.tasks else None, args.episodes,
                      _names(args.modes), args.seed, args.max_steps, args.n_action_steps, args.camera, args.image_size,
                      args.device, not args.disable_tqdm, args.batch_size, args.candidates)
    for key, value in metrics.items():
        if "/low" not in key and "/high" not in key:
            print(f"{key:48s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
