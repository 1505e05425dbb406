"""Which Meta-World environment each task of a LeRobot dataset is, and the instruction a policy trained on it knows.

Instructions are always the dataset's own task strings (meta/tasks.parquet). An episode's environment comes from,
in this order:

1. `--task_map` ({environment: task string}, a JSON file or `env=string;env=string`);
2. meta/metaworld.json, which `vla-energy sim-demos` writes;
3. the task string itself when it names the environment (`reach-v3`, `metaworld-reach-v3`, or `reach` for
   reach-v3);
4. LeRobot's Meta-World table, read from an installed `lerobot` package (its `envs/metaworld_config.json`; not
   imported): an episode's `task_id` column (TASK_NAME_TO_ID) or its task description (TASK_DESCRIPTIONS).

Each episode's first 39-d state is read too, when the dataset records one: the rollout compares its own initial
states with them, so that a rollout episode is never a demonstration.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from vla_energy.data.lerobot import read_lerobot_info, read_lerobot_tasks

__all__ = ["DatasetEpisodes", "TaskMatch", "lerobot_metaworld_table", "parse_task_map", "env_named_by",
           "read_episodes", "match_tasks", "STATE_COLUMNS"]

# Columns that may hold Meta-World's 39-d observation (LeRobot's datasets keep it as environment_state).
STATE_COLUMNS = ("observation.state", "observation.environment_state")
_TASK_MAP_HELP = ("pass --task_map with each environment's task string, e.g. --task_map "
                  "'reach-v3=Reach a goal position;push-v3=Push the puck to a goal' (or a JSON file "
                  "{\"reach-v3\": \"Reach a goal position\"})")


@dataclass
class DatasetEpisodes:
    """Per episode of a LeRobot dataset: its task string, LeRobot's task_id (when recorded), its first 39-d state
    (when recorded)."""

    tasks: list[str]
    task_ids: Optional[list[int]] = None
    first_states: Optional[np.ndarray] = None  # [episodes, 39]


@dataclass
class TaskMatch:
    """Environment -> instruction, environment -> positions of its episodes in DatasetEpisodes, and how."""

    instructions: dict[str, str]
    episodes: dict[str, list[int]] = field(default_factory=dict)
    source: str = ""


def lerobot_metaworld_table() -> Optional[dict]:
    """LeRobot's Meta-World table (TASK_DESCRIPTIONS, TASK_NAME_TO_ID) from an installed lerobot package, read as
    a file without importing lerobot; None when lerobot is not installed or has no such file."""
    spec = importlib.util.find_spec("lerobot")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / "envs" / "metaworld_config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def parse_task_map(text: str) -> dict[str, str]:
    """--task_map: a JSON file {environment: task string} or 'env=string;env=string' -> {environment: string}."""
    path = Path(text)
    if text.strip().endswith(".json") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"--task_map {text}: no such file")
        mapping = json.loads(path.read_text())
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"--task_map {text}: expected a JSON object {{environment: task string}}")
        return {str(k): v for k, v in mapping.items()}
    mapping = {}
    for item in (part for part in text.split(";") if part.strip()):
        env, sep, instruction = item.partition("=")
        if not sep or not env.strip() or not instruction.strip():
            raise ValueError(f"--task_map item {item!r}: expected env=task string (items separated by ';')")
        mapping[env.strip()] = instruction.strip()
    if not mapping:
        raise ValueError(f"--task_map {text!r} maps no environment")
    return mapping


def env_named_by(task: str, env_names: Sequence[str]) -> Optional[str]:
    """The environment a task string names: itself ('reach-v3'), with LeRobot's prefix ('metaworld-reach-v3'), or
    in words ('reach' -> reach-v3, when only one version is known); None otherwise."""
    from vla_energy.sim.metaworld_env import task_instruction

    name = task.strip()
    name = name[len("metaworld-"):] if name.startswith("metaworld-") else name
    if name in env_names:
        return name
    worded = [env for env in env_names if task_instruction(env) == name.casefold()]
    return worded[0] if len(worded) == 1 else None


def read_episodes(root: str | Path, state_keys: Sequence[str] = STATE_COLUMNS) -> DatasetEpisodes:
    """Task string, task_id and first 39-d state (the first of `state_keys` that is 39-d) of every episode of a
    LeRobot v3 dataset, in episode order; reads only those columns."""
    root = Path(root)
    info = read_lerobot_info(root)
    tasks = read_lerobot_tasks(root)
    state_key = next((k for k in state_keys if list(info["features"].get(k, {}).get("shape") or []) == [39]), None)
    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'data'} has no chunk-*/file-*.parquet files")
    frames = []
    for f in files:
        names = pq.ParquetFile(f).schema_arrow.names
        wanted = [c for c in ("episode_index", "frame_index", "task_index", "task_id", state_key) if c in names]
        frames.append(pd.read_parquet(f, columns=wanted))
    df = pd.concat(frames, ignore_index=True)
    missing = [c for c in ("episode_index", "frame_index", "task_index") if c not in df.columns]
    if missing:
        raise ValueError(f"{root}: the data files have no columns {missing}; a LeRobot v3 dataset has them")
    first = df.sort_values(["episode_index", "frame_index"]).groupby("episode_index", sort=True).head(1)
    unknown = sorted(set(first["task_index"].astype(int)) - set(tasks))
    if unknown:
        raise ValueError(f"{root}: task_index values {unknown[:5]} are not in meta/tasks.parquet")
    return DatasetEpisodes(
        tasks=[tasks[int(i)] for i in first["task_index"]],
        task_ids=[int(np.asarray(i).reshape(-1)[0]) for i in first["task_id"]] if "task_id" in first else None,
        first_states=np.stack([np.asarray(s, np.float32) for s in first[state_key]]) if state_key else None)


def _from_task_map(episodes: DatasetEpisodes, task_map: Mapping[str, str], wanted: Optional[Sequence[str]]
                   ) -> TaskMatch:
    names = list(wanted) if wanted else list(task_map)
    missing = [t for t in names if t not in task_map]
    if missing:
        raise ValueError(f"--tasks {missing} are not in --task_map (it maps {sorted(task_map)}): add them")
    members = {t: [i for i, s in enumerate(episodes.tasks) if s == task_map[t]] for t in names}
    unseen = [t for t in names if not members[t]]
    source = "--task_map" + (f" (instructions of {unseen} are no task string of the dataset)"
                             if unseen and episodes.tasks else "")
    return TaskMatch({t: task_map[t] for t in names}, members, source)


def match_tasks(episodes: DatasetEpisodes, env_names: Sequence[str], task_map: Optional[Mapping[str, str]] = None,
                table: Optional[dict] = None, wanted: Optional[Sequence[str]] = None) -> TaskMatch:
    """The environment of each episode and the instruction of each environment (its most frequent task string),
    for `wanted` environments (default: every environment of the dataset). Raises naming the task strings that
    fit no environment, or several, and the option that resolves them."""
    if task_map:
        return _from_task_map(episodes, task_map, wanted)
    table = table or {}
    by_id = {int(i): env for env, i in (table.get("TASK_NAME_TO_ID") or {}).items()}
    by_description: dict[str, list[str]] = {}
    for env, description in (table.get("TASK_DESCRIPTIONS") or {}).items():
        by_description.setdefault(description.strip().casefold(), []).append(env)
    candidates, how = [], set()
    for i, task in enumerate(episodes.tasks):
        named = env_named_by(task, env_names)
        if named:
            candidates.append([named])
            how.add("the task strings name the environments")
        elif episodes.task_ids is not None and episodes.task_ids[i] in by_id:
            candidates.append([by_id[episodes.task_ids[i]]])
            how.add("the episodes' task_id in LeRobot's Meta-World table")
        else:
            candidates.append(by_description.get(task.strip().casefold(), []))
            if candidates[-1]:
                how.add("the task strings are LeRobot's Meta-World task descriptions")
    unmatched = sorted({episodes.tasks[i] for i, c in enumerate(candidates) if not c})
    ambiguous = {episodes.tasks[i]: c for i, c in enumerate(candidates) if len(c) > 1}
    if wanted is None and (unmatched or ambiguous):
        problems = [f"task strings {unmatched} name no Meta-World environment" + (
            "" if table else " (and lerobot, whose Meta-World table maps its descriptions, is not installed)")
            ] if unmatched else []
        problems += [f"{task!r} fits {' and '.join(envs)}" for task, envs in ambiguous.items()]
        raise ValueError("; ".join(problems) + f": {_TASK_MAP_HELP}, or --tasks to choose environments")
    names = list(wanted) if wanted is not None else sorted({env for c in candidates for env in c})
    instructions, members = {}, {}
    for env in names:
        members[env] = [i for i, c in enumerate(candidates) if env in c]
        if not members[env]:
            raise ValueError(f"no episode of the dataset is one of {env} (its task strings: "
                             f"{sorted(set(episodes.tasks))}): {_TASK_MAP_HELP}")
        instructions[env] = Counter(episodes.tasks[i] for i in members[env]).most_common(1)[0][0]
    return TaskMatch(instructions, members, "dataset task strings (meta/tasks.parquet); environments: "
                     + ", ".join(sorted(how)))
