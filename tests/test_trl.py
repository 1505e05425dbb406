"""TRL's SFTTrainer with EnergyLossMixin, as the README suggests: it builds, trains, evaluates, saves a policy and
resumes exactly on the tiny real-format VLM (TRL is a test dependency)."""

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test dependency: pip install 'vla_energy[test]'")

from vla_energy import (  # noqa: E402
    DataConfig,
    EnergyArguments,
    EnergyLossMixin,
    EnergyPlugin,
    EnergyPolicy,
    EnergyVLAModel,
    VLACollator,
    build_datasets,
    load_backbone,
)
from vla_energy.backbones.lora import LoraArguments, apply_lora  # noqa: E402
from vla_energy.backbones.readout import hidden_size_of  # noqa: E402
from vla_energy.training.trainer import PLUGIN_STATE  # noqa: E402

H = 4


class EnergySFTTrainer(EnergyLossMixin, trl.SFTTrainer):
    """The user's own subclass: the mixin first."""


def _trainer(tmp_path, max_steps: int, data) -> EnergySFTTrainer:
    train_ds, val_ds, stats = data
    torch.manual_seed(0)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=4))
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32, bank_size=8),
                          hidden_size_of(loaded.model), len(train_ds[0]["actions"][0]), H, loaded.action_token_id)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                         max_steps=max_steps, learning_rate=1e-3, save_strategy="steps", save_steps=1,
                         logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    return EnergySFTTrainer(model=EnergyVLAModel(backbone, plugin), args=args, train_dataset=train_ds,
                            eval_dataset=val_ds, processing_class=loaded.processor, norm_stats=stats,
                            data_collator=VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token),
                            eval_num_negatives=4)


def _trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_sft_trainer_with_the_mixin_trains_evaluates_saves_and_resumes(tmp_path):
    data = build_datasets(DataConfig(dataset="synthetic", num_episodes=12, horizon=H, val_fraction=0.5,
                                     cache_dir=str(tmp_path / "cache")), progress=False)
    full = _trainer(tmp_path / "full", 2, data)
    assert "sft" in full.model.config.to_dict().get("tags", []) or full.model.base_backbone.model_tags
    full.train()
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any("energy/acc" in h for h in full.state.log_history)
    metrics = full.evaluate()
    assert {"eval_loss", "eval_top1_acc", "eval_energy_loss"} <= set(metrics)

    # save_model writes a policy that loads and predicts.
    full.save_model(str(tmp_path / "policy"))
    policy = EnergyPolicy.from_pretrained(tmp_path / "policy")
    chunk = policy.predict([data[1][0]["image"]], [data[1][0]["instruction"]], mode="rerank", num_samples=4)
    assert chunk.shape == (1, H, 3) and np.isfinite(chunk).all()

    # Resuming from the step-1 checkpoint ends where the uninterrupted run ended.
    checkpoint = tmp_path / "full" / "out" / "checkpoint-1"
    assert (checkpoint / f"{PLUGIN_STATE}.safetensors").exists()
    resumed = _trainer(tmp_path / "resumed", 2, data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    ref, got = _trainable(full), _trainable(resumed)
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(resumed.energy_plugin.bank) == len(full.energy_plugin.bank)
