"""InfoNCE losses: hand-computed values, masking, floor, per-type stats, errors."""

import math

import pytest
import torch

from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss, loss_floor


def test_infonce_hand_value():
    loss, stats = infonce_loss(torch.tensor([0.5]), torch.tensor([[1.0, 1.5]]), tau=0.5)
    # -log( e^{-1} / (e^{-1} + e^{-2} + e^{-3}) ) = log(1 + e^{-1} + e^{-2})
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1) + math.exp(-2)), rel=1e-6)
    assert stats["e_pos"] == pytest.approx(0.5)
    assert stats["e_neg"] == pytest.approx(1.25)
    assert stats["gap"] == pytest.approx(0.75)
    assert stats["acc"] == 1.0 and stats["num_negatives"] == 2.0 and stats["tau"] == 0.5


def test_masked_negative_is_excluded():
    e_pos, e_neg = torch.tensor([0.5, 1.0]), torch.tensor([[1.0, 0.1], [0.2, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    loss, stats = infonce_loss(e_pos, e_neg, tau=1.0, neg_mask=mask)
    row0 = math.log(1 + math.exp(-0.5))
    row1 = 1.0 + math.log(math.exp(-1.0) + math.exp(-0.2) + math.exp(-2.0))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert stats["acc"] == 0.5 and stats["num_negatives"] == 1.5


def test_row_without_negatives_is_excluded_not_nan():
    loss, stats = infonce_loss(
        torch.tensor([0.5, 0.5]), torch.tensor([[1.0], [1.0]]), 1.0, neg_mask=torch.tensor([[True], [False]])
    )
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.5)), rel=1e-6)
    assert stats["rows_without_negatives"] == 1.0


def test_inbatch_equals_explicit_form():
    torch.manual_seed(1)
    e = torch.rand(4, 4)
    labels = torch.arange(4)
    loss, stats = inbatch_infonce_loss(e, labels, tau=0.3)
    ref = torch.nn.functional.cross_entropy(-e / 0.3, labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert stats["num_negatives"] == 3.0
    assert stats["acc"] == pytest.approx(float((e.diag() < (e + torch.eye(4) * 9).min(1).values).float().mean()))


def test_loss_floor_formula_and_bound():
    assert loss_floor(8, (0.1, 2.1), 0.3) == pytest.approx(math.log(1 + 8 * math.exp(-2.0 / 0.3)), rel=1e-9)
    assert loss_floor(8, None, 0.3) == 0.0
    # The best a bounded head can do reaches the floor exactly.
    d = torch.float64
    loss, stats = infonce_loss(torch.full((2,), 0.1, dtype=d), torch.full((2, 8), 2.1, dtype=d), 0.3, energy_range=(0.1, 2.1))
    assert loss.item() == pytest.approx(stats["loss_floor"], rel=1e-9)


def test_per_type_stats():
    e_pos = torch.tensor([0.5, 0.5])
    e_neg = torch.tensor([[1.0, 0.2, 1.5], [1.0, 0.9, 0.1]])
    _, stats = infonce_loss(e_pos, e_neg, 0.3, neg_types=["layer0", "noise0.1", "noise0.1"])
    assert stats["acc/layer0"] == 1.0
    assert stats["acc/noise0.1"] == 0.0
    assert stats["e_neg/noise0.1"] == pytest.approx((0.2 + 1.5 + 0.9 + 0.1) / 4)
    assert stats["num_negatives/noise0.1"] == 2.0


def test_learnable_tau_gets_gradient():
    tau = torch.tensor(0.5, requires_grad=True)
    loss, _ = infonce_loss(torch.tensor([0.5]), torch.tensor([[1.0, 1.5]]), tau=tau)
    loss.backward()
    assert tau.grad is not None and tau.grad.item() != 0.0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: infonce_loss(torch.rand(3), torch.rand(2, 4)), r"e_neg has shape \(2, 4\), expected \(B=3, M\)"),
        (lambda: infonce_loss(torch.rand(3, 1), torch.rand(3, 4)), r"e_pos has shape \(3, 1\)"),
        (lambda: infonce_loss(torch.rand(2), torch.rand(2, 4), tau=0.0), "tau=0.0"),
        (lambda: inbatch_infonce_loss(torch.rand(2, 3), torch.tensor([0, 3])), "labels must index"),
        (lambda: infonce_loss(torch.rand(2), torch.rand(2, 2), neg_types=["a"]), "neg_types has 1"),
        (
            lambda: inbatch_infonce_loss(torch.rand(2, 2), torch.arange(2), valid_mask=torch.eye(2) == 0),
            "masks out a positive",
        ),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
