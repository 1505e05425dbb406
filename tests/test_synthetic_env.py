"""The synthetic task in closed loop: the environment replays the dataset's episodes, closed-loop episodes are not
training episodes, the multimodal demonstrations, and `vla-energy rollout` end to end on a tiny trained run."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vla_energy.data import DataConfig, build_datasets, make_synthetic_dataset
from vla_energy.data.synthetic import GRIP_RADIUS, PALETTE
from vla_energy.sim.rollout import (
    MODES,
    SHIFTS,
    UNRELATED_INSTRUCTION,
    failure_metrics,
    run_batch,
    shift_metrics,
    shift_observation,
    suite_for,
)
from vla_energy.sim.synthetic_env import (
    DEFAULT_MAX_STEPS,
    SyntheticEnv,
    check_not_training,
    synthetic_config,
    synthetic_suite,
)

SMALL = {"num_episodes": 6, "image_size": 32, "min_episode_length": 10, "max_episode_length": 20}


def _config(**kw) -> DataConfig:
    return DataConfig(**{"num_episodes": SMALL["num_episodes"], "image_size": SMALL["image_size"],
                         "min_episode_length": SMALL["min_episode_length"],
                         "max_episode_length": SMALL["max_episode_length"], **kw})


@pytest.mark.parametrize("view,targets,modes", [("top_down", 3, "none"), ("wrist", 1, "targets")])
def test_expert_rollouts_of_the_env_reproduce_the_dataset_and_succeed(view: str, targets: int, modes: str) -> None:
    ds = make_synthetic_dataset(**SMALL, num_targets=targets, view=view, modes=modes, use_cache=False)
    cfg = _config(num_targets=targets, synthetic_view=view, synthetic_modes=modes)
    episodes = list(range(SMALL["num_episodes"]))
    env = SyntheticEnv(cfg, len(episodes), stream="train")
    obs = env.reset(episodes)
    frames = {e: ds.filter(lambda r, e=e: r["episode_index"] == e) for e in episodes}
    steps = [None] * len(episodes)
    for t in range(DEFAULT_MAX_STEPS):
        actions = env.expert_actions()
        for i, e in enumerate(episodes):
            if t < len(frames[e]) and steps[i] is None:  # the dataset's frame t: same pixels, state, task, action
                row = frames[e][t]
                np.testing.assert_array_equal(obs[f"observation.images.{view}"][i], np.asarray(row["image"]))
                np.testing.assert_allclose(obs["observation.state"][i], row["state"], atol=1e-7)
                np.testing.assert_allclose(actions[i], row["action"], atol=1e-7)
                assert obs["task"][i] == row["instruction"]
        obs, success = env.step(actions, np.array([s is None for s in steps]))
        steps = [t + 1 if s is None and ok else s for s, ok in zip(steps, success)]
    assert all(s is not None for s in steps), steps  # the expert reaches a valid target within the step budget
    assert set(obs) == {f"observation.images.{view}", "observation.state", "task"}


def test_closed_loop_episodes_are_not_training_episodes() -> None:
    cfg = _config(num_targets=3)
    check_not_training(cfg, range(200))  # the rollout stream, even at the dataset's episode numbers
    with pytest.raises(ValueError, match=r"episodes \{0: 0, 5: 5\} .*'train' stream are episodes of the training"):
        check_not_training(cfg, [0, 5, 100], stream="train")
    run = {"DataConfig": {"dataset": "synthetic", **SMALL, "num_targets": 3}}
    synthetic_suite(run).check_seeds([0, 1, 2])
    with pytest.raises(ValueError, match="training data"):
        synthetic_suite(run, stream="train").check_seeds([1])
    # The same episode number starts another scene in each stream.
    a, b = SyntheticEnv(cfg, 3), SyntheticEnv(cfg, 3, stream="train")
    a.reset([0, 1, 2])
    b.reset([0, 1, 2])
    assert not np.allclose(a.agents, b.agents)


def test_runs_pick_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    run = {"DataConfig": {"dataset": "synthetic", "synthetic_view": "wrist", "num_targets": 1}}
    suite = suite_for(run)
    assert suite.title == "the synthetic task" and suite.tasks == ["synthetic"]
    assert suite.default_max_steps == DEFAULT_MAX_STEPS
    assert synthetic_config(run).synthetic_view == "wrist"
    with pytest.raises(ValueError, match="--camera, --image_size: the run was trained on the synthetic dataset"):
        suite_for(run, camera="corner", image_size=64)
    with pytest.raises(ValueError, match="not 'synthetic'"):
        synthetic_config({"DataConfig": {"dataset": "data/mw"}})
    monkeypatch.setitem(sys.modules, "metaworld", None)  # any other dataset is a Meta-World run
    with pytest.raises(ValueError, match="'data/mw' is not a LeRobot dataset found from here"):
        suite_for({"DataConfig": {"dataset": "data/mw"}})  # how it recorded Meta-World is read first
    settings = {"DataConfig": {"dataset": "data/mw"}}
    with pytest.raises(ImportError, match=r"vla_energy\[sim\]"):
        suite_for(settings, image_size=64, render_convention="lerobot", task_map={"reach-v3": "reach"},
                  allow_unchecked_seeds=True)


def test_default_synthetic_data_is_unchanged_by_the_modes_option(tmp_path: Path) -> None:
    """The generator's output without modes (and so the cache key's meaning) is what it has been."""
    ds = make_synthetic_dataset(num_episodes=3, use_cache=False)
    assert ds.column_names == ["image", "instruction", "action", "state", "episode_index", "frame_index", "target_xy"]
    columns = [list(ds[name]) for name in ("instruction", "action", "state", "target_xy")]
    digest = hashlib.sha256(json.dumps(columns).encode())
    assert digest.hexdigest()[:16] == "d433c7adf0dc6e5e"
    make_synthetic_dataset(num_episodes=3, cache_dir=str(tmp_path))
    make_synthetic_dataset(num_episodes=3, cache_dir=str(tmp_path), modes="targets")
    params = sorted(json.loads(p.read_text()).get("modes", "-") for p in tmp_path.glob("synthetic/*/params.json"))
    assert params == ["-", "targets"]  # its own cache entry; the default's key has no modes


def test_multimodal_demonstrations_choose_either_valid_target() -> None:
    ds = make_synthetic_dataset(num_episodes=40, image_size=32, num_targets=2, view="top_down", modes="targets",
                                use_cache=False)
    first = ds.filter(lambda r: r["frame_index"] == 0)
    assert sorted(set(first["mode"])) == [0, 1]  # the expert chose each valid target in some episodes
    assert 10 <= sum(first["mode"]) <= 30
    for row in first:
        valid = np.asarray(row["valid_targets_xy"]).reshape(2, 2)
        np.testing.assert_allclose(row["target_xy"], valid[row["mode"]])  # the chosen one is the expert's target
        colour = row["instruction"].split(" the ")[1].split(" square")[0]
        image = np.asarray(row["image"])
        for x, y in valid:  # both valid targets are squares of the named colour
            assert tuple(image[round(y * 31), round(x * 31)]) == PALETTE[colour]
        step = np.asarray(row["action"][:2])
        assert np.dot(step, valid[row["mode"]] - np.asarray(row["state"])) > 0  # heading for the chosen one
    frames = build_datasets(DataConfig(synthetic_modes="targets", num_episodes=8, num_targets=1,
                                       min_episode_length=5, max_episode_length=6), progress=False)[0]
    assert "mode" not in frames.column_names  # a column of the raw table, not of training examples
    with pytest.raises(ValueError, match="synthetic_modes='paths'"):
        make_synthetic_dataset(num_episodes=1, modes="paths", use_cache=False)
    with pytest.raises(ValueError, match="synthetic_modes='targets' with synthetic_state='goal_offset'"):
        DataConfig(synthetic_modes="targets", synthetic_state="goal_offset")


def test_either_valid_target_is_a_success() -> None:
    cfg = _config(num_targets=1, synthetic_view="wrist", synthetic_modes="targets")
    env = SyntheticEnv(cfg, 4)
    env.reset([0, 1, 2, 3])
    # Drive episodes 0, 1 to the expert's choice, 2, 3 to the other valid target, 3 only to the midpoint.
    aims = [s.goals[s.chosen if i < 2 else 1 - s.chosen] for i, s in enumerate(env.scenes)]
    aims[3] = env.scenes[3].goals.mean(axis=0)
    done = np.zeros(4, bool)
    for _ in range(DEFAULT_MAX_STEPS):
        _, success = env.step(np.stack([0.2 * (a - p) for a, p in zip(aims, env.agents)]), ~done)
        done |= success
    assert done.tolist() == [True, True, True, False]
    infos = [env.episode_info(i) for i in range(4)]
    assert [i["reached"] for i in infos[:3]] == [s.chosen if k < 2 else 1 - s.chosen
                                                for k, s in enumerate(env.scenes[:3])]
    assert infos[3]["reached"] is None and infos[3]["distance"] > GRIP_RADIUS
    assert env.frame(0).shape == (128, 2 * 128 + 2, 3)  # the table from above beside the wrist camera


class _ExpertPolicy:
    """Plays the dataset's expert of an environment (it reads the environment, not the observation)."""

    def __init__(self, env: SyntheticEnv) -> None:
        self.env, self.calls = env, 0

    def reset(self) -> None:
        pass

    n_action_steps = 1

    def predict_action_chunk(self, observation, mode: str, seed: int, candidates: str = "gaussian",
                             return_energy: bool = False, relative_energy: bool = False) -> tuple[np.ndarray, ...]:
        self.calls += 1
        actions = self.env.expert_actions().astype(np.float32)
        energy = -np.linalg.norm(actions, axis=1)
        return (actions[:, None], energy, energy + 1.0) if relative_energy else (actions[:, None], energy)


def test_the_rollout_loop_runs_the_expert_to_success() -> None:
    cfg = _config(num_targets=2)
    env = SyntheticEnv(cfg, 5)
    done = run_batch(env, _ExpertPolicy(env), [10, 11, 12, 13, 14], "policy", DEFAULT_MAX_STEPS, record=True)
    results, frames = done.results, done.frames
    assert all(ok for ok, _ in results) and all(20 <= n <= 45 for _, n in results)
    assert len(frames) == results[0][1] + 1  # the first episode from its start to its success
    # One chunk per step (n_action_steps 1), its energy kept while the episode runs.
    assert [len(e) for e in done.energies] == [n for _, n in results]
    assert done.shifted == {} and done.reference == [] and done.relative == []
    again = run_batch(env, _ExpertPolicy(env), [10, 11, 12, 13, 14], "policy", DEFAULT_MAX_STEPS, relative=True)
    assert again.results == results and again.energies == done.energies
    assert [np.allclose(np.array(r) - 1.0, e) for r, e in zip(again.relative, again.energies)] == [True] * 5


def test_the_loop_scores_the_policy_on_shifted_observations() -> None:
    env = SyntheticEnv(_config(num_targets=2), 3)
    done = run_batch(env, _ExpertPolicy(env), [10, 11, 12], "policy", 5, shifts=SHIFTS, relative=True)
    assert set(done.shifted) == set(done.shifted_relative) == set(SHIFTS)
    assert all(len(v) == len(done.reference) == 15 for v in done.shifted.values())  # 3 episodes x 5 chunks
    assert np.allclose(np.array(done.reference_relative) - 1.0, done.reference)
    assert all(np.allclose(np.array(done.shifted_relative[s]) - 1.0, done.shifted[s]) for s in SHIFTS)
    obs = env.observation()
    noisy = shift_observation(obs, "noisy_images", seed=3)
    key = next(k for k in obs if k.startswith("observation.images."))
    assert noisy[key].dtype == np.uint8 and noisy[key].shape == obs[key].shape
    assert np.abs(noisy[key].astype(int) - obs[key]).mean() > 20  # heavy noise, seeded
    assert np.array_equal(noisy[key], shift_observation(obs, "noisy_images", seed=3)[key])
    assert noisy["task"] == obs["task"] and np.array_equal(noisy["observation.state"], obs["observation.state"])
    tasks = ["a", "b", "c"]
    assert shift_observation({**obs, "task": tasks}, "other_instruction", 0)["task"] == ["b", "c", "a"]
    assert shift_observation({**obs, "task": ["a"] * 3}, "other_instruction", 0)["task"] == [UNRELATED_INSTRUCTION] * 3
    with pytest.raises(ValueError, match="expected one of"):
        shift_observation(obs, "rain", 0)


def test_failure_and_shift_metrics() -> None:
    episodes = [{"mode": "policy", "success": ok, "energy": e} for ok, e in
                [(True, 0.1), (True, 0.2), (False, 0.9), (False, 0.15)]]
    episodes += [{"mode": "rerank", "success": True, "energy": 0.0}]
    m = failure_metrics(episodes, ["policy", "rerank"])
    assert m["failure_auroc/policy"] == pytest.approx(0.75)  # (0.9 beats both; 0.15 beats 0.1 only) / 4
    assert m["failure_auroc/policy/low"] <= 0.75 <= m["failure_auroc/policy/high"]
    assert m["energy/policy/failure"] == pytest.approx(0.525) and m["energy/policy/success"] == pytest.approx(0.15)
    assert "failure_auroc/rerank" not in m and m["energy/rerank/success"] == 0.0  # no failures: no AUROC
    assert not any(k.startswith("relative_") for k in m)  # not recorded: not reported
    relative = [{**e, "relative_energy": -e["energy"]} for e in episodes]
    r = failure_metrics(relative, ["policy", "rerank"])
    assert r["failure_auroc/policy"] == pytest.approx(0.75) and r["relative_failure_auroc/policy"] == pytest.approx(0.25)
    assert r["relative_energy/policy/failure"] == pytest.approx(-0.525)
    s = shift_metrics([0.0, 0.1, 0.2], {"noisy_images": [0.5, 0.6, 0.7], "other_instruction": []})
    assert s["shift_auroc/noisy_images"] == 1.0 and s["shift_energy/noisy_images"] == pytest.approx(0.6)
    assert s["shift_energy/none"] == pytest.approx(0.1) and "shift_auroc/other_instruction" not in s
    assert shift_metrics([0.0], {"noisy_images": [1.0]}, prefix="relative_")["relative_shift_auroc/noisy_images"] == 1.0


def test_rollout_command_on_a_tiny_synthetic_run(tmp_path: Path) -> None:
    from vla_energy.cli import main
    from vla_energy.training.train import main as train_main

    train_main(["--backbone", "tiny-llava", "--dataset", "synthetic", "--synthetic_view", "wrist", "--num_targets", "1",
                "--synthetic_modes", "targets", "--num_episodes", "8", "--min_episode_length", "5",
                "--max_episode_length", "8", "--horizon", "4", "--per_device_train_batch_size", "4", "--max_steps",
                "2", "--eval_strategy", "no", "--lora_r", "4", "--energy_hidden_dim", "16", "--action_head_dim", "16",
                "--report_to", "none", "--disable_tqdm", "--output_dir", str(tmp_path), "--run_name", "run",
                "--cache_dir", str(tmp_path / "cache")])
    run = tmp_path / "run"
    argv = ["rollout", str(run), "--episodes", "3", "--batch_size", "2", "--max_steps", "8", "--n_action_steps", "2",
            "--disable_tqdm"]
    assert main(argv) == 0
    assert main(argv) == 0  # again: the run's report keeps one closed-loop section
    out = run / "rollout"
    metrics = json.loads((out / "metrics.json").read_text())
    for mode in MODES:
        assert 0.0 <= metrics[f"success/{mode}/overall/low"] <= metrics[f"success/{mode}/overall"] <= 1.0
        assert 1.0 <= metrics[f"steps/{mode}/synthetic-targets"] <= 8.0
    assert {"delta/rerank/overall/low", "delta/mean/overall", "delta/refine/overall/high"} <= set(metrics)
    episodes = json.loads((out / "episodes.json").read_text())
    assert len(episodes) == 3 * len(MODES)
    assert {e["seed"] for e in episodes} == {1000, 1001, 1002}
    assert set(episodes[0]) == {"task", "mode", "seed", "success", "steps", "reached", "distance", "agent", "goals",
                                "expert_choice", "energy", "chunks", "relative_energy"}
    assert all(e["chunks"] == -(-e["steps"] // 2) for e in episodes)  # a new chunk every 2 steps
    for shift in SHIFTS:
        assert 0.0 <= metrics[f"shift_auroc/{shift}/low"] <= metrics[f"shift_auroc/{shift}"] <= 1.0
        assert 0.0 <= metrics[f"relative_shift_auroc/{shift}"] <= 1.0  # the policy saved training chunks
    assert np.shape(episodes[0]["goals"]) == (2, 2) and len(episodes[0]["agent"]) == 2
    report = (out / "report.md").read_text()
    assert f"# Closed-loop evaluation of `{run}` in the synthetic task" in report
    assert "| synthetic-targets |" in report and "| overall |" in report and "Paired difference" in report
    assert "within 0.05 of a valid target (the grip output is not required)" in report
    assert "## Energies as a failure signal" in report and "| noisy_images |" in report
    assert "AUROC, relative energy" in report
    for mode in MODES:
        gif = out / "gifs" / f"synthetic-targets_{mode}.gif"
        assert gif.read_bytes()[:6] == b"GIF89a" and f"gifs/synthetic-targets_{mode}.gif" in report
    run_report = (run / "report.md").read_text()
    assert run_report.count("## Closed loop in the synthetic task") == 1
    assert "[rollout/report.md](rollout/report.md)" in run_report and "| synthetic-targets |" in run_report
