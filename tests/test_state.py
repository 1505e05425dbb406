"""Proprioceptive state: the state token per family, its embedding from the projector, the energy context, gradient,
errors, policy save/load with state normalization, the recipe end to end with use_state."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vla_energy.backbones.action_token import add_state_token
from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import backbone_forward, hidden_size_of
from vla_energy.backbones.tiny import processor_unavailable
from vla_energy.data.collator import VLACollator
from vla_energy.data.normalization import NormStats
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import LoadedPolicy, save_policy
from vla_energy.modeling.state_projector import inject_state_embedding

ROOT = Path(__file__).resolve().parents[1]
H, DA, DS, B = 4, 3, 4, 3
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(processor_unavailable(f) is not None,
                                                     reason=str(processor_unavailable(f))))
            for f in ("llava", "paligemma", "idefics3")]
STATE_STATS = NormStats("mean_std", [1.0, 2.0, 0.0, 0.0], [2.0, 2.0, 0.5, 0.5], [-1.0] * 4, [1.0] * 4,
                        [-3.0] * 4, [3.0] * 4, 100)
STATS = NormStats("mean_std", [0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [-1.0] * 3, [1.0] * 3, [-3.0, -5.0, -8.0],
                  [3.0, 7.0, 11.0], 100, state=STATE_STATS)


def _model(family: str = "llava", **energy: object):
    """A LoRA backbone with the state token and an EnergyVLAModel with a state projector (weights scaled up, so that
    the state visibly moves the outputs of the random tiny backbone)."""
    torch.manual_seed(0)
    loaded = load_backbone(f"tiny-{family}")
    state_id = add_state_token(loaded.processor, loaded.model)
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=4))
    args = EnergyArguments(strategy="inbatch", energy_hidden_dim=32, action_head_dim=32, **energy)
    plugin = EnergyPlugin(args, hidden_size_of(loaded.model), DA, H, loaded.action_token_id, state_dim=DS,
                          state_token_id=state_id)
    with torch.no_grad():
        for p in plugin.state_projector.parameters():
            p.normal_(std=0.5)
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token, state_token="<|state|>")
    return loaded, EnergyVLAModel(backbone, plugin), collator


def _examples(n: int = B, seed: int = 1) -> list[dict]:
    rng = np.random.RandomState(seed)
    return [{"image": rng.randint(0, 256, (32, 32, 3), dtype=np.uint8), "instruction": f"move to target {i}",
             "actions": rng.uniform(-1, 1, (H, DA)).astype(np.float32), "sample_id": i, "episode_index": i,
             "state": rng.uniform(-1, 1, DS).astype(np.float32)} for i in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_state_token_once_per_row_and_its_hidden_state_follows_the_state(family):
    loaded, model, collator = _model(family)
    model.eval()
    batch = collator(_examples())
    ids, sid = batch["input_ids"], model.plugin.state_token_id
    assert (ids == sid).sum(dim=1).tolist() == [1] * B
    # Right before the first action placeholder.
    first_action = (ids == loaded.action_token_id).int().argmax(dim=1)
    assert torch.equal((ids == sid).int().argmax(dim=1), first_action - 1)

    def run(state):
        inputs = {**batch, "state": state}
        with torch.no_grad(), inject_state_embedding(model.backbone, sid, model.plugin.project_state(inputs)):
            hidden = backbone_forward(model.backbone, inputs).hidden_states[-1]
        at_state = hidden[(ids == sid)]  # [B, D]; inserted image tokens do not shift rows of these families
        assert hidden.shape[1] == ids.shape[1]
        return at_state, model(**inputs).policy

    moved = batch["state"].clone()
    moved[0] += 1.0
    h0, p0 = run(batch["state"])
    h1, p1 = run(moved)
    assert (h1[0] - h0[0]).abs().max() > 1e-3 and (p1[0] - p0[0]).abs().max() > 1e-5
    torch.testing.assert_close(h1[1:], h0[1:])  # each row reads its own state
    torch.testing.assert_close(p1[1:], p0[1:])


def test_gradient_reaches_the_projector_and_the_energy_context_gets_one_token():
    loaded, model, collator = _model()
    model.train()
    model.plugin.setup(_accelerator(), B)
    batch = collator(_examples())
    model(**batch).loss.backward()
    grads = [p.grad for p in model.plugin.state_projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert any(p is model.plugin.state_projector.fc1.weight for p in model.policy_parameters())  # in the policy group
    # The energy context: one more, real token holding the projected state (switchable).
    with torch.no_grad():
        emb = model.plugin.project_state(batch)
        with inject_state_embedding(model.backbone, model.plugin.state_token_id, emb):
            out = backbone_forward(model.backbone, batch)
        plain = model.plugin.read(out, batch)
        with_state = model.plugin.read(out, batch, emb)
    assert with_state.context.shape[1] == plain.context.shape[1] + 1 and bool(with_state.context_mask[:, -1].all())
    torch.testing.assert_close(with_state.context[:, -1], emb)
    model.plugin.args.state_in_energy_context = False
    assert model.plugin.read(out, batch, emb).context.shape == plain.context.shape


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def test_missing_or_misshaped_state_is_a_clear_error():
    _, model, collator = _model()
    model.eval()
    model.plugin.setup(_accelerator(), B)
    batch = collator(_examples())
    with pytest.raises(ValueError, match="batch has no 'state'"):
        model(**{k: v for k, v in batch.items() if k != "state"})
    with pytest.raises(ValueError, match=r"state has shape \(3, 2\), expected \(B, Ds=4\)"):
        model(**{**batch, "state": batch["state"][:, :2]})
    # A prompt without the state token (collated without state_token) cannot take a state.
    plain = VLACollator(collator.processor, horizon=H, action_token=collator.action_token)(_examples())
    with pytest.raises(ValueError, match="0, 0, 0.*state tokens"):
        model(**plain)


def test_policy_round_trip_normalizes_the_state_and_predicts_the_same(tmp_path):
    loaded, model, _ = _model()
    model.eval()
    info = {"action_token": loaded.action_token, "state_token": "<|state|>"}
    in_memory = EnergyPolicy(LoadedPolicy(model, loaded.processor, STATS, info))
    save_policy(tmp_path / "model", model, loaded.processor, STATS, base=loaded.name)
    saved = load_file(str(tmp_path / "model" / "plugin.safetensors"))
    assert {"state_projector.fc1.weight", "state_projector.fc2.weight"} <= set(saved)
    policy = EnergyPolicy.from_pretrained(tmp_path / "model")
    assert policy.uses_state
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    raw = torch.tensor([[1.0, 2.0, 0.3, -0.2], [3.0, 0.0, -0.4, 0.1]])
    obs = {"observation.image": images, "observation.state": raw, "task": "go"}
    chunk = policy.predict_action_chunk(obs)
    torch.testing.assert_close(chunk, in_memory.predict_action_chunk(obs))
    # The state is normalized with the saved NormStats.state: giving the normalized values raw changes the chunk.
    assert torch.allclose(policy.normalize_state(raw), (raw - torch.tensor([1.0, 2.0, 0.0, 0.0]))
                          / torch.tensor([2.0, 2.0, 0.5, 0.5]))
    other = policy.predict_action_chunk({**obs, "observation.state": policy.normalize_state(raw)})
    assert (other - chunk).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs 'observation.state'"):
        policy.predict_action_chunk({k: v for k, v in obs.items() if k != "observation.state"})
    with pytest.raises(ValueError, match=r"expected \(B, Ds=4\)"):
        policy.predict_action_chunk({**obs, "observation.state": raw[:, :3]})


def test_recipe_with_state_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29901",
           "-m", "vla_energy.training.train", "--backbone", "tiny-llava", "--num_episodes", "30", "--horizon", "4",
           "--per_device_train_batch_size", "4", "--eval_steps", "0", "--eval_max_samples", "48",
           "--eval_num_negatives", "7", "--val_fraction", "0.25", "--lora_r", "4", "--energy_hidden_dim", "32",
           "--action_head_dim", "32", "--report_to", "none", "--disable_tqdm", "--max_steps", "2", "--save_steps", "2",
           "--use_state", "true", "--synthetic_state", "goal_offset", "--output_dir", str(tmp_path / "runs"),
           "--run_name", "s"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "runs" / "s"
    assert json.loads((run / "metrics.json").read_text())["steps"] == 2
    info = json.loads((run / "model" / "policy_config.json").read_text())
    assert info["state_token"] == "<|state|>" and info["plugin"]["state_token_id"] == info["state_token_id"]
    ckpt = run / "checkpoints" / "step_0000002"
    assert {k for k in load_file(str(ckpt / "model.safetensors")) if k.startswith("plugin.state_projector.")} == {
        "plugin.state_projector.fc1.weight", "plugin.state_projector.fc1.bias", "plugin.state_projector.fc2.weight",
        "plugin.state_projector.fc2.bias"}
    assert {k for k in load_file(str(ckpt / "plugin.safetensors")) if k.startswith("state_projector.")} == {
        "state_projector.fc1.weight", "state_projector.fc1.bias", "state_projector.fc2.weight",
        "state_projector.fc2.bias"}
    assert json.loads((ckpt / "policy_config.json").read_text())["plugin"]["state_dim"] == 4
    stats = NormStats.load(run / "model" / "norm_stats.json")
    assert stats.state is not None and stats.state.action_dim == 4  # goal_offset: (x, y, ox, oy)
    policy = EnergyPolicy.from_pretrained(run)
    obs = {"observation.image": np.zeros((32, 32, 3), np.uint8), "observation.state": [0.5, 0.5, 0.1, -0.1],
           "task": "go to the red square"}
    assert tuple(policy.predict_action_chunk(obs).shape) == (4, 3)
    # `vla-energy evaluate`'s collection writes the state token and feeds the projected state, as training did.
    from vla_energy.data import build_datasets
    from vla_energy.evaluation.metrics import collect_eval_outputs
    from vla_energy.training.arguments import load_run_config

    data_cfg = load_run_config(run)[1]
    _, val_ds, _ = build_datasets(data_cfg, progress=False)
    collator = VLACollator(policy.loaded.processor, horizon=4, action_token=policy.loaded.info["action_token"],
                           state_token=policy.loaded.info.get("state_token"))
    result = collect_eval_outputs(policy.loaded.model, [collator([val_ds[i] for i in range(4)])], progress=False)
    # The same chunk as EnergyPolicy gives for that sample's raw state, and one more context token (the state).
    row = val_ds[0]
    obs = {"observation.image": row["image"], "task": row["instruction"],
           "observation.state": stats.state.unnormalize(np.asarray(row["state"], np.float32))}
    torch.testing.assert_close(policy.predict_action_chunk(obs, normalized=True), result.policy[0], atol=1e-4, rtol=0)
    real = collator([row])["attention_mask"].sum()
    assert result.contexts[0].shape[0] == real + 1
