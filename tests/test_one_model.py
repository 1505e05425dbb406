"""EnergyVLAModel as one module: ModelOutput without an accelerator, eval mode leaves state alone, Trainer
evaluation / predict with the held-out top-1, gradient checkpointing, the per-group clip rule."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

from vla_energy.data.split import spread_indices
from vla_energy.evaluation.ranking import RankingCollator, RankingDataset
from vla_energy.modeling.energy_vla_model import EnergyVLAModel, EnergyVLAOutput
from vla_energy.training.trainer import EnergyTrainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import trainer_check  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache


def _model(cache, **overrides):
    train_ds, loaded, backbone, plugin, collator = trainer_check.build(
        str(cache), **{"strategy": "combined", "l1_loss_weight": 1.0, "bank_size": 16, "temperature": "adaptive",
                       **overrides})
    return train_ds, EnergyVLAModel(backbone, plugin), collator


def test_forward_returns_model_output_and_eval_leaves_state(parts):
    train_ds, model, collator = _model(parts)
    ranked = RankingDataset(train_ds, num_negatives=7, seed=0)
    batch = RankingCollator(collator)([ranked[i] for i in range(4)])
    out = model(**batch)
    assert isinstance(out, EnergyVLAOutput) and out.loss.requires_grad and out.ranking_energies is None
    assert out.loss.item() == pytest.approx(out.l1.item() + 0.7 * out.energy_loss.item(), rel=1e-5)
    assert "energy/acc" in out.metrics
    with pytest.raises(TypeError, match="no accelerator"):
        model(accelerator=None, **batch)
    model.plugin.after_optimizer_step()
    bank, draws = model.plugin.bank.entries()[0].clone(), model.plugin.draws
    staged = model.plugin.bank.num_staged()
    model.eval()
    with torch.no_grad():
        first, second = model(**batch), model(**batch)
    assert first.ranking_energies.shape == (4, 8)
    assert torch.equal(first.ranking_energies, second.ranking_energies)  # same negatives, nothing moved
    assert first.loss.item() == pytest.approx(second.loss.item(), abs=0)
    assert model.plugin.draws == draws and model.plugin.bank.num_staged() == staged
    assert torch.equal(model.plugin.bank.entries()[0], bank)
    model.train()
    model(**batch)
    assert model.plugin.draws == draws + 1 and model.plugin.bank.num_staged() == staged + 1


def test_trainer_evaluate_and_predict_report_top1(parts, tmp_path):
    train_ds, model, collator = _model(parts)
    held_out = train_ds.select(spread_indices(len(train_ds), 40))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, per_device_eval_batch_size=16, max_steps=4,
        learning_rate=1e-3, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, seed=0,
        disable_tqdm=True, eval_strategy="steps", eval_steps=2, activation_checkpointing=True,
    )
    trainer = EnergyTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=held_out,
                            data_collator=collator)
    trainer.train()
    assert model.is_gradient_checkpointing
    evals = [h for h in trainer.state.log_history if "eval_top1_acc" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert 0.0 <= h["eval_top1_acc"] <= 1.0 and h["eval_chance_acc"] == pytest.approx(1 / 32)
        assert h["eval_eval_samples"] == 40 and "eval_energy/acc" in h and h["eval_loss"] > 0
    pred = trainer.predict(held_out)
    assert pred.predictions.shape == pred.label_ids.shape == (40, 4, 3)
    assert pred.metrics["test_top1_acc"] == pytest.approx(trainer.evaluate()["eval_top1_acc"])
    # The policy's L1 of predict() is the mean error of its predictions over the real action steps.
    mask = torch.tensor(held_out["action_mask"], dtype=torch.float32)[..., None].expand(40, 4, 3)
    err = (torch.as_tensor(pred.predictions) - torch.as_tensor(pred.label_ids)).abs()
    l1 = float((err * mask).sum() / mask.sum())
    assert pred.metrics["test_action_l1"] == pytest.approx(l1, rel=1e-5)


def test_trainer_clips_policy_and_energy_groups_separately(parts, tmp_path):
    """One big energy gradient must not shrink the policy's (a global clip would)."""
    train_ds, model, collator = _model(parts)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, max_steps=1,
                             learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, max_grad_norm=1e9)
    trainer = EnergyTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    trainer.create_optimizer()
    batch = collator([train_ds[i] for i in range(3)])
    trainer.compute_loss(model, batch).backward()
    for p in model.energy_parameters():
        p.grad.mul_(1e6)
    policy = [p.grad.clone() for p in model.policy_parameters()]
    trainer.schedule = type("S", (), {"max_grad_norm": staticmethod(lambda step: 0.5)})()
    trainer._clip_grad_norm(model)
    from vla_energy.training.clipping import global_norm

    assert float(global_norm(model.energy_parameters())) == pytest.approx(0.5, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(policy, model.policy_parameters()))
