"""The recipe and EnergyTrainer, same options and seed, 2 processes: the same loss at every step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# 8 episodes: the 20 steps cross an epoch boundary whose last accumulation window holds one micro-batch; the
# progressive schedule ramps (steps 5-15) over the run; warmup, weight decay, bank, gradient accumulation.
OPTIONS = ["--backbone", "tiny-llava", "--num_episodes", "8", "--horizon", "4", "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "2", "--max_steps", "20", "--logging_steps", "1", "--lora_r", "4",
           "--energy_hidden_dim", "32", "--action_head_dim", "32", "--report_to", "none", "--disable_tqdm",
           "--progressive_schedule", "true", "--schedule_stable_steps", "5", "--schedule_ramp_end_step", "15",
           "--warmup_steps", "3", "--weight_decay", "0.01", "--bank_size", "32", "--strategy", "combined",
           "--eval_strategy", "no", "--seed", "3"]
COMPARED = ("energy_loss", "l1", "grad_norm")


def launch(target: list[str], args: list[str], tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) of a module or script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "VLA_ENERGY_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           *target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_recipe_and_trainer_log_the_same_losses(tmp_path):
    out = ["--output_dir", str(tmp_path / "runs")]
    recipe = launch(["-m", "vla_energy.training.train"], [*OPTIONS, *out, "--run_name", "recipe"], tmp_path, 29960)
    assert recipe.returncode == 0, recipe.stdout[-3000:] + recipe.stderr[-3000:]
    trainer = launch([str(ROOT / "tests" / "two_paths_trainer.py")],
                     [*OPTIONS, *out, "--run_name", "trainer", "--losses_file", str(tmp_path / "trainer.json")],
                     tmp_path, 29961)
    assert trainer.returncode == 0, trainer.stdout[-3000:] + trainer.stderr[-3000:]

    metrics = json.loads((tmp_path / "runs" / "recipe" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    recipe_log = {h["step"]: h for h in metrics["history"] if "loss" in h}
    trainer_log = {h["step"]: h for h in json.loads((tmp_path / "trainer.json").read_text()) if "head_loss" in h}
    assert sorted(recipe_log) == sorted(trainer_log) == list(range(1, 21))
    # The run crossed into a second epoch, so the data order after set_epoch is compared too.
    assert trainer_log[20]["epoch"] > 1
    for step in range(1, 21):
        r, t = recipe_log[step], trainer_log[step]
        # The Trainer's `loss` is its own (model loss, here without an LM term); `head_loss` is the plugin's total.
        assert r["loss"] == pytest.approx(t["loss"], abs=1e-4), step
        assert r["loss"] == pytest.approx(t["head_loss"], abs=1e-4), step
        for key in COMPARED:
            assert r[key] == pytest.approx(t[key], abs=1e-4), (step, key)
    # The comparison is not between constants: the loss moves over the run.
    losses = [recipe_log[s]["loss"] for s in range(1, 21)]
    assert max(losses) - min(losses) > 0.1
