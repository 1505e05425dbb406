"""Scripted-expert demonstrations of Meta-World tasks, written as a LeRobot v3.0 dataset for `--dataset <dir>`.

Episode k of a task starts from seed `seed + k'` where k' counts every attempt, kept or not: only episodes in which
the expert succeeds are kept, and each ends a few frames after the first success. The environment names, camera,
image size and seeds are recorded in meta/metaworld.json, which `vla-energy rollout` reads.

    python -m vla_energy.sim.demos --tasks reach-wall-v3,plate-slide-v3 --episodes_per_task 40 --out data/mw
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from vla_energy.data.lerobot_writer import LeRobotV3Writer
from vla_energy.sim.metaworld_env import (
    DEFAULT_CAMERA,
    MAX_PATH_LENGTH,
    expert_policy,
    make_env,
    render,
    reset_env,
    task_instruction,
)

__all__ = ["expert_episode", "write_demos", "SIM_META", "main"]

SIM_META = "metaworld.json"  # in meta/: what a rollout needs to rebuild the dataset's observations


def expert_episode(env, policy, seed: int, max_steps: int, steps_after_success: int = 5,
                   camera: str = DEFAULT_CAMERA) -> tuple[dict, bool]:
    """One expert episode from `seed`: ({'images', 'state', 'action'} arrays, success). The action is the one the
    environment executed (the expert's, clipped to [-1, 1])."""
    state = reset_env(env, seed)
    images, states, actions = [], [], []
    success, after = False, 0
    for _ in range(max_steps):
        image = render(env)
        action = np.clip(policy.get_action(state), -1.0, 1.0).astype(np.float32)
        images.append(image)
        states.append(state)
        actions.append(action)
        state, _, _, _, info = env.step(action)
        state = np.asarray(state, np.float32)
        success = success or bool(info["success"])
        after += success
        if after > steps_after_success:
            break
    return {"images": {camera: np.stack(images)}, "state": np.stack(states), "action": np.stack(actions)}, success


def write_demos(out: str | Path, tasks: Sequence[str], episodes_per_task: int, seed: int = 0,
                camera: str = DEFAULT_CAMERA, image_size: int = 64, max_steps: int = 200,
                max_attempts_factor: int = 3, fps: int = 10, progress: bool = True) -> dict:
    """Write `episodes_per_task` successful expert episodes of each task to `out`; returns the metadata (kept and
    attempted episodes and their seeds per task). Raises if a task keeps failing (more than max_attempts_factor x
    the asked episodes)."""
    if not tasks:
        raise ValueError("no tasks given")
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"max_steps={max_steps}, expected 1..{MAX_PATH_LENGTH} (Meta-World's episode limit)")
    meta: dict = {"tasks": {}, "camera": camera, "image_size": image_size, "seed": seed, "max_steps": max_steps,
                  "kept": "only episodes in which the scripted expert succeeded"}
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="expert demos", disable=not progress)
    with LeRobotV3Writer(out, [camera], (image_size, image_size), state_dim=39, action_dim=4, fps=fps,
                         robot_type="sawyer (Meta-World)") as writer:
        for task in tasks:
            env, policy = make_env(task, camera, image_size), expert_policy(task)
            instruction = task_instruction(task)
            kept, attempts = [], 0
            while len(kept) < episodes_per_task:
                if attempts >= max_attempts_factor * episodes_per_task:
                    raise RuntimeError(f"{task}: the expert succeeded in only {len(kept)} of {attempts} episodes "
                                       f"within {max_steps} steps; raise --max_steps")
                episode_seed = seed + attempts
                attempts += 1
                episode, success = expert_episode(env, policy, episode_seed, max_steps, camera=camera)
                if success:
                    writer.add_episode(episode["images"], episode["state"], episode["action"], instruction)
                    kept.append(episode_seed)
                    bar.update(1)
            env.close()
            meta["tasks"][task] = {"instruction": instruction, "seeds": kept, "attempted": attempts}
    bar.close()
    (Path(out) / "meta" / SIM_META).write_text(json.dumps(meta, indent=2))
    return meta


def build_parser(prog: str = "python -m vla_energy.sim.demos") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write Meta-World scripted-expert demonstrations as a "
                                "LeRobot v3.0 dataset (needs vla_energy[sim]).")
    p.add_argument("--tasks", required=True, help="comma-separated Meta-World task names, e.g. reach-wall-v3")
    p.add_argument("--out", required=True, help="a new dataset directory")
    p.add_argument("--episodes_per_task", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode; each attempt takes the next")
    p.add_argument("--camera", default=DEFAULT_CAMERA, help="Meta-World camera (corner, corner2, topview, ...)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--max_steps", type=int, default=200, help="steps per expert episode at most")
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    meta = write_demos(args.out, tasks, args.episodes_per_task, args.seed, args.camera, args.image_size,
                       args.max_steps, progress=not args.disable_tqdm)
    for task, m in meta["tasks"].items():
        print(f"{task}: kept {len(m['seeds'])} of {m['attempted']} expert episodes ({m['instruction']!r})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
