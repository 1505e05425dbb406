"""EnergyTrainer: trains, logs energy metrics, checkpoints heads + bank, resumes; the energy term's exact weight."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.trainer import PLUGIN_STATE, EnergyTrainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import trainer_check  # noqa: E402


def _trainer(tmp_path, cache, max_steps):
    train_ds, loaded, backbone, plugin, collator = trainer_check.build(
        str(cache), strategy="combined", l1_loss_weight=1.0, bank_size=16
    )
    model = EnergyVLAModel(backbone, plugin)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=max_steps, learning_rate=1e-3,
        report_to=[], save_strategy="steps", save_steps=2, logging_steps=1, use_cpu=True, seed=0,
        disable_tqdm=True,
    )
    return EnergyTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator), plugin


def test_trainer_trains_logs_checkpoints_and_resumes(tmp_path):
    cache = tmp_path / "cache"
    trainer, plugin = _trainer(tmp_path, cache, max_steps=2)
    before = {k: v.clone() for k, v in plugin.energy_head.state_dict().items()}
    before_action = {k: v.clone() for k, v in plugin.action_head.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(before[k], v) for k, v in plugin.energy_head.state_dict().items())
    assert any(not torch.equal(before_action[k], v) for k, v in plugin.action_head.state_dict().items())
    logged = [h for h in trainer.state.log_history if "energy_loss" in h]
    assert logged and all(k in logged[0] for k in ("energy/acc", "energy/e_pos", "energy/loss_floor", "l1"))
    ckpt = tmp_path / "out" / "checkpoint-2"
    # The checkpoint holds the trained heads and buffers, not one weight of the frozen backbone.
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    frozen = {n for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert any(k.startswith("plugin.energy_head.") for k in saved)
    assert any(k.startswith("plugin.action_head.") for k in saved)
    assert frozen and not frozen & set(saved)
    assert (ckpt / f"{PLUGIN_STATE}.safetensors").exists()
    assert len(plugin.bank) == 6  # two optimizer steps of 3 gathered chunks
    bank_actions = plugin.bank.entries()[0].clone()

    resumed, plugin2 = _trainer(tmp_path, cache, max_steps=4)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    # Resuming at the checkpoint's own step trains nothing: the heads and LoRA are the saved ones.
    at_ckpt, _ = _trainer(tmp_path, cache, max_steps=2)
    at_ckpt.train(resume_from_checkpoint=str(ckpt))
    state = at_ckpt.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    # The bank came back from the checkpoint and kept filling: the first 6 entries are the saved ones.
    assert len(plugin2.bank) == 12
    assert torch.equal(plugin2.bank.entries()[0][:6], bank_actions)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_energy_weight_exact_one_process(tmp_path, grad_accum):
    err = trainer_check.run(grad_accum, str(tmp_path), str(tmp_path / "cache"))
    assert err < 1e-3  # float32 noise ~1e-4; a doubled or halved energy term would give >= 0.5


def test_energy_weight_exact_two_processes(tmp_path):
    cache = tmp_path / "cache"
    trainer_check.build(str(cache))  # build the dataset cache once, before two processes read it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(HERE.parent)}
    for ga in (1, 2):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", str(29600 + ga), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(HERE / "trainer_check.py"), "--grad_accum", str(ga),
               "--out_dir", str(tmp_path), "--cache_dir", str(cache)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        result = json.loads((tmp_path / f"grad_check_ga{ga}_w2.json").read_text())
        assert result["world"] == 2 and result["max_rel_err"] < 1e-3


def test_progressive_schedule_callback_scales_energy_group(tmp_path):
    from vla_energy.training.schedule import ProgressiveSchedule

    train_ds, loaded, backbone, plugin, collator = trainer_check.build(str(tmp_path / "cache"))
    schedule = ProgressiveSchedule(stable_steps=1, ramp_end_step=3, start_lr_scale=0.1, end_lr_scale=0.5,
                                   start_max_grad_norm=0.3, end_max_grad_norm=0.5)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=2, learning_rate=1e-3,
        lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = EnergyTrainer(model=EnergyVLAModel(backbone, plugin), args=args, train_dataset=train_ds,
                            data_collator=collator, energy_lr_scale=0.5, schedule=schedule)
    trainer.train()
    step = trainer.state.global_step
    groups = trainer.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(1e-3)  # the policy group follows the Trainer's scheduler only
    assert groups[-1]["lr"] == pytest.approx(1e-3 * 0.5 * schedule.lr_scale(step))
    # The policy keeps max_grad_norm; the energy group is clipped at the schedule's norm (the recipe's rule).
    assert trainer.args.max_grad_norm == pytest.approx(1.0)
    assert trainer.energy_max_grad_norm() == pytest.approx(schedule.max_grad_norm(step))


def test_peft_wrapped_model_with_modules_to_save(tmp_path):
    """get_peft_model over the whole EnergyVLAModel: LoRA on the backbone, the heads as modules_to_save."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    train_ds, _, backbone, plugin, collator = trainer_check.build(str(cache), strategy="combined", l1_loss_weight=1.0)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=r"backbone\..*language_model.*\.(q_proj|v_proj)",
                        modules_to_save=["action_head", "energy_head"])
    model = get_peft_model(EnergyVLAModel(backbone, plugin), config)
    base = model.get_base_model()
    original = {k: v.clone() for k, v in base.plugin.energy_head.original_module.state_dict().items()}
    copy = {k: v.clone() for k, v in base.plugin.energy_head.modules_to_save["default"].state_dict().items()}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    assert lora
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=2,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             seed=0, disable_tqdm=True)
    trainer = EnergyTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    names = {id(p): n for n, p in model.named_parameters()}
    energy_group = [names[id(p)] for p in trainer.create_optimizer().param_groups[-1]["params"]]
    assert energy_group and all("energy_head.modules_to_save" in n for n in energy_group)
    trainer.train()
    # The trained copy moved and is what the plugin used; the original stayed; LoRA moved.
    trained = base.plugin.energy_head.modules_to_save["default"].state_dict()
    assert any(not torch.equal(copy[k], v) for k, v in trained.items())
    assert all(torch.equal(original[k], v) for k, v in base.plugin.energy_head.original_module.state_dict().items())
    assert any(not torch.equal(lora[n], p) for n, p in model.named_parameters() if n in lora)
    assert plugin.energy_head is base.plugin.energy_head and plugin is base.plugin
    assert any("energy/acc" in h for h in trainer.state.log_history)

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any("energy_head" in k for k in saved) and any("action_head" in k for k in saved)
    _, _, backbone2, plugin2, _ = trainer_check.build(str(cache), strategy="combined", l1_loss_weight=1.0)
    reloaded = PeftModel.from_pretrained(EnergyVLAModel(backbone2, plugin2), tmp_path / "adapter")
    again = reloaded.get_base_model().plugin.energy_head.modules_to_save["default"].state_dict()
    assert all(torch.equal(trained[k], again[k]) for k in trained)


def test_trainer_two_processes_checkpoint_and_resume(tmp_path):
    """accelerate launch, 2 CPU processes: trains, logs, checkpoints heads + bank, resumes to step 4."""
    cache = tmp_path / "cache"
    trainer_check.build(str(cache))  # the dataset cache, before two processes read it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "29611", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(HERE / "trainer_check.py"), "--resume_check", "--out_dir", str(tmp_path), "--cache_dir", str(cache)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"resume_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["world"] == 2 and r["head_moved"] and r["logged_energy"]
        assert r["bank_after_2"] == 12  # 2 steps x 2 ranks x 3 gathered chunks, identical on both ranks
        assert r["global_step"] == 4 and r["bank_after_4"] == 24 and r["bank_kept"]
        assert "model.safetensors" in r["checkpoint_files"] and f"{PLUGIN_STATE}.safetensors" in r["checkpoint_files"]
    assert ranks[0]["head_after_2"] == ranks[1]["head_after_2"]  # DDP kept the heads equal
