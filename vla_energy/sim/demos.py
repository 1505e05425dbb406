"""Scripted-expert demonstrations of Meta-World tasks, written as a LeRobot v3.0 dataset for `--dataset <dir>`.

Episode k of a task starts from seed `seed + k'` where k' counts every attempt, kept or not: only episodes in which
the expert succeeds are kept, and each ends a few frames after the first success. With `routes` > 1 the expert of
each episode takes a route drawn from its seed (`vla_energy.sim.routes`). The environment names, render convention,
camera, image size, seeds and routes are recorded in meta/metaworld.json, which `vla-energy rollout` reads.
Meta-World and its renderer are checked before anything is written, and the dataset appears under its name only
once it is complete.

    python -m vla_energy.sim.demos --tasks reach-wall-v3,plate-slide-v3 --episodes_per_task 40 --out data/mw
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from vla_energy.data.lerobot_writer import LeRobotV3Writer
from vla_energy.sim.metaworld_env import (
    MAX_PATH_LENGTH,
    RENDER_CONVENTIONS,
    check_renderer,
    default_camera,
    expert_policy,
    make_env,
    render,
    require_metaworld,
    reset_env,
    task_instruction,
    task_names,
)
from vla_energy.sim.routes import RoutedExpert, draw_route, route_sides

__all__ = ["expert_episode", "write_demos", "SIM_META", "main"]

SIM_META = "metaworld.json"  # in meta/: what a rollout needs to rebuild the dataset's observations


def expert_episode(env, policy, seed: int, max_steps: int, steps_after_success: int = 5,
                   camera: Optional[str] = None, convention: str = "vla_energy") -> tuple[dict, bool]:
    """One expert episode from `seed`: ({'images', 'state', 'action'} arrays, success). The action is the one the
    environment executed (the expert's, clipped to [-1, 1]); images as the render convention stores them."""
    state = reset_env(env, seed)
    if hasattr(policy, "reset"):
        policy.reset()
    images, states, actions = [], [], []
    success, after = False, 0
    for _ in range(max_steps):
        image = render(env, convention)
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
    return {"images": {camera or env.camera_name: np.stack(images)}, "state": np.stack(states),
            "action": np.stack(actions)}, success


def check_demo_options(tasks: Sequence[str], episodes_per_task: int, max_steps: int, routes: int,
                       route_offset: float, convention: str) -> None:
    """Raise on options that cannot write a dataset, before anything is written."""
    if not tasks:
        raise ValueError("no tasks given: pass --tasks, e.g. reach-wall-v3,plate-slide-v3")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task={episodes_per_task}, expected at least 1")
    if not 1 <= max_steps <= MAX_PATH_LENGTH:
        raise ValueError(f"max_steps={max_steps}, expected 1..{MAX_PATH_LENGTH} (Meta-World's episode limit)")
    route_sides(routes)
    if routes > 1 and not route_offset > 0:
        raise ValueError(f"route_offset={route_offset} with routes={routes}: expected a distance > 0 (metres)")
    if convention not in RENDER_CONVENTIONS:
        raise ValueError(f"render_convention={convention!r}, expected one of {', '.join(RENDER_CONVENTIONS)}")


def write_demos(out: str | Path, tasks: Sequence[str], episodes_per_task: int, seed: int = 0,
                camera: Optional[str] = None, image_size: int = 64, max_steps: int = 200,
                max_attempts_factor: int = 3, fps: int = 10, progress: bool = True, routes: int = 1,
                route_offset: float = 0.2, render_convention: str = "vla_energy") -> dict:
    """Write `episodes_per_task` successful expert episodes of each task to `out` (expert routes drawn per episode
    when routes > 1); returns the metadata (kept and attempted episodes, their seeds and routes per task). Checks
    the options, Meta-World and its renderer first; raises if a task keeps failing (more than max_attempts_factor x
    the asked episodes), and then no dataset is left under `out`."""
    check_demo_options(tasks, episodes_per_task, max_steps, routes, route_offset, render_convention)
    camera = camera or default_camera(render_convention)
    require_metaworld()
    unknown = [t for t in tasks if t not in task_names()]
    if unknown:
        raise ValueError(f"unknown Meta-World tasks {unknown}; tasks with a scripted expert: {', '.join(task_names())}")
    check_renderer(camera, render_convention)
    sides = route_sides(routes)
    meta: dict = {"tasks": {}, "render_convention": render_convention, "camera": camera, "image_size": image_size,
                  "seed": seed, "max_steps": max_steps, "kept": "only episodes in which the scripted expert succeeded",
                  "routes": {"count": routes, "offset": route_offset, "sides": sides.tolist()}, "episodes": []}
    bar = tqdm(total=len(tasks) * episodes_per_task, desc="expert demos", disable=not progress)
    with LeRobotV3Writer(out, [camera], (image_size, image_size), state_dim=39, action_dim=4, fps=fps,
                         robot_type="sawyer (Meta-World)") as writer:
        for task in tasks:
            env, expert = make_env(task, camera, image_size, render_convention), expert_policy(task)
            instruction = task_instruction(task)
            kept, kept_routes, attempts = [], [], 0
            while len(kept) < episodes_per_task:
                if attempts >= max_attempts_factor * episodes_per_task:
                    raise RuntimeError(f"{task}: the expert succeeded in only {len(kept)} of {attempts} episodes "
                                       f"within {max_steps} steps; raise --max_steps"
                                       + (" or lower --route_offset" if routes > 1 else ""))
                episode_seed = seed + attempts
                attempts += 1
                route = draw_route(episode_seed, routes, task)
                policy = RoutedExpert(expert, sides[route], route_offset)
                episode, success = expert_episode(env, policy, episode_seed, max_steps, camera=camera,
                                                  convention=render_convention)
                if success:
                    index = writer.add_episode(episode["images"], episode["state"], episode["action"], instruction)
                    kept.append(episode_seed)
                    kept_routes.append(route)
                    meta["episodes"].append({"episode_index": index, "task": task, "seed": episode_seed,
                                             "route": route})
                    bar.update(1)
            env.close()
            meta["tasks"][task] = {"instruction": instruction, "seeds": kept, "routes": kept_routes,
                                   "attempted": attempts}
        writer.add_meta_file(SIM_META, meta)
    bar.close()
    return meta


def build_parser(prog: str = "python -m vla_energy.sim.demos") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Write Meta-World scripted-expert demonstrations as a "
                                "LeRobot v3.0 dataset (needs vla_energy[sim]).")
    p.add_argument("--tasks", required=True, help="comma-separated Meta-World task names, e.g. reach-wall-v3")
    p.add_argument("--out", required=True, help="a new dataset directory")
    p.add_argument("--episodes_per_task", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="seed of the first episode; each attempt takes the next")
    p.add_argument("--render_convention", default="vla_energy", choices=RENDER_CONVENTIONS,
                   help="how images are rendered: vla_energy (camera as Meta-World places it, flipped vertically) or "
                        "lerobot (as LeRobot's MetaworldEnv: corner2 at LeRobot's placement, turned by 180 degrees)")
    p.add_argument("--camera", default=None, help="Meta-World camera (corner, corner2, topview, ...); default: "
                   "corner (vla_energy) or corner2 (lerobot)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--max_steps", type=int, default=200, help="steps per expert episode at most")
    p.add_argument("--routes", type=int, default=1, help="expert routes drawn per episode: 1 = Meta-World's own; "
                   "2 = a via-point on either side of the straight path; 3 = left, straight, right")
    p.add_argument("--route_offset", type=float, default=0.2,
                   help="distance (m) of the outermost via-points from the straight path")
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    meta = write_demos(args.out, tasks, args.episodes_per_task, args.seed, args.camera, args.image_size,
                       args.max_steps, progress=not args.disable_tqdm, routes=args.routes,
                       route_offset=args.route_offset, render_convention=args.render_convention)
    for task, m in meta["tasks"].items():
        routes = m.get("routes") or []
        per_route = (", routes " + " / ".join(str(routes.count(r)) for r in range(args.routes))
                     if args.routes > 1 else "")
        print(f"{task}: kept {len(m['seeds'])} of {m['attempted']} expert episodes ({m['instruction']!r}{per_route})")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
