"""Closed loop in Meta-World: the dataset writer, intervals, lockstep rollouts (fake environment), and with the `sim`
extra installed a tiny end-to-end run (demonstrations -> training -> rollout in every mode)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_energy.data import DataConfig, build_datasets
from vla_energy.data.lerobot import load_lerobot_v3
from vla_energy.data.lerobot_writer import LeRobotV3Writer
from vla_energy.sim import paired_bootstrap_interval, wilson_interval
from vla_energy.sim.metaworld_env import observation_dict, require_metaworld, task_instruction
from vla_energy.sim.rollout import run_episodes, sim_settings, success_metrics


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


def test_sim_settings_come_from_the_runs_dataset(tmp_path: Path) -> None:
    (tmp_path / "ds" / "meta").mkdir(parents=True)
    meta = {"tasks": {"reach-wall-v3": {"instruction": "reach wall", "seeds": [0, 1]}}, "camera": "corner",
            "image_size": 64}
    (tmp_path / "ds" / "meta" / "metaworld.json").write_text(json.dumps(meta))
    run = {"DataConfig": {"dataset": str(tmp_path / "ds")}}
    s = sim_settings(run)
    assert s == {"tasks": {"reach-wall-v3": "reach wall"}, "camera": "corner", "image_size": 64,
                 "train_seeds": {"reach-wall-v3": [0, 1]}}
    s = sim_settings(run, tasks=["reach-v3"], image_size=32)
    assert s["tasks"] == {"reach-v3": "reach"} and s["image_size"] == 32 and s["train_seeds"] == {"reach-v3": []}
    with pytest.raises(ValueError, match="--tasks, --camera and --image_size"):
        sim_settings({"DataConfig": {"dataset": "synthetic"}})


class _FakeEnv:
    """Succeeds once the summed first action coordinate reaches the seed's threshold; counts its steps."""

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

    def select_action(self, observation, mode: str, seed: int, candidates: str = "gaussian"):
        assert candidates in ("gaussian", "retrieval")
        assert set(observation) == {"observation.images.corner", "observation.state", "task"}
        batch = len(observation["task"])
        assert observation["observation.images.corner"].shape == (batch, 8, 8, 3)
        self.batches.append(batch)
        return np.ones((batch, 4), np.float32)


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
    from vla_energy.evaluation import cli
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
    meta = write_demos(data, ["reach-v3", "reach-wall-v3"], episodes_per_task=2, image_size=32, progress=False)
    assert [len(m["seeds"]) for m in meta["tasks"].values()] == [2, 2]
    frames = load_lerobot_v3(data)
    assert set(frames["task"]) == {"reach", "reach wall"} and len(set(frames["episode_index"])) == 4
    assert np.asarray(frames[0]["observation.images.corner"]).shape == (32, 32, 3)
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
    assert "| overall |" in report
    # rerank and mean can take the training chunks the policy carries as candidates.
    nearest = rollout(run, tmp_path / "nearest", episodes=1, max_steps=2, modes=["policy", "mean"], progress=False,
                      candidates="retrieval")
    assert nearest["retrieval_candidates"] == 1.0 and 0.0 <= nearest["success/mean/overall"] <= 1.0
