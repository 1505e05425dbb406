"""Meta-World environments for demonstrations and rollouts: seeded, goal in the state, offscreen camera images.

One function builds the observation dict from what the environment returns, for the dataset writer and for the
policy alike, so that training and closed loop see the same keys and the same pixels. Images follow a render
convention, the one the dataset was recorded with:

- `vla_energy` (what `vla-energy sim-demos` writes by default): Meta-World's camera where Meta-World puts it, the
  rendered image flipped vertically (default camera `corner`);
- `lerobot` (LeRobot's `MetaworldEnv`, which recorded LeRobot's Meta-World datasets): camera `corner2` moved to
  LeRobot's placement and its image turned by 180 degrees (flipped in both axes); other cameras as rendered.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import numpy as np

__all__ = ["require_metaworld", "check_renderer", "task_names", "task_instruction", "make_env", "reset_env",
           "render", "orient_image", "default_camera", "check_convention", "observation_state", "observation_dict",
           "expert_policy", "DEFAULT_CAMERA", "MAX_PATH_LENGTH", "RENDER_CONVENTIONS", "CAMERAS", "STATE_DIMS"]

DEFAULT_CAMERA = "corner"
MAX_PATH_LENGTH = 500  # Meta-World's own episode limit: its environments refuse to step beyond it
RENDER_CONVENTIONS = ("vla_energy", "lerobot")
CAMERAS = ("topview", "corner", "corner2", "corner3", "corner4", "behindGripper", "gripperPOV")  # Meta-World's
_DEFAULT_CAMERAS = {"vla_energy": DEFAULT_CAMERA, "lerobot": "corner2"}
# LeRobot's MetaworldEnv moves corner2 here before rendering and turns its images by 180 degrees; it leaves the
# other cameras where they are and their images as rendered.
_LEROBOT_CAMERA_POSITIONS = {"corner2": (0.75, 0.075, 0.7)}
_LEROBOT_TURNED = ("corner2",)
# Meta-World's 39-d observation, or its first 4 (hand position + gripper: LeRobot's `agent_pos`).
STATE_DIMS = (39, 4)

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


def check_renderer(camera: str = DEFAULT_CAMERA, convention: str = "vla_energy") -> None:
    """Render one small frame, or raise naming the extra and the rendering backend: run before writing anything."""
    try:
        env = make_env("reach-v3", camera, image_size=8, convention=convention)
        render(env, convention)
        env.close()
    except ImportError:
        raise
    except Exception as e:  # MuJoCo raises plain exceptions when no GL backend can make a context
        raise RuntimeError(f"Meta-World cannot render offscreen (MUJOCO_GL={os.environ.get('MUJOCO_GL')!r}): "
                           f"{type(e).__name__}: {e}. {_MISSING}") from e


def check_convention(convention: str) -> str:
    """`convention` if it is a render convention, else a ValueError naming them."""
    if convention not in RENDER_CONVENTIONS:
        raise ValueError(f"render convention {convention!r}, expected one of {', '.join(RENDER_CONVENTIONS)}")
    return convention


def default_camera(convention: str) -> str:
    """The camera a dataset of this render convention is recorded with unless it says otherwise."""
    return _DEFAULT_CAMERAS[check_convention(convention)]


def orient_image(image: np.ndarray, convention: str, camera: str) -> np.ndarray:
    """MuJoCo's rendering (H x W x 3, or a batch [..., H, W, 3]) as a dataset of `convention` stores it:
    vla_energy flips it vertically; lerobot turns corner2 by 180 degrees and keeps other cameras as rendered."""
    image = np.asarray(image)
    if image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"image has shape {image.shape}, expected (..., H, W, 3)")
    if check_convention(convention) == "vla_energy":
        return np.ascontiguousarray(np.flip(image, -3))
    return np.ascontiguousarray(np.flip(image, (-3, -2)) if camera in _LEROBOT_TURNED else image)


def observation_state(obs: np.ndarray, state_dim: int) -> np.ndarray:
    """The dataset's observation.state from Meta-World's 39-d observation ([39] or [B, 39]): all of it, or its
    first 4 (hand position and gripper opening, LeRobot's agent_pos)."""
    obs = np.asarray(obs, np.float32)
    if obs.shape[-1] != 39:
        raise ValueError(f"Meta-World observation has shape {obs.shape}, expected (..., 39)")
    if state_dim not in STATE_DIMS:
        raise ValueError(f"observation.state of {state_dim} dims: a Meta-World dataset's state is its 39-d "
                         "observation or the first 4 dims (hand position + gripper, LeRobot's agent_pos)")
    return obs[..., :state_dim]


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


def make_env(task: str, camera: Optional[str] = None, image_size: int = 64, convention: str = "vla_energy") -> Any:
    """A goal-observable environment of `task` (39-d state incl. the goal) rendering `camera` (default: the
    convention's) at image_size^2, the camera placed as the render convention places it; each
    `reset_env(env, seed)` draws the object and goal positions from `seed`."""
    camera = camera or default_camera(convention)
    check_convention(convention)
    if camera not in CAMERAS:
        raise ValueError(f"camera {camera!r}, expected one of Meta-World's: {', '.join(CAMERAS)}")
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
    if convention == "lerobot" and camera in _LEROBOT_CAMERA_POSITIONS:
        import mujoco

        camera_id = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        env.model.cam_pos[camera_id] = _LEROBOT_CAMERA_POSITIONS[camera]
    return env


def reset_env(env: Any, seed: int) -> np.ndarray:
    """Reset to the initial state of episode `seed`; returns the state [39]."""
    env.seed(int(seed))
    obs, _ = env.reset()
    return np.asarray(obs, np.float32)


def render(env: Any, convention: str = "vla_energy") -> np.ndarray:
    """The camera image, H x W x 3 uint8, oriented as the render convention stores it (`orient_image`)."""
    return orient_image(np.asarray(env.render(), dtype=np.uint8), convention, env.camera_name)


def observation_dict(state: np.ndarray, image: np.ndarray, instruction: str | list[str],
                     camera: str = DEFAULT_CAMERA, image_key: Optional[str] = None) -> dict:
    """The observation keyed as in the demonstration dataset (LeRobot names; `image_key` default
    observation.images.<camera>), raw units (the policy normalizes): one (state [Ds], image H x W x 3, instruction)
    or a batch ([B, Ds], [B, H, W, 3], B instructions)."""
    return {image_key or f"observation.images.{camera}": image, "observation.state": np.asarray(state, np.float32),
            "task": instruction}


def expert_policy(task: str) -> Any:
    """Meta-World's scripted policy of `task` (its `get_action(state)` gives a 4-d action)."""
    mw = require_metaworld()
    _check_task(task)
    return mw.policies.ENV_POLICY_MAP[task]()
