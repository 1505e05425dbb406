"""Built-in synthetic VLA task: move the agent to the coloured square that the instruction names.

Each episode draws `num_targets` squares of distinct colours at random positions and an agent (a white plus).
The instruction names one colour; the expert moves the agent toward that square. The target cannot be told
from the image alone (several squares) nor from the instruction alone (positions change every episode).

Coordinates are fractions of the image side, x to the right and y downward, in [0, 1].
Two camera views: "top_down" shows the whole table with the agent drawn as a white plus; "wrist" is an
eye-in-hand camera centred on the agent (no plus drawn) that sees the table at WRIST_ZOOM, so a target appears at
0.5 + WRIST_ZOOM * (target - agent). The wrist view makes the step a function of where the named square is in the
image, which a small randomly initialised VLM learns in minutes; the top-down view needs relating two objects.
Action (Da = 3) of frame t: dx, dy = GAIN * (target - agent_t) + N(0, NOISE^2) (the step to the next frame;
|dx|, |dy| < 0.08), and grip = 1.0 when the agent is within GRIP_RADIUS of the target, else 0.0.
State ("agent"): the agent position (x, y). State "goal_offset": (x, y, ox, oy), where each episode draws an
offset that moves the goal off the named square (goal = clip(target + U(-GOAL_OFFSET, GOAL_OFFSET)^2, 0.05, 0.95),
offset = goal - target); the offset is drawn nowhere in the image, so only a model that reads the state can reach the
goal (an image-only model is off by GAIN * offset per step, and never grips).
Modes ("none" or "targets"): with "targets" the scene holds a second square of the named colour; both are valid
and the expert heads for one of them, chosen at random per episode (column "mode": 0 or 1), so the demonstrations
from one picture split between two directions and a regression to their average heads between the squares.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from datasets import Dataset, Features, Image, Sequence, Value, load_from_disk
from PIL import Image as PILImage
from tqdm.auto import tqdm

__all__ = [
    "make_synthetic_dataset",
    "render_scene",
    "default_cache_dir",
    "PALETTE",
    "INSTRUCTION_TEMPLATES",
    "SYNTHETIC_ACTION_NAMES",
    "GAIN",
    "NOISE",
    "GRIP_RADIUS",
    "VIEWS",
    "WRIST_ZOOM",
    "SYNTHETIC_STATES",
    "GOAL_OFFSET",
    "SYNTHETIC_MODES",
    "SyntheticScene",
    "sample_scene",
    "expert_action",
    "move_agent",
    "render_view",
    "episode_rng",
    "check_modes",
]

# Version of the generator: bump when the output changes so that stale caches are not reused.
_GENERATOR_VERSION = 1

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 30),
    "magenta": (220, 50, 220),
    "cyan": (30, 210, 220),
}
BACKGROUND = (24, 24, 24)
AGENT_COLOR = (255, 255, 255)
INSTRUCTION_TEMPLATES = ("move to the {} square", "go to the {} square", "reach the {} square",
                         "navigate to the {} square")
SYNTHETIC_ACTION_NAMES = ("dx", "dy", "grip")
GAIN = 0.08
NOISE = 0.004
GRIP_RADIUS = 0.05
VIEWS = ("top_down", "wrist")
SYNTHETIC_STATES = ("agent", "goal_offset")
GOAL_OFFSET = 0.2
WRIST_ZOOM = 0.5
SYNTHETIC_MODES = ("none", "targets")
_MIN_TARGET_GAP = 0.25
_MIN_START_DISTANCE = 0.4

FEATURES = Features({
    "image": Image(),
    "instruction": Value("string"),
    "action": Sequence(Value("float32")),
    "state": Sequence(Value("float32")),
    "episode_index": Value("int64"),
    "frame_index": Value("int64"),
    "target_xy": Sequence(Value("float32")),
})
# The multimodal variants add which valid target the expert chose and where all valid targets are (x0, y0, x1, y1).
MODE_FEATURES = Features({**FEATURES, "mode": Value("int64"), "valid_targets_xy": Sequence(Value("float32"))})


def default_cache_dir() -> Path:
    """$VLA_ENERGY_CACHE, else ~/.cache/vla_energy."""
    return Path(os.environ.get("VLA_ENERGY_CACHE") or Path.home() / ".cache" / "vla_energy")


def check_modes(modes: str, state: str = "agent") -> None:
    """Raise a ValueError unless `modes` is one of SYNTHETIC_MODES and goes with `state`."""
    if modes not in SYNTHETIC_MODES:
        raise ValueError(f"synthetic_modes={modes!r}, expected one of {SYNTHETIC_MODES}")
    if modes != "none" and state != "agent":
        raise ValueError(f"synthetic_modes={modes!r} with synthetic_state={state!r}: the goal offset is defined for one named "
                         "square; use state 'agent' with modes 'targets'")


def _pixel(p: np.ndarray, size: int) -> tuple[int, int]:
    return int(round(float(p[0]) * (size - 1))), int(round(float(p[1]) * (size - 1)))


def render_scene(
    size: int, targets: np.ndarray, colors: list[str], agent: Optional[np.ndarray]
) -> np.ndarray:
    """RGB uint8 [size, size, 3]: coloured squares at `targets` [K, 2] and the agent (a white plus, unless None)."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    half = max(1, round(size * 0.14)) // 2 + 1  # a 5x5 square at 32 px
    for (x, y), name in zip((_pixel(t, size) for t in targets), colors):
        img[max(0, y - half + 1): y + half, max(0, x - half + 1): x + half] = PALETTE[name]
    if agent is None:
        return img
    ax, ay = _pixel(agent, size)
    arm = max(1, size // 20)
    img[ay, max(0, ax - arm): ax + arm + 1] = AGENT_COLOR
    img[max(0, ay - arm): ay + arm + 1, ax] = AGENT_COLOR
    return img


def _place_targets(rng: np.random.Generator, k: int) -> np.ndarray:
    """K positions in [0.1, 0.9]^2, pairwise at least _MIN_TARGET_GAP apart (relaxed if placement is hard)."""
    gap = _MIN_TARGET_GAP
    while True:
        for _ in range(200):
            pts = rng.uniform(0.1, 0.9, size=(k, 2))
            d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(k)
            if d.min() >= gap:
                return pts
        gap *= 0.8


def render_view(size: int, scene: SyntheticScene, agent: np.ndarray, view: str) -> np.ndarray:
    """The frame of `scene` with the agent at `agent` as the camera of `view` sees it, RGB uint8 [size, size, 3]."""
    if view == "wrist":
        return render_scene(size, 0.5 + WRIST_ZOOM * (scene.squares - agent), scene.colors, None)
    return render_scene(size, scene.squares, scene.colors, agent)


@dataclass
class SyntheticScene:
    """An episode's start: the squares drawn, the instruction, the valid goals, the expert's choice, the agent."""

    colors: list[str]  # colour of each drawn square
    squares: np.ndarray  # [K, 2] drawn squares
    instruction: str
    goals: np.ndarray  # [V, 2] where the instruction is fulfilled (V = 2 with modes "targets", else 1)
    chosen: int  # the goal the expert heads for
    offset: np.ndarray  # [2] goal - named square (state "goal_offset"; zeros otherwise)
    agent: np.ndarray  # [2] the agent's start

    @property
    def goal(self) -> np.ndarray:
        """The goal the expert heads for."""
        return self.goals[self.chosen]


def episode_rng(seed: int, episode: int) -> np.random.Generator:
    """The generator of dataset episode `episode`: one per episode, so episode e is the same whatever num_episodes
    is. Its draws: the length, the scene (`sample_scene`), then one expert action per frame."""
    return np.random.default_rng([seed, episode])


def sample_scene(rng: np.random.Generator, k: int, state: str = "agent", modes: str = "none") -> SyntheticScene:
    """Draw an episode's start: k squares of distinct colours (with modes "targets" one more, of the named colour),
    the instruction, the goal offset (state "goal_offset"), the expert's choice and the agent's start."""
    colors = [str(c) for c in rng.choice(list(PALETTE), size=k, replace=False)]
    squares = _place_targets(rng, k + (modes == "targets"))
    named = int(rng.integers(k))
    instruction = INSTRUCTION_TEMPLATES[int(rng.integers(len(INSTRUCTION_TEMPLATES)))].format(colors[named])
    goals, chosen, offset = squares[[named]], 0, np.zeros(2)
    if modes == "targets":
        colors.append(colors[named])
        goals, chosen = squares[[named, k]], int(rng.integers(2))
    if state == "goal_offset":  # drawn after the scene, so the "agent" episodes' draws are unchanged
        goal = np.clip(goals[0] + rng.uniform(-GOAL_OFFSET, GOAL_OFFSET, size=2), 0.05, 0.95)
        offset, goals = goal - goals[0], goal[None]
    agent = rng.uniform(0.05, 0.95, size=2)
    while np.linalg.norm(agent - goals, axis=-1).min() < _MIN_START_DISTANCE:
        agent = rng.uniform(0.05, 0.95, size=2)
    return SyntheticScene(colors, squares, instruction, goals, chosen, offset, agent)


def expert_action(rng: np.random.Generator, goal: np.ndarray, agent: np.ndarray) -> np.ndarray:
    """The expert's action [dx, dy, grip] (float64) at `agent`: a noisy step GAIN of the way to `goal`; grip 1.0
    within GRIP_RADIUS of it."""
    step = GAIN * (goal - agent) + rng.normal(0.0, NOISE, size=2)
    return np.array([step[0], step[1], float(np.linalg.norm(goal - agent) < GRIP_RADIUS)])


def move_agent(agent: np.ndarray, action: np.ndarray) -> np.ndarray:
    """The dynamics: the agent moves by (dx, dy) of the action and stays on the table ([0, 1]^2)."""
    return np.clip(agent + np.asarray(action, np.float64)[..., :2], 0.0, 1.0)


def _episode(rng: np.random.Generator, size: int, k: int, length: int, view: str,
             state: str = "agent", modes: str = "none") -> dict[str, list]:
    """One episode: frames, instruction, actions, states."""
    scene = sample_scene(rng, k, state, modes)
    agent = scene.agent
    out: dict[str, list] = {"image": [], "action": [], "state": []}
    for _ in range(length):
        png = io.BytesIO()
        PILImage.fromarray(render_view(size, scene, agent, view)).save(png, format="PNG", compress_level=1)
        action = expert_action(rng, scene.goal, agent)
        out["image"].append({"bytes": png.getvalue(), "path": None})
        out["action"].append([float(a) for a in action])
        out["state"].append([float(agent[0]), float(agent[1])]
                            + ([float(scene.offset[0]), float(scene.offset[1])] if state == "goal_offset" else []))
        agent = move_agent(agent, action)
    out["instruction"] = [scene.instruction] * length
    out["target_xy"] = [[float(scene.goal[0]), float(scene.goal[1])]] * length
    if modes != "none":
        out["mode"] = [scene.chosen] * length
        out["valid_targets_xy"] = [[float(v) for v in scene.goals.reshape(-1)]] * length
    return out


def _generate(num_episodes: int, image_size: int, num_targets: int, min_len: int, max_len: int, seed: int,
              view: str, state: str, modes: str, progress: bool) -> Dataset:
    features = FEATURES if modes == "none" else MODE_FEATURES
    columns: dict[str, list] = {name: [] for name in features}
    for e in tqdm(range(num_episodes), desc="synthetic episodes", disable=not progress, leave=False):
        rng = episode_rng(seed, e)
        length = int(rng.integers(min_len, max_len + 1))
        ep = _episode(rng, image_size, num_targets, length, view, state, modes)
        for name, values in ep.items():
            columns[name].extend(values)
        columns["episode_index"].extend([e] * length)
        columns["frame_index"].extend(range(length))
    return Dataset.from_dict(columns, features=features)


def make_synthetic_dataset(
    num_episodes: int = 160,
    image_size: int = 32,
    num_targets: int = 3,
    min_episode_length: int = 20,
    max_episode_length: int = 40,
    seed: int = 0,
    view: str = "top_down",
    cache_dir: Optional[str] = None,
    state: str = "agent",
    use_cache: bool = True,
    progress: bool = False,
    modes: str = "none",
) -> Dataset:
    """The synthetic frame dataset (columns: image, instruction, action [3], state [2], episode_index,
    frame_index, target_xy; with modes "targets" also mode and valid_targets_xy), deterministic in its arguments
    and cached on disk under a key of them. `view` is "top_down" or "wrist", `state` "agent" or "goal_offset",
    `modes` "none" or "targets" (see the module docstring)."""
    if num_episodes < 1:
        raise ValueError(f"num_episodes={num_episodes}, expected >= 1")
    if image_size < 8:
        raise ValueError(f"image_size={image_size}, expected >= 8")
    if not 1 <= num_targets <= len(PALETTE):
        raise ValueError(f"num_targets={num_targets}, expected 1..{len(PALETTE)} (the number of colours)")
    if view not in VIEWS:
        raise ValueError(f"view={view!r}, expected one of {VIEWS}")
    if state not in SYNTHETIC_STATES:
        raise ValueError(f"state={state!r}, expected one of {SYNTHETIC_STATES}")
    check_modes(modes, state)
    if not 1 <= min_episode_length <= max_episode_length:
        raise ValueError(
            f"min_episode_length={min_episode_length}, max_episode_length={max_episode_length}, "
            "expected 1 <= min <= max"
        )
    args = (num_episodes, image_size, num_targets, min_episode_length, max_episode_length, seed, view, state, modes)
    if not use_cache:
        return _generate(*args, progress=progress)
    params = dict(zip(("num_episodes", "image_size", "num_targets", "min_episode_length", "max_episode_length",
                       "seed", "view"), args), version=_GENERATOR_VERSION)
    if state != "agent":  # the default's key stays as before, so existing caches stay valid
        params["state"] = state
    if modes != "none":
        params["modes"] = modes
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / "synthetic" / key
    if (target / "dataset_info.json").exists():
        return load_from_disk(str(target))
    ds = _generate(*args, progress=progress)
    # Write to a unique temp dir, then rename: concurrent writers never expose a half-written dataset.
    tmp = root / "synthetic" / f".{key}.{uuid.uuid4().hex}.tmp"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_to_disk(str(tmp))
        (tmp / "params.json").write_text(json.dumps(params, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "dataset_info.json").exists():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return load_from_disk(str(target))
