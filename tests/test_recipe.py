"""recipes/train_energy.py end to end: 2 processes, outputs, resume (step count and bank), configs parse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vla_energy.training.arguments import load_yaml, parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*(ROOT / "vla_energy" / "training" / "configs").glob("*.yaml"),
                  *(ROOT / "benchmarks" / "configs").glob("*.yaml")])


def _launch(args: list[str], tmp_path: Path, port: int, processes: int = 2,
            script: Path = ROOT / "recipes" / "train_energy.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(tmp_path / "cache")}
    launcher = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


SMALL = ["--backbone", "tiny-llava", "--num_episodes", "30", "--horizon", "4", "--per_device_train_batch_size", "4",
         "--eval_steps", "0", "--eval_max_samples", "48", "--val_fraction", "0.25", "--logging_steps", "1", "--lora_r", "4",
         "--energy_hidden_dim", "32", "--action_head_dim", "32", "--report_to", "none", "--disable_tqdm",
         "--progressive_schedule", "false", "--bank_size", "32", "--strategy", "combined"]


def test_two_processes_end_to_end_and_resume(tmp_path):
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "t"]
    first = _launch([*SMALL, *out, "--max_steps", "3", "--save_steps", "2"], tmp_path, 29641)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run = tmp_path / "runs" / "t"
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("top1_acc", "chance_acc", "e_pos", "e_neg", "gap", "action_l1", "steps", "world_size", "local_batch",
                "grad_accum", "negatives_per_positive"):
        assert key in metrics, key
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 and metrics["chance_acc"] == pytest.approx(1 / 32)
    # 2 x 4 samples gathered: 7 batch negatives + 8 explicit + bank entries (all but the positive's own).
    assert metrics["negatives_per_positive"] >= 15
    for name in ("report.md", "loss.png", "accuracy.png", "energy_hist.png", "run_config.json"):
        assert (run / name).exists(), name
    assert (run / "model" / "plugin.safetensors").exists()
    ckpt = run / "checkpoints" / "step_0000002"
    assert (ckpt / "checkpoint_complete.json").exists()
    # Our own state is safetensors + JSON; nothing of ours is pickled (accelerate's custom_checkpoint_*.pkl).
    assert (ckpt / "energy_plugin.safetensors").exists() and (ckpt / "train_state.json").exists()
    assert not list(ckpt.glob("custom_checkpoint_*"))

    resumed = _launch([*SMALL, *out, "--max_steps", "4", "--resume_from_checkpoint", "latest"], tmp_path, 29642)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout + resumed.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4
    # The bank came back (16 entries after 2 steps of 8) and grew by 2 more steps: 32 (its size).
    assert metrics["bank_entries"] == 32
    _check_evaluate_and_policy(run, tmp_path)


def _check_evaluate_and_policy(run, tmp_path):
    """`vla-energy evaluate` on the run matches a direct computation; EnergyPolicy predicts in all modes."""
    import numpy as np
    import torch

    from vla_energy.cli import main as cli_main
    from vla_energy.data import build_datasets
    from vla_energy.data.split import spread_indices
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.training.arguments import load_run_config

    os.environ["VLA_ENERGY_CACHE"] = str(tmp_path / "cache")
    assert cli_main(["evaluate", str(run), "--max_samples", "40", "--disable_tqdm"]) == 0
    out = json.loads((run / "eval_val" / "metrics.json").read_text())
    for name in ("energy_by_type.png", "accuracy_by_type.png", "selection.png", "report.md"):
        assert (run / "eval_val" / name).exists()
    for kind in ("other_episodes", "layer", "noise0.1", "noise0.2", "noise0.4", "shuffle"):
        assert 0.0 <= out[f"acc/{kind}"] <= 1.0 and f"gap/{kind}" in out

    policy = EnergyPolicy.from_pretrained(run)
    _, data_cfg, *_ = load_run_config(run)
    _, val, _ = build_datasets(data_cfg, progress=False)
    rows = [val[i] for i in spread_indices(len(val), 40)]
    images, texts = [r["image"] for r in rows], [r["instruction"] for r in rows]
    chunks = {m: policy.predict(images, texts, mode=m, normalized=True) for m in ("policy", "rerank", "refine")}
    assert all(c.shape == (40, 4, 3) for c in chunks.values())
    # Direct computation of the policy's L1 on the same 40 samples equals the command's number.
    truth = np.array([r["actions"] for r in rows])
    mask = np.array([r["action_mask"] for r in rows])[..., None]
    direct = float((np.abs(chunks["policy"] - truth) * mask).sum() / (mask.sum() * truth.shape[-1]))
    assert out["l1/policy"] == pytest.approx(direct, rel=1e-4) and out["action_l1"] == pytest.approx(direct, rel=1e-4)
    raw = policy.predict(images[:2], texts[:2])
    assert np.allclose(raw, policy.loaded.norm_stats.unnormalize(chunks["policy"][:2]), atol=1e-5)
    # Refine never raises the energy of the policy's chunk.
    readout = policy.encode(images, texts)
    head = policy.plugin.energy_head
    with torch.no_grad():
        e_pol = head(readout.context, torch.from_numpy(chunks["policy"]), context_mask=readout.context_mask)
        e_ref = head(readout.context, torch.from_numpy(chunks["refine"]), context_mask=readout.context_mask)
    assert bool((e_ref <= e_pol + 1e-6).all())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_parses(path):
    assert load_yaml(path)
    model, data, lora, energy, train = parse_config(["--config", str(path)])
    assert train.per_device_train_batch_size >= 1 and data.horizon >= 1


def test_cli_overrides_yaml_and_unknown_keys_fail(tmp_path, monkeypatch):
    *_, train = parse_config(["--config", "demo", "--max_steps", "7"])
    assert train.max_steps == 7
    (tmp_path / "demo").mkdir()  # a directory named like the shipped config (e.g. a run's) does not shadow it
    monkeypatch.chdir(tmp_path)
    assert parse_config(["--config", "demo"])[-1].max_steps == 900
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_step: 3\n")
    with pytest.raises(ValueError, match=r"unknown options \['max_step'\]"):
        load_yaml(bad)


def test_configuration_reference_is_current():
    from vla_energy.training.arguments import config_reference_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference_markdown(), (
        "docs/configuration.md is stale: python -m vla_energy.training.arguments > docs/configuration.md"
    )


def test_bad_training_options_fail_early():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        parse_config(["--on_nonfinite", "ignore"])
    with pytest.raises(ValueError, match="per_device_train_batch_size=0"):
        parse_config(["--per_device_train_batch_size", "0"])
    with pytest.raises(ValueError, match="candidate_ranking=1"):
        parse_config(["--candidate_ranking", "1"])
    with pytest.raises(ValueError, match="retrieval_chunks=-1"):
        parse_config(["--retrieval_chunks", "-1"])


def test_frozen_backbone_two_processes(tmp_path):
    """use_lora false: the backbone stays out of DDP (it has nothing to train) and the heads still train."""
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "frozen", "--use_lora", "false", "--max_steps", "2",
           "--save_steps", "2"]
    run = _launch([*SMALL, *out], tmp_path, 29643)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "frozen" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["world_size"] == 2
    ckpt = tmp_path / "runs" / "frozen" / "checkpoints" / "step_0000002"
    assert (ckpt / "checkpoint_complete.json").exists() and (ckpt / "model.safetensors").exists()


def test_two_by_two_trains_like_one_by_four(tmp_path):
    """Same samples per step: 2 processes x 2 follow 1 process x 4 (policy L1, global InfoNCE, gradient norm)."""
    histories = {}
    for processes, port in ((1, 29644), (2, 29645)):
        name = f"w{processes}"
        args = [*SMALL, "--output_dir", str(tmp_path / "runs"), "--run_name", name, "--max_steps", "3",
                "--per_device_train_batch_size", str(4 // processes), "--strategy", "global", "--bank_size", "0"]
        run = _launch(args, tmp_path, port, processes=processes)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        history = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["history"]
        histories[processes] = [h for h in history if "l1" in h]
    assert [h["step"] for h in histories[1]] == [h["step"] for h in histories[2]] == [1, 2, 3]
    for one, two in zip(histories[1], histories[2]):
        for key in ("l1", "energy_loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4), (one["step"], key)


def test_init_from_a_saved_policy(tmp_path):
    """init_from: backbone, adapter and action head come from the saved policy; use_lora false keeps them frozen."""
    runs = tmp_path / "runs"
    first = _launch([*SMALL, "--output_dir", str(runs), "--run_name", "a", "--max_steps", "2"], tmp_path, 29646,
                    processes=1)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    a = json.loads((runs / "a" / "metrics.json").read_text())

    # lr 0: nothing moves, so the held-out policy error is the saved policy's.
    same = _launch([*SMALL, "--output_dir", str(runs), "--run_name", "same", "--max_steps", "1", "--init_from",
                    str(runs / "a"), "--learning_rate", "0"], tmp_path, 29647, processes=1)
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert json.loads((runs / "same" / "metrics.json").read_text())["action_l1"] == pytest.approx(a["action_l1"],
                                                                                                 rel=1e-6)
    # Frozen backbone and adapter under 2 processes: only the heads train.
    frozen = _launch([*SMALL, "--output_dir", str(runs), "--run_name", "frozen", "--max_steps", "2", "--init_from",
                      str(runs / "a" / "model"), "--use_lora", "false"], tmp_path, 29648)
    assert frozen.returncode == 0, frozen.stdout[-3000:] + frozen.stderr[-3000:]
    for part, prefix, moved in (("adapter/adapter_model.safetensors", "", False),
                                ("action_token_embedding.safetensors", "", False),
                                ("plugin.safetensors", "action_head.", True)):
        before, after = ({k: v for k, v in load_file(str(runs / run / "model" / part)).items() if k.startswith(prefix)}
                         for run in ("a", "frozen"))
        assert before and before.keys() == after.keys()
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed == moved, part

    # Another kind of action head: the backbone and adapter carry over (frozen here), the flow head starts fresh.
    flow = _launch([*SMALL, "--output_dir", str(runs), "--run_name", "flow", "--max_steps", "1", "--init_from",
                    str(runs / "a"), "--use_lora", "false", "--action_head", "flow"], tmp_path, 29650, processes=1)
    assert flow.returncode == 0, flow.stdout[-3000:] + flow.stderr[-3000:]
    assert "its action head is 'l1', this run's --action_head is 'flow'" in flow.stderr
    adapters = [load_file(str(runs / run / "model" / "adapter/adapter_model.safetensors")) for run in ("a", "flow")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    info = json.loads((runs / "flow" / "model" / "policy_config.json").read_text())
    assert info["plugin"]["args"]["action_head"] == "flow"

    wrong = _launch([*SMALL, "--output_dir", str(runs), "--run_name", "wrong", "--max_steps", "1", "--init_from",
                     str(runs / "a"), "--horizon", "3"], tmp_path, 29649, processes=1)
    assert wrong.returncode != 0 and "its action head predicts (horizon, action_dim) = (4, " in wrong.stderr
