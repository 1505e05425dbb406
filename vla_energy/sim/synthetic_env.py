"""The built-in synthetic task in closed loop: a batched, seeded environment with the dataset's scenes, renderer,
instructions and dynamics (`vla_energy.data.synthetic`), so that training and closed loop see the same pixels.

An episode draws its scene as a dataset episode does, from its own generator; closed-loop episodes come from a
stream of generators that no dataset episode uses (`ROLLOUT_STREAM`), and `check_not_training` compares their
starting scenes with the training data's. The agent moves by each action's (dx, dy) and stays on the table. An
episode succeeds when the agent comes within GRIP_RADIUS of a valid target (either square of the named colour with
modes "targets"); the grip output is not required, because short demonstrations (the demo's end after 10-20
frames) stop before the expert is that close, so a policy trained on them has hardly ever seen a grip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields
from typing import Any, Optional

import numpy as np

from vla_energy.data.arguments import DataConfig
from vla_energy.data.synthetic import (
    GRIP_RADIUS,
    SyntheticScene,
    episode_rng,
    expert_action,
    move_agent,
    render_scene,
    render_view,
    sample_scene,
)
from vla_energy.sim.envs import Suite

__all__ = ["SyntheticEnv", "synthetic_config", "synthetic_suite", "check_not_training", "ROLLOUT_STREAM",
           "STREAMS", "DEFAULT_MAX_STEPS"]

# Appended to the episode generator's seed words: dataset episodes use [data_seed, e] (numpy pads it with zeros),
# closed-loop ones [data_seed, e, ROLLOUT_STREAM], so no closed-loop episode can share a dataset episode's draws.
ROLLOUT_STREAM = 0x5EED_C105
STREAMS = ("rollout", "train")
# The dataset's expert reaches a target in 22-44 steps (500 episodes); a policy gets 1.5 times the longest.
DEFAULT_MAX_STEPS = 60
_PICTURE_SCALE = 4  # the report's pictures: the top-down view at 4x the camera's size


def synthetic_config(run_config: Optional[Mapping[str, Any]]) -> DataConfig:
    """The DataConfig of a run trained on the synthetic dataset (its run_config.json), or a ValueError."""
    data = dict((run_config or {}).get("DataConfig") or {})
    if data.get("dataset") != "synthetic":
        raise ValueError(f"the run's dataset is {data.get('dataset')!r}, not 'synthetic': the synthetic environment "
                         "rebuilds the synthetic task from the run's DataConfig")
    known = {f.name for f in fields(DataConfig)}
    return DataConfig(**{k: v for k, v in data.items() if k in known})


def _generator(cfg: DataConfig, seed: int, stream: str) -> np.random.Generator:
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r}, expected one of {STREAMS}")
    if seed < 0:
        raise ValueError(f"episode seed {seed}, expected >= 0")
    return episode_rng(cfg.data_seed, seed) if stream == "train" else np.random.default_rng(
        [cfg.data_seed, seed, ROLLOUT_STREAM])


def _start(cfg: DataConfig, rng: np.random.Generator) -> SyntheticScene:
    """An episode's scene, drawing from `rng` in the dataset's order (the episode length first)."""
    rng.integers(cfg.min_episode_length, cfg.max_episode_length + 1)
    return sample_scene(rng, cfg.num_targets, cfg.synthetic_state, cfg.synthetic_modes)


def _scene_key(scene: SyntheticScene) -> bytes:
    return scene.instruction.encode() + np.concatenate([scene.squares.ravel(), scene.agent]).tobytes()


def check_not_training(cfg: DataConfig, seeds: Sequence[int], stream: str = "rollout") -> str:
    """Raise a ValueError when an episode of `seeds` (in `stream`) starts like one of the dataset's episodes
    (the same instruction, squares and agent start); returns what was checked."""
    starts = {_scene_key(_start(cfg, episode_rng(cfg.data_seed, e))): e for e in range(cfg.num_episodes)}
    clashes = {int(s): starts[k] for s in seeds if (k := _scene_key(_start(cfg, _generator(cfg, s, stream)))) in starts}
    if clashes:
        first = dict(list(clashes.items())[:5])
        raise ValueError(f"episodes {first} (episode seed: dataset episode) of the {stream!r} stream are episodes of "
                         f"the training data (data_seed {cfg.data_seed}, episodes 0..{cfg.num_episodes - 1}): run "
                         "closed-loop episodes from the 'rollout' stream")
    return (f"checked against the {cfg.num_episodes} training episodes' scenes (data_seed {cfg.data_seed}): no rollout "
            "episode starts like one")


class SyntheticEnv:
    """A batch of synthetic-task episodes stepped in lockstep (the `BatchedEnv` interface of the rollout loop).

    Observations are keyed like the policy's inputs: `observation.images.<view>` (uint8 [B, S, S, 3], the pixels
    of the dataset's `image` column), `observation.state` ([B, 2] agent x, y; [B, 4] with the goal offset) and
    `task` (the instructions). `stream` "train" replays the dataset's own episodes (tests and checks only)."""

    def __init__(self, cfg: DataConfig, batch_size: int, stream: str = "rollout") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}, expected >= 1")
        if stream not in STREAMS:
            raise ValueError(f"stream={stream!r}, expected one of {STREAMS}")
        self.cfg, self.batch_size, self.stream = cfg, batch_size, stream
        self.camera = cfg.synthetic_view
        self.scenes: list[SyntheticScene] = []
        self.rngs: list[np.random.Generator] = []
        self.agents = np.zeros((0, 2))
        self.reached: list[Optional[int]] = []

    def reset(self, seeds: Sequence[int]) -> dict[str, Any]:
        """Start the episodes of `seeds` (at most batch_size); returns their first observation."""
        if not 1 <= len(seeds) <= self.batch_size:
            raise ValueError(f"{len(seeds)} seeds for a batch of {self.batch_size} episodes, expected 1..{self.batch_size}")
        self.rngs = [_generator(self.cfg, int(s), self.stream) for s in seeds]
        self.scenes = [_start(self.cfg, rng) for rng in self.rngs]
        self.agents = np.stack([scene.agent for scene in self.scenes])
        self.reached = [None] * len(seeds)
        return self.observation()

    def observation(self) -> dict[str, Any]:
        """The current observation of every episode, batched."""
        images = np.stack([render_view(self.cfg.image_size, scene, agent, self.cfg.synthetic_view)
                           for scene, agent in zip(self.scenes, self.agents)])
        state = self.agents if self.cfg.synthetic_state == "agent" else np.concatenate(
            [self.agents, np.stack([scene.offset for scene in self.scenes])], axis=1)
        return {f"observation.images.{self.camera}": images, "observation.state": state.astype(np.float32),
                "task": [scene.instruction for scene in self.scenes]}

    def distances(self) -> np.ndarray:
        """[B, V]: each agent's distance to each valid goal of its episode."""
        return np.stack([np.linalg.norm(scene.goals - agent, axis=-1) for scene, agent in zip(self.scenes, self.agents)])

    def step(self, actions: np.ndarray, active: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
        """Move the active agents by actions [B, Da>=2] (dx, dy; the rest is ignored); success [B]: within
        GRIP_RADIUS of a valid goal after the step."""
        actions = np.asarray(actions, np.float64)
        active = np.asarray(active, bool)
        n = len(self.scenes)
        if actions.ndim != 2 or actions.shape[0] != n or actions.shape[1] < 2 or active.shape != (n,):
            raise ValueError(f"actions {actions.shape} and active {active.shape}, expected (B={n}, Da>=2) and ({n},)")
        self.agents[active] = move_agent(self.agents[active], actions[active])
        distances = self.distances()
        success = active & (distances.min(axis=1) < GRIP_RADIUS)
        for i in np.flatnonzero(success):
            self.reached[i] = int(distances[i].argmin())
        return self.observation(), success

    def expert_actions(self) -> np.ndarray:
        """[B, 3]: the dataset's expert action of each episode now, drawn from the episode's own generator (so that
        with stream "train" an expert rollout reproduces the dataset's episodes)."""
        return np.stack([expert_action(rng, scene.goal, agent)
                         for rng, scene, agent in zip(self.rngs, self.scenes, self.agents)])

    def frame(self, index: int) -> np.ndarray:
        """The whole table from above (agent drawn) at 4x the camera's size, beside the camera's image when the
        camera is the wrist view."""
        scene, agent = self.scenes[index], self.agents[index]
        size = self.cfg.image_size * _PICTURE_SCALE
        top = render_scene(size, scene.squares, scene.colors, agent)
        if self.cfg.synthetic_view == "top_down":
            return top
        wrist = render_view(self.cfg.image_size, scene, agent, self.cfg.synthetic_view)
        wrist = wrist.repeat(_PICTURE_SCALE, axis=0).repeat(_PICTURE_SCALE, axis=1)
        gap = np.full((size, 2, 3), 255, np.uint8)
        return np.concatenate([top, gap, wrist], axis=1)

    def episode_info(self, index: int) -> dict[str, Any]:
        """The valid goal reached (its index, None if none), the final distance to the nearest one, the agent's
        final position, the valid goals and, with modes, the goal the dataset's expert would have chosen."""
        scene = self.scenes[index]
        info: dict[str, Any] = {"reached": self.reached[index],
                                "distance": round(float(self.distances()[index].min()), 4),
                                "agent": [round(float(v), 4) for v in self.agents[index]],
                                "goals": [[round(float(v), 4) for v in goal] for goal in scene.goals]}
        if self.cfg.synthetic_modes != "none":
            info["expert_choice"] = scene.chosen
        return info

    def close(self) -> None:
        """Nothing to release."""


def synthetic_suite(run_config: Optional[Mapping[str, Any]], stream: str = "rollout") -> Suite:
    """The rollout suite of a run trained on the synthetic dataset: one task, rebuilt from the run's DataConfig."""
    cfg = synthetic_config(run_config)
    task = "synthetic" if cfg.synthetic_modes == "none" else f"synthetic-{cfg.synthetic_modes}"
    scene = (f"{cfg.num_targets} colour{'s' * (cfg.num_targets > 1)} per scene"
             + (", two squares of the named colour (both valid)" if cfg.synthetic_modes == "targets" else ""))
    return Suite(
        title="the synthetic task",
        tasks=[task],
        make=lambda _task, n: SyntheticEnv(cfg, n, stream),
        settings=f"camera `{cfg.synthetic_view}` at {cfg.image_size} px, {scene}, state `{cfg.synthetic_state}`; "
                 f"scenes drawn from the rollout stream of data_seed {cfg.data_seed}, none of them a training episode",
        success=f"An episode succeeds when the agent comes within {GRIP_RADIUS} of a valid target (the grip output "
                "is not required).",
        default_max_steps=DEFAULT_MAX_STEPS,
        max_steps_limit=10_000,
        check_seeds=lambda seeds: check_not_training(cfg, seeds, stream),
        settings_json={"data_config": asdict(cfg), "stream": stream},
    )
