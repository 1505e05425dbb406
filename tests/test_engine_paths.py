"""Engine paths of the recipe and the Trainer: accumulation owned by the accelerator, float32 targets under FSDP2 bf16,
the accelerator's device, evaluation without even_batches' duplicates, saving with tied embeddings, every resume path
restoring the plugin's loss state, the plugin state written inside the checkpoint, parts that must learn."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from vla_energy import EnergyArguments, EnergyPlugin, EnergyPolicy, EnergyTrainer, EnergyVLAModel, VLACollator
from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data import DataConfig, build_datasets
from vla_energy.training.trainer import PLUGIN_STATE

HERE = Path(__file__).resolve().parent
H = 4
SMALL = ["--backbone", "tiny-llava", "--dataset", "synthetic", "--num_episodes", "12", "--horizon", str(H),
         "--per_device_train_batch_size", "4", "--max_steps", "1", "--eval_strategy", "no", "--lora_r", "4",
         "--energy_hidden_dim", "16", "--action_head_dim", "16", "--report_to", "none", "--disable_tqdm",
         "--retrieval_chunks", "0"]


def _launch(script_args: list[str], tmp_path: Path, port: int, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
           "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
           "no", "--main_process_port", str(port), str(HERE / "engine_checks.py"), *script_args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_accumulation_is_the_accelerators_and_a_disagreement_stops(tmp_path, monkeypatch):
    from vla_energy.training.train import main

    args = [*SMALL, "--output_dir", str(tmp_path), "--cache_dir", str(tmp_path / "cache")]
    # What `accelerate launch` exports from a DeepSpeed config's gradient_accumulation_steps.
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    with pytest.raises(ValueError, match=r"sets 2 .*--gradient_accumulation_steps is 1: set the same value"):
        main([*args, "--run_name", "disagree"])
    metrics = main([*args, "--run_name", "agree", "--gradient_accumulation_steps", "2"])
    assert metrics["grad_accum"] == 2.0
    config = json.loads((tmp_path / "agree" / "run_config.json").read_text())
    assert config["TrainArguments"]["gradient_accumulation_steps"] == 2


def test_the_recipe_uses_any_accelerator_it_finds(monkeypatch):
    from vla_energy.training.train import uses_cpu

    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)  # an XPU or MPS machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not uses_cpu()
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert uses_cpu()


def test_fsdp2_bf16_targets_reach_the_loss_in_float32(tmp_path):
    run = _launch(["fsdp_bf16", str(tmp_path)], tmp_path, 29741)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"fsdp_bf16_{rank}.json").read_text())
        assert report["dtype"] == "torch.float32" and report["equal"], report  # not 0.98828125
        assert report["l1"] == pytest.approx(report["l1_exact_targets"], rel=1e-6), report


def test_evaluation_leaves_out_the_duplicates_even_batches_adds(tmp_path):
    """10 samples on 2 processes at local batch 4: the last global batch is padded with 6 duplicates. The losses
    equal those of one process holding the same global batches (local batch 8, no padding)."""
    sys.path.insert(0, str(HERE))
    import engine_checks

    a = engine_checks.evaluation(tmp_path, 8)
    two = _launch(["eval", str(tmp_path), "4"], tmp_path, 29743)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    b = json.loads((tmp_path / "eval_2.json").read_text())
    assert a["eval_samples"] == b["eval_samples"] == 10
    for key in ("loss", "energy_loss", "top1_acc", "action_l1"):
        # Float sums in another order differ by ~1e-5 relative; 6 duplicates among 16 rows move the loss by percents.
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def _plugin(loaded, **options) -> EnergyPlugin:
    args = EnergyArguments(energy_hidden_dim=16, action_head_dim=16, **options)
    return EnergyPlugin(args, hidden_size_of(loaded.model), 3, H, loaded.action_token_id)


def _data(tmp_path):
    return build_datasets(DataConfig(dataset="synthetic", num_episodes=8, horizon=H, cache_dir=str(tmp_path / "c")),
                          progress=False)


def _args(tmp_path, **kw) -> TrainingArguments:
    return TrainingArguments(str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, logging_steps=1, **kw)


def test_save_model_writes_a_policy_with_tied_embeddings(tmp_path):
    """PaliGemma ties its LM head to the input embeddings: a plain state-dict save refuses shared tensors."""
    train_ds, _, stats = _data(tmp_path)
    loaded = load_backbone("tiny-paligemma")
    assert loaded.model.get_output_embeddings().weight.data_ptr() == \
        loaded.model.get_input_embeddings().weight.data_ptr()
    trainer = EnergyTrainer(model=EnergyVLAModel(loaded.model, _plugin(loaded)), args=_args(tmp_path, max_steps=1),
                            train_dataset=train_ds, norm_stats=stats,
                            data_collator=VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token))
    trainer.train()
    trainer.save_model(str(tmp_path / "policy"))
    policy = EnergyPolicy.from_pretrained(tmp_path / "policy")
    assert policy.loaded.norm_stats == stats
    # The collator's image column is recorded as the camera, as `vla-energy train` records it.
    info = json.loads((tmp_path / "policy" / "policy_config.json").read_text())
    assert info["inputs"] == {"processor_kwargs": None, "cameras": ["image"], "camera_layout": "separate"}
    assert policy.cameras == ["image"]
    chunk = policy.predict([train_ds[0]["image"]], [train_ds[0]["instruction"]])
    assert chunk.shape == (1, H, 3)


def test_every_resume_path_restores_the_loss_state_and_it_is_saved_before_rotation(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    train_ds, _, _ = _data(tmp_path)
    seen = []
    rotate = hf_trainer.rotate_checkpoints

    def spy(output_dir, *args, **kwargs):
        newest = max(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        seen.append((newest / f"{PLUGIN_STATE}.safetensors").exists())
        return rotate(output_dir, *args, **kwargs)

    monkeypatch.setattr(hf_trainer, "rotate_checkpoints", spy)

    def trainer(cls, steps):
        torch.manual_seed(0)
        loaded = load_backbone("tiny-llava")
        return cls(model=EnergyVLAModel(loaded.model, _plugin(loaded, bank_size=8)),
                   args=_args(tmp_path, max_steps=steps, save_steps=1, save_total_limit=2), train_dataset=train_ds,
                   data_collator=VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token))

    first = trainer(EnergyTrainer, 3)
    first.train()
    assert seen == [True, True, True], "the plugin state must be in the checkpoint before it is pushed or rotated"
    bank = first.energy_plugin.bank.entries()[0].clone()

    class DeepSpeedLike(EnergyTrainer):
        """DeepSpeed resumes through deepspeed_load_checkpoint: Trainer._load_from_checkpoint is never called."""

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            self.accelerator.unwrap_model(self.model).load_state_dict(
                __import__("safetensors.torch").torch.load_file(str(Path(resume_from_checkpoint) /
                                                                    "model.safetensors")), strict=False)

    resumed = trainer(DeepSpeedLike, 3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert torch.equal(resumed.energy_plugin.bank.entries()[0], bank)
    assert resumed.energy_plugin.draws == first.energy_plugin.draws


def test_peft_on_the_whole_model_must_keep_every_learning_part_trainable(tmp_path):
    from peft import LoraConfig, get_peft_model

    train_ds, _, _ = _data(tmp_path)
    loaded = load_backbone("tiny-llava")
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token)
    target = r"backbone\..*language_model.*\.(q_proj|v_proj)"

    def wrapped(modules):
        plugin = _plugin(loaded, temperature="learnable")
        return get_peft_model(EnergyVLAModel(loaded.model, plugin),
                              LoraConfig(r=4, target_modules=target, modules_to_save=modules))

    with pytest.raises(ValueError, match=r"\['temperature'\] of the energy plugin have no trainable parameter"):
        EnergyTrainer(model=wrapped(["action_head", "energy_head"]), args=_args(tmp_path, max_steps=1),
                      train_dataset=train_ds, data_collator=collator)
    model = wrapped(["action_head", "energy_head", "temperature"])
    EnergyTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=train_ds, data_collator=collator)


def test_a_trainer_on_several_gpus_in_one_process_says_how_to_launch(tmp_path, monkeypatch):
    train_ds, _, _ = _data(tmp_path)
    loaded = load_backbone("tiny-llava")
    args = _args(tmp_path, max_steps=1)
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))  # what one process seeing 2 GPUs gets
    with pytest.raises(ValueError, match="accelerate launch.*torchrun"):
        EnergyTrainer(model=EnergyVLAModel(loaded.model, _plugin(loaded)), args=args, train_dataset=train_ds,
                      data_collator=VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token))


def test_the_trainer_hands_the_datas_bounds_to_bound_negatives(tmp_path):
    train_ds, _, stats = _data(tmp_path)
    loaded = load_backbone("tiny-llava")
    collator = VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token)
    with pytest.raises(ValueError, match="bound_negatives needs the data's bounds: pass norm_stats"):
        EnergyTrainer(model=EnergyVLAModel(loaded.model, _plugin(loaded, bound_negatives=True)),
                      args=_args(tmp_path, max_steps=1), train_dataset=train_ds, data_collator=collator)
    trainer = EnergyTrainer(model=EnergyVLAModel(loaded.model, _plugin(loaded, bound_negatives=True)),
                            args=_args(tmp_path, max_steps=1), train_dataset=train_ds, data_collator=collator,
                            norm_stats=stats)
    for got, want in zip(trainer.energy_plugin.action_bounds, stats.normalized_bounds()):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
