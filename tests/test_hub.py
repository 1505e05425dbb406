"""Hub sharing offline: push_to_hub's folder and card (only the network call is replaced), and loading a real-format
base and a policy by repo id from a hub cache laid out as huggingface_hub lays it (HF_HUB_CACHE, refs/main)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import save_policy
from vla_energy.training.run_report import add_results_to_policy

ROOT = Path(__file__).resolve().parents[1]


def _policy_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=4))
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), hidden_size_of(loaded.model), 3,
                          4, loaded.action_token_id)
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({"DataConfig": {"dataset": "synthetic", "normalization": "q01_q99"},
                                      "TrainArguments": {"max_steps": 7, "learning_rate": 0.001}}))
    return save_policy(tmp_path / "policy", EnergyVLAModel(backbone, plugin), loaded.processor, base=loaded.name,
                       run_config=run_config)


def test_push_to_hub_uploads_the_policy_files_with_a_model_card(tmp_path, monkeypatch):
    out = _policy_dir(tmp_path)
    (tmp_path / "loss.png").write_bytes(b"\x89PNG fake")
    add_results_to_policy(out, {"top1_acc": 0.75, "chance_acc": 1 / 32, "steps": 7.0}, tmp_path)
    (out / "optimizer.bin").write_bytes(b"not part of a policy")  # as a checkpoint directory would hold
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))

    EnergyPolicy.from_pretrained(out).push_to_hub("org/my-policy", private=True)
    assert calls["create"] == ("org/my-policy", {"repo_type": "model", "private": True, "exist_ok": True})
    upload = calls["upload"]
    assert upload["repo_id"] == "org/my-policy" and Path(upload["folder_path"]) == out
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    sent = set(filter_repo_objects(files, allow_patterns=upload["allow_patterns"]))
    assert "optimizer.bin" not in sent
    assert {"policy_config.json", "README.md", "metrics.json", "loss.png", "adapter/adapter_model.safetensors",
            "plugin.safetensors", "processor/tokenizer.json",
            "action_token_embedding.safetensors"} <= sent
    card = (out / "README.md").read_text()
    assert "library_name: vla_energy" in card and "pipeline_tag: robotics" in card
    assert "| top1_acc | 0.7500 |" in card and "![loss](loss.png)" in card and "| max_steps | 7 |" in card


HUB_CACHE_SCRIPT = r"""
import hashlib, json, os, shutil, sys
from pathlib import Path
import numpy as np, torch
from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data.normalization import NormStats
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.modeling.serialization import LoadedPolicy, save_policy
from vla_energy.backbones.tiny import build_tiny_checkpoint
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel

tmp, cache = Path(sys.argv[1]), Path(os.environ["HF_HUB_CACHE"])

def lay(repo, src):
    '''A folder placed in the hub cache as huggingface_hub lays a download out: snapshots/<commit>, refs/main.'''
    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(src, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit

base_commit = lay("org/tiny-llava", build_tiny_checkpoint("llava", tmp / "base_src"))
torch.manual_seed(0)
loaded = load_backbone("org/tiny-llava")  # by repo id, offline, from the cache
backbone = apply_lora(loaded.model, LoraArguments(lora_r=4))
plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), hidden_size_of(loaded.model), 3, 4,
                      loaded.action_token_id)
with torch.no_grad():  # the new action token's row must travel with the policy
    loaded.model.get_input_embeddings().weight[loaded.action_token_id] += 1.0
stats = NormStats("q01_q99", [0.0] * 3, [1.0] * 3, [-2.0] * 3, [2.0] * 3, [-3.0] * 3, [3.0] * 3, 10)
model = EnergyVLAModel(backbone, plugin)
out = save_policy(tmp / "policy", model, loaded.processor, stats, base=loaded.name)
info = json.loads((out / "policy_config.json").read_text())
assert info["revision"] == base_commit, info
assert (out / "processor").is_dir() and not (out / "backbone").exists() and not (out / "merged").exists()
model.eval()
images = [np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
ref = EnergyPolicy(LoadedPolicy(model, loaded.processor, stats, info, out)).predict(images, ["a", "b"])

policy_commit = lay("org/my-policy", out)
shutil.rmtree(out)  # nothing left but the cache
policy = EnergyPolicy.from_pretrained("org/my-policy")
assert policy.loaded.path.name == policy_commit and policy.loaded.path.parent.name == "snapshots"
assert np.allclose(policy.predict(images, ["a", "b"]), ref, atol=1e-5)
half = EnergyPolicy.from_pretrained("org/my-policy", dtype="bfloat16")
assert next(half.loaded.backbone.parameters()).dtype == torch.bfloat16
assert np.abs(half.predict(images, ["a", "b"]) - ref).max() < 0.5
try:
    EnergyPolicy.from_pretrained("org/not-cached")
except FileNotFoundError as e:
    assert "downloading it from the hub failed" in str(e)
else:
    raise AssertionError("an uncached repo offline must fail")
print("HUB CACHE OK")
"""


def test_base_and_policy_load_by_repo_id_from_the_hub_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", HUB_CACHE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and "HUB CACHE OK" in run.stdout, run.stdout[-2000:] + run.stderr[-4000:]
