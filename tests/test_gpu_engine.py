"""GPU-only engine paths (`make test-gpu`): a step the fp16 loss scaler skips moves nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on a GPU host)")]


def test_a_step_the_fp16_loss_scaler_skips_moves_no_schedule_bank_or_counter(tmp_path):
    path = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, "ACCELERATE_MIXED_PRECISION": "fp16"}
    run = subprocess.run([sys.executable, str(HERE / "engine_checks.py"), "fp16_skip", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "fp16_skip.json").read_text())
    # 4 forwards for 3 optimizer steps: the overflowing one was skipped everywhere.
    assert report["forwards"] == 4 and report["steps"] == 3 and report["skipped_steps"] == 1, report
    assert report["bank_entries"] == 3 * 4, report  # three committed steps of 4 chunks
    history = [h for h in json.loads((tmp_path / "fp16" / "metrics.json").read_text())["history"] if "lr" in h]
    # Warmup over 10 steps: the lr of logged step k is (k + 1) / 10 of the base; a skipped step does not advance it.
    assert [round(h["lr"] / 1e-3, 4) for h in history] == [0.2, 0.3, 0.4], history
