"""LeRobot data: hub repo ids from the hub cache, lazy video decoding, several cameras, state, synthetic state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_energy.data import DataConfig, NormStats, VLACollator, build_datasets, load_frames
from vla_energy.data import video as video_mod
from vla_energy.data.synthetic import GAIN, make_synthetic_dataset
from vla_energy.testing.lerobot_datasets import TASKS, frame_rgb, write_hub_cache, write_lerobot_v3

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = ("top", "wrist")

_HUB_SCRIPT = """
import sys
from vla_energy.data import DataConfig, build_datasets
train, val, stats = build_datasets(DataConfig(dataset="lerobot/tiny_pick", horizon=2, use_state=True), progress=False)
ex = train[0]
print("ok", len(train) + len(val), len(stats.state.mean), sorted(ex))
try:
    build_datasets(DataConfig(dataset="lerobot/not_cached"), progress=False)
except FileNotFoundError as e:
    print("error", e)
"""


def test_hub_repo_id_reads_the_hub_cache_offline(tmp_path: Path) -> None:
    src = write_lerobot_v3(tmp_path / "src")
    write_hub_cache(tmp_path / "hub", "lerobot/tiny_pick", src)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), "VLA_ENERGY_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", _HUB_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "ok 12 2 " + str(sorted(["action_mask", "actions", "episode_index", "frame_index", "image",
                                                "instruction", "sample_id", "state"]))
    assert lines[1].startswith("error dataset='lerobot/not_cached': no such file or directory")
    assert "dataset='lerobot/not_cached' is not in the local hub cache" in lines[1]
    assert str(tmp_path / "hub") in lines[1] and "HF_HUB_OFFLINE=1" in lines[1]
    assert "hf download lerobot/not_cached --repo-type dataset" in lines[1]


def test_video_frames_are_decoded_lazily_in_workers(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("av", reason="PyAV (`pip install av`) decodes LeRobot video features")
    root = write_lerobot_v3(tmp_path / "ds", video=True, cameras=CAMERAS)
    calls = []
    decode = video_mod.decode_video_frames
    monkeypatch.setattr(video_mod, "decode_video_frames", lambda *a, **k: calls.append(a[0]) or decode(*a, **k))
    train, val, _ = build_datasets(DataConfig(dataset=str(root), horizon=2, val_fraction=0.34), progress=False)
    assert calls == []  # nothing decoded up front: the table holds (file, time) references
    assert {c for c in train.features if c.startswith("camera_")} == {"camera_0", "camera_1"}
    ex = train[3]
    assert len(calls) == 2  # one decoding pass per camera for the row
    e, f = ex["episode_index"], ex["frame_index"]
    for c, im in enumerate(ex["image"]):
        np.testing.assert_allclose(np.asarray(im, float), frame_rgb(e, f, camera=c), atol=3)
    loader = torch.utils.data.DataLoader(val, batch_size=3, num_workers=1, collate_fn=list)
    rows = [row for batch in loader for row in batch]
    assert len(rows) == len(val)
    for row in rows:
        for c, im in enumerate(row["image"]):
            np.testing.assert_allclose(np.asarray(im, float),
                                       frame_rgb(row["episode_index"], row["frame_index"], camera=c), atol=3)
    eager = load_frames(DataConfig(dataset=str(root), decode_video="eager", camera_layout="tile"))
    lazy = load_frames(DataConfig(dataset=str(root), camera_layout="tile"))
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(eager, lazy))


def test_far_apart_frames_of_one_file_get_separate_seeks(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("av", reason="PyAV (`pip install av`) decodes LeRobot video features")
    root = write_lerobot_v3(tmp_path / "ds", lengths=(12, 12), video=True, fps=10)
    path = str(next((root / "videos").rglob("*.mp4")))
    calls = []
    decode = video_mod.decode_video_frames
    monkeypatch.setattr(video_mod, "decode_video_frames", lambda p, t, tol: calls.append(list(t)) or decode(p, t, tol))
    refs = [{"video_path": path, "timestamp": t, "tolerance_s": 0.05} for t in (2.0, 0.0, 0.1)]
    frames = video_mod.decode_frame_refs(refs, max_gap_s=1.0)
    assert calls == [[0.0, 0.1], [2.0]]
    np.testing.assert_allclose(np.asarray(frames[0], float), frame_rgb(1, 8), atol=3)


def test_missing_camera_or_state_lists_columns(tmp_path: Path) -> None:
    root = write_lerobot_v3(tmp_path / "ds", cameras=CAMERAS)
    with pytest.raises(ValueError, match=r"image_key 'observation.images.side'.*observation.images.top"):
        load_frames(DataConfig(dataset=str(root), image_key="observation.images.side"))
    with pytest.raises(ValueError, match=r"state_key='joints'.*available columns: \[.*'observation.state'"):
        load_frames(DataConfig(dataset=str(root), use_state=True, state_key="joints"))
    with pytest.raises(ValueError, match="state_key='joints' is set but use_state=False"):
        DataConfig(state_key="joints")
    with pytest.raises(ValueError, match="camera_layout='grid'"):
        DataConfig(camera_layout="grid")


def test_lerobot_cameras_default_to_all_in_info_order(tmp_path: Path) -> None:
    root = write_lerobot_v3(tmp_path / "ds", cameras=CAMERAS)
    ex = load_frames(DataConfig(dataset=str(root)))[4]  # episode 1, frame 0
    assert [np.asarray(im)[0, 0, 2] for im in ex["image"]] == [0, 60] and ex["instruction"] == TASKS[1]
    one = load_frames(DataConfig(dataset=str(root), image_key="observation.images.wrist"))[4]
    assert np.array_equal(np.asarray(one["image"]), frame_rgb(1, 0, camera=1))


def test_norm_stats_with_state_round_trip(tmp_path: Path) -> None:
    root = write_lerobot_v3(tmp_path / "ds")
    _, _, stats = build_datasets(DataConfig(dataset=str(root), use_state=True, val_fraction=0.0), progress=False)
    assert stats.state is not None and stats.state.action_dim == 2 and stats.state.count == 12
    loaded = NormStats.load(stats.save(tmp_path))
    assert loaded == stats and isinstance(loaded.state, NormStats)
    without = NormStats(**{k: v for k, v in stats.to_dict().items() if k != "state"})
    assert "state" not in json.loads(Path(without.save(tmp_path / "a.json")).read_text())


class _RecordingProcessor:
    """Records what the collator passes; returns token ids of the words."""

    action_token = "<act>"

    def __call__(self, text, images, return_tensors="pt", padding=True):
        self.text, self.images = text, images
        return {"input_ids": torch.zeros(len(text), 3, dtype=torch.long)}


def test_collator_takes_lerobot_observation_keys() -> None:
    keys = [f"observation.images.{c}" for c in CAMERAS]
    obs = [{keys[0]: frame_rgb(i, 0), keys[1]: frame_rgb(i, 0, camera=1), "observation.state": [0.1, i],
            "task": TASKS[i], "actions": [[0.0]] * 2, "sample_id": i, "episode_index": i} for i in range(2)]
    proc = _RecordingProcessor()
    batch = VLACollator(proc, horizon=2, image_key=keys, instruction_key="task", state_key="observation.state")(obs)
    assert [len(ims) for ims in proc.images] == [2, 2]
    assert [np.asarray(im)[0, 0, 2] for im in proc.images[1]] == [0, 60]
    assert proc.text == [TASKS[0] + "<act><act>", TASKS[1] + "<act><act>"]
    assert batch["state"].tolist() == [[pytest.approx(0.1), 0.0], [pytest.approx(0.1), 1.0]]
    # The training layout (one `image` column holding the camera list) gives the processor the same input.
    same = [{"image": [o[keys[0]], o[keys[1]]], "instruction": o["task"], **o} for o in obs]
    VLACollator(proc, horizon=2)(same)
    assert [len(ims) for ims in proc.images] == [2, 2]
    with pytest.raises(ValueError, match=r"\[1, 2\] images each"):
        VLACollator(proc, horizon=2)([{**same[0], "image": same[0]["image"][:1]}, same[1]])


def test_synthetic_goal_offset_is_only_in_the_state(tmp_path: Path) -> None:
    ds = make_synthetic_dataset(num_episodes=8, state="goal_offset", use_cache=False, min_episode_length=10,
                                max_episode_length=10)
    base = make_synthetic_dataset(num_episodes=8, use_cache=False, min_episode_length=10, max_episode_length=10)
    state, action = np.asarray(ds["state"][:]), np.asarray(ds["action"][:])
    assert state.shape == (80, 4) and np.asarray(base["state"][:]).shape == (80, 2)
    # Same scene and instruction per episode: the image shows only the named square, not the offset goal.
    assert ds["instruction"][:] == base["instruction"][:]
    named = np.asarray(base["target_xy"][:])
    image_only = np.c_[named - state[:, :2], np.ones(len(ds))]
    with_state = np.c_[image_only, state[:, 2:]]
    residual = [np.linalg.lstsq(x, action[:, :2], rcond=None)[1].sum() / len(ds) for x in (image_only, with_state)]
    assert residual[1] < 5e-5 and residual[0] > 4 * residual[1]  # the offset explains what the image cannot
    np.testing.assert_allclose(action[:, :2], GAIN * (named + state[:, 2:] - state[:, :2]), atol=0.02)
    cfg = DataConfig(num_episodes=8, synthetic_state="goal_offset", use_state=True, cache_dir=str(tmp_path))
    train, _, stats = build_datasets(cfg, progress=False)
    assert np.asarray(train["state"][:]).shape[1] == 4 and stats.state.action_dim == 4
