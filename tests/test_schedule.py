"""Seed 000's progressive lr-scale / grad-clip schedule and its LambdaLR."""

import pytest
import torch

from vla_energy.training.schedule import ProgressiveSchedule


@pytest.mark.parametrize(
    "step, lr_scale, clip",
    [
        (0, 0.1, 0.3),
        (4999, 0.1, 0.3),
        (5000, 0.1, 0.3),
        (7500, 0.2, 0.35),
        (10000, 0.3, 0.4),
        (14999, 0.1 + 0.4 * 9999 / 10000, 0.3 + 0.2 * 9999 / 10000),
        (15000, 0.5, 0.5),
        (10**6, 0.5, 0.5),
    ],
)
def test_seed_000_values(step, lr_scale, clip):
    schedule = ProgressiveSchedule()
    assert schedule.lr_scale(step) == pytest.approx(lr_scale, abs=1e-12)
    assert schedule.max_grad_norm(step) == pytest.approx(clip, abs=1e-12)


def test_configurable_boundaries():
    schedule = ProgressiveSchedule(stable_steps=10, ramp_end_step=20, start_lr_scale=0.2, end_lr_scale=1.0,
                                   start_max_grad_norm=1.0, end_max_grad_norm=2.0)
    assert schedule.lr_scale(9) == pytest.approx(0.2)
    assert schedule.lr_scale(15) == pytest.approx(0.6)
    assert schedule.max_grad_norm(15) == pytest.approx(1.5)
    assert schedule.lr_scale(20) == pytest.approx(1.0)


def test_step_change_when_ramp_is_empty():
    schedule = ProgressiveSchedule(stable_steps=5, ramp_end_step=5)
    assert schedule.lr_scale(4) == pytest.approx(0.1) and schedule.lr_scale(5) == pytest.approx(0.5)


def test_constant():
    schedule = ProgressiveSchedule.constant(lr_scale=0.7, max_grad_norm=2.0)
    for step in (0, 1, 5000, 10**7):
        assert schedule.lr_scale(step) == 0.7 and schedule.max_grad_norm(step) == 2.0
    assert ProgressiveSchedule.constant().lr_scale(3) == 1.0


def _optimizer() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    return torch.optim.SGD([{"params": [params[0]], "lr": 1.0}, {"params": [params[1]], "lr": 0.5},
                            {"params": [params[2]], "lr": 0.2}], lr=1.0)


def _step(opt, sched, n):
    for _ in range(n):
        opt.step()
        sched.step()


def test_lr_scheduler_scales_only_chosen_group():
    opt = _optimizer()
    sched = ProgressiveSchedule(stable_steps=2, ramp_end_step=6).make_lr_scheduler(opt, group_index=-1)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs[:2] == [1.0, 0.5] and lrs[2] == pytest.approx(0.2 * 0.1)
    _step(opt, sched, 4)  # step 4: halfway through the ramp
    assert [g["lr"] for g in opt.param_groups][:2] == [1.0, 0.5]
    assert opt.param_groups[2]["lr"] == pytest.approx(0.2 * 0.3)
    _step(opt, sched, 10)
    assert [g["lr"] for g in opt.param_groups][:2] == [1.0, 0.5]
    assert opt.param_groups[2]["lr"] == pytest.approx(0.2 * 0.5)


def test_lr_scheduler_with_base_lambda_for_all_groups():
    opt = _optimizer()
    warmup = lambda s: min(1.0, (s + 1) / 4)  # noqa: E731
    sched = ProgressiveSchedule().make_lr_scheduler(opt, group_index=0, base_lambda=warmup)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0 * 0.25 * 0.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * 0.25)
    _step(opt, sched, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert [g["lr"] for g in opt.param_groups][1:] == pytest.approx([0.5, 0.2])


def test_scheduler_state_dict_has_no_lambdas_and_restores_step():
    opt = _optimizer()
    schedule = ProgressiveSchedule(stable_steps=2, ramp_end_step=6)
    sched = schedule.make_lr_scheduler(opt, group_index=1, base_lambda=lambda s: 1.0)
    _step(opt, sched, 4)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None, None, None]  # plain functions: nothing to pickle
    opt2 = _optimizer()
    sched2 = schedule.make_lr_scheduler(opt2, group_index=1, base_lambda=lambda s: 1.0)
    sched2.load_state_dict(state)
    _step(opt2, sched2, 1)
    assert opt2.param_groups[1]["lr"] == pytest.approx(0.5 * schedule.lr_scale(5))


def test_lr_lambda_list():
    lambdas = ProgressiveSchedule().lr_lambda(1, 3)
    assert [f(10000) for f in lambdas] == pytest.approx([1.0, 0.3, 1.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ProgressiveSchedule(stable_steps=10, ramp_end_step=5), r"ramp_end_step=5, expected >= stable_steps=10"),
        (lambda: ProgressiveSchedule(start_lr_scale=0.0), r"start_lr_scale=0.0"),
        (lambda: ProgressiveSchedule(end_max_grad_norm=-1.0), r"end_max_grad_norm=-1.0"),
        (lambda: ProgressiveSchedule(stable_steps=-1), r"stable_steps=-1"),
        (lambda: ProgressiveSchedule().lr_lambda(3, 3), r"group_index=3 is out of range for 3"),
        (lambda: ProgressiveSchedule().make_lr_scheduler(_optimizer(), group_index=-4), r"group_index=-4"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
