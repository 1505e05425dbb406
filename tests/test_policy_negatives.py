"""Negatives at the policy's scale: the running error is global and masked-step aware; the policy chunk is masked when right."""

from types import SimpleNamespace

import pytest
import torch

from vla_energy.losses.negatives import Negatives
from vla_energy.losses.policy_negatives import RunningPolicyError, concat_negatives, policy_negatives

H, DA = 4, 2
SINGLE = SimpleNamespace(num_processes=1)


def test_running_error_counts_real_steps_and_blends():
    truth = torch.zeros(2, H, DA)
    policy = torch.full((2, H, DA), 0.5)
    policy[1, 2:] = 9.0  # padded steps of sample 1
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    run = RunningPolicyError(H, DA, momentum=0.5)
    assert torch.allclose(run.update(SINGLE, policy, truth, mask), torch.full((H, DA), 0.5))
    scale = run.update(SINGLE, torch.full((2, H, DA), 1.5), truth, mask)
    assert torch.allclose(scale, torch.full((H, DA), 1.0))  # 0.5 * 0.5 + 0.5 * 1.5
    restored = RunningPolicyError(H, DA)
    restored.load_state_dict(run.state_dict())
    assert torch.equal(restored.scale, run.scale) and restored.initialized


def test_policy_negatives_mask_a_right_policy_and_scale_noise():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(3, H, DA, generator=g)
    policy = truth.clone()
    policy[1] += 0.3  # only sample 1's policy is wrong
    scale = torch.full((H, DA), 0.2)
    scale[:, 1] = 0.0  # no error in dim 1: no noise there
    neg = policy_negatives(truth, policy, scale, 2, True, generator=torch.Generator().manual_seed(1))
    assert neg.types == ["policy_error_noise", "policy_error_noise", "policy"]
    assert neg.mask[:, 2].tolist() == [False, True, False]
    assert torch.equal(neg.actions[:, :2, :, 1], truth[:, None, :, 1].expand(-1, 2, -1))
    spread = (neg.actions[:, :2, :, 0] - truth[:, None, :, 0]).std()
    assert 0.1 < float(spread) < 0.35
    both = concat_negatives(Negatives(truth[:, None] + 1, ["x"], torch.ones(3, 1, dtype=torch.bool)), neg)
    assert both.actions.shape == (3, 4, H, DA) and both.types[0] == "x"
    with pytest.raises(ValueError, match="needs the policy error scale"):
        policy_negatives(truth, policy, None, 1, False)


def test_plugin_adds_policy_negatives_and_saves_the_running_error():
    from vla_energy.backbones.readout import BackboneReadout
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.training.arguments import EnergyArguments

    torch.manual_seed(0)
    args = EnergyArguments(strategy="layer", num_negatives=3, policy_error_negatives=2, policy_negative=True,
                           energy_hidden_dim=16, energy_num_heads=2, energy_num_layers=1, action_head_dim=16)
    plugin = EnergyPlugin(args, hidden_size=8, action_dim=DA, horizon=H, action_token_id=0)
    plugin.setup(SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu")), local_batch=4)
    readout = BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))
    policy, layers = plugin.predict_actions(readout)
    actions = torch.randn(4, H, DA)
    loss, stats = plugin.energy_loss(readout, actions, None, None, layers, SINGLE)
    assert torch.isfinite(loss)
    assert stats["num_negatives/policy"] == 1 and stats["num_negatives/policy_error_noise"] == 2
    assert stats["num_negatives"] == 6
    state = plugin.loss_state_dict()
    assert torch.allclose(state["policy_error"]["scale"],
                          (policy.detach() - actions).square().mean(dim=0).sqrt(), atol=1e-6)
