"""GPU checks (`make test-gpu`): the recipe with each accelerate config on 1 GPU, bf16 and fp16, 20 steps.

Each run: a finite loss, heads that moved, a checkpoint that resumes to the same next loss, an exported policy
that predicts. Skipped with the reason where CUDA is absent; DeepSpeed configs also need `deepspeed` installed.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["gpu_1.yaml", "ddp_bf16.yaml", "fsdp2_sharded.yaml", "fsdp2_full.yaml", "deepspeed_zero2.yaml",
           "deepspeed_zero3.yaml"]
SMALL = ["--backbone", "tiny-llava", "--num_episodes", "30", "--horizon", "4", "--per_device_train_batch_size", "4",
         "--eval_steps", "0", "--eval_max_samples", "48", "--val_fraction", "0.25", "--logging_steps", "1",
         "--lora_r", "4", "--energy_hidden_dim", "32", "--action_head_dim", "32", "--report_to", "none",
         "--disable_tqdm", "--progressive_schedule", "false", "--bank_size", "32", "--strategy", "combined"]

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on a GPU host)")]


def _launch(config: str, precision: str, args: list[str], tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(tmp_path / "cache"), "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate" /
           config), "--num_processes", "1", "--mixed_precision", precision, "--main_process_port", str(port),
           "-m", "vla_energy.training.train", *SMALL, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("config", CONFIGS)
def test_recipe_on_one_gpu(config, precision, tmp_path):
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    port = 29720 + CONFIGS.index(config) * 2 + (precision == "fp16")
    out = ["--output_dir", str(tmp_path / "runs"), "--save_steps", "10"]
    full = _launch(config, precision, [*out, "--run_name", "full", "--max_steps", "20"], tmp_path, port)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    run = tmp_path / "runs" / "full"
    history = [h for h in json.loads((run / "metrics.json").read_text())["history"] if "loss" in h]
    assert len(history) == 20 and all(h["loss"] == h["loss"] and abs(h["loss"]) < 1e6 for h in history)
    assert history[-1]["skipped_steps"] < 20
    # Resume from step 10: the next logged loss equals the uninterrupted run's.
    import shutil

    shutil.copytree(run / "checkpoints" / "step_0000010", tmp_path / "runs" / "again" / "checkpoints" / "step_0000010")
    again = _launch(config, precision, [*out, "--run_name", "again", "--max_steps", "11", "--resume_from_checkpoint",
                                        "latest"], tmp_path, port)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = [h for h in json.loads((tmp_path / "runs" / "again" / "metrics.json").read_text())["history"]
               if "loss" in h and h["step"] == 11]
    assert resumed and resumed[0]["loss"] == pytest.approx(history[10]["loss"], rel=1e-3)
    # Heads moved from their initialization, and the exported policy predicts.
    from safetensors.torch import load_file

    from vla_energy.data import build_datasets
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.training.arguments import load_run_config

    head = {k: v for k, v in load_file(str(run / "model" / "plugin.safetensors")).items() if k.startswith("energy_head.")}
    assert head and all(torch.isfinite(v).all() for v in head.values())
    policy = EnergyPolicy.from_pretrained(run)
    _, data_cfg, *_ = load_run_config(run)
    os.environ["VLA_ENERGY_CACHE"] = str(tmp_path / "cache")
    _, val, _ = build_datasets(data_cfg, progress=False)
    chunk = policy.predict([val[0]["image"]], [val[0]["instruction"]])
    assert chunk.shape == (1, 4, 3) and bool((abs(chunk) < 1e6).all())
    first = [h for h in history if h["step"] == 1][0]
    assert history[-1]["l1"] != first["l1"]  # the action head (and the loss) moved
