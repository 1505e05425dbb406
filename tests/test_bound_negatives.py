"""bound_negatives: generated negatives and ranking candidates stay where the data's normalized chunks lie, so a
dimension constant in the data (an unused gripper, a padded dimension) is never what makes a negative a negative."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vla_energy import EnergyArguments, EnergyPlugin
from vla_energy.backbones.readout import BackboneReadout
from vla_energy.data.normalization import compute_norm_stats
from vla_energy.inference.policy import candidate_bounds
from vla_energy.losses.candidate_ranking import ranking_candidates
from vla_energy.losses.negatives import Negatives
from vla_energy.losses.perturbation import pin_constant_dims

H, DA = 4, 3
SINGLE = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))


def _stats():
    """q01_q99 statistics of 3-d actions whose last dimension never moves (a gripper the data never uses)."""
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.uniform(-0.1, 0.1, (500, 2)), np.full((500, 1), 0.3)], axis=1).astype(np.float32)
    return compute_norm_stats([raw])


def _plugin(**options) -> EnergyPlugin:
    args = EnergyArguments(strategy="layer", num_negatives=6, energy_hidden_dim=16, energy_num_heads=2,
                           energy_num_layers=1, action_head_dim=16, **options)
    plugin = EnergyPlugin(args, hidden_size=8, action_dim=DA, horizon=H, action_token_id=0)
    plugin.setup(SINGLE, local_batch=4)
    return plugin


def _readout() -> BackboneReadout:
    return BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))


def _actions(stats) -> torch.Tensor:
    rng = np.random.default_rng(1)
    raw = np.concatenate([rng.uniform(-0.1, 0.1, (4, H, 2)), np.full((4, H, 1), 0.3)], axis=-1).astype(np.float32)
    return torch.as_tensor(stats.normalize(raw))


def _negatives_seen(plugin: EnergyPlugin, actions: torch.Tensor) -> torch.Tensor:
    """The negatives the plugin's energy loss trains against (what `bound` hands on), [B,M,H,Da]."""
    seen = []
    bound = plugin.bound

    def record(negatives, *args):
        out = bound(negatives, *args)
        seen.append(out.actions)
        return out

    plugin.bound = record
    readout = _readout()
    _, layers = plugin.predict_actions(readout)
    loss, _ = plugin.energy_loss(readout, actions, None, None, layers, SINGLE)
    assert torch.isfinite(loss)
    return seen[0]


def test_normalized_bounds_pin_a_constant_dimension_and_are_what_inference_uses():
    stats = _stats()
    low, high = stats.normalized_bounds()
    assert stats.constant_dims().tolist() == [False, False, True]
    torch.testing.assert_close(low, torch.tensor([-1.0, -1.0, 0.0]))
    torch.testing.assert_close(high, torch.tensor([1.0, 1.0, 0.0]))
    assert all(torch.equal(a, b) for a, b in zip(candidate_bounds(stats), (low, high)))
    moving = compute_norm_stats([np.random.default_rng(0).uniform(-1, 1, (100, 2)).astype(np.float32)])
    assert moving.normalized_bounds() == (-1.0, 1.0) and candidate_bounds(None) == (None, None)


def test_bounded_negatives_leave_a_constant_dimension_alone_and_stay_in_range():
    torch.manual_seed(0)
    stats = _stats()
    actions = _actions(stats)
    plain = _negatives_seen(_plugin(), actions)
    # Unbounded, Gaussian negatives move the constant dimension: a negative for a reason that is not the task.
    assert float(plain[..., 2].abs().max()) > 0.1
    torch.manual_seed(0)
    plugin = _plugin(bound_negatives=True)
    plugin.set_action_bounds(*stats.normalized_bounds())
    bounded = _negatives_seen(plugin, actions)
    assert bounded.shape == plain.shape
    torch.testing.assert_close(bounded[..., 2], actions[:, None, :, 2].expand_as(bounded[..., 2]))
    assert float(bounded[..., :2].abs().max()) <= 1.0 and float(bounded[..., :2].abs().max()) > 0.5


def test_bounding_masks_a_negative_it_brings_onto_the_truth():
    plugin = _plugin(bound_negatives=True)
    plugin.set_action_bounds(torch.tensor([-1.0, -1.0, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    actions = torch.zeros(2, H, DA)
    chunks = torch.zeros(2, 2, H, DA)
    chunks[:, 0, :, 2] = 0.5  # differs from the truth only where the data never moves
    chunks[:, 1, :, 0] = 0.5
    out = plugin.bound(Negatives(chunks, ["a", "b"], torch.ones(2, 2, dtype=torch.bool)), actions, None)
    assert out.mask.tolist() == [[False, True], [False, True]]
    assert _plugin().bound(Negatives(chunks, ["a", "b"], torch.ones(2, 2, dtype=torch.bool)), actions, None).mask.all()


def test_ranking_samples_and_candidates_are_bounded_like_inference_candidates():
    stats = _stats()
    low, high = stats.normalized_bounds()
    for options in ({"action_head": "flow", "flow_steps": 3, "candidate_ranking": 4, "ranking_candidates": "samples"},
                    {"candidate_ranking": 4}):
        torch.manual_seed(0)
        plugin = _plugin(bound_negatives=True, **options)
        plugin.set_action_bounds(low, high)
        readout = _readout()
        policy, layers = plugin.predict_actions(readout)
        cands = (plugin.ranking_samples(readout, policy, 4) if plugin.is_flow else
                 ranking_candidates(_actions(stats), policy, None, 4, None, plugin.generator, low, high))
        assert cands.shape == (4, 4, H, DA) and bool((cands[..., 2] == 0).all()) and float(cands.abs().max()) <= 1.0
        loss, stats_ = plugin.energy_loss(readout, _actions(stats), None, None, layers, SINGLE)
        assert torch.isfinite(loss) and stats_["ranking_loss"] > 0


def test_bound_negatives_without_the_datas_bounds_is_a_clear_error():
    plugin = _plugin(bound_negatives=True)
    readout = _readout()
    _, layers = plugin.predict_actions(readout)
    with pytest.raises(ValueError, match="bound_negatives needs the data's bounds: call plugin.set_action_bounds"):
        plugin.energy_loss(readout, torch.zeros(4, H, DA), None, None, layers, SINGLE)
    with pytest.raises(ValueError, match="the bounds are empty"):
        plugin.set_action_bounds(1.0, -1.0)


def test_pin_constant_dims_sets_only_the_dimensions_whose_bounds_meet():
    x = torch.randn(2, H, DA)
    low, high = torch.tensor([-1.0, -1.0, 0.25]), torch.tensor([1.0, 1.0, 0.25])
    pinned = pin_constant_dims(x, low, high)
    assert (pinned[..., 2] == 0.25).all() and torch.equal(pinned[..., :2], x[..., :2])
    assert pin_constant_dims(x, -1.0, 1.0) is x and pin_constant_dims(x, None, None) is x  # scalar bounds: no dim
