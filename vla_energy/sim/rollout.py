"""Closed-loop evaluation of a trained policy: success rate per task and overall for each mode, in Meta-World or
(for a run trained on the built-in synthetic dataset) in the synthetic task.

Each task runs the same seeded episodes in every mode (`policy`, `rerank`, `mean`, `refine` of `EnergyPolicy`), so
modes are compared on identical initial states; episodes that trained the policy are refused (Meta-World: the seeds
of the dataset's meta/metaworld.json or its demonstrations' initial states, else only with --allow_unchecked_seeds;
synthetic: scenes equal to a dataset episode's). In Meta-World the policy sees the simulator as its dataset recorded
it: the render convention (camera, placement, image orientation), image key and size, state layout, and the
dataset's own task strings as instructions (`vla_energy.sim.dataset_tasks`). An episode ends at its first success. Writes metrics.json, episodes.json (every episode), report.md and one GIF per task and mode (the first
episode), and appends the table to the run's report.md when there is one. Both environments are driven through one
loop (`run_batch`) over the `BatchedEnv` interface (vla_energy.sim.envs).

    vla-energy rollout runs/mw --episodes 10 --out_dir runs/mw/rollout
    vla-energy rollout runs/demo --episodes 50
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from tqdm.auto import tqdm

from vla_energy.evaluation.auroc import auroc_interval
from vla_energy.evaluation.intervals import paired_bootstrap_interval, wilson_interval
from vla_energy.sim.envs import BatchedEnv, Suite
from vla_energy.sim.metaworld_env import MAX_PATH_LENGTH

__all__ = ["MODES", "SHIFTS", "SCORES", "shift_observation", "BatchResult", "failure_metrics", "shift_metrics", "sim_settings", "seed_check_plan", "check_seeds", "MetaWorldEnvs", "metaworld_suite", "suite_for",
           "run_batch", "run_episodes", "success_metrics", "rollout", "build_parser", "main"]

MODES = ("policy", "rerank", "mean", "refine")
# Observations the policy never saw, on which rollout scores the policy's chunks (shift_observation).
SHIFTS = ("noisy_images", "other_instruction")
UNRELATED_INSTRUCTION = "water the plants on the windowsill"


def _image_size(feature: dict, key: str) -> int:
    """The side of a square image feature of meta/info.json (shape HWC or CHW, as its names say)."""
    shape, names = list(feature.get("shape") or []), list(feature.get("names") or [])
    if "height" in names and "width" in names:
        h, w = shape[names.index("height")], shape[names.index("width")]
    elif len(shape) == 3:
        h, w = shape[1:] if shape[0] in (1, 3) and shape[-1] not in (1, 3) else shape[:2]
    else:
        raise ValueError(f"image feature {key!r} has shape {shape}: pass --image_size")
    if h != w:
        raise ValueError(f"image feature {key!r} is {h} x {w}; Meta-World rollouts render square images")
    return int(h)


def _camera_named_by(image_key: Optional[str]) -> Optional[str]:
    from vla_energy.sim.metaworld_env import CAMERAS

    name = (image_key or "").rsplit(".", 1)[-1]
    return name if name in CAMERAS else None


def sim_settings(run_config: Optional[dict], tasks: Optional[Sequence[str]] = None, camera: Optional[str] = None,
                 image_size: Optional[int] = None, render_convention: Optional[str] = None,
                 task_map: Optional[dict[str, str]] = None, env_names: Optional[Sequence[str]] = None) -> dict:
    """How the run's dataset saw Meta-World, each part overridable: tasks (environment -> instruction, the dataset's
    task strings), render convention, camera, image size, image key, state size, and what the demonstrations' seeds
    can be checked against (their seeds, or their first 39-d states). `env_names`: the known environments
    (default: Meta-World's)."""
    from vla_energy.data.lerobot import is_lerobot_dataset, lerobot_image_features, read_lerobot_info
    from vla_energy.sim.dataset_tasks import (
        DatasetEpisodes,
        lerobot_metaworld_table,
        match_tasks,
        read_episodes,
    )
    from vla_energy.sim.demos import SIM_META
    from vla_energy.sim.metaworld_env import STATE_DIMS, check_convention, default_camera, task_names

    data = (run_config or {}).get("DataConfig") or {}
    dataset = data.get("dataset")
    root = Path(str(dataset)) if dataset else None
    meta_path = root / "meta" / SIM_META if root is not None else None
    meta = json.loads(meta_path.read_text()) if meta_path is not None and meta_path.is_file() else None
    info = read_lerobot_info(root) if root is not None and is_lerobot_dataset(root) else None
    if info is None and meta is None and not (render_convention and task_map and image_size):
        raise ValueError(f"the run's dataset {dataset!r} is not a LeRobot dataset found from here: pass "
                         "--render_convention, --task_map and --image_size as the dataset used them")

    if render_convention:
        convention, convention_from = check_convention(render_convention), "--render_convention"
    elif meta is not None:
        convention = check_convention(meta.get("render_convention", "vla_energy"))
        convention_from = f"meta/{SIM_META} (written by vla-energy sim-demos)"
    else:
        convention, convention_from = "lerobot", (f"default for a dataset without meta/{SIM_META} (not written by "
                                                  "vla-energy sim-demos); --render_convention vla_energy changes it")

    keys = [k.strip() for k in (data.get("image_key") or "").split(",") if k.strip()]
    keys = keys or (list(lerobot_image_features(info)) if info is not None else [])
    if len(keys) > 1:
        raise ValueError(f"the policy takes cameras {keys}; a Meta-World rollout renders one camera")
    image_key = keys[0] if keys else None
    camera = camera or (meta or {}).get("camera") or _camera_named_by(image_key) or default_camera(convention)
    if not image_size:
        image_size = (meta or {}).get("image_size") or (
            _image_size(info["features"][image_key], image_key) if info is not None and image_key else None)
    if not image_size:
        raise ValueError(f"the image size of the run's dataset {dataset!r} is unknown: pass --image_size")

    state_dim = 39
    if data.get("use_state") and info is not None:
        state_key = data.get("state_key") or "observation.state"
        state_dim = int((list(info["features"].get(state_key, {}).get("shape") or [0]) or [0])[0])
        if state_dim not in STATE_DIMS:
            raise ValueError(f"the policy's state {state_key!r} has {state_dim} dims; a Meta-World rollout gives "
                             f"Meta-World's observation ({' or '.join(map(str, STATE_DIMS))} dims)")
    instruction_key = data.get("instruction_key")
    if instruction_key not in (None, "task") and not task_map:
        raise ValueError(f"the policy's instructions come from the column {instruction_key!r}: pass --task_map "
                         "with each environment's instruction")

    train_seeds: Optional[dict[str, list[int]]] = None
    first_states: Optional[dict[str, np.ndarray]] = None
    if meta is not None and not task_map:
        known = meta.get("tasks", {})
        names = list(tasks) if tasks else list(known)
        missing = [t for t in names if t not in known]
        if missing:
            raise ValueError(f"{missing} are not tasks of the run's dataset {dataset!r} (it has {sorted(known)}): "
                             "pass --task_map env=instruction to run them with an instruction of your choice")
        instructions = {t: known[t]["instruction"] for t in names}
        instructions_from = f"dataset task strings (meta/{SIM_META})"
        train_seeds = {t: list(known[t].get("seeds", [])) for t in names}
    else:
        episodes = read_episodes(root) if info is not None else DatasetEpisodes([])
        names_known = env_names if env_names is not None or task_map else task_names()
        match = match_tasks(episodes, names_known or [], task_map, None if task_map else lerobot_metaworld_table(),
                            list(tasks) if tasks else None)
        instructions, instructions_from = match.instructions, match.source
        if meta is not None:  # --task_map on a sim-demos dataset: its seeds still say which episodes were shown
            known = meta.get("tasks", {})
            train_seeds = {t: list(known.get(t, {}).get("seeds", [])) for t in instructions}
        elif episodes.first_states is not None:
            first_states = {t: episodes.first_states[match.episodes[t]] for t in instructions}
    return {"tasks": instructions, "render_convention": convention, "render_convention_from": convention_from,
            "camera": camera, "image_size": int(image_size), "image_key": image_key or f"observation.images.{camera}",
            "state_dim": state_dim, "instructions_from": instructions_from, "train_seeds": train_seeds,
            "first_states": first_states, "dataset": dataset}


def seed_check_plan(settings: dict, allow_unchecked: bool = False) -> str:
    """How the rollout seeds are checked against the demonstrations: 'seeds' (meta/metaworld.json), 'initial_states'
    (the dataset's first 39-d states) or, only when allowed, 'unchecked'; raises when no check is possible."""
    if settings["train_seeds"] is not None:
        return "seeds"
    if settings["first_states"] is not None:
        return "initial_states"
    if allow_unchecked:
        return "unchecked"
    raise ValueError(f"cannot check that the rollout episodes are not demonstrations: the run's dataset "
                     f"{settings['dataset']!r} records neither its episodes' seeds (meta/metaworld.json, written by "
                     "vla-energy sim-demos) nor their 39-d initial states. Pass --allow_unchecked_seeds to run anyway "
                     "(the report will say the seeds were not checked)")


# Meta-World's 39-d observation: hand 0:3, gripper 3, objects 4:18, the previous frame's 18:36, goal 36:39. The objects
# and the goal are what a seed draws.
_DRAWN = np.r_[4:18, 36:39]


def check_seeds(settings: dict, seeds: Sequence[int], plan: str,
                initial_states: Optional[Callable[[str, Sequence[int]], np.ndarray]] = None,
                allow_unchecked: bool = False) -> str:
    """Refuse rollout seeds that are demonstrations of the dataset (ValueError naming them); returns what was checked.
    `initial_states(task, seeds)` [len(seeds), 39]: the rollout's first states (plan 'initial_states')."""
    if plan == "seeds":
        for task, train_seeds in settings["train_seeds"].items():
            overlap = sorted(set(seeds) & set(train_seeds))
            if overlap:
                raise ValueError(f"{task}: seeds {overlap[:5]} are demonstration episodes of the training data; pass "
                                 f"a --seed past them (the demonstrations use {min(train_seeds)}..{max(train_seeds)})")
        return "checked against the demonstrations' seeds (meta/metaworld.json): none is a rollout seed"
    if plan == "initial_states":
        unchecked = []
        for task, demos in settings["first_states"].items():
            if len(demos) == 0:
                continue
            ours = np.asarray(initial_states(task, seeds), np.float32)
            # Coordinates the dataset recorded (a hidden goal is stored as zeros) and that a seed changes.
            cols = [c for c in _DRAWN if np.abs(demos[:, c]).max() > 1e-6]
            if not cols or np.ptp(np.concatenate([demos[:, cols], ours[:, cols]]), axis=0).max() <= 1e-6:
                unchecked.append(task)
                continue
            gaps = np.abs(ours[:, None, cols] - demos[None, :, cols]).max(axis=-1)  # [seeds, demos]
            hits = np.argwhere(gaps < 1e-4)
            if len(hits):
                raise ValueError(f"{task}: rollout seeds {sorted({seeds[i] for i, _ in hits})[:5]} start where "
                                 f"demonstrations of the dataset start (same object and goal positions): pass "
                                 "another --seed")
        if unchecked and not allow_unchecked:
            raise ValueError(f"{unchecked}: the initial states of the dataset's demonstrations do not vary where a "
                             "seed does, so the rollout seeds cannot be checked against them; pass "
                             "--allow_unchecked_seeds to run anyway")
        return ("checked against the demonstrations' initial states (the dataset's first 39-d states): no rollout "
                "episode starts where one does" + (f"; NOT checked for {unchecked} (--allow_unchecked_seeds: their "
                                                   "initial states do not vary where a seed does)" if unchecked else ""))
    if plan == "unchecked":
        return ("NOT checked (--allow_unchecked_seeds): the dataset records neither its episodes' seeds nor their "
                "initial states, so rollout episodes may repeat demonstrations")
    raise ValueError(f"seed check plan {plan!r}, expected seeds, initial_states or unchecked")


class MetaWorldEnvs:
    """Meta-World environments of one task as a `BatchedEnv`: one environment per episode of the batch, actions
    clipped to Meta-World's [-1, 1]."""

    def __init__(self, envs: Sequence[Any], instruction: str, camera: str, convention: str = "vla_energy",
                 image_key: Optional[str] = None, state_dim: int = 39) -> None:
        self.envs, self.instruction, self.camera = list(envs), instruction, camera
        self.convention, self.image_key, self.state_dim = convention, image_key, state_dim
        self.states: list[np.ndarray] = []
        self.images: list[np.ndarray] = []

    def reset(self, seeds: Sequence[int]) -> dict[str, Any]:
        """Reset the first len(seeds) environments to the initial states of `seeds`."""
        from vla_energy.sim.metaworld_env import render, reset_env

        if not 1 <= len(seeds) <= len(self.envs):
            raise ValueError(f"{len(seeds)} seeds for {len(self.envs)} environments, expected 1..{len(self.envs)}")
        self.states = [reset_env(env, s) for env, s in zip(self.envs, seeds)]
        self.images = [render(env, self.convention) for env in self.envs[:len(seeds)]]
        return self.observation()

    def observation(self) -> dict[str, Any]:
        """The batched observation, keyed and laid out as in the dataset (image key, state size)."""
        from vla_energy.sim.metaworld_env import observation_dict, observation_state

        return observation_dict(observation_state(np.stack(self.states), self.state_dim), np.stack(self.images),
                                [self.instruction] * len(self.states), self.camera, self.image_key)

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Step the active environments; success where Meta-World reports it."""
        from vla_energy.sim.metaworld_env import render

        actions = np.clip(np.asarray(actions, np.float32), -1, 1)
        success = np.zeros(len(self.states), bool)
        for i in np.flatnonzero(active):
            state, _, _, _, info = self.envs[i].step(actions[i])
            self.states[i], self.images[i] = np.asarray(state, np.float32), render(self.envs[i], self.convention)
            success[i] = bool(info["success"])
        return self.observation(), success

    def frame(self, index: int) -> np.ndarray:
        """The camera image of episode `index`."""
        return self.images[index]

    def episode_info(self, index: int) -> dict[str, Any]:
        """Nothing beyond success and steps."""
        return {}

    def close(self) -> None:
        """Close every environment."""
        for env in self.envs:
            env.close()


_RENDERING = {"vla_energy": "cameras where Meta-World places them, images flipped vertically",
              "lerobot": "as LeRobot's MetaworldEnv: corner2 at LeRobot's placement and turned by 180 degrees, other "
                         "cameras as rendered"}


def metaworld_suite(run_config: Optional[dict], tasks: Optional[Sequence[str]] = None, camera: Optional[str] = None,
                    image_size: Optional[int] = None, render_convention: Optional[str] = None,
                    task_map: Optional[dict[str, str]] = None, allow_unchecked_seeds: bool = False) -> Suite:
    """The Meta-World tasks of a run as its dataset recorded them (`sim_settings`), their environments and the check
    of the rollout seeds against the demonstrations (`seed_check_plan`, refused before anything runs)."""
    from vla_energy.sim.metaworld_env import make_env, require_metaworld, reset_env

    settings = sim_settings(run_config, tasks, camera, image_size, render_convention, task_map)
    plan = seed_check_plan(settings, allow_unchecked_seeds)
    require_metaworld()

    def env_of(task: str) -> Any:
        return make_env(task, settings["camera"], settings["image_size"], settings["render_convention"])

    def initial_states(task: str, task_seeds: Sequence[int]) -> np.ndarray:
        env = env_of(task)
        states = np.stack([reset_env(env, s) for s in task_seeds])
        env.close()
        return states

    def make(task: str, n: int) -> MetaWorldEnvs:
        return MetaWorldEnvs([env_of(task) for _ in range(n)], settings["tasks"][task], settings["camera"],
                             settings["render_convention"], settings["image_key"], settings["state_dim"])

    convention = settings["render_convention"]
    details = [f"- Rendering: `{convention}` convention ({_RENDERING[convention]}); camera `{settings['camera']}` at "
               f"{settings['image_size']} px as `{settings['image_key']}`; from {settings['render_convention_from']}.",
               f"- State: {settings['state_dim']}-d observation.state.",
               f"- Instructions: {settings['instructions_from']}: "
               + "; ".join(f"{t} -> {i!r}" for t, i in settings["tasks"].items()) + "."]
    return Suite(title="Meta-World", tasks=list(settings["tasks"]), make=make,
                 settings=f"camera `{settings['camera']}` at {settings['image_size']} px",
                 success="An episode succeeds when Meta-World reports success at any step.", default_max_steps=150,
                 max_steps_limit=MAX_PATH_LENGTH,
                 check_seeds=lambda seeds: check_seeds(settings, seeds, plan, initial_states, allow_unchecked_seeds),
                 details=details,
                 metrics={"convention/render": convention, "convention/camera": settings["camera"],
                          "convention/render_from": settings["render_convention_from"],
                          "convention/instructions": settings["instructions_from"]},
                 settings_json={k: v for k, v in settings.items() if k != "first_states"})


def suite_for(run_config: Optional[dict], tasks: Optional[Sequence[str]] = None, camera: Optional[str] = None,
              image_size: Optional[int] = None, render_convention: Optional[str] = None,
              task_map: Optional[dict[str, str]] = None, allow_unchecked_seeds: bool = False) -> Suite:
    """The synthetic task for a run trained on the synthetic dataset, else Meta-World."""
    if ((run_config or {}).get("DataConfig") or {}).get("dataset") == "synthetic":
        given = [name for name, value in (("--tasks", tasks), ("--camera", camera), ("--image_size", image_size),
                                          ("--render_convention", render_convention), ("--task_map", task_map))
                 if value]
        if given:
            raise ValueError(f"{', '.join(given)}: the run was trained on the synthetic dataset, whose task, camera "
                             "and image size come from the run's DataConfig; leave these options out")
        from vla_energy.sim.synthetic_env import synthetic_suite

        return synthetic_suite(run_config)
    return metaworld_suite(run_config, tasks, camera, image_size, render_convention, task_map, allow_unchecked_seeds)


def shift_observation(observation: dict[str, Any], shift: str, seed: int) -> dict[str, Any]:
    """The observation as the policy never saw it in training (SHIFTS): noisy_images adds Gaussian pixel noise
    (std 64 of 255, seeded); other_instruction gives each episode another episode's instruction (rolled by one in
    the batch), or an unrelated one when the batch shares its instruction."""
    if shift == "noisy_images":
        rng = np.random.default_rng(seed)
        return {k: (np.clip(np.asarray(v, np.float32) + rng.normal(0.0, 64.0, np.shape(v)), 0, 255).astype(np.uint8)
                    if k.startswith("observation.image") else v) for k, v in observation.items()}
    if shift == "other_instruction":
        tasks = list(observation["task"])
        other = tasks[1:] + tasks[:1] if len(set(tasks)) > 1 else [UNRELATED_INSTRUCTION] * len(tasks)
        return {**observation, "task": other}
    raise ValueError(f"shift={shift!r}, expected one of {SHIFTS}")


@dataclass
class BatchResult:
    """One batch of lockstep episodes: (success, steps) per episode, the first episode's frames, the energy of each
    chunk an episode executed (and its relative energy, when asked), and per shift the energies of the policy's
    chunks on shifted observations (paired with `reference`, the policy's chunks' energies on the same, unshifted
    observations; the `*_relative` lists hold the relative energies of the same chunks)."""

    results: list[tuple[bool, int]]
    frames: list[np.ndarray]
    energies: list[list[float]]
    shifted: dict[str, list[float]] = field(default_factory=dict)
    reference: list[float] = field(default_factory=list)
    relative: list[list[float]] = field(default_factory=list)
    shifted_relative: dict[str, list[float]] = field(default_factory=dict)
    reference_relative: list[float] = field(default_factory=list)


def _floats(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, np.float64)


def _scored(policy: Any, observation: dict[str, Any], relative: bool, **kwargs: Any
            ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(chunks, energies, relative energies or None) of one batched predict_action_chunk call."""
    out = policy.predict_action_chunk(observation, return_energy=True, **({"relative_energy": True} if relative
                                                                          else {}), **kwargs)
    chunk = np.asarray(out[0].detach().cpu() if hasattr(out[0], "detach") else out[0], np.float32)
    return chunk, _floats(out[1]), _floats(out[2]) if relative else None


def run_batch(env: BatchedEnv, policy: Any, seeds: Sequence[int], mode: str, max_steps: int, record: bool = False,
              candidates: str = "gaussian", shifts: Sequence[str] = (), relative: bool = False) -> BatchResult:
    """One episode per seed, run in lockstep with one batched `predict_action_chunk` call per chunk (its first
    `policy.n_action_steps` actions executed), the frames of the first episode if record, and the energy of every
    executed chunk (relative: also its relative energy). `shifts` (SHIFTS): also score the policy's own chunk on
    shifted observations at each chunk. An episode ends at its first success; a finished one is no longer stepped
    (its last observation stays in the batch)."""
    observation = env.reset(seeds)
    policy.reset()
    frames = [env.frame(0)] if record else []
    steps: list[Optional[int]] = [None] * len(seeds)
    out = BatchResult([], frames, [[] for _ in seeds], {s: [] for s in shifts},
                      relative=[[] for _ in seeds] if relative else [],
                      shifted_relative={s: [] for s in shifts} if relative else {})
    queue: list[np.ndarray] = []
    for step in range(max_steps):
        active = np.flatnonzero([s is None for s in steps])
        if not queue:
            # One seed per batch and chunk keeps the rerank candidates reproducible and the same across modes.
            chunk, energy, rel = _scored(policy, observation, relative, mode=mode, seed=seeds[0] + step,
                                         candidates=candidates)
            queue = list(chunk[:, : policy.n_action_steps].transpose(1, 0, 2))
            for i in active:
                out.energies[i].append(float(energy[i]))
                if relative:
                    out.relative[i].append(float(rel[i]))
            for shift in shifts:
                _, shifted, shifted_rel = _scored(policy, shift_observation(observation, shift, seeds[0] + step),
                                                  relative, mode="policy", seed=seeds[0] + step)
                out.shifted[shift] += [float(shifted[i]) for i in active]
                if relative:
                    out.shifted_relative[shift] += [float(shifted_rel[i]) for i in active]
            if shifts:
                out.reference += [float(energy[i]) for i in active]
                if relative:
                    out.reference_relative += [float(rel[i]) for i in active]
        observation, success = env.step(queue.pop(0), np.array([s is None for s in steps]))
        for i in np.flatnonzero(success):
            steps[i] = step + 1 if steps[i] is None else steps[i]
        if record and (steps[0] is None or steps[0] == step + 1):
            frames.append(env.frame(0))
        if all(s is not None for s in steps):
            break
    out.results = [(s is not None, max_steps if s is None else s) for s in steps]
    return out


def run_episodes(envs: Sequence[Any], policy: Any, instruction: str, camera: str, seeds: Sequence[int], mode: str,
                 max_steps: int, record: bool = False, candidates: str = "gaussian", convention: str = "vla_energy",
                 image_key: Optional[str] = None, state_dim: int = 39
                 ) -> tuple[list[tuple[bool, int]], list[np.ndarray]]:
    """`run_batch` on Meta-World environments, one per seed, observations as the dataset recorded them."""
    if len(envs) != len(seeds):
        raise ValueError(f"{len(envs)} environments for {len(seeds)} seeds, expected one each")
    out = run_batch(MetaWorldEnvs(envs, instruction, camera, convention, image_key, state_dim), policy, seeds, mode,
                    max_steps, record, candidates)
    return out.results, out.frames


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


# The episode scores of the failure signal: (episode record key, metric prefix).
SCORES = (("energy", ""), ("relative_energy", "relative_"))


def failure_metrics(episodes: Sequence[dict], modes: Sequence[str]) -> dict[str, float]:
    """Per mode, how well an episode's mean chunk energy (and mean relative energy, where recorded) predicts its
    failure: the AUROC (failures scoring higher) with its bootstrap interval, when the mode has both successes and
    failures, and the mean of each group (relative_* keys for the relative energy)."""
    metrics: dict[str, float] = {}
    for key, prefix in SCORES:
        for mode in modes:
            group = [e for e in episodes if e["mode"] == mode and key in e]
            failed = [e[key] for e in group if not e["success"]]
            succeeded = [e[key] for e in group if e["success"]]
            for name, values in (("failure", failed), ("success", succeeded)):
                if values:
                    metrics[f"{prefix}energy/{mode}/{name}"] = float(np.mean(values))
            if failed and succeeded:
                value, low, high = auroc_interval(failed, succeeded)
                name = f"{prefix}failure_auroc/{mode}"
                metrics[name], metrics[f"{name}/low"], metrics[f"{name}/high"] = value, low, high
    return metrics


def shift_metrics(reference: Sequence[float], shifted: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    """For each shift, the policy's mean chunk energy on shifted observations against the same observations
    unshifted, and the AUROC of telling them apart by energy (shifted scoring higher) with its interval; keys
    start with `prefix` (relative_ for relative energies)."""
    metrics: dict[str, float] = {}
    if reference:
        metrics[f"{prefix}shift_energy/none"] = float(np.mean(reference))
    for shift, values in shifted.items():
        if not values:
            continue
        value, low, high = auroc_interval(values, reference)
        metrics[f"{prefix}shift_energy/{shift}"] = float(np.mean(values))
        name = f"{prefix}shift_auroc/{shift}"
        metrics[name], metrics[f"{name}/low"], metrics[f"{name}/high"] = value, low, high
    return metrics


def _energy_lines(metrics: dict, modes: Sequence[str], shifts: Sequence[str]) -> list[str]:
    """The failure-signal and shifted-observation tables (markdown lines)."""
    def value(key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "-"

    def interval(key: str) -> str:
        return f"{metrics[key]:.2f} [{metrics[key + '/low']:.2f}, {metrics[key + '/high']:.2f}]" if key in metrics \
            else "- (no failures or no successes)"

    relative = any(k.startswith("relative_energy/") for k in metrics)
    lines = ["Failure signal: an episode's mean energy of its executed chunks (higher = predicted failure)"
             + (", and its mean relative energy (the energy minus its soft minimum over the policy's reference "
                "training chunks in the same context)" if relative else "") + ":", "",
             "| mode | AUROC [95% bootstrap] | mean energy, failures | mean energy, successes |"
             + (" AUROC, relative energy |" if relative else ""), "|---|---|---|---|" + ("---|" if relative else "")]
    lines += [f"| {m} | {interval(f'failure_auroc/{m}')} | {value(f'energy/{m}/failure')} | "
              f"{value(f'energy/{m}/success')} |" + (f" {interval(f'relative_failure_auroc/{m}')} |" if relative
                                                      else "") for m in modes]
    if shifts and "shift_energy/none" in metrics:
        lines += ["", "The policy's chunk energies on observations it never saw, against the same observations "
                  f"unshifted (mean {metrics['shift_energy/none']:.3f}):", "",
                  "| shift | mean energy | AUROC shifted vs unshifted [95% bootstrap] |"
                  + (" AUROC, relative energy |" if relative else ""), "|---|---|---|" + ("---|" if relative else "")]
        lines += [f"| {s} | {value(f'shift_energy/{s}')} | {interval(f'shift_auroc/{s}')} |"
                  + (f" {interval(f'relative_shift_auroc/{s}')} |" if relative else "") for s in shifts]
    return lines


def _write_gif(path: Path, frames: Sequence[np.ndarray], scale: int = 2, ms_per_frame: int = 80) -> None:
    """An animated GIF (PIL), each frame enlarged `scale` times (nearest) for viewing."""
    from PIL import Image

    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)


def _table(metrics: dict, modes: Sequence[str], tasks: Sequence[str]) -> list[str]:
    """The success table (markdown lines) with the paired differences to the policy."""
    def cell(mode: str, name: str) -> str:
        k = f"success/{mode}/{name}"
        return f"{metrics[k]:.2f} [{metrics[k + '/low']:.2f}, {metrics[k + '/high']:.2f}]"

    lines = ["| task | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for name in [*tasks, "overall"]:
        lines.append(f"| {name} | " + " | ".join(cell(m, name) for m in modes) + " |")
    deltas = [m for m in modes if f"delta/{m}/overall" in metrics]
    if deltas:
        lines += ["", "Paired difference to the policy over the same episodes (95% bootstrap interval): " + "; ".join(
            f"{m} {metrics[f'delta/{m}/overall']:+.2f} [{metrics[f'delta/{m}/overall/low']:+.2f}, "
            f"{metrics[f'delta/{m}/overall/high']:+.2f}]" for m in deltas) + "."]
    return lines


def _report(path: Path, run_dir: Path, suite: Suite, metrics: dict, modes: Sequence[str], episodes: int,
            seeds: Sequence[int], max_steps: int, n_action_steps: int, gifs: dict,
            shifts: Sequence[str] = ()) -> list[str]:
    """Write report.md; returns its summary (the settings sentence and the table)."""
    summary = [f"{episodes} episodes per task (seeds {seeds[0]}..{seeds[-1]}, the same in every mode), at most "
               f"{max_steps} steps, a new chunk every {n_action_steps} steps; {suite.settings}. {suite.success}", "",
               *suite.details, f"- Seeds: {metrics['seed_check']}.", "",
               "Success rate [95% Wilson interval]:", "", *_table(metrics, modes, suite.tasks)]
    lines = [f"# Closed-loop evaluation of `{run_dir}` in {suite.title}", "", *summary, "",
             "## Energies as a failure signal", "", *_energy_lines(metrics, modes, shifts), "",
             "## One rollout per task and mode (the first seed)", ""]
    for (task, mode), name in gifs.items():
        lines.append(f"{task}, {mode}: ![{task} {mode}]({name})")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return summary


def _append_to_run_report(run_dir: Path, out: Path, title: str, summary: list[str]) -> Optional[Path]:
    """Put the rollout's table into the run's report.md (replacing an earlier one from the same out dir); returns
    the report, or None when the run has none (a policy or checkpoint directory)."""
    report = run_dir / "report.md"
    if not report.is_file():
        return None
    link = Path(os.path.relpath(out / "report.md", run_dir)).as_posix()
    begin, end = f"<!-- rollout {link} -->", f"<!-- end rollout {link} -->"
    section = "\n".join([begin, f"## Closed loop in {title}", "", *summary, "",
                         f"Details and GIFs: [{link}]({link}).", end])
    text = re.sub(re.escape(begin) + ".*?" + re.escape(end), "", report.read_text(), flags=re.S).rstrip("\n")
    report.write_text(text + "\n\n" + section + "\n")
    return report


def rollout(run_dir: str | Path, out_dir: Optional[str | Path] = None, tasks: Optional[Sequence[str]] = None,
            episodes: int = 10, modes: Sequence[str] = MODES, seed: int = 1000, max_steps: Optional[int] = None,
            n_action_steps: Optional[int] = None, camera: Optional[str] = None, image_size: Optional[int] = None,
            device: str = "cpu", progress: bool = True, batch_size: int = 10, candidates: str = "gaussian",
            render_convention: Optional[str] = None, task_map: Optional[dict[str, str]] = None,
            allow_unchecked_seeds: bool = False, shifts: Sequence[str] = SHIFTS) -> dict[str, Any]:
    """Run `episodes` seeded episodes (seeds seed..seed+episodes-1) of each task in each mode, `batch_size` of them
    in lockstep (one batched policy call); write the report to out_dir (default run_dir/rollout) and return the
    metrics. The environment is the synthetic task when the run's dataset is "synthetic", else Meta-World;
    max_steps defaults to the environment's (150 in Meta-World, 60 in the synthetic task). `candidates`: where
    rerank / mean take their candidates (gaussian | layers | retrieval | neighbors | samples). Seeds that are
    demonstrations are refused before the policy loads; Meta-World runs without that check only with
    allow_unchecked_seeds. Every executed chunk's energy is kept: the report gives how well an episode's mean energy
    predicts its failure (AUROC per mode) and, for each of `shifts` (SHIFTS), how the policy's energies move on
    shifted observations; the same for the relative energy when the policy saved training chunks."""
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.modeling.serialization import resolve_policy_dir

    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise ValueError(f"modes {list(modes)}: expected some of {MODES}")
    if set(shifts) - set(SHIFTS):
        raise ValueError(f"shifts {list(shifts)}: expected some of {SHIFTS} (or none)")
    if episodes < 1 or batch_size < 1:
        raise ValueError(f"episodes={episodes}, batch_size={batch_size}: expected >= 1 and >= 1")
    run_dir = Path(run_dir)
    config_path = resolve_policy_dir(run_dir) / "run_config.json"
    run_config = json.loads(config_path.read_text()) if config_path.is_file() else None
    suite = suite_for(run_config, tasks, camera, image_size, render_convention, task_map, allow_unchecked_seeds)
    max_steps = suite.default_max_steps if max_steps is None else max_steps
    if not 1 <= max_steps <= suite.max_steps_limit:
        raise ValueError(f"max_steps={max_steps}: expected 1..{suite.max_steps_limit} in {suite.title}")
    seeds = list(range(seed, seed + episodes))
    seed_check = suite.check_seeds(seeds)
    policy = EnergyPolicy.from_pretrained(run_dir, device=device, n_action_steps=n_action_steps)
    out = Path(out_dir) if out_dir else run_dir / "rollout"
    (out / "gifs").mkdir(parents=True, exist_ok=True)
    records, gifs, seconds = [], {}, {m: 0.0 for m in modes}
    shifted: dict[str, list[float]] = {s: [] for s in shifts}
    shifted_relative: dict[str, list[float]] = {s: [] for s in shifts}
    reference: list[float] = []
    reference_relative: list[float] = []
    # Relative energies need the policy's training chunks as the reference (retrieval_chunks.safetensors).
    relative = policy.reference_chunks is not None
    bar = tqdm(total=len(suite.tasks) * len(modes) * episodes, desc="rollouts", disable=not progress)
    for task in suite.tasks:
        env = suite.make(task, min(batch_size, episodes))
        for mode in modes:
            start = time.perf_counter()
            for first in range(0, episodes, batch_size):
                batch = seeds[first:first + batch_size]
                # The shifted observations are scored once, beside the policy's own chunks.
                done = run_batch(env, policy, batch, mode, max_steps, record=first == 0, candidates=candidates,
                                 shifts=shifts if mode == "policy" else (), relative=relative)
                records += [{"task": task, "mode": mode, "seed": s, "success": ok, "steps": n,
                             "energy": float(np.mean(e)), "chunks": len(e),
                             **({"relative_energy": float(np.mean(done.relative[i]))} if relative else {}),
                             **env.episode_info(i)}
                            for i, (s, (ok, n), e) in enumerate(zip(batch, done.results, done.energies))]
                for shift, values in done.shifted.items():
                    shifted[shift] += values
                for shift, values in done.shifted_relative.items():
                    shifted_relative[shift] += values
                reference += done.reference
                reference_relative += done.reference_relative
                if done.frames:
                    name = f"gifs/{task}_{mode}.gif"
                    _write_gif(out / name, done.frames)
                    gifs[(task, mode)] = name
                bar.update(len(batch))
            seconds[mode] += time.perf_counter() - start
        env.close()
    bar.close()
    metrics: dict[str, Any] = success_metrics(records, modes, suite.tasks)
    metrics.update(failure_metrics(records, modes))
    metrics.update(shift_metrics(reference, shifted))
    if relative:
        metrics.update(shift_metrics(reference_relative, shifted_relative, prefix="relative_"))
    metrics.update({f"seconds/{m}": s for m, s in seconds.items()})
    metrics.update({**suite.metrics, "seed_check": seed_check, "seeds_checked": float(not seed_check.startswith("NOT"))})
    metrics["episodes_per_task"] = float(episodes)
    metrics["candidates"] = candidates
    from vla_energy.evaluation.report import write_metrics

    write_metrics(out / "metrics.json", metrics)
    (out / "episodes.json").write_text(json.dumps(records, indent=1))
    (out / "settings.json").write_text(json.dumps({**suite.settings_json, "seeds": seeds, "seed_check": seed_check},
                                                  indent=1, default=str))
    summary = _report(out / "report.md", run_dir, suite, metrics, modes, episodes, seeds, max_steps,
                      policy.n_action_steps, gifs, shifts)
    _append_to_run_report(run_dir, out, suite.title, summary)
    return metrics


def build_parser(prog: str = "python -m vla_energy.sim.rollout") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Closed-loop success rates of a trained policy: in the "
                                "synthetic task for a run trained on the synthetic dataset, else in Meta-World (needs "
                                "vla_energy[sim]).")
    p.add_argument("run_dir", help="a run directory (or policy / checkpoint directory)")
    p.add_argument("--out_dir", default=None, help="default: <run_dir>/rollout")
    p.add_argument("--tasks", default=None, help="Meta-World, comma-separated; default: the tasks of the run's dataset")
    p.add_argument("--episodes", type=int, default=10, help="seeded episodes per task and mode")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of " + ", ".join(MODES))
    from vla_energy.inference.candidates import CANDIDATE_SOURCES

    p.add_argument("--candidates", default="gaussian", choices=list(CANDIDATE_SOURCES),
                   help="candidates of rerank and mean: the policy + Gaussian perturbations, its layer-wise "
                        "predictions, the training chunks nearest to the policy's (saved with the policy), the chunks "
                        "of the training samples whose contexts are nearest to the observation's (neighbors: a policy "
                        "saved with their contexts, --retrieval_contexts), or a flow head's samples (a policy "
                        "trained with --action_head flow)")
    p.add_argument("--seed", type=int, default=1000, help="seed of the first episode (Meta-World: past the "
                   "demonstrations'; synthetic: any, its episodes come from a stream the dataset does not use)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="steps per episode at most (default: 150 in Meta-World, 60 in the synthetic task)")
    p.add_argument("--n_action_steps", type=int, default=None, help="actions run from each chunk (default: horizon)")
    from vla_energy.sim.metaworld_env import RENDER_CONVENTIONS

    p.add_argument("--render_convention", default=None, choices=RENDER_CONVENTIONS,
                   help="Meta-World: how the dataset's images were rendered; default: meta/metaworld.json's (vla-energy "
                        "sim-demos), else lerobot (LeRobot's MetaworldEnv)")
    p.add_argument("--camera", default=None, help="Meta-World; default: the dataset's (else the render convention's)")
    p.add_argument("--image_size", type=int, default=None, help="Meta-World; default: the dataset's")
    p.add_argument("--task_map", default=None,
                   help="Meta-World: environment -> the dataset's task string, when the dataset does not say: "
                        "'reach-v3=Reach a goal position;push-v3=Push the puck to a goal' or a JSON file")
    p.add_argument("--allow_unchecked_seeds", action="store_true",
                   help="Meta-World: run although the dataset records neither its episodes' seeds nor their initial "
                        "states (the report says the seeds were not checked)")
    p.add_argument("--batch_size", type=int, default=10, help="episodes run in lockstep, one batched policy call")
    p.add_argument("--shifts", default=",".join(SHIFTS),
                   help="observations the policy never saw, on which the policy mode also scores its chunks (one more "
                        "policy call per chunk each): comma-separated of " + ", ".join(SHIFTS) + ", or none")
    p.add_argument("--device", default="cpu")
    p.add_argument("--disable_tqdm", action="store_true")
    return p


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: Optional[list[str]] = None, prog: Optional[str] = None) -> int:
    from vla_energy.sim.dataset_tasks import parse_task_map

    args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
    metrics = rollout(args.run_dir, args.out_dir, _names(args.tasks) if args.tasks else None, args.episodes,
                      _names(args.modes), args.seed, args.max_steps, args.n_action_steps, args.camera, args.image_size,
                      args.device, not args.disable_tqdm, args.batch_size, args.candidates,
                      render_convention=args.render_convention,
                      task_map=parse_task_map(args.task_map) if args.task_map else None,
                      allow_unchecked_seeds=args.allow_unchecked_seeds,
                      shifts=[] if args.shifts.strip() == "none" else _names(args.shifts))
    for key, value in metrics.items():
        if "/low" not in key and "/high" not in key:
            print(f"{key:48s} {value:.4f}" if isinstance(value, float) else f"{key:48s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
