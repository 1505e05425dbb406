"""The one-module model on 2 CPU processes (gloo): FSDP2 equals DDP; Llava at vision_feature_layer -2 with LoRA on
its vision tower trains under DDP (find_unused_parameters off)."""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _launch(args: list[str], tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(HERE / "dist_model_check.py"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_fsdp2_matches_ddp_over_two_steps(tmp_path):
    run = _launch(["fsdp", str(tmp_path)], tmp_path, 29701)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "fsdp.json").read_text())
    assert report["grads"] > 20  # LoRA + both heads, both steps
    assert max(report["loss_err"]) < 1e-5, report
    assert max(report["grad_err"]) < 1e-4, report


def test_llava_vision_feature_layer_trains_under_ddp(tmp_path):
    from vla_energy.backbones.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint("llava", tmp_path / "llava")
    run = _launch(["llava", str(tmp_path), str(ckpt)], tmp_path, 29702)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "llava.json").read_text())
    assert len(report["losses"]) == 3 and all(x == x for x in report["losses"])
    assert report["vision_lora"] > 0 and report["moved"] == report["vision_lora"]
    # Without the target selection the last vision layer's adapters get no gradient, and the error names them.
    assert report["control_unused"] and all("vision_tower" in n for n in report["control_unused"])
    assert "ddp_find_unused_parameters" in report["control_error"]
    assert report["control_unused"][0] in report["control_error"]
