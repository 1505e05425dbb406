"""The everyday user's paths through the `vla-energy` command: runs are never lost or mixed, the defaults run without
extras, errors say what to do, and a policy carries what it needs (its cameras, its base model's hub name)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vla_energy.backbones.tiny import build_tiny_checkpoint
from vla_energy.cli import main
from vla_energy.testing.lerobot_datasets import write_lerobot_v3

ROOT = Path(__file__).resolve().parents[1]
CAMERAS = ["observation.images.top", "observation.images.wrist"]
# A two-camera LeRobot dataset of 40 episodes: 10 held out, enough for the 31-chunk ranking of `evaluate`.
TINY = ["--horizon", "4", "--val_fraction", "0.25", "--per_device_train_batch_size", "4", "--max_steps", "2",
        "--logging_steps", "1", "--eval_strategy", "no", "--lora_r", "4", "--energy_hidden_dim", "32",
        "--action_head_dim", "32", "--retrieval_chunks", "16", "--report_to", "none", "--disable_tqdm"]


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """`vla-energy ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    """A run trained by `vla-energy train` on two cameras from a local copy of a base model named by its hub id."""
    root = tmp_path_factory.mktemp("user")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLA_ENERGY_CACHE", str(root / "cache"))
        mp.chdir(root)
        dataset = write_lerobot_v3(root / "data" / "two_cameras", lengths=(5,) * 40, cameras=("top", "wrist"))
        base = build_tiny_checkpoint("llava", root / "base_copy")
        torch.manual_seed(0)
        code, out, err = _cli(["train", *TINY, "--dataset", str(dataset), "--backbone", str(base),
                               "--base_model_id", "org/tiny-llava", "--base_model_revision", "0123abc",
                               "--output_dir", "runs", "--run_name", "cams"])
        assert code == 0, err[-3000:]
        yield SimpleNamespace(root=root, run=root / "runs" / "cams", dataset=dataset, base=base, out=out, err=err)


# Runs are never lost or mixed ---------------------------------------------------------------------------------------


def test_training_again_into_a_run_is_refused_then_overwrite_replaces_it(work):
    argv = ["train", *TINY, "--dataset", str(work.dataset), "--backbone", str(work.base),
            "--output_dir", str(work.root / "runs"), "--run_name", "again"]
    run = work.root / "runs" / "again"
    (run / "checkpoints" / "step_0000020").mkdir(parents=True)  # an earlier run's
    (run / "eval_val").mkdir()
    code, _, err = _cli(argv)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert len(err.strip().splitlines()) == 1 and str(run) in line
    assert "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line and "--run_name" in line
    assert (run / "checkpoints" / "step_0000020").is_dir()  # nothing was touched

    code, _, err = _cli([*argv, "--overwrite_output_dir", "--max_steps", "1"])
    assert code == 0, err[-3000:]
    assert not (run / "checkpoints").exists() and not (run / "eval_val").exists()
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1


def test_run_config_comes_with_the_model_and_resume_checks_the_options(work):
    argv = ["train", *TINY, "--dataset", str(work.dataset), "--backbone", str(work.base),
            "--output_dir", str(work.root / "runs"), "--run_name", "stopped"]
    run = work.root / "runs" / "stopped"
    code, _, err = _cli([*argv, "--stop_after_steps", "1"])  # a job that ran out of time
    assert code == 0, err[-3000:]
    checkpoint = run / "checkpoints" / "step_0000001"
    assert (checkpoint / "run_config.json").exists()
    assert not (run / "run_config.json").exists() and not (run / "model").exists()

    code, _, err = _cli([*argv, "--resume_from_checkpoint", "latest", "--lora_r", "8"])
    assert code == 2 and "lora_r 4 -> 8" in err and "run_config.json" in err

    code, _, err = _cli([*argv, "--resume_from_checkpoint", "latest"])
    assert code == 0, err[-3000:]
    assert json.loads((run / "run_config.json").read_text()) == json.loads((run / "model" / "run_config.json").read_text())


def test_train_head_writes_a_new_policy_and_leaves_the_run_as_it_was(work):
    model = work.run / "model"
    before = (model / "plugin.safetensors").read_bytes()
    code, out, err = _cli(["train-head", str(work.run), "--max_steps", "2", "--batch_size", "4", "--max_samples", "16",
                           "--disable_tqdm"])
    assert code == 0, err[-3000:]
    new = work.run / "model_head"
    assert str(new) in out and (model / "plugin.safetensors").read_bytes() == before
    info = json.loads((new / "policy_config.json").read_text())
    assert info["energy_head_retrained"]["max_steps"] == 2 and info["inputs"]["cameras"] == CAMERAS
    card = (new / "README.md").read_text()
    assert "vla-energy train-head" in card and not (new / "metrics.json").exists()
    assert not list(new.glob("*.png"))

    code, _, err = _cli(["train-head", str(work.run), "--max_steps", "1", "--batch_size", "4", "--max_samples", "8"])
    assert code == 2 and "--overwrite_output_dir" in err


# Errors surface ---------------------------------------------------------------------------------------------------


def test_disable_tqdm_prints_the_metrics_every_logging_steps(work):
    lines = [line for line in work.out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"] and all(" loss " in line for line in lines)


def test_evaluate_prints_the_tables_and_names_its_stages(work):
    code, out, err = _cli(["evaluate", str(work.run), "--max_samples", "40", "--num_candidates", "4",
                           "--disable_tqdm"])
    assert code == 0, err[-3000:]
    assert "| top-1 accuracy | chance |" in out and "| negative type | acc | gap |" in out
    assert "| candidates | random | uniform | rerank | mean | refine | oracle |" in out and "| gaussian | " in out
    assert "Calibration against the policy: how often the head gives the policy's chunk a lower energy" in out
    assert len(out.splitlines()) < 40
    assert "evaluate: encoding 40 val samples" in err and "evaluate: selecting among 4 candidates" in err
    assert "| negative type | acc | gap |" in (work.run / "eval_val" / "report.md").read_text()
    code, out, err = _cli(["evaluate", str(work.run), "--max_samples", "8", "--disable_tqdm"])
    assert code == 2 and "pass a larger --max_samples (now 8)" in err.splitlines()[-1] and "Traceback" not in err


def test_help_groups_the_options_and_names_the_command():
    code, out, _ = _cli(["train", "--help"])
    assert code == 0 and out.startswith("usage: vla-energy train")
    for group in ("launcher:", "ModelArguments:", "DataConfig:", "LoraArguments:", "EnergyArguments:",
                  "TrainArguments:"):
        assert f"\n{group}" in out, group
    assert "--num_processes INT" in out and "--accelerate_config" in out and "--main_process_port" in out
    assert "--overwrite_output_dir" in out and "docs/" not in out and "--base-model-id" not in out

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    options = [line.split()[0] for line in out.getvalue().splitlines() if line.startswith("  --")]
    assert set(options) >= {"--split", "--out_dir", "--max_samples", "--device", "--trust_remote_code",
                            "--disable_tqdm", "--num_candidates"}
    described = out.getvalue().split("options:")[1]
    for option in options:
        block = described.split(option, 1)[1].split("\n  --", 1)[0]
        assert len(block.split()) > 2, f"{option} has no description"


def test_bad_options_and_missing_datasets_fail_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    lerobot = tmp_path / "half_copied"
    write_lerobot_v3(lerobot)
    (lerobot / "meta" / "info.json").unlink()
    cases = {
        "data/my_dataset": str(tmp_path / "data" / "my_dataset"),
        "./my_dataset": str(tmp_path / "my_dataset"),
        str(lerobot): "meta/info.json",
    }
    for dataset, named in cases.items():
        code, out, err = _cli(["train", "--num_processes", "2", "--dataset", dataset])
        assert code == 2 and out == "", err
        assert len(err.strip().splitlines()) == 1 and named in err and "Hub" not in err, err
    code, _, err = _cli(["train", "--num_processes", "2", "--per_device_train_batch_size", "0"])
    assert code == 2 and "per_device_train_batch_size=0" in err and len(err.strip().splitlines()) == 1


def test_a_missing_policy_says_where_it_was_looked_for(tmp_path, monkeypatch):
    from vla_energy import EnergyPolicy

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        EnergyPolicy.from_pretrained("runs/missing")
    assert str(tmp_path / "runs" / "missing") in str(e.value) and e.value.__cause__ is None
    assert e.value.__suppress_context__
    code, _, err = _cli(["evaluate", "runs/missing"])
    assert code == 2 and err.strip().splitlines()[-1].startswith("vla-energy evaluate: error: policy 'runs/missing'")
    assert "Traceback" not in err


def test_a_missing_backbone_fails_before_any_process_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _cli(["train", "--num_processes", "2", "--backbone", "./no_such_base", *TINY])
    last = err.strip().splitlines()[-1]
    assert code == 2 and last == "vla-energy train: error: backbone='./no_such_base': no such checkpoint directory"
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(["train", "--backbone", str(tmp_path / "empty"), *TINY])
    assert code == 2 and "is a directory without config.json" in err.strip().splitlines()[-1]
    code, _, err = _cli(["train", "--backbone", "vla-energy-tests/not-a-model", *TINY])
    assert code == 2 and "is not a local directory nor in the Hugging Face cache" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_failing_rank_ends_the_output_with_its_cause(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(tmp_path / "cache")}
    # A checkpoint directory passes the checks before launch; its unknown model type fails in the loading rank.
    (tmp_path / "broken_base").mkdir()
    (tmp_path / "broken_base" / "config.json").write_text('{"model_type": "no_such_model_type"}')
    run = subprocess.run([sys.executable, "-m", "vla_energy.cli", "train", "--num_processes", "2",
                          "--main_process_port", "29655", "--backbone", str(tmp_path / "broken_base"), *TINY,
                          "--num_episodes", "8", "--output_dir", str(tmp_path / "runs")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode != 0
    # Rank 0 loads the base first; rank 1, waiting for it, then loses its peer: the last line names the cause.
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("vla-energy train: training failed: rank 0: ValueError: "), last
    assert str(tmp_path / "broken_base") in last and last.endswith("(rank 1 stopped after it)")


def test_accelerate_launch_with_a_bad_option_ends_with_it(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", "29656", "-m", "vla_energy.training.train",
                          "--per_device_train_batch_size", "0"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode != 0
    output = run.stdout + run.stderr
    # One process reports it (no traceback); torchrun's closing summary names it as the root cause.
    assert output.count("error: per_device_train_batch_size=0, expected >= 1") == 1 and "Traceback (most" not in \
        output.split("error: per_device")[0]
    tail = [line.strip() for line in output.strip().splitlines()[-3:]]
    assert "traceback : ConfigError: per_device_train_batch_size=0, expected >= 1" in tail, tail


# Defaults run without extras --------------------------------------------------------------------------------------

# Hides the optional extras from this interpreter (and the processes it starts) as if they were not installed.
WITHOUT_EXTRAS = """
import sys
from importlib.machinery import PathFinder

HIDDEN = {"tensorboard", "tensorboardX", "matplotlib"}


class WithoutExtras(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [WithoutExtras if f is PathFinder else f for f in sys.meta_path]
"""


def test_the_defaults_run_without_the_extras(work, tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(WITHOUT_EXTRAS)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(work.root / "cache")}
    check = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('matplotlib'))"],
                           env=env, capture_output=True, text=True)
    assert check.stdout.strip() == "None", check.stderr
    # The demo config with its default report_to tensorboard, made tiny.
    train = subprocess.run([sys.executable, "-m", "vla_energy.cli", "train", "--config", "demo", "--num_episodes", "40",
                            "--val_fraction", "0.25", "--horizon", "4", "--max_steps", "1", "--per_device_train_batch_size", "4",
                            "--lora_r", "4",
                            "--energy_hidden_dim", "32", "--action_head_dim", "32", "--eval_strategy", "no",
                            "--retrieval_chunks", "16", "--disable_tqdm", "--output_dir", str(tmp_path / "runs")],
                           env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "report_to tensorboard: not installed, skipped (pip install 'vla_energy[tensorboard]'" in train.stdout
    assert "matplotlib is not installed" in train.stdout
    run = tmp_path / "runs" / "demo"
    evaluate = subprocess.run([sys.executable, "-m", "vla_energy.cli", "evaluate", str(run), "--max_samples", "64",
                               "--num_candidates", "2", "--disable_tqdm"],
                              env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert "matplotlib is not installed: no plots" in evaluate.stderr and "| negative type |" in evaluate.stdout
    assert (run / "eval_val" / "report.md").exists() and not list((run / "eval_val").glob("*.png"))


# A policy carries what it needs -----------------------------------------------------------------------------------


def test_the_policy_knows_its_cameras_and_refuses_a_missing_one(work):
    from vla_energy import EnergyPolicy
    from vla_energy.testing.lerobot_datasets import frame_rgb

    info = json.loads((work.run / "model" / "policy_config.json").read_text())
    assert info["inputs"]["cameras"] == CAMERAS and info["inputs"]["camera_layout"] == "separate"
    policy = EnergyPolicy.from_pretrained(work.run)
    top, wrist = frame_rgb(0, 0, 16, 0), frame_rgb(0, 0, 16, 1)
    with pytest.raises(ValueError, match=r"lacks camera\(s\) \['observation.images.wrist'\]"):
        policy.select_action({CAMERAS[0]: top, "task": "go"})
    assert policy.select_action({CAMERAS[0]: top, CAMERAS[1]: wrist, "task": "go"}).shape == (3,)
    with pytest.raises(ValueError, match=r"trained on 2 camera\(s\)"):
        policy.predict([top], ["go"])


def test_a_local_base_is_named_by_its_hub_id_and_a_nameless_one_is_not_pushed(work, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from vla_energy import EnergyPolicy
    from vla_energy.modeling.serialization import load_policy
    from vla_energy.training.arguments import ModelArguments
    from vla_energy.training.train import policy_base

    info = json.loads((work.run / "model" / "policy_config.json").read_text())
    assert info["backbone"] == "org/tiny-llava" and info["revision"] == "0123abc"
    assert info["backbone_local_path"] == str(work.base.resolve())
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(kw["folder_path"]))
    EnergyPolicy.from_pretrained(work.run).push_to_hub("me/policy")
    assert calls[0] == "me/policy"

    # Trained from the same local copy without its hub id: a note at training, a refusal to push, a clear error moved.
    notes: list[str] = []
    loaded = SimpleNamespace(name=str(work.base), model=SimpleNamespace(config=None))
    base = policy_base(ModelArguments(backbone=str(work.base)), loaded, log=notes.append)
    assert base["backbone"] == str(work.base.resolve()) and "--base_model_id" in notes[0]
    nameless = load_policy(work.run)
    nameless.info.update(backbone=base["backbone"], revision=None, backbone_local_path=None)
    nameless.save(tmp_path / "nameless")
    with pytest.raises(ValueError, match="--base_model_id org/name"):
        EnergyPolicy.from_pretrained(tmp_path / "nameless").push_to_hub("me/policy")
    config = json.loads((tmp_path / "nameless" / "policy_config.json").read_text())
    (tmp_path / "nameless" / "policy_config.json").write_text(json.dumps({**config, "backbone": str(tmp_path / "moved")}))
    with pytest.raises(FileNotFoundError, match="does not exist here"):
        EnergyPolicy.from_pretrained(tmp_path / "nameless")
