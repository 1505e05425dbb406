"""The public surface: top-level names, option names a HF user knows, shipped configs by name, the train command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vla_energy.training.arguments import RENAMED_OPTIONS, load_yaml, parse_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ["EnergyHead", "EnergyHeadConfig", "global_infonce_loss", "gather_actions", "ActionBank", "EnergyPlugin",
          "EnergyArguments", "EnergyVLAModel", "EnergyTrainer", "EnergyLossMixin", "EnergyPolicy", "build_datasets",
          "VLACollator"]


def test_public_names_import_from_the_top_level():
    import vla_energy

    for name in PUBLIC:
        assert name in vla_energy.__all__, name
        assert getattr(vla_energy, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vla_energy.nope  # noqa: B018


def test_import_is_lazy_and_a_real_run_never_imports_the_test_backbones():
    code = ("import sys, vla_energy; heavy = [m for m in ('torch', 'transformers', 'vla_energy.training.train') "
            "if m in sys.modules]; print(heavy)\n"
            "from vla_energy.backbones.loading import load_backbone\n"
            "try:\n    load_backbone('/nonexistent/checkpoint')\nexcept Exception:\n    pass\n"
            "print('vla_energy.testing' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "False", out


@pytest.mark.parametrize("old", sorted(RENAMED_OPTIONS))
def test_old_option_names_fail_with_the_new_name(old, tmp_path):
    new = RENAMED_OPTIONS[old]
    with pytest.raises(ValueError, match=f"'{old}' is now called '{new}'"):
        parse_config([f"--{old}", "1"])
    yaml_file = tmp_path / "old.yaml"
    yaml_file.write_text(f"{old}: 1\n")
    with pytest.raises(ValueError, match=f"'{old}' is now called '{new}'"):
        load_yaml(yaml_file)


def test_removed_benchmark_switch_fails_clearly():
    with pytest.raises(ValueError, match="unsynced_energy_head.*benchmark"):
        parse_config(["--unsynced_energy_head", "true"])


def test_transformers_names_parse():
    *_, train = parse_config(["--per_device_train_batch_size", "3", "--logging_steps", "5", "--eval_steps", "7",
                              "--save_steps", "9", "--save_total_limit", "2", "--report_to", "none",
                              "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "1",
                              "--disable_tqdm"])
    assert (train.per_device_train_batch_size, train.logging_steps, train.eval_steps, train.save_steps) == (3, 5, 7, 9)
    assert train.save_total_limit == 2 and train.report_to == "none" and train.disable_tqdm
    model, *_ = parse_config(["--dtype", "bfloat16"])
    assert model.dtype == "bfloat16"


def test_shipped_config_by_name_and_clear_error_otherwise():
    assert resolve_config("demo") == ROOT / "vla_energy" / "training" / "configs" / "demo.yaml"
    *_, train = parse_config(["--config", "demo", "--max_steps", "5"])
    assert train.max_steps == 5 and train.run_name == "demo"
    with pytest.raises(FileNotFoundError, match=r"not a shipped config \(shipped: \['demo'"):
        resolve_config("nope")


def test_save_total_limit_rotates_oldest(tmp_path):
    import json

    from vla_energy.training.checkpoints import COMPLETE_MARKER, latest_checkpoint, rotate_checkpoints

    for step in (2, 4, 6):
        d = tmp_path / f"step_{step:07d}"
        d.mkdir()
        (d / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "step_0000008.tmp").mkdir()  # a half-written save is not counted nor deleted
    assert rotate_checkpoints(tmp_path, None) == []
    deleted = rotate_checkpoints(tmp_path, 2)
    assert [d.name for d in deleted] == ["step_0000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000006", "step_0000008.tmp"]
    assert latest_checkpoint(tmp_path).name == "step_0000006"


SMALL = ["--backbone", "tiny-llava", "--num_episodes", "12", "--horizon", "4", "--per_device_train_batch_size", "4",
         "--eval_steps", "0", "--eval_max_samples", "8", "--eval_num_negatives", "3", "--val_fraction", "0.25",
         "--lora_r", "4", "--energy_hidden_dim", "16", "--action_head_dim", "16", "--report_to", "none",
         "--disable_tqdm", "--max_steps", "2"]


def test_vla_energy_train_and_accelerate_launch_module(tmp_path):
    """The ways a pip user trains: `vla-energy train` (1 process, and 2 through accelerate) and `-m` directly."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "VLA_ENERGY_CACHE": str(tmp_path / "cache")}
    out = ["--output_dir", str(tmp_path / "runs")]
    cli = [sys.executable, "-m", "vla_energy.cli", "train"]
    one = subprocess.run([*cli, *SMALL, *out, "--run_name", "one"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*cli, "--num_processes", "2", "--main_process_port", "29672", *SMALL, *out, "--run_name", "two",
                          "--save_steps", "1", "--save_total_limit", "1"],
                         env=env, capture_output=True, text=True, cwd=tmp_path,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    import json

    assert json.loads((tmp_path / "runs" / "two" / "metrics.json").read_text())["world_size"] == 2
    assert [p.name for p in (tmp_path / "runs" / "two" / "checkpoints").iterdir()] == ["step_0000002"]
    assert (tmp_path / "runs" / "one" / "model" / "plugin.safetensors").exists()
