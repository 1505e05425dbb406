"""Closed loop in Meta-World: the dataset writer, intervals, lockstep rollouts (fake environment), render conventions,
instructions and seed checks for datasets of any origin, expert routes, and with the `sim` extra installed a tiny
end-to-end run (demonstrations -> training -> rollout in every mode)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vla_energy.data import DataConfig, build_datasets
from vla_energy.data.lerobot import load_lerobot_v3
from vla_energy.data.lerobot_writer import LeRobotV3Writer
from vla_energy.evaluation.intervals import paired_bootstrap_interval, wilson_interval
from vla_energy.sim.dataset_tasks import (
    DatasetEpisodes,
    lerobot_metaworld_table,
    match_tasks,
    parse_task_map,
    read_episodes,
)
from vla_energy.sim.metaworld_env import (
    observation_dict,
    observation_state,
    orient_image,
    require_metaworld,
    task_instruction,
)
from vla_energy.sim.rollout import check_seeds, run_episodes, seed_check_plan, sim_settings, success_metrics
from vla_energy.sim.routes import MT10_TASKS, ROUTE_TASKS, RoutedExpert, draw_route, route_sides, via_point


def test_wilson_interval_known_values_and_edges() -> None:
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)  # not empty at 0 successes
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(30, 100)[1] - wilson_interval(30, 100)[0] < wilson_interval(3, 10)[1] - wilson_interval(3, 10)[0]
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_paired_bootstrap_interval() -> None:
    assert paired_bootstrap_interval([1, 0, 1], [1, 0, 1]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_interval([1, 1, 1, 1], [0, 0, 0, 0]) == (1.0, 1.0, 1.0)
    mean, low, high = paired_bootstrap_interval([1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1], seed=3)
    assert mean == pytest.approx(1 / 3) and 0.0 <= low < mean < high <= 1.0
    with pytest.raises(ValueError):
        paired_bootstrap_interval([], [])


def test_success_metrics_per_task_overall_and_paired_delta() -> None:
    records = [{"task": t, "mode": m, "seed": s, "success": ok, "steps": 10 if ok else 50}
               for t, m, s, ok in [("a", "policy", 0, True), ("a", "policy", 1, False), ("b", "policy", 0, False),
                                   ("b", "policy", 1, False), ("a", "rerank", 0, True), ("a", "rerank", 1, True),
                                   ("b", "rerank", 0, False), ("b", "rerank", 1, True)]]
    m = success_metrics(records, ["policy", "rerank"], ["a", "b"])
    assert m["success/policy/a"] == 0.5 and m["success/policy/b"] == 0.0 and m["success/policy/overall"] == 0.25
    assert m["success/rerank/overall"] == 0.75 and m["steps/rerank/a"] == 10.0 and m["steps/policy/overall"] == 40.0
    assert m["delta/rerank/overall"] == pytest.approx(0.5)
    assert "delta/policy/overall" not in m
    for key, value in m.items():
        if key.startswith("success/"):
            assert 0.0 <= value <= 1.0
            if not key.endswith(("/low", "/high")):
                assert m[key + "/low"] <= value <= m[key + "/high"]


def test_task_instruction() -> None:
    assert task_instruction("reach-wall-v3") == "reach wall"
    assert task_instruction("button-press-topdown-wall-v3") == "button press topdown wall"
    assert task_instruction("my-task") == "my task"


def _episode(rng: np.random.Generator, length: int, size: int = 8) -> tuple[dict, np.ndarray, np.ndarray]:
    images = {"corner": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8)}
    return images, rng.normal(size=(length, 39)).astype(np.float32), rng.uniform(-1, 1, (length, 4)).astype(np.float32)


def test_writer_round_trip_through_the_loader(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    episodes = [(*_episode(rng, n), task) for n, task in [(5, "reach wall"), (7, "plate slide"), (6, "reach wall"),
                                                         (4, "plate slide")]]
    with LeRobotV3Writer(tmp_path / "ds", ["corner"], (8, 8), state_dim=39, action_dim=4, episodes_per_file=3) as w:
        for images, state, action, task in episodes:
            w.add_episode(images, state, action, task)
    assert sorted(p.name for p in (tmp_path / "ds" / "data" / "chunk-000").iterdir()) == ["file-000.parquet",
                                                                                         "file-001.parquet"]
    frames = load_lerobot_v3(tmp_path / "ds")
    assert len(frames) == 22 and frames["episode_index"] == [e for e, n in enumerate([5, 7, 6, 4]) for _ in range(n)]
    row = frames[5 + 3]  # episode 1, frame 3
    assert row["task"] == "plate slide" and row["frame_index"] == 3
    np.testing.assert_array_equal(np.asarray(row["observation.images.corner"]), episodes[1][0]["corner"][3])  # lossless
    np.testing.assert_allclose(row["observation.state"], episodes[1][1][3])
    np.testing.assert_allclose(row["action"], episodes[1][2][3])
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["total_episodes"] == 4 and info["total_frames"] == 22 and info["total_tasks"] == 2
    obs = observation_dict(episodes[0][1][0], episodes[0][0]["corner"][0], "reach wall", "corner")
    assert set(obs) - {"task"} <= set(info["features"])  # the rollout's observation keys are the dataset's features
    train, val, stats = build_datasets(DataConfig(dataset=str(tmp_path / "ds"), horizon=4, use_state=True,
                                                  val_fraction=0.25), progress=False)
    assert len(train) + len(val) == 22 and len(stats.state.mean) == 39 and len(train[0]["actions"][0]) == 4


def test_writer_refuses_bad_episodes_and_a_used_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, state, action = _episode(rng, 3)
    w = LeRobotV3Writer(tmp_path / "ds", ["corner"], (8, 8), state_dim=39, action_dim=4)
    with pytest.raises(ValueError, match="state"):
        w.add_episode(images, state[:, :5], action, "t")
    with pytest.raises(ValueError, match="cameras"):
        w.add_episode({"top": images["corner"]}, state, action, "t")
    with pytest.raises(ValueError, match="frames have shape"):
        w.add_episode({"corner": images["corner"][:, :4]}, state, action, "t")
    w.add_episode(images, state, action, "t")
    w.close()
    with pytest.raises(FileExistsError):
        LeRobotV3Writer(tmp_path / "ds", ["corner"], (8, 8), state_dim=39, action_dim=4)


def test_writer_puts_a_dataset_in_place_only_when_complete(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, state, action = _episode(rng, 3)
    root = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="rendering failed"):
        with LeRobotV3Writer(root, ["corner"], (8, 8), state_dim=39, action_dim=4) as w:
            w.add_episode(images, state, action, "t")
            assert not root.exists() and w.partial.is_dir()  # written beside, under a name no loader takes
            raise RuntimeError("rendering failed")
    assert not root.exists() and not w.partial.exists()  # nothing left that looks like a dataset
    with pytest.raises(RuntimeError, match="closed or aborted"):
        w.add_episode(images, state, action, "t")
    # A writer killed before close leaves only its partial directory; the next one replaces it.
    killed = LeRobotV3Writer(root, ["corner"], (8, 8), state_dim=39, action_dim=4)
    killed.add_episode(images, state, action, "t")
    root.mkdir()  # an empty directory is a valid target
    with LeRobotV3Writer(root, ["corner"], (8, 8), state_dim=39, action_dim=4) as w:
        w.add_episode(images, state, action, "t")
        w.add_meta_file("extra.json", {"a": 1})
    assert json.loads((root / "meta" / "info.json").read_text())["total_episodes"] == 1
    assert json.loads((root / "meta" / "extra.json").read_text()) == {"a": 1} and not w.partial.exists()
    assert len(load_lerobot_v3(root)) == 3


def test_sim_demos_without_the_extra_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_energy import cli

    monkeypatch.setitem(sys.modules, "metaworld", None)
    out = tmp_path / "mw"
    with pytest.raises(ImportError, match=r"vla_energy\[sim\]"):
        cli.main(["sim-demos", "--tasks", "reach-wall-v3", "--out", str(out), "--disable_tqdm"])
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="episodes_per_task=0"):
        cli.main(["sim-demos", "--tasks", "reach-wall-v3", "--out", str(out), "--episodes_per_task", "0"])
    with pytest.raises(ValueError, match="routes=0"):
        cli.main(["sim-demos", "--tasks", "reach-wall-v3", "--out", str(out), "--routes", "0"])
    with pytest.raises(ValueError, match="route_offset=-0.1"):
        cli.main(["sim-demos", "--tasks", "reach-wall-v3", "--out", str(out), "--routes", "2", "--route_offset", "-0.1"])
    assert list(tmp_path.iterdir()) == []


def test_route_tasks_are_outside_mt10() -> None:
    assert len(MT10_TASKS) == 10 and not set(ROUTE_TASKS) & set(MT10_TASKS)


def test_routes_are_drawn_per_episode_seed() -> None:
    np.testing.assert_array_equal(route_sides(1), [0.0])
    np.testing.assert_array_equal(route_sides(2), [-1.0, 1.0])
    np.testing.assert_array_equal(route_sides(3), [-1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="routes=0"):
        route_sides(0)
    drawn = [draw_route(seed, 2, "reach-wall-v3") for seed in range(200)]
    assert drawn == [draw_route(seed, 2, "reach-wall-v3") for seed in range(200)]  # the same episode, the same route
    assert 70 < sum(drawn) < 130  # both routes, about equally often
    other = [draw_route(seed, 2, "plate-slide-v3") for seed in range(200)]
    assert 70 < sum(a == b for a, b in zip(drawn, other)) < 130  # tasks with the same seeds draw independently
    assert {draw_route(seed, 3) for seed in range(50)} == {0, 1, 2} and draw_route(5, 1) == 0


def test_via_point_lies_halfway_beside_the_straight_path() -> None:
    hand, goal = np.array([0.0, 0.6, 0.2]), np.array([0.0, 0.9, 0.05])
    left, right = via_point(hand, goal, -1.0, 0.2), via_point(hand, goal, 1.0, 0.2)
    np.testing.assert_allclose(left, [0.2, 0.75, 0.2])  # moving along +y, counter-clockwise is -x
    np.testing.assert_allclose(right, [-0.2, 0.75, 0.2])
    np.testing.assert_allclose(via_point(hand, goal, 0.0, 0.2), [0.0, 0.75, 0.2])
    diagonal = via_point(np.zeros(3), np.array([1.0, 1.0, 0.0]), 1.0, 0.5)
    assert np.dot(diagonal[:2] - [0.5, 0.5], [1.0, 1.0]) == pytest.approx(0.0)  # at right angles to the path
    assert np.linalg.norm(diagonal[:2] - [0.5, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="above the goal"):
        via_point(hand, hand + [0, 0, -0.1], 1.0, 0.2)


class _ReachExpert:
    """Meta-World's reach expert in miniature: proportional to the goal (the last 3 state entries), gripper -1."""

    def get_action(self, state: np.ndarray) -> np.ndarray:
        return np.concatenate([5.0 * (state[-3:] - state[:3]), [-1.0]]).astype(np.float32)


def _point_mass(policy, hand: np.ndarray, goal: np.ndarray, steps: int = 150) -> np.ndarray:
    """Hand positions of a point mass moved by 1/100 of each action clipped to [-1, 1] (as Meta-World does)."""
    path = [hand.copy()]
    for _ in range(steps):
        action = policy.get_action(np.concatenate([hand, np.zeros(33), goal]))
        assert action.shape == (4,) and action[3] == -1.0
        hand = hand + np.clip(action[:3], -1, 1) / 100
        path.append(hand.copy())
    return np.stack(path)


def test_routed_expert_passes_its_via_point_then_follows_the_expert() -> None:
    hand, goal = np.array([0.0, 0.6, 0.2]), np.array([0.05, 0.9, 0.05])
    paths = {}
    for side in (-1.0, 0.0, 1.0):
        expert = RoutedExpert(_ReachExpert(), side, offset=0.2)
        paths[side] = _point_mass(expert, hand, goal)
        assert np.abs([expert.get_action(np.r_[hand, np.zeros(33), goal])]).max() <= 1.0  # clipped actions
        assert np.linalg.norm(paths[side][-1] - goal) < 0.01  # every route reaches the goal
        if side:
            assert np.linalg.norm(paths[side] - expert.via, axis=1).min() < expert.radius
    straight = _point_mass(_ReachExpert(), hand, goal)
    np.testing.assert_allclose(paths[0.0], straight)  # the middle route is the expert's own
    # The two routes leave the straight path on opposite sides (x), by about the offset.
    assert paths[1.0][:, 0].min() < -0.15 and paths[-1.0][:, 0].max() > 0.2
    expert = RoutedExpert(_ReachExpert(), 1.0, offset=0.2)
    _point_mass(expert, hand, goal, steps=5)
    expert.reset()  # a new episode draws its via-point from its own first state
    assert expert.via is None and not expert.reached


def test_sim_settings_come_from_the_runs_dataset(tmp_path: Path) -> None:
    (tmp_path / "ds" / "meta").mkdir(parents=True)
    meta = {"tasks": {"reach-wall-v3": {"instruction": "reach wall", "seeds": [0, 1]}}, "camera": "corner",
            "image_size": 64}  # a sim-demos dataset that does not name its render convention: vla_energy
    (tmp_path / "ds" / "meta" / "metaworld.json").write_text(json.dumps(meta))
    run = {"DataConfig": {"dataset": str(tmp_path / "ds")}}
    s = sim_settings(run)
    assert s["tasks"] == {"reach-wall-v3": "reach wall"} and s["train_seeds"] == {"reach-wall-v3": [0, 1]}
    assert (s["render_convention"], s["camera"], s["image_size"], s["image_key"]) == (
        "vla_energy", "corner", 64, "observation.images.corner")
    assert "meta/metaworld.json" in s["render_convention_from"] and "meta/metaworld.json" in s["instructions_from"]
    s = sim_settings(run, image_size=32, render_convention="lerobot")
    assert s["image_size"] == 32 and s["render_convention"] == "lerobot" and s["camera"] == "corner"
    assert s["render_convention_from"] == "--render_convention"
    # A task the dataset does not have gets no instruction made up from its name.
    with pytest.raises(ValueError, match="not tasks of the run's dataset.*--task_map"):
        sim_settings(run, tasks=["reach-v3"])
    s = sim_settings(run, tasks=["reach-v3"], task_map={"reach-v3": "reach the goal"})
    assert s["tasks"] == {"reach-v3": "reach the goal"} and s["train_seeds"] == {"reach-v3": []}
    with pytest.raises(ValueError, match="--render_convention, --task_map and --image_size"):
        sim_settings({"DataConfig": {"dataset": "synthetic"}})


def test_orient_image_follows_the_render_convention() -> None:
    image = np.arange(2 * 3).reshape(2, 3, 1).repeat(3, axis=2).astype(np.uint8)  # rows and columns differ
    np.testing.assert_array_equal(orient_image(image, "vla_energy", "corner"), image[::-1])
    np.testing.assert_array_equal(orient_image(image, "lerobot", "corner2"), image[::-1, ::-1])  # turned 180 degrees
    np.testing.assert_array_equal(orient_image(image, "lerobot", "corner2"), np.rot90(image, 2))
    np.testing.assert_array_equal(orient_image(image, "lerobot", "corner"), image)  # LeRobot turns only corner2
    batch = np.stack([image, image + 1])
    np.testing.assert_array_equal(orient_image(batch, "lerobot", "corner2")[1], np.rot90(image + 1, 2))
    # The two conventions differ by a horizontal mirror on corner2: what a policy sees under the wrong one.
    np.testing.assert_array_equal(orient_image(image, "vla_energy", "corner2")[:, ::-1],
                                  orient_image(image, "lerobot", "corner2"))
    with pytest.raises(ValueError, match="render convention 'mujoco'"):
        orient_image(image, "mujoco", "corner")
    with pytest.raises(ValueError, match=r"expected \(\.\.\., H, W, 3\)"):
        orient_image(image[..., 0], "lerobot", "corner2")


def test_observation_state_is_the_datasets_layout() -> None:
    obs = np.arange(2 * 39, dtype=np.float32).reshape(2, 39)
    np.testing.assert_array_equal(observation_state(obs, 39), obs)
    np.testing.assert_array_equal(observation_state(obs[0], 4), obs[0, :4])  # LeRobot's agent_pos
    with pytest.raises(ValueError, match="7 dims"):
        observation_state(obs, 7)
    with pytest.raises(ValueError, match="expected \\(\\.\\.\\., 39\\)"):
        observation_state(obs[:, :10], 4)


def _foreign_dataset(root: Path, tasks: list[str], task_ids: list[int] | None = None, state_dim: int = 39,
                     size: int = 8, key: str = "corner2") -> np.ndarray:
    """A LeRobot v3 dataset as another recorder writes it: its own task strings, no meta/metaworld.json; episode e
    (of tasks[e]) starts in state e (objects and goal at e/100). Returns the first states [E, 39]."""
    rng = np.random.default_rng(0)
    first = np.zeros((len(tasks), 39), np.float32)
    with LeRobotV3Writer(root, [key], (size, size), state_dim=state_dim, action_dim=4) as w:
        for e, task in enumerate(tasks):
            first[e, 4:18], first[e, 36:39] = (e + 1) / 100, (e + 1) / 50
            state = np.repeat(first[e:e + 1], 3, axis=0)[:, :state_dim]
            w.add_episode({key: rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)}, state,
                          rng.uniform(-1, 1, (3, 4)), task)
    if task_ids is not None:  # LeRobot's Meta-World datasets carry a task_id column
        for f in (root / "data").glob("chunk-*/file-*.parquet"):
            table = pq.read_table(f)
            ids = [task_ids[int(e)] for e in table.column("episode_index").to_pylist()]
            pq.write_table(table.append_column("task_id", pa.array(ids, pa.int16())), f)
    return first


ENVS = ["reach-v3", "reach-wall-v3", "push-v3", "push-back-v3", "plate-slide-v3"]
TABLE = {"TASK_DESCRIPTIONS": {"reach-v3": "Reach a goal position", "reach-wall-v3": "Bypass a wall and reach a goal",
                               "push-v3": "Push the puck to a goal", "push-back-v3": "Push the puck to a goal"},
         "TASK_NAME_TO_ID": {"reach-v3": 40, "reach-wall-v3": 41, "push-back-v3": 37, "push-v3": 38}}


def test_instructions_are_the_datasets_task_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tasks = ["Reach a goal position", "Bypass a wall and reach a goal", "reach a goal position!", "Reach a goal position"]
    _foreign_dataset(tmp_path / "ds", tasks)
    episodes = read_episodes(tmp_path / "ds")
    assert episodes.tasks == tasks and episodes.task_ids is None and episodes.first_states.shape == (4, 39)
    # Without a table that names them, the strings name no environment: the error says what to pass.
    with pytest.raises(ValueError, match="name no Meta-World environment.*lerobot.*not installed.*--task_map"):
        match_tasks(episodes, ENVS)
    # LeRobot's table, found in an installed lerobot package (read as a file, never imported).
    package = tmp_path / "site" / "lerobot"
    (package / "envs").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('lerobot must not be imported')\n")
    (package / "envs" / "metaworld_config.json").write_text(json.dumps(TABLE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    table = lerobot_metaworld_table()
    assert table == TABLE
    with pytest.raises(ValueError, match=r"\['reach a goal position!'\] name no Meta-World environment"):
        match_tasks(episodes, ENVS, table=table)
    m = match_tasks(episodes, ENVS, table=table, wanted=["reach-v3", "reach-wall-v3"])
    assert m.instructions == {"reach-v3": "Reach a goal position", "reach-wall-v3": "Bypass a wall and reach a goal"}
    assert m.episodes == {"reach-v3": [0, 3], "reach-wall-v3": [1]} and "LeRobot's Meta-World task descriptions" in m.source
    with pytest.raises(ValueError, match="no episode of the dataset is one of push-v3.*--task_map"):
        match_tasks(episodes, ENVS, table=table, wanted=["push-v3"])
    # An explicit map wins, names its source, and its strings select the episodes.
    m = match_tasks(episodes, ENVS, task_map={"reach-v3": "reach a goal position!"}, table=table)
    assert m.instructions == {"reach-v3": "reach a goal position!"} and m.episodes == {"reach-v3": [2]}
    assert m.source == "--task_map"
    m = match_tasks(episodes, ENVS, task_map={"reach-v3": "reach", "reach-wall-v3": "Bypass a wall and reach a goal"})
    assert m.episodes == {"reach-v3": [], "reach-wall-v3": [1]}
    assert m.source == "--task_map (instructions of ['reach-v3'] are no task string of the dataset)"
    # Strings that name their environment need no table.
    named = DatasetEpisodes(["reach-v3", "metaworld-plate-slide-v3", "reach wall"])
    assert match_tasks(named, ENVS).instructions == {"plate-slide-v3": "metaworld-plate-slide-v3",
                                                     "reach-v3": "reach-v3", "reach-wall-v3": "reach wall"}


def test_lerobot_task_ids_tell_apart_tasks_with_one_description(tmp_path: Path) -> None:
    tasks = ["Push the puck to a goal"] * 2
    _foreign_dataset(tmp_path / "ds", tasks, task_ids=[38, 37])
    episodes = read_episodes(tmp_path / "ds")
    assert episodes.task_ids == [38, 37]
    m = match_tasks(episodes, ENVS, table=TABLE)
    assert m.episodes == {"push-back-v3": [1], "push-v3": [0]} and "task_id" in m.source
    # Without the ids the description fits both: the error names them and the options that resolve it.
    with pytest.raises(ValueError, match="fits push-v3 and push-back-v3.*--task_map.*--tasks"):
        match_tasks(DatasetEpisodes(tasks), ENVS, table=TABLE)
    m = match_tasks(DatasetEpisodes(tasks), ENVS, table=TABLE, wanted=["push-v3"])
    assert m.instructions == {"push-v3": "Push the puck to a goal"} and m.episodes == {"push-v3": [0, 1]}


def test_parse_task_map(tmp_path: Path) -> None:
    assert parse_task_map("reach-v3=Reach a goal position; push-v3 = Push it=there") == {
        "reach-v3": "Reach a goal position", "push-v3": "Push it=there"}
    (tmp_path / "map.json").write_text(json.dumps({"reach-v3": "Reach"}))
    assert parse_task_map(str(tmp_path / "map.json")) == {"reach-v3": "Reach"}
    for bad in ["reach-v3", "=x", ";"]:
        with pytest.raises(ValueError, match="task_map"):
            parse_task_map(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        parse_task_map(str(tmp_path / "missing.json"))


def test_foreign_dataset_settings_default_to_lerobots_rendering(tmp_path: Path) -> None:
    first = _foreign_dataset(tmp_path / "ds", ["reach-v3", "reach-wall-v3"], size=16)
    run = {"DataConfig": {"dataset": str(tmp_path / "ds"), "use_state": True}}
    s = sim_settings(run, env_names=ENVS)
    assert (s["render_convention"], s["camera"], s["image_size"], s["image_key"], s["state_dim"]) == (
        "lerobot", "corner2", 16, "observation.images.corner2", 39)
    assert "without meta/metaworld.json" in s["render_convention_from"] and "name the environments" in s["instructions_from"]
    assert s["tasks"] == {"reach-v3": "reach-v3", "reach-wall-v3": "reach-wall-v3"} and s["train_seeds"] is None
    np.testing.assert_array_equal(s["first_states"]["reach-wall-v3"], first[1:2])
    assert seed_check_plan(s) == "initial_states"
    assert sim_settings(run, render_convention="vla_energy", env_names=ENVS)["camera"] == "corner2"  # the key's camera
    # LeRobot's layout: one observation.image (CHW in meta/info.json) and the 4-d agent_pos as the state.
    _foreign_dataset(tmp_path / "lr", ["reach-v3"], state_dim=4, key="image")
    info_path = tmp_path / "lr" / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["features"] = {("observation.image" if k == "observation.images.image" else k): v
                        for k, v in info["features"].items()}
    info["features"]["observation.image"].update(shape=[3, 8, 8], names=["channels", "height", "width"])
    info_path.write_text(json.dumps(info))
    s = sim_settings({"DataConfig": {"dataset": str(tmp_path / "lr"), "use_state": True}}, env_names=ENVS)
    assert (s["camera"], s["image_size"], s["image_key"], s["state_dim"], s["first_states"]) == (
        "corner2", 8, "observation.image", 4, None)
    with pytest.raises(ValueError, match="--allow_unchecked_seeds"):
        seed_check_plan(s)
    assert seed_check_plan(s, allow_unchecked=True) == "unchecked"
    assert check_seeds(s, [1000], "unchecked").startswith("NOT checked")


def test_seed_check_by_initial_states() -> None:
    demos = np.zeros((2, 39), np.float32)
    demos[:, 4:7] = [[0.1, 0.6, 0.0], [0.2, 0.7, 0.0]]  # the goal is hidden (zeros) in this dataset
    settings = {"train_seeds": None, "first_states": {"reach-v3": demos}, "dataset": "d"}

    def initial_states(task: str, seeds: list[int]) -> np.ndarray:
        states = np.zeros((len(seeds), 39), np.float32)
        states[:, 4:7] = [[0.1 * (s - 998), 0.6 + 0.1 * (s - 999), 0.0] for s in seeds]
        states[:, 36:39] = 0.5  # our environment shows the goal: not compared where the dataset hid it
        return states

    assert "no rollout episode starts where one does" in check_seeds(settings, [1001, 1002], "initial_states",
                                                                     initial_states)
    with pytest.raises(ValueError, match=r"rollout seeds \[999, 1000\] start where demonstrations"):
        check_seeds(settings, [999, 1000, 1001], "initial_states", initial_states)
    fixed = {"train_seeds": None, "first_states": {"reach-v3": demos[:1]}, "dataset": "d"}
    with pytest.raises(ValueError, match="do not vary where a seed does.*--allow_unchecked_seeds"):
        check_seeds(fixed, [999], "initial_states", lambda t, s: np.repeat(demos[:1], len(s), axis=0))
    with pytest.raises(ValueError, match=r"seeds \[1\] are demonstration episodes"):
        check_seeds({"train_seeds": {"reach-v3": [0, 1]}}, [1, 2], "seeds")


def _stub_run(root: Path, dataset: Path) -> Path:
    """A run directory as far as the rollout reads it before loading the model: model/ with the run's options."""
    (root / "model").mkdir(parents=True)
    (root / "model" / "policy_config.json").write_text("{}")
    (root / "model" / "run_config.json").write_text(json.dumps({"DataConfig": {"dataset": str(dataset)}}))
    return root


def test_rollout_refuses_to_run_without_a_seed_check(tmp_path: Path) -> None:
    from vla_energy.sim import rollout

    _foreign_dataset(tmp_path / "ds", ["Reach a goal position"], state_dim=4)
    run = _stub_run(tmp_path / "run", tmp_path / "ds")
    with pytest.raises(ValueError, match="neither its episodes' seeds.*nor their 39-d initial states.*"
                                         "--allow_unchecked_seeds"):
        rollout.main([str(run), "--task_map", "reach-v3=Reach a goal position", "--disable_tqdm"])
    with pytest.raises(ValueError, match="--task_map item 'reach-v3'"):
        rollout.main([str(run), "--task_map", "reach-v3", "--disable_tqdm"])
    with pytest.raises(SystemExit):
        rollout.main([str(run), "--render_convention", "mujoco"])


class _FakeEnv:
    """Succeeds once the summed first action coordinate reaches the seed's threshold; counts its steps."""

    camera_name = "corner"

    def __init__(self) -> None:
        self.steps, self.total, self.threshold = 0, 0.0, 0.0

    def seed(self, seed: int) -> None:
        self.threshold = float(seed)

    def reset(self):
        self.steps, self.total = 0, 0.0
        return np.zeros(39), {}

    def step(self, action):
        self.steps += 1
        self.total += float(action[0])
        return np.full(39, self.total), 0.0, False, False, {"success": float(self.total >= self.threshold)}

    def render(self):
        return np.full((8, 8, 3), self.steps, np.uint8)


class _FakePolicy:
    """Action 1.0 on every coordinate; records the batch sizes it was asked for."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    n_action_steps = 1

    def predict_action_chunk(self, observation, mode: str, seed: int, candidates: str = "gaussian",
                             return_energy: bool = False):
        assert candidates in ("gaussian", "retrieval") and return_energy
        assert set(observation) == {"observation.images.corner", "observation.state", "task"}
        batch = len(observation["task"])
        assert observation["observation.images.corner"].shape == (batch, 8, 8, 3)
        self.batches.append(batch)
        return np.ones((batch, 1, 4), np.float32), np.zeros(batch)


def test_lockstep_episodes_stop_at_success_and_record_the_first() -> None:
    envs, policy = [_FakeEnv() for _ in range(3)], _FakePolicy()
    results, frames = run_episodes(envs, policy, "go", "corner", seeds=[2, 4, 100], mode="policy", max_steps=6,
                                   record=True)
    assert results == [(True, 2), (True, 4), (False, 6)]
    assert [e.steps for e in envs] == [2, 4, 6]  # a finished episode is not stepped again
    assert policy.resets == 1 and policy.batches == [3] * 6
    assert [int(f[0, 0, 0]) for f in frames] == [0, 1, 2]  # the first episode's frames up to its success
    with pytest.raises(ValueError, match="one each"):
        run_episodes(envs, policy, "go", "corner", seeds=[1], mode="policy", max_steps=2)


def test_cli_parses_the_sim_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    from vla_energy import cli
    from vla_energy.sim import demos, rollout

    seen = {}
    monkeypatch.setattr(demos, "write_demos", lambda *a, **k: seen.setdefault("demos", a) and {"tasks": {}})
    monkeypatch.setattr(rollout, "rollout", lambda *a, **k: seen.setdefault("rollout", a) and {})
    assert cli.main(["sim-demos", "--tasks", "reach-v3, plate-slide-v3", "--out", "x", "--episodes_per_task", "3"]) == 0
    assert seen["demos"][:3] == ("x", ["reach-v3", "plate-slide-v3"], 3)
    assert cli.main(["rollout", "runs/a", "--episodes", "4", "--modes", "policy,rerank"]) == 0
    assert seen["rollout"][:5] == ("runs/a", None, None, 4, ["policy", "rerank"])


def test_missing_metaworld_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "metaworld", None)
    with pytest.raises(ImportError, match=r"vla_energy\[sim\].*libosmesa6"):
        require_metaworld()


def _sim_unavailable() -> str | None:
    """Why the Meta-World test cannot run here, or None."""
    try:
        from vla_energy.sim.metaworld_env import make_env, render

        env = make_env("reach-v3", image_size=8)
        render(env)
        env.close()
    except Exception as e:  # ImportError without the extra; GL errors without a rendering backend
        return (f"needs pip install 'vla_energy[sim]' and an offscreen GL backend (libosmesa6 with MUJOCO_GL=osmesa): "
                f"{type(e).__name__}: {str(e)[:200]}")
    return None


def test_demos_train_and_rollout_in_every_mode(tmp_path: Path) -> None:
    reason = _sim_unavailable()
    if reason:
        pytest.skip(reason)
    from vla_energy.sim.demos import write_demos
    from vla_energy.sim.metaworld_env import make_env, reset_env
    from vla_energy.sim.rollout import MODES, rollout
    from vla_energy.training.train import main as train_main

    env = make_env("reach-v3", image_size=8)
    first, again, other = reset_env(env, 7), reset_env(env, 7), reset_env(env, 8)
    np.testing.assert_array_equal(first, again)  # an episode's initial state is its seed's
    assert not np.allclose(first[-3:], other[-3:])  # another seed, another goal
    data = tmp_path / "mw"
    meta = write_demos(data, ["reach-v3", "reach-wall-v3"], episodes_per_task=2, image_size=32, progress=False,
                       render_convention="lerobot")
    assert [len(m["seeds"]) for m in meta["tasks"].values()] == [2, 2] and meta["render_convention"] == "lerobot"
    assert meta["camera"] == "corner2" and json.loads((data / "meta" / "metaworld.json").read_text()) == meta
    frames = load_lerobot_v3(data)
    assert set(frames["task"]) == {"reach", "reach wall"} and len(set(frames["episode_index"])) == 4
    assert np.asarray(frames[0]["observation.images.corner2"]).shape == (32, 32, 3)
    train_main(["--config", "demo", "--dataset", str(data), "--use_state", "true", "--per_device_train_batch_size", "4",
                "--max_steps", "2", "--eval_steps", "0", "--eval_max_samples", "8", "--eval_num_negatives", "3",
                "--val_fraction", "0.5", "--lora_r", "4", "--energy_hidden_dim", "16", "--action_head_dim", "16",
                "--report_to", "none", "--disable_tqdm", "--output_dir", str(tmp_path / "runs"), "--run_name", "mw"])
    run = tmp_path / "runs" / "mw"
    with pytest.raises(ValueError, match="demonstration episodes"):
        rollout(run, seed=0, episodes=1, max_steps=2, progress=False)
    metrics = rollout(run, tmp_path / "report", episodes=2, max_steps=4, n_action_steps=2, progress=False)
    for mode in MODES:
        for name in ["reach-v3", "reach-wall-v3", "overall"]:
            assert 0.0 <= metrics[f"success/{mode}/{name}/low"] <= metrics[f"success/{mode}/{name}"] <= 1.0
            assert 1.0 <= metrics[f"steps/{mode}/{name}"] <= 4.0
        assert metrics[f"seconds/{mode}"] > 0
    assert -1.0 <= metrics["delta/rerank/overall"] <= 1.0 and "delta/refine/overall/high" in metrics
    out = tmp_path / "report"
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert len(json.loads((out / "episodes.json").read_text())) == 2 * 2 * len(MODES)
    report = (out / "report.md").read_text()
    for task in ["reach-v3", "reach-wall-v3"]:
        for mode in MODES:
            gif = out / "gifs" / f"{task}_{mode}.gif"
            assert gif.read_bytes()[:6] == b"GIF89a" and f"gifs/{task}_{mode}.gif" in report
    assert "| overall |" in report and "`lerobot` convention" in report and "meta/metaworld.json" in report
    assert metrics["convention/render"] == "lerobot" and metrics["convention/camera"] == "corner2"
    assert "seeds (meta/metaworld.json)" in metrics["seed_check"] and metrics["seeds_checked"] == 1.0
    # The same dataset as a foreign one: no meta/metaworld.json. LeRobot's rendering is the default, the task strings
    # name the environments in words, and the seeds are checked against the demonstrations' initial states.
    (data / "meta" / "metaworld.json").unlink()
    with pytest.raises(ValueError, match=r"reach-v3: rollout seeds \[0, 1\] start where demonstrations"):
        rollout(run, seed=0, episodes=2, max_steps=2, progress=False)
    foreign = rollout(run, tmp_path / "foreign", episodes=1, max_steps=2, modes=["policy"], progress=False)
    assert foreign["convention/render"] == "lerobot" and "without meta/metaworld.json" in foreign["convention/render_from"]
    assert "initial states" in foreign["seed_check"] and "name the environments" in foreign["convention/instructions"]
    assert json.loads((tmp_path / "foreign" / "settings.json").read_text())["tasks"] == {
        "reach-v3": "reach", "reach-wall-v3": "reach wall"}
    # rerank and mean can take the training chunks the policy carries as candidates.
    nearest = rollout(run, tmp_path / "nearest", episodes=1, max_steps=2, modes=["policy", "mean"], progress=False,
                      candidates="retrieval")
    assert nearest["candidates"] == "retrieval" and 0.0 <= nearest["success/mean/overall"] <= 1.0


def test_lerobot_convention_renders_as_lerobots_env() -> None:
    reason = _sim_unavailable()
    if reason:
        pytest.skip(reason)
    import mujoco

    from vla_energy.sim.metaworld_env import make_env, render, reset_env

    env = make_env("reach-wall-v3", image_size=24, convention="lerobot")
    assert env.camera_name == "corner2"
    corner2 = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, "corner2")
    np.testing.assert_allclose(env.model.cam_pos[corner2], [0.75, 0.075, 0.7])  # LeRobot's placement
    reset_env(env, 3)
    raw = np.asarray(env.render())
    np.testing.assert_array_equal(render(env, "lerobot"), raw[::-1, ::-1])
    ours = make_env("reach-wall-v3", "corner2", image_size=24)  # Meta-World's placement, flipped vertically
    reset_env(ours, 3)
    assert not np.array_equal(render(ours, "vla_energy"), render(env, "lerobot"))
    env.close()
    ours.close()


def test_demos_with_two_routes_record_them_and_leave_on_either_side(tmp_path: Path) -> None:
    reason = _sim_unavailable()
    if reason:
        pytest.skip(reason)
    from vla_energy.sim.demos import main as demos_main

    first = next(s for s in range(100)
                 if [draw_route(s, 2, "reach-wall-v3"), draw_route(s + 1, 2, "reach-wall-v3")] == [0, 1])
    out = tmp_path / "routes"
    assert demos_main(["--tasks", "reach-wall-v3", "--episodes_per_task", "2", "--out", str(out), "--routes", "2",
                       "--seed", str(first), "--image_size", "8", "--disable_tqdm"]) == 0
    meta = json.loads((out / "meta" / "metaworld.json").read_text())
    assert meta["routes"] == {"count": 2, "offset": 0.2, "sides": [-1.0, 1.0]}
    task = meta["tasks"]["reach-wall-v3"]
    assert task["seeds"] == [first, first + 1] and task["routes"] == [0, 1]  # the expert succeeded on both routes
    assert [e["route"] for e in meta["episodes"]] == task["routes"] and [e["episode_index"] for e in meta["episodes"]] == [0, 1]
    frames = load_lerobot_v3(out)
    hand = np.asarray(frames["observation.state"])[:, :3]
    episode = np.asarray(frames["episode_index"])
    start = hand[episode == 0][0]
    # Sideways extent of each episode's path (x: the straight path runs along +y), by route.
    sideways = [hand[episode == e][:, 0] - start[0] for e in (0, 1)]
    assert sideways[0].max() > 0.1 and sideways[1].min() < -0.1  # route 0 (side -1) passes at +x, route 1 at -x
