"""Checkpoints hold what training changed and load as policies; self-contained policy dirs, dtype, select_action,
candidate bounds per normalization mode, evaluation pre-flight, Auto classes, optional extras."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data.normalization import NormStats
from vla_energy.inference.candidates import gaussian_candidates
from vla_energy.inference.policy import EnergyPolicy, candidate_bounds
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import checkpoint_policy_writer, save_policy
from vla_energy.training.checkpoints import (
    find_resume_checkpoint,
    register_checkpoint_hooks,
    save_checkpoint,
    trainable_keys,
)
from vla_energy.training.preflight import check_evaluation

ROOT = Path(__file__).resolve().parents[1]
H, DA = 4, 3
STATS = NormStats("mean_std", [0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [-1.0] * 3, [1.0] * 3, [-3.0, -5.0, -8.0],
                  [3.0, 7.0, 11.0], 100)


def _model(lora_r: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=lora_r))
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), hidden_size_of(loaded.model), DA,
                          H, loaded.action_token_id)
    return loaded, EnergyVLAModel(backbone, plugin)


def _save(out, loaded, model, **kwargs):
    """The policy directory of `model` (the tiny base referred to by its name)."""
    return save_policy(out, model, loaded.processor, STATS, base=loaded.name, **kwargs)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _prepare(lora_r: int = 4, seed: int = 0):
    accelerator = Accelerator(cpu=True)
    register_checkpoint_hooks(accelerator)
    loaded, model = _model(lora_r, seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, loaded, model, optimizer


def _train_step(model, optimizer) -> None:
    """One step that moves every trainable parameter."""
    loss = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_holds_trainable_state_resumes_and_loads_as_a_policy(tmp_path):
    accelerator, loaded, model, optimizer = _prepare()
    _train_step(model, optimizer)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"DataConfig": {"dataset": "synthetic", "image_key": None}}))
    writer = checkpoint_policy_writer(model, processor=loaded.processor, norm_stats=STATS, base=loaded.name,
                                      run_config=run / "run_config.json")
    ckpt = save_checkpoint(accelerator, run / "checkpoints" / "step_0000001", 1, policy_writer=writer)

    # The model's file holds the backbone's LoRA weights, the plugin's heads and buffers only, not one frozen weight.
    saved = load_file(str(ckpt / "model.safetensors"))
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    lora = {k for k in trained if k.startswith("backbone.")}
    assert lora and trained <= set(saved) <= trainable_keys(model)
    assert not [k for k in saved if "lora_" not in k and k.startswith("backbone.") and k in dict(model.named_parameters())]
    full = sum(v.numel() for v in model.backbone.state_dict().values())
    assert sum(v.numel() for k, v in saved.items() if k.startswith("backbone.")) < 0.2 * full
    # The frozen base is referred to by name, not copied into the checkpoint.
    assert not (ckpt / "backbone").exists() and not (ckpt / "merged").exists()
    assert json.loads((ckpt / "policy_config.json").read_text())["backbone"] == "tiny-llava"

    # Resume into a freshly built model (frozen base rebuilt from the base checkpoint): every weight comes back.
    accelerator2, _, model2, optimizer2 = _prepare(seed=1)
    accelerator2.load_state(str(ckpt))
    for a, b in ((model.backbone, model2.backbone), (model.plugin.action_head, model2.plugin.action_head),
                 (model.plugin.energy_head, model2.plugin.energy_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()

    # The checkpoint is a policy: same chunks as the in-memory model.
    policy = EnergyPolicy.from_pretrained(ckpt)
    images, texts = _images(3), ["go left", "go right", "stop"]
    model.eval()
    reference = EnergyPolicy(dataclasses.replace(policy.loaded, model=model), "cpu")
    expected = reference.predict(images, texts, normalized=True)
    assert np.allclose(EnergyPolicy.from_pretrained(ckpt).predict(images, texts, normalized=True), expected, atol=1e-5)


def test_load_state_refuses_a_checkpoint_of_other_lora_options(tmp_path):
    accelerator, loaded, model, optimizer = _prepare(lora_r=4)
    ckpt = save_checkpoint(accelerator, tmp_path / "step_0000001", 1)
    other, *_ = _prepare(lora_r=2)
    with pytest.raises(ValueError, match="does not fit prepared model 0 .* other LoRA / use_lora options"):
        other.load_state(str(ckpt))


def test_policy_dir_is_self_contained_and_loads_in_bfloat16(tmp_path):
    loaded, model = _model()
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({"DataConfig": {"dataset": "org/data", "image_key": "observation.images.top",
                                                     "normalization": "mean_std"}}))
    out = _save(tmp_path / "policy", loaded, model, run_config=run_config)
    names = {p.name for p in out.iterdir()}
    assert {"policy_config.json", "processor", "adapter", "plugin.safetensors", "norm_stats.json",
            "run_config.json", "README.md"} <= names
    info = json.loads((out / "policy_config.json").read_text())
    assert info["processor"] == "processor" and info["dtype"] == "float32" and info["format_version"] == 3
    card = (out / "README.md").read_text()
    assert "datasets:\n- org/data" in card and "normalization `mean_std`" in card

    images, texts = _images(2), ["a", "b"]
    full = EnergyPolicy.from_pretrained(out)
    half = EnergyPolicy.from_pretrained(out, dtype="bfloat16", device="cpu")
    modules = (half.loaded.backbone, half.plugin.action_head, half.plugin.energy_head)
    assert all(p.dtype == torch.bfloat16 for m in modules for p in m.parameters())
    a, b = full.predict(images, texts, normalized=True), half.predict(images, texts, normalized=True)
    assert b.dtype == np.float32 and np.abs(a - b).max() < 0.1
    with pytest.raises(ValueError, match="dtype='float64', expected one of"):
        EnergyPolicy.from_pretrained(out, dtype="float64")


def test_select_action_queue_and_observation_formats(tmp_path):
    loaded, model = _model()
    out = _save(tmp_path / "policy", loaded, model)
    policy = EnergyPolicy.from_pretrained(out, n_action_steps=2)
    image = _images(1)[0]
    pil = {"observation.images.top": Image.fromarray(image), "task": "go"}
    chw = {"observation.images.top": torch.from_numpy(image).permute(2, 0, 1).float() / 255, "task": "go",
           "observation.state": torch.zeros(2)}
    chunk = policy.predict_action_chunk(pil)
    assert chunk.shape == (H, DA) and torch.allclose(policy.predict_action_chunk(chw), chunk)
    raw = policy.predict([image], ["go"])[0]
    assert np.allclose(chunk.numpy(), raw, atol=1e-5)

    calls = []
    original = policy._chunks
    policy._chunks = lambda *a, **k: calls.append(1) or original(*a, **k)
    policy.reset()
    got = [policy.select_action(pil) for _ in range(3)]
    assert len(calls) == 2  # a chunk every n_action_steps = 2 actions
    assert torch.allclose(got[0], chunk[0]) and torch.allclose(got[1], chunk[1]) and torch.allclose(got[2], chunk[0])
    policy.reset()
    batched = {"observation.images.top": np.stack([image, image]), "task": ["go", "go"]}
    step = policy.select_action(batched)
    assert step.shape == (2, DA) and torch.allclose(step[1], chunk[0], atol=1e-5)
    with pytest.raises(ValueError, match="has no 'task'"):
        policy.predict_action_chunk({"observation.images.top": image})
    with pytest.raises(ValueError, match="has the cameras"):
        policy.predict_action_chunk({"observation.images.a": image, "observation.images.b": image, "task": "go"})
    with pytest.raises(ValueError, match="n_action_steps=9"):
        EnergyPolicy.from_pretrained(out, n_action_steps=9)


def test_a_model_on_a_tiny_backbone_saves_the_tiny_name_not_the_cache_path(tmp_path):
    loaded, model = _model()
    model.save_pretrained(tmp_path / "policy", loaded.processor, STATS)
    info = json.loads((tmp_path / "policy" / "policy_config.json").read_text())
    assert info["backbone"] == "tiny-llava" and "backbone_local_path" not in info
    assert EnergyPolicy.from_pretrained(tmp_path / "policy").predict(_images(1), ["go"]).shape == (1, H, DA)


def test_a_policy_saved_in_format_2_loads_and_predicts_the_same(tmp_path):
    """Format 2 kept each head in its own save_pretrained directory and a shorter plugin record."""
    loaded, model = _model()
    out = _save(tmp_path / "policy", loaded, model)
    new = EnergyPolicy.from_pretrained(out).predict(_images(2), ["go", "stop"], normalized=True)
    info = json.loads((out / "policy_config.json").read_text())
    plugin = model.plugin
    for name in ("action_head", "energy_head"):
        getattr(plugin, name).save_pretrained(out / name)
    (out / "plugin.safetensors").unlink()
    info["format_version"] = 2
    info["plugin"] = {k: info["plugin"][k] for k in ("args", "horizon", "action_dim", "action_token_id",
                                                      "state_token_id")}
    (out / "policy_config.json").write_text(json.dumps(info))
    old = EnergyPolicy.from_pretrained(out)
    assert np.allclose(old.predict(_images(2), ["go", "stop"], normalized=True), new, atol=1e-6)
    (out / "state_projector").mkdir()
    with pytest.raises(ValueError, match="incomplete policy"):
        EnergyPolicy.from_pretrained(out)


def test_predicted_chunks_carry_the_energy_the_head_gives_them(tmp_path):
    loaded, model = _model()
    policy = EnergyPolicy.from_pretrained(_save(tmp_path / "policy", loaded, model))
    obs = {"observation.images.top": np.stack(_images(2)), "task": ["go", "stop"]}
    chunk, energy = policy.predict_action_chunk(obs, normalized=True, return_energy=True)
    assert chunk.shape == (2, H, DA) and energy.shape == (2,) and torch.equal(chunk, policy.predict_action_chunk(
        obs, normalized=True))
    readout = policy.encode(list(obs["observation.images.top"]), obs["task"])
    head = policy.plugin.energy_head
    with torch.no_grad():
        expected = head(head.encode_context(readout.context, readout.context_mask), chunk[:, None])[:, 0]
    assert torch.allclose(energy, expected, atol=1e-5)
    # rerank keeps the lowest-energy candidate, the policy's own among them: never a higher energy than the policy's
    _, reranked = policy.predict_action_chunk(obs, mode="rerank", return_energy=True, num_samples=8)
    assert bool((reranked <= energy + 1e-5).all())
    single, e1 = policy.predict_action_chunk({"observation.images.top": _images(1)[0], "task": "go"},
                                             return_energy=True)
    assert single.shape == (H, DA) and e1.shape == ()


def test_candidate_bounds_follow_the_normalization_mode():
    assert candidate_bounds(None) == (None, None)
    q = NormStats(**{**STATS.to_dict(), "mode": "q01_q99"})
    assert candidate_bounds(q) == (-1.0, 1.0)
    low, high = candidate_bounds(STATS)  # mean_std: the data's range, normalized
    assert torch.allclose(low, torch.tensor([-3.0, -3.0, -10 / 3])) and torch.allclose(high, torch.tensor([3.0, 3.0, 3.0]))
    none = NormStats(**{**STATS.to_dict(), "mode": "none"})
    assert torch.equal(candidate_bounds(none)[1], torch.tensor([3.0, 7.0, 11.0]))
    policy = torch.full((2, H, DA), 2.5)
    cands = gaussian_candidates(policy, 9, sigma=1.0, generator=torch.Generator().manual_seed(0), low=low, high=high)
    assert (cands >= low).all() and (cands <= high).all() and (cands > 1.0).any()  # not clamped to [-1, 1]
    free = gaussian_candidates(policy, 3, low=None, high=None)
    assert torch.equal(free[:, 0], policy)


def test_evaluation_preflight(capsys):
    with pytest.raises(ValueError, match=r"needs at least 32 samples .* \(--val_fraction, --num_episodes\).*"
                                         r"--eval_strategy no"):
        check_evaluation("steps", [7] * 40, 31)  # one validation episode: nothing to rank against
    with pytest.raises(ValueError, match="the evaluated validation samples are 20"):
        check_evaluation("steps", list(range(20)), 31)
    assert check_evaluation("steps", [i // 4 for i in range(64)], 31) is True
    assert check_evaluation("steps", [], 31) is False and "evaluation is skipped" in capsys.readouterr().out
    assert check_evaluation("no", [7] * 3, 31) is False


def test_resume_latest_on_first_launch_starts_fresh(tmp_path):
    lines = []
    assert find_resume_checkpoint("latest", tmp_path, log=lines.append) is None
    assert "no complete checkpoint" in lines[0] and "starting from step 0" in lines[0]
    assert find_resume_checkpoint(None, tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        find_resume_checkpoint(str(tmp_path), tmp_path)


def test_heads_load_through_the_auto_classes(tmp_path):
    from transformers import AutoConfig, AutoModel

    from vla_energy.modeling import ActionHead, EnergyHead

    _, model = _model()
    for head, cls in ((model.plugin.action_head, ActionHead), (model.plugin.energy_head, EnergyHead)):
        head.save_pretrained(tmp_path / cls.__name__)
        loaded = AutoModel.from_pretrained(tmp_path / cls.__name__)
        assert type(loaded) is cls and type(AutoConfig.from_pretrained(tmp_path / cls.__name__)) is cls.config_class
        assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))


MISSING_EXTRAS = """
import sys
sys.modules["matplotlib"] = None
sys.modules["tensorboard"] = None
sys.modules["tensorboardX"] = None
from vla_energy.evaluation.report import plot_curves, plots_available
from vla_energy.training.preflight import check_trackers
assert not plots_available()
for call in (lambda: plot_curves("x.png", [], ["loss"], "t"), lambda: check_trackers("none,tensorboard")):
    try:
        call()
    except ImportError as e:
        print(e)
check_trackers("none")
"""


def test_missing_extras_name_what_to_install(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", MISSING_EXTRAS], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pip install 'vla_energy[plots]'" in run.stdout and "pip install 'vla_energy[tensorboard]'" in run.stdout


def test_retrieval_candidates_and_energy_weighted_mean(tmp_path):
    loaded, model = _model()
    chunks = torch.rand(40, H, DA, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = _save(tmp_path / "policy", loaded, model, retrieval_chunks=chunks)
    assert json.loads((out / "policy_config.json").read_text())["retrieval_chunks"] == 40
    policy = EnergyPolicy.from_pretrained(out)
    assert torch.equal(policy.loaded.retrieval_chunks, chunks)
    images, texts = _images(2), ["a", "b"]
    own = torch.from_numpy(policy.predict(images, texts, normalized=True))
    picked = torch.from_numpy(policy.predict(images, texts, mode="rerank", candidates="retrieval", num_samples=5,
                                             normalized=True))
    # A retrieval pick is the policy's own chunk or one of the saved training chunks.
    for row, own_row in zip(picked, own):
        assert torch.allclose(row, own_row, atol=1e-5) or bool(((chunks - row).abs().amax(dim=(1, 2)) < 1e-6).any())
    mean = torch.from_numpy(policy.predict(images, texts, mode="mean", candidates="retrieval", num_samples=5,
                                           normalized=True))
    # The weighted mean lies inside the box spanned by the policy's chunk and its 4 nearest training chunks.
    from vla_energy.inference.candidates import retrieve_nearest

    cands = retrieve_nearest(own, chunks, 5)
    assert bool((mean >= cands.amin(dim=1) - 1e-5).all() and (mean <= cands.amax(dim=1) + 1e-5).all())
    step = policy.predict_action_chunk({"observation.images.top": images[0], "task": "a"}, mode="mean",
                                       candidates="gaussian", normalized=True)
    assert step.shape == (H, DA) and torch.isfinite(step).all()
    with pytest.raises(ValueError, match="candidates='nearest'"):
        policy.predict(images, texts, mode="mean", candidates="nearest")
    bare = EnergyPolicy.from_pretrained(_save(tmp_path / "bare", loaded, model))
    with pytest.raises(ValueError, match="needs the training chunks saved with the policy"):
        bare.predict(images, texts, mode="rerank", candidates="retrieval")


def test_relative_energy_is_measured_against_a_fixed_draw_of_training_chunks(tmp_path):
    from vla_energy.inference.policy import REFERENCE_CHUNKS
    from vla_energy.inference.rerank import relative_energy

    loaded, model = _model()
    chunks = torch.rand(REFERENCE_CHUNKS + 16, H, DA, generator=torch.Generator().manual_seed(0)) * 2 - 1
    policy = EnergyPolicy.from_pretrained(_save(tmp_path / "policy", loaded, model, retrieval_chunks=chunks))
    refs = policy.reference_chunks
    assert refs.shape == (REFERENCE_CHUNKS, H, DA) and refs is policy.reference_chunks  # drawn once
    assert all(bool(((chunks - r).abs().amax(dim=(1, 2)) == 0).any()) for r in refs)
    again = EnergyPolicy.from_pretrained(tmp_path / "policy").reference_chunks
    assert torch.equal(refs, again)  # seeded: the same references in every process
    obs = {"observation.images.top": np.stack(_images(2)), "task": ["go", "stop"]}
    chunk, energy, rel = policy.predict_action_chunk(obs, mode="rerank", normalized=True, return_energy=True,
                                                     relative_energy=True, num_samples=4)
    head = policy.plugin.energy_head
    readout = policy.encode(list(obs["observation.images.top"]), obs["task"])
    ctx = head.encode_context(readout.context, readout.context_mask)
    torch.testing.assert_close(rel, relative_energy(head, ctx, chunk, refs, policy.plugin.args.tau))
    single = policy.predict_action_chunk({"observation.images.top": _images(1)[0], "task": "go"},
                                         return_energy=True, relative_energy=True)
    assert [tuple(t.shape) for t in single] == [(H, DA), (), ()]
    with pytest.raises(ValueError, match="pass return_energy=True too"):
        policy.predict_action_chunk(obs, relative_energy=True)
    bare = EnergyPolicy.from_pretrained(_save(tmp_path / "bare", loaded, model))
    assert bare.reference_chunks is None
    with pytest.raises(ValueError, match="saved no training chunks to measure relative energies against"):
        bare.predict_action_chunk(obs, return_energy=True, relative_energy=True)


def test_add_retrieval_chunks_to_a_policy_saved_without_them(tmp_path, monkeypatch):
    from vla_energy.data.arguments import DataConfig
    from vla_energy.training.retrieval_chunks import add_retrieval_chunks

    loaded, model = _model()
    cfg = DataConfig(dataset="synthetic", num_episodes=6, horizon=H, min_episode_length=4, max_episode_length=6,
                     val_fraction=0.34)
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({cls: {} for cls in ("ModelArguments", "LoraArguments", "EnergyArguments",
                                                          "TrainArguments")} | {"DataConfig": dataclasses.asdict(cfg)}))
    out = _save(tmp_path / "policy", loaded, model, run_config=run_config)
    assert EnergyPolicy.from_pretrained(out).loaded.retrieval_chunks is None
    monkeypatch.chdir(tmp_path)  # a relative synthetic cache is written here
    count = add_retrieval_chunks(out, count=7, progress=False)
    policy = EnergyPolicy.from_pretrained(out)
    assert count == 7 and policy.loaded.retrieval_chunks.shape == (7, H, DA)
    assert json.loads((out / "policy_config.json").read_text())["retrieval_chunks"] == 7
    with pytest.raises(ValueError, match="count=0"):
        add_retrieval_chunks(out, count=0)


def test_candidate_bounds_keep_a_constant_dimension_at_its_value():
    stats = NormStats("q01_q99", [0.0, 0.0, 0.5], [1.0, 1.0, 0.0], [-1.0, -2.0, 0.5], [1.0, 2.0, 0.5],
                      [-3.0, -5.0, 0.5], [3.0, 7.0, 0.5], 100)
    assert stats.constant_dims().tolist() == [False, False, True]
    low, high = candidate_bounds(stats)
    assert low.tolist() == [-1.0, -1.0, 0.0] and high.tolist() == [1.0, 1.0, 0.0]
    policy = torch.full((2, H, DA), 0.3)
    cands = gaussian_candidates(policy, 9, sigma=0.5, generator=torch.Generator().manual_seed(0), low=low, high=high)
    assert (cands[..., 2] == 0).all() and (cands[..., :2] != 0.3).any()
    assert torch.allclose(torch.as_tensor(stats.unnormalize(cands))[..., 2], torch.tensor(0.5))
    rare = NormStats("q01_q99", [0.0] * 3, [1.0] * 3, [-1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-2.0, -2.0, 0.0],
                     [2.0, 2.0, 1.0], 100)  # a gripper closed in under 1% of the frames still moves
    assert candidate_bounds(rare) == (-1.0, 1.0)


def test_every_mode_outputs_and_scores_a_constant_dimension_at_its_value(tmp_path):
    constant = NormStats("q01_q99", [0.0, 0.0, 0.5], [1.0, 1.0, 0.0], [-1.0, -2.0, 0.5], [1.0, 2.0, 0.5],
                         [-3.0, -5.0, 0.5], [3.0, 7.0, 0.5], 100)
    moving = NormStats(**{**constant.to_dict(), "q01": [-1.0, -2.0, 0.0], "q99": [1.0, 2.0, 1.0],
                                             "min": [-3.0, -5.0, 0.0], "max": [3.0, 7.0, 1.0]})
    loaded, model = _model()
    pinned = EnergyPolicy.from_pretrained(save_policy(tmp_path / "c", model, loaded.processor, constant,
                                                      base=loaded.name))
    free = EnergyPolicy.from_pretrained(save_policy(tmp_path / "m", model, loaded.processor, moving,
                                                    base=loaded.name))
    obs = {"observation.images.top": np.stack(_images(2)), "task": ["go", "stop"]}
    raw = free.predict_action_chunk(obs, normalized=True)
    assert (raw[..., 2] != 0).all()  # the head itself puts something there
    chunk, energy = pinned.predict_action_chunk(obs, normalized=True, return_energy=True)
    assert (chunk[..., 2] == 0).all() and torch.equal(chunk[..., :2], raw[..., :2])
    assert torch.allclose(torch.as_tensor(pinned.predict_action_chunk(obs))[..., 2], torch.tensor(0.5))
    readout = pinned.encode(list(obs["observation.images.top"]), obs["task"])
    head = pinned.plugin.energy_head
    with torch.no_grad():
        expected = head(head.encode_context(readout.context, readout.context_mask), chunk[:, None])[:, 0]
    assert torch.allclose(energy, expected, atol=1e-5)  # the energy is the pinned chunk's, not the raw one's
    for mode in ("rerank", "mean"):
        assert (pinned.predict_action_chunk(obs, normalized=True, mode=mode, num_samples=6)[..., 2] == 0).all()
