"""Two nodes simulated on one machine: two `accelerate launch --num_machines 2` (one process each) train the recipe
with the same losses as 2 processes on one node."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--backbone", "tiny-llava", "--num_episodes", "8", "--horizon", "4", "--per_device_train_batch_size", "4",
           "--max_steps", "5", "--logging_steps", "1", "--lora_r", "4", "--energy_hidden_dim", "32",
           "--action_head_dim", "32", "--report_to", "none", "--disable_tqdm", "--bank_size", "32",
           "--strategy", "combined", "--eval_strategy", "no"]
COMPARED = ("loss", "energy_loss", "l1", "grad_norm", "energy/e_pos", "energy/e_neg")


def _command(launcher: list[str], run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--mixed_precision", "no", "--dynamo_backend", "no", *launcher, "-m", "vla_energy.training.train",
            *OPTIONS, "--output_dir", str(run_dir.parent), "--run_name", run_dir.name]


def _env(tmp_path: Path) -> dict[str, str]:
    # One cache for both "nodes", as a shared filesystem: the main process builds the tiny checkpoint first.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "VLA_ENERGY_CACHE": str(tmp_path / "cache")}


def _history(run_dir: Path) -> dict[int, dict]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    return {h["step"]: h for h in metrics["history"] if "loss" in h}


def test_two_nodes_match_one_node(tmp_path):
    one = _command(["--num_machines", "1", "--main_process_port", "29970"], tmp_path / "one" / "run")
    single = subprocess.run(one, env=_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    nodes = []
    for rank in (0, 1):
        cmd = _command(["--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                        "--main_process_port", "29971"], tmp_path / f"node{rank}" / "run")
        log = open(tmp_path / f"node{rank}.log", "w")
        nodes.append((subprocess.Popen(cmd, env=_env(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                                       cwd=tmp_path), log))
    try:
        codes = [proc.wait(timeout=300) for proc, _ in nodes]
    finally:
        for proc, log in nodes:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = "".join((tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], logs

    # Global rank 0 (node 0) writes the run; node 1's process is rank 1 of the same group.
    assert not (tmp_path / "node1" / "run" / "metrics.json").exists()
    two, reference = _history(tmp_path / "node0" / "run"), _history(tmp_path / "one" / "run")
    assert sorted(two) == sorted(reference) == [1, 2, 3, 4, 5]
    for step in reference:
        for key in COMPARED:
            assert two[step][key] == pytest.approx(reference[step][key], abs=1e-5), (step, key)
