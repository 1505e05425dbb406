"""Fixed / adaptive (seed 000 gap rule) / learnable temperatures."""

import math

import pytest
import torch

from vla_energy.losses.infonce import infonce_loss
from vla_energy.losses.temperature import (
    AdaptiveTemperature,
    FixedTemperature,
    LearnableTemperature,
    make_temperature,
)


def _stats(gap: float, b: int = 4, m: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    e_pos = torch.full((b,), 0.2)
    return e_pos, torch.full((b, m), 0.2 + gap)


def test_fixed_returns_constant_scalar():
    temp = FixedTemperature(0.3)
    tau = temp(*_stats(0.7))
    assert tau.dim() == 0 and tau.dtype == torch.float32 and not tau.requires_grad
    assert tau.item() == pytest.approx(0.3)
    assert temp.current == pytest.approx(0.3)


@pytest.mark.parametrize("gap, expected", [(0.05, 0.15), (0.5, 0.3), (1.5, 0.6)])
def test_adaptive_seed_000_rule(gap, expected):
    temp = AdaptiveTemperature(base=0.3)
    tau = temp(*_stats(gap))
    assert tau.dim() == 0 and tau.dtype == torch.float32 and not tau.requires_grad
    assert tau.item() == pytest.approx(expected)
    assert temp.current == pytest.approx(expected)


def test_adaptive_gap_is_absolute():
    e_pos, e_neg = _stats(1.5)
    assert AdaptiveTemperature(base=0.3)(e_neg[:, 0], e_pos[:, None]).item() == pytest.approx(0.6)


@pytest.mark.parametrize("base, gap, expected", [(1.5, 1.5, 2.0), (0.15, 0.05, 0.1), (5.0, 0.5, 2.0)])
def test_adaptive_clamps(base, gap, expected):
    assert AdaptiveTemperature(base=base)(*_stats(gap)).item() == pytest.approx(expected)


def test_adaptive_no_grad_from_energies():
    e_pos = torch.full((2,), 0.2, requires_grad=True)
    e_neg = torch.full((2, 3), 0.25, requires_grad=True)
    tau = AdaptiveTemperature()(e_pos, e_neg)
    assert not tau.requires_grad and tau.item() == pytest.approx(0.15)


def test_adaptive_neg_mask_selects_entries():
    e_pos = torch.full((2,), 0.2)
    # Valid negatives sit 1.5 above the positives; masked ones would pull the mean gap under 1.0.
    e_neg = torch.tensor([[1.7, 0.2, 0.2], [1.7, 0.2, 0.2]])
    mask = torch.tensor([[True, False, False], [True, False, False]])
    temp = AdaptiveTemperature(base=0.3)
    assert temp(e_pos, e_neg).item() == pytest.approx(0.3)
    assert temp(e_pos, e_neg, neg_mask=mask).item() == pytest.approx(0.6)


def test_adaptive_without_negatives_uses_base():
    e_pos = torch.full((2,), 0.2)
    temp = AdaptiveTemperature(base=0.3)
    assert temp(e_pos, torch.zeros(0)).item() == pytest.approx(0.3)
    assert temp(e_pos, torch.ones(2, 2), neg_mask=torch.zeros(2, 2, dtype=torch.bool)).item() == pytest.approx(0.3)


def test_adaptive_ema_smooths_and_round_trips_state_dict():
    temp = AdaptiveTemperature(base=0.3, ema=0.9)
    assert temp(*_stats(1.5)).item() == pytest.approx(0.6)  # the first gap seeds the EMA
    # 0.9 * 1.5 + 0.1 * 0.05 = 1.355: still above high_gap, where an unsmoothed rule would give 0.15.
    assert temp(*_stats(0.05)).item() == pytest.approx(0.6)
    assert temp.gap_ema.item() == pytest.approx(1.355)
    state = temp.state_dict()
    assert set(state) == {"gap_ema", "num_updates"}
    restored = AdaptiveTemperature(base=0.3, ema=0.9)
    restored.load_state_dict(state)
    assert restored.gap_ema.item() == pytest.approx(1.355) and int(restored.num_updates) == 2
    # Both continue identically: 1.355 -> 1.2245 -> 1.10705 -> 1.00135 (still 0.6) -> 0.90621 (0.3).
    for _ in range(4):
        assert temp(*_stats(0.05)).item() == restored(*_stats(0.05)).item()
    assert restored.current == pytest.approx(0.3)
    assert restored.gap_ema.item() == pytest.approx(0.906210, rel=1e-5)


def test_adaptive_ema_frozen_in_eval_mode():
    temp = AdaptiveTemperature(base=0.3, ema=0.5)
    temp(*_stats(1.5))
    temp.eval()
    assert temp(*_stats(0.05)).item() == pytest.approx(0.6)  # uses the stored gap 1.5
    assert temp.gap_ema.item() == pytest.approx(1.5) and int(temp.num_updates) == 1


def test_adaptive_with_infonce_loss():
    e_pos, e_neg = _stats(1.5, b=3, m=4)
    _, stats = infonce_loss(e_pos, e_neg, tau=AdaptiveTemperature(base=0.3))
    assert stats["tau"] == pytest.approx(0.6)


def test_learnable_gets_gradient_through_loss():
    temp = LearnableTemperature(init=0.3)
    assert temp.log_tau.item() == pytest.approx(math.log(0.3))
    loss, stats = infonce_loss(torch.tensor([0.5, 0.4]), torch.tensor([[1.0, 1.5], [0.6, 0.9]]), tau=temp)
    assert stats["tau"] == pytest.approx(0.3)
    loss.backward()
    assert temp.log_tau.grad is not None and temp.log_tau.grad.item() != 0.0


def test_learnable_value_clamped_and_recovers():
    temp = LearnableTemperature(init=0.3, min_tau=0.01, max_tau=10.0)
    e_pos, e_neg = _stats(0.5)
    with torch.no_grad():
        temp.log_tau.fill_(math.log(100.0))
    tau = temp(e_pos, e_neg)
    assert tau.item() == pytest.approx(10.0) and temp.current == pytest.approx(10.0)
    assert temp.log_tau.item() == pytest.approx(math.log(10.0))  # the parameter itself is clamped, as in CLIP
    # At the bound the gradient still flows, so an optimizer can move it back into range.
    tau.backward()
    assert temp.log_tau.grad.item() == pytest.approx(10.0)
    with torch.no_grad():
        temp.log_tau.fill_(math.log(1e-4))
    assert temp(e_pos, e_neg).item() == pytest.approx(0.01)


def test_learnable_called_twice_backward():
    temp = LearnableTemperature(init=0.5)
    e_pos, e_neg = _stats(0.5)
    (temp(e_pos, e_neg) * 2 + temp(e_pos, e_neg)).backward()
    assert temp.log_tau.grad.item() == pytest.approx(3 * 0.5)


def test_learnable_state_dict_round_trip():
    temp = LearnableTemperature(init=0.7)
    other = LearnableTemperature(init=0.3)
    other.load_state_dict(temp.state_dict())
    assert other(*_stats(0.5)).item() == pytest.approx(0.7)


def test_make_temperature():
    assert isinstance(make_temperature("fixed", 0.2), FixedTemperature)
    adaptive = make_temperature("adaptive", 0.4, ema=0.5)
    assert isinstance(adaptive, AdaptiveTemperature) and adaptive.base == 0.4 and adaptive.ema == 0.5
    learnable = make_temperature("learnable", 0.2)
    assert isinstance(learnable, LearnableTemperature)
    assert [p.requires_grad for p in learnable.parameters()] == [True]
    assert list(make_temperature("fixed", 0.2).parameters()) == []
    assert list(adaptive.parameters()) == []
    with pytest.raises(ValueError, match=r"temperature kind 'cosine' is unknown, expected one of \('fixed'"):
        make_temperature("cosine", 0.3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: FixedTemperature(0.0), r"tau=0.0"),
        (lambda: AdaptiveTemperature(ema=1.0), r"ema=1.0"),
        (lambda: AdaptiveTemperature(min_tau=2.0, max_tau=1.0), r"min_tau=2.0 > max_tau=1.0"),
        (lambda: AdaptiveTemperature(low_gap=2.0), r"low_gap=2.0"),
        (lambda: LearnableTemperature(init=20.0), r"init=20.0, expected within"),
        (lambda: FixedTemperature()(torch.rand(2, 1), torch.rand(2, 3)), r"e_pos has shape \(2, 1\), expected \(B\)"),
        (lambda: AdaptiveTemperature()(torch.rand(2), torch.ones(2, 3, dtype=torch.long)), r"e_neg must be"),
        (
            lambda: AdaptiveTemperature()(torch.rand(2), torch.rand(2, 3), neg_mask=torch.ones(3, 2, dtype=torch.bool)),
            r"neg_mask has shape \(3, 2\), expected \(2, 3\)",
        ),
        (
            lambda: LearnableTemperature()(torch.rand(2), torch.rand(2, 3), neg_mask=torch.ones(2, dtype=torch.bool)),
            r"neg_mask has shape \(2,\), expected \(2, 3\)",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
