"""Meta-World environments for demonstrations and rollouts: seeded, goal in the state, offscreen camera images.

One function builds the observation dict from what the environment returns, for the dataset writer and for the
policy alike, so that training and closed loop see the same keys and the same pixels.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

__all__ = ["require_metaworld", "task_names", "task_instruction", "make_env", "reset_env", "render",
           "observation_dict", "expert_policy", "DEFAULT_CAMERA", "MAX_PATH_LENGTH"]

DEFAULT_CAMERA = "corner"
MAX_PATH_LENGTH = 500  # Meta-World's own episode limit: its environments refuse to step beyond it

_MISSING = ("Meta-World is not installed: pip install 'vla_energy[sim]' (metaworld, mujoco), and for offscreen "
            "rendering without a display the Debian package libosmesa6 with MUJOCO_GL=osmesa (or libegl1 with "
            "MUJOCO_GL=egl on a GPU machine)")


def require_metaworld() -> Any:
    """The metaworld module, or an ImportError naming the extra and the rendering backend. On Linux without a
    display MUJOCO_GL defaults to osmesa (MuJoCo's own default, glfw, needs a window system)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("MUJOCO_GL", "osmesa")
    if os.environ.get("MUJOCO_GL") == "osmesa":
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")  # PyOpenGL must agree with MuJoCo's GL backend
    try:
        import metaworld
        import metaworld.env_dict  # noqa: F401
        import metaworld.policies  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{_MISSING} ({e})") from e
    return metaworld


def task_names() -> list[str]:
    """Every Meta-World task that has a scripted expert, sorted (e.g. 'reach-v3')."""
    mw = require_metaworld()
    return sorted(set(mw.env_dict.ALL_V3_ENVIRONMENTS) & set(mw.policies.ENV_POLICY_MAP))


def task_instruction(task: str) -> str:
    """The instruction of a task: its name without the version, words separated ('reach-wall-v3' -> 'reach wall')."""
    words = task.split("-")
    if len(words) > 1 and words[-1][:1] == "v" and words[-1][1:].isdigit():
        words = words[:-1]
    return " ".join(words)


def _check_task(task: str) -> None:
    known = task_names()
    if task not in known:
        raise ValueError(f"unknown Meta-World task {task!r}; tasks with a scripted expert: {', '.join(known)}")


def make_env(task: str, camera: str = DEFAULT_CAMERA, image_size: int = 64) -> Any:
    """A goal-observable environment of `task` (39-d state incl. the goal) rendering `camera` at image_size^2;
    each `reset_env(env, seed)` draws the object and goal positions from `seed`."""
    mw = require_metaworld()
    _check_task(task)
    env = mw.env_dict.ALL_V3_ENVIRONMENTS[task](render_mode="rgb_array", camera_name=camera, width=image_size,
                                                height=image_size)
    # What Meta-World's goal-observable classes do, with the task's random positions drawn from env.np_random
    # (seeded per episode) instead of the global numpy generator.
    env._partially_observable = False
    env._freeze_rand_vec = False
    env._set_task_called = True
    env.seeded_rand_vec = True
    if "sawyer_observation_space" in env.__dict__:  # a cached property computed for the goal-hidden layout
        del env.sawyer_observation_space
    # The default 4096^2 shadow map takes 2/3 of a software-rendered 64 px frame (0.09 s -> 0.05 s at 512).
    env.model.vis.quality.shadowsize = min(int(env.model.vis.quality.shadowsize), 512)
    return env


def reset_env(env: Any, seed: int) -> np.ndarray:
    """Reset to the initial state of episode `seed`; returns the state [39]."""
    env.seed(int(seed))
    obs, _ = env.reset()
    return np.asarray(obs, np.float32)


def render(env: Any) -> np.ndarray:
    """The camera image, H x W x 3 uint8, upright (MuJoCo reads pixels bottom row first)."""
    return np.ascontiguousarray(np.flipud(np.asarray(env.render(), dtype=np.uint8)))


def observation_dict(state: np.ndarray, image: np.ndarray, instruction: str | list[str],
                     camera: str = DEFAULT_CAMERA) -> dict:
    """The observation keyed as in the demonstration dataset (LeRobot names), raw units (the policy normalizes):
    one (state [39], image H x W x 3, instruction) or a batch ([B, 39], [B, H, W, 3], B instructions)."""
    return {f"observation.images.{camera}": image, "observation.state": np.asarray(state, np.float32),
            "task": instruction}


def expert_policy(task: str) -> Any:
    """Meta-World's scripted policy of `task` (its `get_action(state)` gives a 4-d action)."""
    mw = require_metaworld()
    _check_task(task)
    return mw.policies.ENV_POLICY_MAP[task]()
