"""The recipe under faults, 2 processes for real: exact resume, a NaN loss on one rank, a kill during a save."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_recipe import SMALL, _launch

FAULTS = Path(__file__).resolve().parent / "recipe_faults.py"


def _tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint's safetensors files (models, heads, bank, temperature, negatives RNG)."""
    out = {}
    for f in sorted(checkpoint.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_resume_is_exact(tmp_path):
    """N steps + stop + resume + N steps == 2N uninterrupted steps: weights, optimizer, bank, schedule, history."""
    common = [*SMALL, "--max_steps", "4", "--save_steps", "4", "--progressive_schedule", "true",
              "--schedule_stable_steps", "1", "--schedule_ramp_end_step", "4", "--output_dir", str(tmp_path / "runs")]
    straight = _launch([*common, "--run_name", "straight"], tmp_path, 29651)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _launch([*common, "--run_name", "split", "--stop_after_steps", "2"], tmp_path, 29652)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped at step 2 of 4" in first.stdout + first.stderr
    split = tmp_path / "runs" / "split"
    assert (split / "checkpoints" / "step_0000002").is_dir() and not (split / "metrics.json").exists()
    second = _launch([*common, "--run_name", "split", "--resume_from_checkpoint", "latest"], tmp_path, 29653)
    assert second.returncode == 0, second.stderr[-3000:]

    a = tmp_path / "runs" / "straight" / "checkpoints" / "step_0000004"
    b = split / "checkpoints" / "step_0000004"
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and any("model" in k for k in ta) and any("energy_plugin" in k for k in ta)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6, msg=key)
    # Adam moments too (accelerate's optimizer file, read without unpickling arbitrary objects).
    oa = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    ob = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    assert oa.keys() == ob.keys() and len(oa) > 0
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa[i][k], ob[i][k], rtol=0, atol=1e-6)
    assert json.loads((a / "lr_scheduler.json").read_text()) == json.loads((b / "lr_scheduler.json").read_text())
    ha = json.loads(json.loads((a / "train_state.json").read_text())["json"])["history"]
    hb = json.loads(json.loads((b / "train_state.json").read_text())["json"])["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [1, 2, 3, 4]
    for x, y in zip(ha, hb):
        assert x.keys() == y.keys()
        assert all(x[k] == pytest.approx(y[k], abs=1e-6) for k in x), (x, y)
    # The control: a different seed gives different weights, so the comparison above can fail.
    other = _launch([*common, "--run_name", "other", "--seed", "1"], tmp_path, 29654)
    assert other.returncode == 0, other.stderr[-3000:]
    tc = _tensors(tmp_path / "runs" / "other" / "checkpoints" / "step_0000004")
    assert any(not torch.allclose(ta[k], tc[k], atol=1e-6) for k in ta if "model" in k)


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    """The loop's skip branch: a NaN on rank 1 only; both ranks leave weights, lr schedule and bank untouched."""
    report = tmp_path / "report"
    report.mkdir()
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "nan", "--max_steps", "3",
           "--progressive_schedule", "true", "--schedule_stable_steps", "0", "--schedule_ramp_end_step", "3"]
    run = _launch(["nan", str(report), *SMALL, *out], tmp_path, 29655, script=FAULTS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "nan" / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 3
    assert [h["skipped_steps"] for h in metrics["history"] if "skipped_steps" in h] == [0, 1, 1]
    for rank in (0, 1):
        seen = json.loads((report / f"rank{rank}.json").read_text())
        assert seen["over_skipped_step"] == {"params": False, "lrs": False, "bank": False}, (rank, seen)
        assert seen["over_normal_step"] == {"params": True, "lrs": True, "bank": True}, (rank, seen)


def test_kill_during_save_resumes_from_last_complete_checkpoint(tmp_path):
    """SIGKILL of the main process halfway through the 2nd save; --resume_from latest picks the 1st and finishes."""
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "killed", "--save_steps", "1"]
    killed = _launch(["kill", *SMALL, *out, "--max_steps", "3"], tmp_path, 29656, script=FAULTS)
    assert killed.returncode != 0
    ckpts = tmp_path / "runs" / "killed" / "checkpoints"
    assert (ckpts / "step_0000001" / "checkpoint_complete.json").exists()
    half = ckpts / "step_0000002.tmp"
    assert half.is_dir() and not (half / "checkpoint_complete.json").exists() and not (ckpts / "step_0000002").exists()
    resumed = _launch([*SMALL, *out, "--max_steps", "3", "--resume_from_checkpoint", "latest"], tmp_path, 29657)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 1" in resumed.stdout + resumed.stderr
    assert json.loads((tmp_path / "runs" / "killed" / "metrics.json").read_text())["steps"] == 3
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000001", "step_0000002", "step_0000003"]


@pytest.mark.parametrize("ending", ["finished", "stop_after_steps"])
def test_no_ddp_wrapper_outlives_the_process_group(tmp_path, ending):
    """The recipe frees its DDP wrappers before end_training, on the normal and the time-limited way out."""
    report = tmp_path / "report"
    report.mkdir()
    out = ["--output_dir", str(tmp_path / "runs"), "--run_name", "ddp", "--max_steps", "2"]
    if ending == "stop_after_steps":
        out += ["--stop_after_steps", "1"]
    run = _launch(["ddp", str(report), *SMALL, *out], tmp_path, 29658, script=FAULTS)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((report / f"rank{rank}.json").read_text()) == {"ddp_alive": 0}, rank
