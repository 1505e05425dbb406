"""Data pipeline: chunking, normalization, split, loaders (LeRobot v3, HF), synthetic task, collator."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Sequence, Value
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from transformers import HfArgumentParser

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.readout import backbone_inputs
from vla_energy.backbones.tiny import TINY_FAMILIES, processor_unavailable
from vla_energy.data import (
    DataConfig,
    NormStats,
    VLACollator,
    add_action_chunks,
    build_datasets,
    chunk_indices,
    compute_norm_stats,
    load_frames,
    make_synthetic_dataset,
    split_rows,
    tile_images,
)
from vla_energy.data import video as video_mod
from vla_energy.data.synthetic import GAIN, PALETTE, WRIST_ZOOM
from vla_energy.testing.lerobot_datasets import frame_rgb as _frame_rgb
from vla_energy.testing.lerobot_datasets import write_lerobot_v3

# ---------------------------------------------------------------- chunking


def test_chunks_at_episode_boundaries_repeat_last_action_and_mask() -> None:
    # Episode 7 has 3 frames, episode 2 has 5; rows shuffled and interleaved.
    ep = np.array([7, 2, 2, 7, 2, 7, 2, 2])
    fr = np.array([2, 0, 3, 0, 1, 1, 4, 2])
    idx, mask = chunk_indices(ep, fr, horizon=4)
    row = {(e, f): i for i, (e, f) in enumerate(zip(ep, fr))}
    # Frame 1 of episode 7: frames 1, 2, then two pads repeating frame 2.
    r = row[(7, 1)]
    assert idx[r].tolist() == [row[(7, 1)], row[(7, 2)], row[(7, 2)], row[(7, 2)]]
    assert mask[r].tolist() == [True, True, False, False]
    # Frame 0 of episode 2: four real frames, never crossing into episode 7.
    r = row[(2, 0)]
    assert idx[r].tolist() == [row[(2, f)] for f in range(4)]
    assert mask[r].all()
    # The last frame: itself, then pads.
    r = row[(2, 4)]
    assert idx[r].tolist() == [r] * 4 and mask[r].tolist() == [True, False, False, False]


def test_chunk_indices_rejects_duplicate_frames() -> None:
    with pytest.raises(ValueError, match="frame_index 1 twice"):
        chunk_indices(np.array([0, 0, 0]), np.array([0, 1, 1]), horizon=2)


@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=5), horizon=st.integers(1, 6), seed=st.integers(0, 99))
def test_chunk_indices_match_a_per_episode_reference(lengths: list[int], horizon: int, seed: int) -> None:
    ep = np.concatenate([np.full(n, e) for e, n in enumerate(lengths)])
    fr = np.concatenate([np.arange(n) for n in lengths])
    perm = np.random.default_rng(seed).permutation(len(ep))
    ep, fr = ep[perm], fr[perm]
    idx, mask = chunk_indices(ep, fr, horizon)
    for i in range(len(ep)):
        n = lengths[ep[i]]
        steps = [min(fr[i] + k, n - 1) for k in range(horizon)]
        assert [(ep[j], fr[j]) for j in idx[i]] == [(ep[i], s) for s in steps]
        assert mask[i].tolist() == [fr[i] + k < n for k in range(horizon)]


def test_add_action_chunks_gathers_and_normalizes_actions() -> None:
    actions = [[float(e * 10 + f), -float(f)] for e, n in enumerate([3, 2]) for f in range(n)]
    frames = Dataset.from_dict({
        "action": actions, "episode_index": [0, 0, 0, 1, 1], "frame_index": [0, 1, 2, 0, 1],
    })
    out = add_action_chunks(frames, horizon=3)
    assert "action" not in out.column_names
    assert out[1]["actions"] == [[1.0, -1.0], [2.0, -2.0], [2.0, -2.0]]
    assert out[1]["action_mask"] == [True, True, False]
    assert out[3]["actions"] == [[10.0, 0.0], [11.0, -1.0], [11.0, -1.0]]
    assert out["sample_id"][:] == [0, 1, 2, 3, 4]
    stats = compute_norm_stats([np.asarray(actions)], mode="mean_std")
    normed = add_action_chunks(frames, horizon=3, norm_stats=stats)
    np.testing.assert_allclose(normed[3]["actions"], stats.normalize(np.asarray(out[3]["actions"])), rtol=1e-6)


# ---------------------------------------------------------------- normalization


def _stats(mode: str = "q01_q99") -> NormStats:
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 2, 5000), rng.uniform(-1, 3, 5000), np.full(5000, 0.5)], axis=1)
    return compute_norm_stats([x[:1234], x[1234:]], mode=mode)


def test_norm_stats_match_numpy_and_handle_degenerate_dims() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 2, 5000), rng.uniform(-1, 3, 5000), np.full(5000, 0.5)], axis=1)
    stats = compute_norm_stats([x[:1234], x[1234:]])
    np.testing.assert_allclose(stats.q01, np.quantile(x, 0.01, axis=0))
    np.testing.assert_allclose(stats.q99, np.quantile(x, 0.99, axis=0))
    np.testing.assert_allclose(stats.mean, x.mean(0))
    assert stats.count == 5000
    y = stats.normalize(x)
    assert np.isfinite(y).all()
    assert y.min() >= -1.0 and y.max() <= 1.0  # clipped outside q01..q99
    np.testing.assert_allclose(y[:, 2], 0.0)  # the constant dimension: no division by zero


@pytest.mark.parametrize("mode", ["q01_q99", "mean_std", "none"])
def test_normalization_round_trip_numpy_and_torch(mode: str) -> None:
    stats = _stats(mode)
    lo, hi = np.asarray(stats.q01), np.asarray(stats.q99)
    x = lo + (hi - lo) * np.random.default_rng(1).uniform(size=(4, 8, 3))  # inside q01..q99: no clipping
    y = stats.normalize(x)
    np.testing.assert_allclose(stats.unnormalize(y), x, atol=1e-9)
    xt = torch.tensor(x, dtype=torch.float32)
    yt = stats.normalize(xt)
    assert yt.dtype == torch.float32 and yt.shape == (4, 8, 3)
    np.testing.assert_allclose(yt.numpy(), y, atol=1e-5)
    np.testing.assert_allclose(stats.unnormalize(yt).numpy(), x, atol=1e-5)
    if mode == "q01_q99":
        assert abs(y).max() <= 1.0


def test_q01_q99_maps_quantiles_to_unit_interval_and_clips() -> None:
    stats = NormStats("q01_q99", mean=[0.0], std=[1.0], q01=[-2.0], q99=[6.0], min=[-9.0], max=[9.0], count=10)
    np.testing.assert_allclose(stats.normalize(np.array([[-2.0], [2.0], [6.0], [100.0], [-100.0]]))[:, 0],
                               [-1.0, 0.0, 1.0, 1.0, -1.0])


def test_norm_stats_save_load_and_shape_errors(tmp_path: Path) -> None:
    stats = _stats()
    path = stats.save(tmp_path / "norm_stats.json")
    loaded = NormStats.load(path)
    assert loaded == stats
    assert NormStats.load(tmp_path) == stats  # a directory holding norm_stats.json
    x = np.ones((2, 3))
    np.testing.assert_array_equal(loaded.normalize(x), stats.normalize(x))
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected \(\.\.\., Da=3\)"):
        stats.normalize(np.ones((2, 4)))
    (tmp_path / "bad.json").write_text(json.dumps({"mode": "q01_q99"}))
    with pytest.raises(ValueError, match="expected"):
        NormStats.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="NaN"):
        compute_norm_stats([np.array([[0.0], [np.nan]])])


# ---------------------------------------------------------------- split


def test_split_by_episode_is_disjoint_and_seeded() -> None:
    episode = np.repeat(np.arange(20), 5)
    train, val = split_rows(episode, val_fraction=0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert not set(episode[train]) & set(episode[val])
    again = split_rows(episode, val_fraction=0.2, seed=3)
    assert np.array_equal(again[1], val)
    other = split_rows(episode, val_fraction=0.2, seed=4)
    assert not np.array_equal(other[1], val)
    with pytest.raises(ValueError, match="val_fraction"):
        split_rows(episode, val_fraction=1.0)


# ---------------------------------------------------------------- LeRobot v3 fixture


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_lerobot_v3_fixture_loads_end_to_end(tmp_path: Path) -> None:
    root = write_lerobot_v3(tmp_path / "ds")
    cfg = DataConfig(dataset=str(root), horizon=3, val_fraction=0.34, data_seed=0, use_state=True)
    train, val, stats = build_datasets(cfg, progress=False)
    assert len(train) + len(val) == 12
    assert not set(train["episode_index"][:]) & set(val["episode_index"][:])
    for ds in (train, val):
        for ex in ds:
            e, f = ex["episode_index"], ex["frame_index"]
            assert ex["instruction"] == ["pick up the cube", "open the drawer"][e % 2]
            assert np.array_equal(np.asarray(ex["image"]), _frame_rgb(e, f))
            np.testing.assert_allclose(ex["state"], stats.state.normalize(np.asarray([float(f), -float(f)])),
                                       atol=1e-6)
            n = (4, 3, 5)[e]
            raw = [[float(e), float(s), float(e * s)] for s in (min(f + k, n - 1) for k in range(3))]
            np.testing.assert_allclose(ex["actions"], stats.normalize(np.asarray(raw)), atol=1e-6)
            assert ex["action_mask"] == [f + k < n for k in range(3)]
    # Statistics come from the training episodes only.
    train_frames = [[float(e), float(f), float(e * f)] for e, f in zip(train["episode_index"], train["frame_index"])]
    np.testing.assert_allclose(stats.q99, np.quantile(np.asarray(train_frames), 0.99, axis=0))
    train_states = [[float(f), -float(f)] for f in train["frame_index"]]
    np.testing.assert_allclose(stats.state.q99, np.quantile(np.asarray(train_states), 0.99, axis=0))
    assert "state" not in build_datasets(DataConfig(dataset=str(root), horizon=3), progress=False)[0].column_names


def test_lerobot_video_feature_without_decoder_names_feature_and_install(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ds"
    write_lerobot_v3(root)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["features"]["observation.images.top"]["dtype"] = "video"
    (root / "meta" / "info.json").write_text(json.dumps(info))
    monkeypatch.setattr(video_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"'observation.images.top'.*pip install av"):
        load_frames(DataConfig(dataset=str(root)))


def test_lerobot_video_feature_decodes_with_pyav(tmp_path: Path) -> None:
    pytest.importorskip("av")
    root = write_lerobot_v3(tmp_path / "ds", video=True)
    frames = load_frames(DataConfig(dataset=str(root)))
    for ex in frames:
        np.testing.assert_allclose(np.asarray(ex["image"], float), _frame_rgb(ex["episode_index"], ex["frame_index"]),
                                   atol=3)


def test_lerobot_rejects_other_versions_and_unknown_camera(tmp_path: Path) -> None:
    root = write_lerobot_v3(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"image_key 'cam' is not an image/video feature.*observation.images.top"):
        load_frames(DataConfig(dataset=str(root), image_key="cam"))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="v2.1"):
        load_frames(DataConfig(dataset=str(root)))


# ---------------------------------------------------------------- HF datasets


def _hf_frames(n_eps: int = 3, length: int = 4) -> Dataset:
    rows = [(e, f) for e in range(n_eps) for f in range(length)]
    return Dataset.from_dict({
        "rgb": [PILImage.fromarray(_frame_rgb(e, f)) for e, f in rows],
        "wrist": [PILImage.fromarray(_frame_rgb(f, e, size=8)) for e, f in rows],
        "prompt": [f"task {e}" for e, _ in rows],
        "act": [[float(e), float(f)] for e, f in rows],
        "ep": [e for e, _ in rows],
        "t": [f for _, f in rows],
    }, features=Features({"rgb": Image(), "wrist": Image(), "prompt": Value("string"),
                          "act": Sequence(Value("float32")), "ep": Value("int64"), "t": Value("int64")}))


def test_wrong_column_names_list_available_columns(tmp_path: Path) -> None:
    _hf_frames().save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_key="rgb", instruction_key="prompt", action_key="act",
                     episode_key="episode", frame_key="t")
    with pytest.raises(ValueError) as err:
        load_frames(cfg)
    msg = str(err.value)
    assert "episode_key='episode'" in msg
    assert "available columns: ['act', 'ep', 'prompt', 'rgb', 't', 'wrist']" in msg


@pytest.mark.parametrize("as_parquet", [False, True])
def test_hf_dataset_with_custom_columns_builds(tmp_path: Path, as_parquet: bool) -> None:
    ds = _hf_frames()
    if as_parquet:
        ds.to_parquet(str(tmp_path / "frames.parquet"))
        path = tmp_path / "frames.parquet"
    else:
        ds.save_to_disk(str(tmp_path / "hf"))
        path = tmp_path / "hf"
    cfg = DataConfig(dataset=str(path), image_key="rgb", instruction_key="prompt", action_key="act",
                     episode_key="ep", frame_key="t", horizon=2, val_fraction=0.34, normalization="none")
    train, val, stats = build_datasets(cfg, progress=False)
    assert stats.mode == "none" and len(train) == 8 and len(val) == 4
    ex = train[0]
    assert set(ex) == {"image", "instruction", "episode_index", "frame_index", "actions", "action_mask",
                       "sample_id"}
    assert ex["instruction"] == f"task {ex['episode_index']}"
    assert ex["actions"] == [[float(ex["episode_index"]), 0.0], [float(ex["episode_index"]), 1.0]]


def test_hub_names_go_through_load_dataset(monkeypatch) -> None:
    from vla_energy.data import loading

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return _hf_frames()

    monkeypatch.setattr(loading, "load_dataset", fake_load_dataset)
    cfg = DataConfig(dataset="org/robot-data", dataset_format="hf", dataset_split="validation", image_key="rgb",
                     instruction_key="prompt", action_key="act", episode_key="ep", frame_key="t")
    assert len(load_frames(cfg)) == 12 and calls == [("org/robot-data", "validation")]
    monkeypatch.setattr(loading, "load_dataset", lambda name, split: (_ for _ in ()).throw(ConnectionError("offline")))
    with pytest.raises(ValueError, match="no such file or directory.*as a hub dataset failed.*ConnectionError: offline"):
        load_frames(cfg)


def test_several_cameras_are_separate_or_tiled(tmp_path: Path) -> None:
    _hf_frames().save_to_disk(str(tmp_path / "hf"))
    cfg = DataConfig(dataset=str(tmp_path / "hf"), image_key="rgb,wrist", instruction_key="prompt",
                     action_key="act", episode_key="ep", frame_key="t")
    images = load_frames(cfg)[5]["image"]  # episode 1, frame 1: a list in image_key order
    assert [im.size for im in images] == [(16, 16), (8, 8)]
    assert np.array_equal(np.asarray(images[0]), _frame_rgb(1, 1))
    cfg.image_key = "wrist,rgb"
    assert [im.size for im in load_frames(cfg)[5]["image"]] == [(8, 8), (16, 16)]
    cfg.image_key, cfg.camera_layout = "rgb,wrist", "tile"
    ex = load_frames(cfg)[5]
    img = np.asarray(ex["image"])
    assert img.shape == (16, 32, 3)  # the 8 px wrist camera resized to 16 px, right of the main one
    assert np.array_equal(img[:, :16], _frame_rgb(1, 1))
    assert tile_images([PILImage.new("RGB", (4, 2)), PILImage.new("RGB", (2, 1))]).size == (8, 2)


def test_data_config_parses_with_hf_argument_parser() -> None:
    (cfg,) = HfArgumentParser(DataConfig).parse_args_into_dataclasses(
        ["--dataset", "x", "--horizon", "4", "--normalization", "mean_std", "--image_key", "a,b"])
    assert cfg.horizon == 4 and cfg.normalization == "mean_std" and cfg.image_keys == ["a", "b"]
    with pytest.raises(ValueError, match="normalization='minmax'"):
        DataConfig(normalization="minmax")


# ---------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_deterministic_and_cached(tmp_path: Path) -> None:
    kwargs = dict(num_episodes=6, image_size=24, num_targets=4, seed=5)
    a = make_synthetic_dataset(**kwargs, use_cache=False)
    b = make_synthetic_dataset(**kwargs, cache_dir=str(tmp_path))
    assert a.to_dict() == b.to_dict()
    cached = list((tmp_path / "synthetic").iterdir())
    assert len(cached) == 1 and (cached[0] / "params.json").exists()
    c = make_synthetic_dataset(**kwargs, cache_dir=str(tmp_path))  # from the cache
    assert c.to_dict() == a.to_dict()
    other = make_synthetic_dataset(**{**kwargs, "seed": 6}, use_cache=False)
    assert other["instruction"][:] != a["instruction"][:] or other["action"][:] != a["action"][:]
    # Episode e does not depend on how many episodes are generated.
    more = make_synthetic_dataset(**{**kwargs, "num_episodes": 7}, use_cache=False)
    assert more.select(range(len(a))).to_dict() == a.to_dict()
    lengths = np.bincount(np.asarray(a["episode_index"][:]))
    assert lengths.min() >= 20 and lengths.max() <= 40


def test_synthetic_expert_needs_image_and_instruction() -> None:
    ds = make_synthetic_dataset(num_episodes=8, image_size=32, num_targets=3, use_cache=False)
    for i in range(0, len(ds), 7):
        ex = ds[i]
        img = np.asarray(ex["image"])
        target, state = np.asarray(ex["target_xy"]), np.asarray(ex["state"])
        colour = next(c for c in PALETTE if f" {c} " in ex["instruction"])
        # The named target's colour is at target_xy (the image shows it) ...
        x, y = np.round(target * 31).astype(int) + 1  # a pixel of the square away from the agent marker's centre
        near = img[max(0, y - 2): y + 2, max(0, x - 2): x + 2].reshape(-1, 3)
        assert (near == PALETTE[colour]).all(axis=1).any()
        # ... other colours are present too, so the instruction is needed ...
        present = [c for c, rgb in PALETTE.items() if (img.reshape(-1, 3) == rgb).all(axis=1).any()]
        assert len(present) >= 2 and colour in present
        # ... and the expert action steps toward it.
        np.testing.assert_allclose(ex["action"][:2], GAIN * (target - state), atol=0.02)


def test_synthetic_wrist_view_is_centred_on_the_agent() -> None:
    ds = make_synthetic_dataset(num_episodes=4, image_size=32, num_targets=1, view="wrist", use_cache=False)
    top = make_synthetic_dataset(num_episodes=4, image_size=32, num_targets=1, use_cache=False)
    # Same episodes (targets, actions), different pictures.
    assert ds["action"][:] == top["action"][:] and ds["instruction"][:] == top["instruction"][:]
    white = np.array([255, 255, 255])
    for i in range(0, len(ds), 5):
        ex = ds[i]
        img = np.asarray(ex["image"])
        target, state = np.asarray(ex["target_xy"]), np.asarray(ex["state"])
        assert not (img.reshape(-1, 3) == white).all(axis=1).any()  # no agent marker in the wrist view
        colour = next(c for c in PALETTE if f" {c} " in ex["instruction"])
        seen = 0.5 + WRIST_ZOOM * (target - state)
        x, y = np.round(seen * 31).astype(int)
        near = img[max(0, y - 1): y + 2, max(0, x - 1): x + 2].reshape(-1, 3)
        assert (near == PALETTE[colour]).all(axis=1).all()
        present = [c for c, rgb in PALETTE.items() if (img.reshape(-1, 3) == rgb).all(axis=1).any()]
        assert present == [colour]
    with pytest.raises(ValueError, match="view='side'"):
        make_synthetic_dataset(num_episodes=1, view="side", use_cache=False)
    with pytest.raises(ValueError, match="num_targets=0"):
        make_synthetic_dataset(num_episodes=1, num_targets=0, use_cache=False)
    with pytest.raises(ValueError, match="synthetic_view='side'"):
        DataConfig(synthetic_view="side")


def test_build_datasets_on_synthetic(tmp_path: Path) -> None:
    cfg = DataConfig(num_episodes=10, horizon=4, val_fraction=0.2, cache_dir=str(tmp_path))
    train, val, stats = build_datasets(cfg, progress=False)
    assert stats.action_dim == 3 and stats.mode == "q01_q99"
    assert len(set(val["episode_index"][:])) == 2
    acts = np.asarray(train["actions"][:])
    assert acts.shape[1:] == (4, 3) and np.abs(acts).max() <= 1.0
    assert train["sample_id"][:] != val["sample_id"][:]


# ---------------------------------------------------------------- collator


class _FakeProcessor:
    """A picklable stand-in with the tiny processors' call contract (token ids from a word vocabulary)."""

    action_token = "<act>"

    def __call__(self, text, images, return_tensors="pt", padding=True):
        rows = [t.replace("<act>", " <act> ").split() for t in text]
        vocab = {w: i + 2 for i, w in enumerate(sorted({w for r in rows for w in r}))}
        self.action_token_id = vocab["<act>"]
        t = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor([vocab[w] for w in r])
            mask[i, : len(r)] = 1
        pix = torch.stack([torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32)).permute(2, 0, 1)
                           for im in images])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix}


def _examples(b: int = 3, h: int = 4, da: int = 2) -> list[dict]:
    return [{"image": PILImage.fromarray(_frame_rgb(i, 0)), "instruction": f"go to {i}",
             "actions": np.full((h, da), i, np.float32).tolist(), "action_mask": [True] * (h - i) + [False] * i,
             "sample_id": 10 + i, "episode_index": i, "state": [0.5, i]} for i in range(b)]


def test_collator_output_and_errors() -> None:
    collator = VLACollator(_FakeProcessor(), horizon=4)
    batch = collator(_examples())
    assert batch["actions"].shape == (3, 4, 2) and batch["actions"].dtype == torch.float32
    assert batch["action_mask"].dtype == torch.bool and batch["action_mask"].sum(1).tolist() == [4, 3, 2]
    assert batch["sample_id"].tolist() == [10, 11, 12] and batch["sample_id"].dtype == torch.long
    assert batch["episode_index"].tolist() == [0, 1, 2] and batch["state"].shape == (3, 2)
    token_id = collator.processor.action_token_id
    assert ((batch["input_ids"] == token_id).sum(1) == 4).all()
    pickle.loads(pickle.dumps(collator))
    bad = _examples()
    bad[1]["actions"] = np.zeros((5, 2)).tolist()
    with pytest.raises(ValueError, match="actions has shapes"):
        collator(bad)
    with pytest.raises(ValueError, match=r"actions has shape \(3, 4, 2\), expected \(B, H=8, Da\)"):
        VLACollator(_FakeProcessor(), horizon=8)(_examples())
    with pytest.raises(ValueError, match="action_token"):
        VLACollator(object(), horizon=4)




@pytest.fixture(scope="module")
def synthetic_examples(tmp_path_factory) -> list[dict]:
    cache = tmp_path_factory.mktemp("cache")
    train, _, _ = build_datasets(DataConfig(num_episodes=6, horizon=3, cache_dir=str(cache), use_state=True),
                                 progress=False)
    return [train[i] for i in (0, 17, 40)]


@pytest.mark.parametrize("kind", TINY_FAMILIES)
def test_collator_shapes_for_each_tiny_vlm(kind: str, synthetic_examples: list[dict]) -> None:
    if processor_unavailable(kind):
        pytest.skip(processor_unavailable(kind))
    tiny = load_backbone(f"tiny-{kind}")
    collator = VLACollator(tiny.processor, horizon=3, action_token=tiny.action_token)
    batch = collator(synthetic_examples)
    b = len(synthetic_examples)
    assert batch["input_ids"].shape[0] == b and batch["attention_mask"].shape == batch["input_ids"].shape
    assert "pixel_values" in batch
    assert batch["actions"].shape == (b, 3, 3) and batch["actions"].dtype == torch.float32
    assert batch["action_mask"].shape == (b, 3) and batch["action_mask"].dtype == torch.bool
    assert batch["sample_id"].tolist() == [ex["sample_id"] for ex in synthetic_examples]
    assert batch["episode_index"].dtype == torch.long and batch["state"].shape == (b, 2)
    # Exactly H placeholders per row, all inside the attention mask.
    is_action = batch["input_ids"] == tiny.action_token_id
    assert is_action.sum(1).tolist() == [3] * b
    assert bool(batch["attention_mask"][is_action].all())
    out = tiny.model(**backbone_inputs(batch), output_hidden_states=True)
    assert out.hidden_states[-1].shape[:2] == batch["input_ids"].shape
    again = pickle.loads(pickle.dumps(collator))(synthetic_examples)
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_collator_runs_in_dataloader_workers(tmp_path: Path) -> None:
    train, _, _ = build_datasets(DataConfig(num_episodes=3, horizon=3, cache_dir=str(tmp_path)), progress=False)
    collator = VLACollator(_FakeProcessor(), horizon=3)
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1, collate_fn=collator)
    batch = next(iter(loader))
    assert batch["actions"].shape == (4, 3, 3) and batch["sample_id"].tolist() == train["sample_id"][:4]
    np.testing.assert_allclose(batch["actions"].numpy(), np.asarray(train["actions"][:4]), rtol=1e-6)
