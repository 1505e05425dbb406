"""The training recipe keeps its policy: pre-flight evaluation check, no-evaluation runs, the requeue pattern
(`--resume_from_checkpoint latest` on a first launch), checkpoints that load as policies."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--backbone", "tiny-llava", "--num_episodes", "20", "--horizon", "4", "--per_device_train_batch_size", "4",
         "--eval_max_samples", "48", "--logging_steps", "1", "--lora_r", "4", "--energy_hidden_dim", "32",
         "--action_head_dim", "32", "--report_to", "none", "--disable_tqdm", "--progressive_schedule", "false"]


def _launch(args: list[str], tmp_path: Path, port: int, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}
    launcher = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "vla_energy.training.train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_impossible_evaluation_fails_before_training(tmp_path):
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "bad", "--max_steps", "50"]
    run = _launch([*SMALL, *out, "--val_fraction", "0.05"], tmp_path, 29750)
    assert run.returncode != 0
    assert "--val_fraction, --num_episodes" in run.stderr and "--eval_strategy no" in run.stderr
    assert "train [" not in run.stderr and not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_no_validation_split_trains_requeues_and_checkpoints_load_as_policies(tmp_path):
    """val_fraction 0: no evaluation, a policy all the same; `latest` with no checkpoint yet starts fresh."""
    from vla_energy.inference.policy import EnergyPolicy

    runs = tmp_path / "runs"
    out = ["--output_dir", str(runs), "--run_name", "noval", "--val_fraction", "0", "--max_steps", "2",
           "--save_steps", "1", "--save_total_limit", "1", "--resume_from_checkpoint", "latest"]
    run = _launch([*SMALL, *out], tmp_path, 29751, processes=1)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "no complete checkpoint" in log and "starting from step 0" in log and "evaluation is skipped" in log
    model, ckpt = runs / "noval" / "model", runs / "noval" / "checkpoints" / "step_0000002"
    metrics = json.loads((model / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "top1_acc" not in metrics
    assert "datasets" not in (model / "README.md").read_text().split("---")[1]  # synthetic: no hub dataset
    # The last checkpoint is the final policy: same weights, same chunks.
    images = [np.random.RandomState(i).randint(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(2)]
    a = EnergyPolicy.from_pretrained(model).predict(images, ["a", "b"])
    b = EnergyPolicy.from_pretrained(ckpt).predict(images, ["a", "b"])
    assert np.allclose(a, b, atol=1e-6)
    # Both carry the training chunks for candidates="retrieval" (fewer rows than the default cap of 16384).
    chunks = [load_file(str(d / "retrieval_chunks.safetensors"))["chunks"] for d in (model, ckpt)]
    assert torch.equal(chunks[0], chunks[1]) and 0 < chunks[0].shape[0] < 16384 and chunks[0].abs().max() <= 1
    a = EnergyPolicy.from_pretrained(model).predict(images, ["a", "b"], mode="mean", candidates="retrieval")
    b = EnergyPolicy.from_pretrained(ckpt).predict(images, ["a", "b"], mode="mean", candidates="retrieval")
    assert np.allclose(a, b, atol=1e-6)
    # The checkpoint carries the adapter and the heads, not the frozen backbone (tiny llava has no persistent
    # buffers); the base is referred to by name.
    saved = load_file(str(ckpt / "model.safetensors"))
    backbone_keys = [k for k in saved if k.startswith("backbone.")]
    assert backbone_keys and all("lora_" in k for k in backbone_keys)
    assert {k.split(".")[0] for k in saved} == {"backbone", "plugin"}
    assert {k.split(".")[1] for k in saved if k.startswith("plugin.")} == {"action_head", "energy_head"}
    assert not (ckpt / "backbone").exists() and not (runs / "noval" / "base").exists()


def test_ranking_and_alignment_terms_train_under_ddp(tmp_path, monkeypatch):
    """candidate_ranking and grad_align_weight (a double backward through the DDP-wrapped head) on 2 processes; the
    retrieval chunks' context keys, each process encoding its share, are those of the saved policy, in order."""
    from vla_energy.training.retrieval_chunks import add_retrieval_chunks

    runs = tmp_path / "runs"
    out = ["--output_dir", str(runs), "--run_name", "terms", "--max_steps", "3", "--eval_strategy", "no",
           "--candidate_ranking", "4", "--grad_align_weight", "0.5", "--policy_error_negatives", "1",
           "--retrieval_chunks", "23", "--retrieval_contexts", "--per_device_eval_batch_size", "4"]
    run = _launch([*SMALL, *out], tmp_path, 29752)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    history = json.loads((runs / "terms" / "metrics.json").read_text())["history"]
    logged = [h for h in history if "energy/ranking_loss" in h]
    assert len(logged) == 3 and all(h["energy/ranking_loss"] > 0 and -1 <= h["energy/grad_align_cos"] <= 1
                                    for h in logged)
    model = runs / "terms" / "model"
    info = json.loads((model / "policy_config.json").read_text())
    assert info["plugin"]["args"]["candidate_ranking"] == 4 and info["plugin"]["args"]["grad_align_weight"] == 0.5
    trained = load_file(str(model / "retrieval_chunks.safetensors"))["contexts"]
    assert trained.shape[0] == info["retrieval_contexts"] == 23
    monkeypatch.setenv("VLA_ENERGY_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    add_retrieval_chunks(model, count=23, progress=False, contexts=True, batch_size=7)
    torch.testing.assert_close(load_file(str(model / "retrieval_chunks.safetensors"))["contexts"], trained)
