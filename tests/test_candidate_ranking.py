"""Candidate ranking and gradient alignment losses, their plugin wiring, and head-only training on cached outputs."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vla_energy.losses.candidate_ranking import candidate_ranking_loss, ranking_candidates
from vla_energy.losses.gradient_alignment import gradient_alignment_loss

H, DA = 4, 2
SINGLE = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))


class DistanceHead(nn.Module):
    """E(a) = sign * mean squared distance of a to a fixed target per row (no context): a known energy."""

    def __init__(self, target: torch.Tensor, sign: float = 1.0) -> None:
        super().__init__()
        self.target, self.sign = target, sign
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, context, actions, context_mask=None, action_mask=None):
        t = self.target if actions.dim() == 3 else self.target[:, None]
        return self.sign * self.scale * (actions - t).square().mean(dim=(-1, -2))


def test_ranking_candidates_start_with_the_policy_and_use_other_rows_errors():
    g = torch.Generator().manual_seed(0)
    truth, policy = (torch.rand(5, H, DA) - 0.5) / 2, (torch.rand(5, H, DA) - 0.5) / 2  # no clamping
    cands = ranking_candidates(truth, policy, torch.full((H, DA), 0.05), 7, generator=g)
    assert cands.shape == (5, 7, H, DA)
    assert torch.equal(cands[:, 0], policy)
    residuals = truth - policy
    for i in range(5):
        for k in range(1, 4):  # (7 - 1) // 2 residual candidates
            used = [j for j in range(5) if torch.allclose(cands[i, k], policy[i] + residuals[j])]
            assert used and i not in used
    noise = cands[:, 4:] - policy[:, None]
    assert 0.02 < float(noise.std()) < 0.1
    with pytest.raises(ValueError, match="num_candidates=1"):
        ranking_candidates(truth, policy, None, 1)


def test_ranking_loss_prefers_energies_that_follow_the_distance():
    torch.manual_seed(0)
    truth = torch.rand(6, H, DA) - 0.5
    cands = truth[:, None] + 0.3 * torch.randn(6, 8, H, DA)
    ctx = torch.zeros(6, 1, 3)
    right, _ = candidate_ranking_loss(DistanceHead(truth), ctx, cands, truth, 0.05)
    wrong, stats = candidate_ranking_loss(DistanceHead(truth, -1.0), ctx, cands, truth, 0.05)
    assert float(right.detach()) < float(wrong.detach())
    assert stats["ranking_top1"] == 0.0 and stats["ranking_regret"] > 1.0
    _, stats = candidate_ranking_loss(DistanceHead(truth), ctx, cands, truth, 0.05)
    assert stats["ranking_top1"] == 1.0 and stats["ranking_regret"] == pytest.approx(1.0)


def test_gradient_alignment_is_zero_for_a_bowl_at_the_truth_and_two_for_a_hill():
    torch.manual_seed(0)
    truth = torch.rand(3, H, DA)
    perturbed = truth + 0.1 * torch.randn(3, H, DA)
    ctx = torch.zeros(3, 1, 3)
    bowl = DistanceHead(truth)
    loss, stats = gradient_alignment_loss(bowl, ctx, truth, perturbed)
    assert float(loss) == pytest.approx(0.0, abs=1e-5) and stats["grad_align_cos"] == pytest.approx(1.0, abs=1e-5)
    hill, _ = gradient_alignment_loss(DistanceHead(truth, -1.0), ctx, truth, perturbed)
    assert float(hill) == pytest.approx(2.0, abs=1e-5)
    # Masked steps are left out: moving them does not change the loss.
    mask = torch.tensor([[1, 1, 0, 0]] * 3, dtype=torch.bool)
    moved = perturbed.clone()
    moved[:, 2:] += 5.0
    a, _ = gradient_alignment_loss(bowl, ctx, truth, perturbed, action_mask=mask)
    b, _ = gradient_alignment_loss(bowl, ctx, truth, moved, action_mask=mask)
    assert float(a) == pytest.approx(float(b), abs=1e-6)


def _plugin(**overrides):
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.training.arguments import EnergyArguments

    args = EnergyArguments(strategy="layer", num_negatives=3, energy_hidden_dim=16, energy_num_heads=2,
                           energy_num_layers=1, action_head_dim=16, **overrides)
    return EnergyPlugin(args, hidden_size=8, action_dim=DA, horizon=H, action_token_id=0)


def test_plugin_adds_ranking_and_alignment_terms_that_reach_the_head():
    from vla_energy.backbones.readout import BackboneReadout

    torch.manual_seed(0)
    readout = BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))
    actions = torch.rand(4, H, DA) - 0.5
    losses = {}
    for name, overrides in {"base": {}, "both": {"candidate_ranking": 6, "grad_align_weight": 1.0}}.items():
        torch.manual_seed(1)
        plugin = _plugin(**overrides)
        plugin.setup(SINGLE, local_batch=4)
        _, layers = plugin.predict_actions(readout)
        loss, stats = plugin.energy_loss(readout, actions, None, None, layers, SINGLE)
        loss.backward()
        losses[name] = float(loss)
        grads = [p.grad for p in plugin.energy_head.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if name == "both":
            assert {"ranking_loss", "ranking_top1", "grad_align_loss", "grad_align_cos"} <= set(stats)
            assert stats["ranking_loss"] > 0 and 0 <= stats["grad_align_loss"] <= 2
            assert plugin.policy_error is not None and plugin.policy_error.initialized
    assert losses["both"] > losses["base"]
    plugin = _plugin(candidate_ranking=4)
    plugin.setup(SINGLE, local_batch=4)
    with pytest.raises(ValueError, match="need the policy's chunk"):
        plugin.energy_loss(readout, actions, None, None, None, SINGLE)


def _cached_outputs(n: int, seed: int = 0):
    """An EvalResult whose contexts determine the action chunk (a learnable task for the head alone)."""
    from vla_energy.evaluation.metrics import EvalResult

    g = torch.Generator().manual_seed(seed)
    result = EvalResult()
    for i in range(n):
        truth = torch.rand(H, DA, generator=g) * 2 - 1
        ctx = torch.cat([truth.flatten(), torch.zeros(0)])[None].repeat(3, 1)
        result.contexts.append(ctx + 0.01 * torch.randn(ctx.shape, generator=g))
        result.actions.append(truth)
        result.action_mask.append(torch.ones(H, dtype=torch.bool))
        policy = truth + 0.2 * torch.randn(H, DA, generator=g)
        result.policy.append(policy)
        result.layer_actions.append(torch.stack([policy + 0.1, policy]))
        result.episode_index.append(i // 4)
    return result


def test_head_only_training_learns_and_is_seeded():
    from vla_energy.evaluation.metrics import ranking_metrics
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.training.arguments import EnergyArguments
    from vla_energy.training.head_only import train_energy_head

    train, val = _cached_outputs(128), _cached_outputs(64, seed=1)

    def run(steps: int):
        torch.manual_seed(0)
        args = EnergyArguments(strategy="combined", num_negatives=2, energy_hidden_dim=16, energy_num_heads=2,
                               energy_num_layers=1, candidate_ranking=4)
        plugin = EnergyPlugin(args, hidden_size=H * DA, action_dim=DA, horizon=H, action_token_id=0)
        result = train_energy_head(plugin, train, steps, batch_size=16, learning_rate=3e-3, progress=False)
        return result, ranking_metrics(plugin.energy_head, val, num_negatives=15)["top1_acc"]

    (first, acc_first), (again, _) = run(1), run(1)
    trained, acc = run(150)
    assert first.losses == again.losses
    assert trained.last < trained.first
    assert acc > max(acc_first, 0.3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        train_energy_head(EnergyPlugin(EnergyArguments(), H * DA, DA, H, 0), _cached_outputs(1), 5)


def test_train_head_command_writes_a_policy_with_a_new_head(tmp_path):
    import json

    import numpy as np
    from safetensors.torch import load_file

    from vla_energy.cli import main
    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.training.train import main as train_main

    train_main(["--backbone", "tiny-llava", "--dataset", "synthetic", "--num_episodes", "12", "--horizon", "4",
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_strategy", "no", "--lora_r", "4",
                "--energy_hidden_dim", "16", "--action_head_dim", "16", "--report_to", "none", "--disable_tqdm",
                "--output_dir", str(tmp_path), "--run_name", "run", "--cache_dir", str(tmp_path / "cache")])
    model = tmp_path / "run" / "model"
    before = load_file(str(model / "plugin.safetensors"))
    assert main(["train-head", str(tmp_path / "run"), "--max_steps", "3", "--batch_size", "4", "--max_samples", "16",
                 "--candidate_ranking", "3", "--disable_tqdm"]) == 0
    # A new policy beside the run's, which stays as it was.
    assert all(torch.equal(v, load_file(str(model / "plugin.safetensors"))[k]) for k, v in before.items())
    new = tmp_path / "run" / "model_head"
    after = load_file(str(new / "plugin.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("energy_head."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("action_head."))
    info = json.loads((new / "policy_config.json").read_text())
    assert info["energy_head_retrained"]["max_steps"] == 3 and info["energy_head_retrained"]["samples"] == 16
    assert info["plugin"]["args"]["candidate_ranking"] == 3
    policy = EnergyPolicy.from_pretrained(new)
    image = np.zeros((32, 32, 3), np.uint8)
    chunk = policy.predict([image], ["go"], mode="mean", candidates="retrieval", num_samples=4)
    assert chunk.shape == (1, 4, 3) and np.isfinite(chunk).all()
