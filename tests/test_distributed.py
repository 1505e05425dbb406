"""Global InfoNCE across real processes (gloo, CPU): exact loss and gradients vs one process holding all samples."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.losses.bank import ActionBank
from vla_energy.losses.global_infonce import gather_actions, global_infonce_loss
from vla_energy.losses.infonce import inbatch_infonce_loss
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.losses.strategy import plan_strategy, strategy_loss

H, DA, S, D = 4, 2, 5, 8
SINGLE = SimpleNamespace(num_processes=1, process_index=0)


def _head() -> EnergyHead:
    torch.manual_seed(0)
    cfg = EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=16, num_heads=2, num_layers=1)
    return EnergyHead(cfg).double()


def _data(n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, S, dtype=torch.bool)
    mask[::2, 3:] = False
    amask = torch.ones(n, H, dtype=torch.bool)
    amask[1::3, 2:] = False
    return {
        "context": torch.randn(n, S, D, generator=g, dtype=torch.float64),
        "context_mask": mask,
        "actions": torch.randn(n, H, DA, generator=g, dtype=torch.float64),
        "action_mask": amask,
        "sample_ids": torch.arange(n) + 100,
        "negatives": torch.randn(n, 3, H, DA, generator=g, dtype=torch.float64),
        "negative_mask": torch.rand(n, 3, generator=g) > 0.2,
    }


def _bank() -> ActionBank:
    bank = ActionBank(8, H, DA, eps=1e-3)
    g = torch.Generator().manual_seed(2)
    bank.stage(torch.randn(6, H, DA, generator=g, dtype=torch.float64), sample_ids=torch.arange(6) + 100)
    bank.commit()
    bank.actions = bank.actions.double()
    return bank


CASES = {
    "batch": dict(),
    "negatives_bank": dict(negatives=True, bank=True),
    "symmetric": dict(symmetric=True),
}


def _run(head, data, accelerator, case):
    kw = dict(context_mask=data["context_mask"], action_mask=data["action_mask"], sample_ids=data["sample_ids"],
              tau=0.3, symmetric=case.get("symmetric", False))
    if case.get("negatives"):
        kw.update(negatives=data["negatives"], negative_mask=data["negative_mask"], negative_types=["a", "b", "a"])
    if case.get("bank"):
        kw["bank"] = _bank()
    return global_infonce_loss(head, data["context"], data["actions"], accelerator, **kw)


def _slice(data, start, stop):
    return {k: v[start:stop] for k, v in data.items()}


def _fresh_accelerator(**kwargs) -> Accelerator:
    """Forked workers inherit accelerate's singleton state from the pytest process: start from a clean one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, **kwargs)


def _worker(out_dir: str, sizes: list, prepared: bool) -> None:
    accelerator = _fresh_accelerator()
    rank = accelerator.process_index
    data = _data(sum(sizes))
    local = _slice(data, sum(sizes[:rank]), sum(sizes[: rank + 1]))
    results = {}
    for name, case in CASES.items():
        head = _head()
        model = accelerator.prepare(head) if prepared else head
        loss, stats = _run(model, local, accelerator, case)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in head.parameters()])
        if not prepared:  # what DDP does: the mean over processes
            grads = accelerator.reduce(grads, reduction="mean")
        mean_loss = accelerator.reduce(loss.detach().reshape(1), reduction="mean")
        results[name] = {"loss": float(mean_loss), "grads": grads.tolist(), "stats": stats,
                         "world": accelerator.num_processes}
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps(results))


def _reference(sizes):
    data = _data(sum(sizes))
    out = {}
    for name, case in CASES.items():
        head = _head()
        loss, stats = _run(head, data, SINGLE, case)
        loss.backward()
        out[name] = {"loss": float(loss.detach()), "grads": torch.cat([p.grad.flatten() for p in head.parameters()]),
                     "stats": stats}
    return out


def test_world_one_is_plain_inbatch_infonce():
    data = _data(6)
    head = _head()
    loss, stats = global_infonce_loss(head, data["context"], data["actions"], SINGLE,
                                      context_mask=data["context_mask"], tau=0.3)
    energies = head(data["context"], pool=data["actions"], context_mask=data["context_mask"])
    ref, ref_stats = inbatch_infonce_loss(energies, torch.arange(6), tau=0.3, energy_range=head.energy_range)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    for key in ("e_pos", "e_neg", "acc", "num_negatives", "loss_floor"):
        assert stats[key] == pytest.approx(ref_stats[key], rel=1e-9), key


@pytest.mark.parametrize(
    "sizes, prepared",
    [([3, 3], False), ([3, 1], True), ([3, 0], True), ([2, 2, 2, 2], True), ([3, 1, 2, 0], False)],
    ids=["2x3-manual", "uneven-ddp", "empty-rank-ddp", "4x2-ddp", "4-uneven-empty-manual"],
)
def test_multiprocess_equals_single_process(tmp_path, sizes, prepared):
    debug_launcher(_worker, args=(str(tmp_path), sizes, prepared), num_processes=len(sizes))
    got = json.loads((tmp_path / "result.json").read_text())
    ref = _reference(sizes)
    for name in CASES:
        assert got[name]["world"] == len(sizes)
        assert got[name]["loss"] == pytest.approx(ref[name]["loss"], rel=1e-6), name
        g = torch.tensor(got[name]["grads"], dtype=torch.float64)
        assert torch.allclose(g, ref[name]["grads"], rtol=1e-6, atol=1e-10), name
        for key in ("e_pos", "e_neg", "acc", "num_negatives", "loss_floor"):
            assert got[name]["stats"][key] == pytest.approx(ref[name]["stats"][key], rel=1e-6, abs=1e-9), key


def _policy() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(D, H * DA).double()


def _l1(policy, data, accelerator):
    pred = policy(data["context"].mean(1)).view(-1, H, DA)
    return masked_l1(pred, data["actions"], data["action_mask"], accelerator)


def _l1_worker(out_dir: str, sizes: list) -> None:
    accelerator = _fresh_accelerator()
    rank = accelerator.process_index
    policy = _policy()
    model = accelerator.prepare(policy)
    loss = _l1(model, _slice(_data(sum(sizes)), sum(sizes[:rank]), sum(sizes[: rank + 1])), accelerator)
    accelerator.backward(loss)
    mean_loss = float(accelerator.reduce(loss.detach().reshape(1), reduction="mean"))
    if rank == 0:
        grads = torch.cat([p.grad.flatten() for p in policy.parameters()]).tolist()
        Path(out_dir, "l1.json").write_text(json.dumps({"grads": grads, "loss": mean_loss}))


@pytest.mark.parametrize("sizes", [[3, 1], [2, 2, 2, 0]], ids=["uneven", "4-with-empty"])
def test_policy_l1_counts_real_steps_over_all_processes(tmp_path, sizes):
    # _data masks steps in every third row, so the ranks hold different numbers of real steps.
    debug_launcher(_l1_worker, args=(str(tmp_path), sizes), num_processes=len(sizes))
    got = json.loads((tmp_path / "l1.json").read_text())
    policy = _policy()
    loss = _l1(policy, _data(sum(sizes)), SINGLE)
    loss.backward()
    ref = torch.cat([p.grad.flatten() for p in policy.parameters()])
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)  # masked_l1 computes in float32
    assert torch.allclose(torch.tensor(got["grads"], dtype=torch.float64), ref, rtol=1e-6, atol=1e-10)


def _mismatch_worker(out_dir: str) -> None:
    accelerator = _fresh_accelerator()
    rank = accelerator.process_index
    try:
        gather_actions(accelerator, torch.zeros(2, H, DA + rank))
        Path(out_dir, f"rank{rank}").write_text("no error")
    except ValueError as e:
        Path(out_dir, f"rank{rank}").write_text(str(e))


def test_mismatched_shapes_raise_on_every_rank(tmp_path):
    debug_launcher(_mismatch_worker, args=(str(tmp_path),), num_processes=2)
    for rank in range(2):
        assert "actions differ across processes" in (tmp_path / f"rank{rank}").read_text()


def _accumulate_worker(out_dir: str) -> None:
    accelerator = _fresh_accelerator(gradient_accumulation_steps=2)
    rank = accelerator.process_index
    head = _head()
    model = accelerator.prepare(head)
    bank = ActionBank(16, H, DA)
    for micro in range(2):
        local = _slice(_data(4, seed=10 + micro), 2 * rank, 2 * rank + 2)
        with accelerator.accumulate(model):
            loss, _ = global_infonce_loss(model, local["context"], local["actions"], accelerator,
                                          context_mask=local["context_mask"], sample_ids=local["sample_ids"],
                                          bank=bank)
            accelerator.backward(loss)
    bank.commit()
    if rank == 0:
        grads = torch.cat([p.grad.flatten() for p in head.parameters()]).tolist()
        Path(out_dir, "acc.json").write_text(json.dumps({"grads": grads, "bank": len(bank)}))
    Path(out_dir, f"bank{rank}.json").write_text(json.dumps(bank.entries()[0].tolist()))


def test_gradient_accumulation_gathers_every_micro_batch(tmp_path):
    debug_launcher(_accumulate_worker, args=(str(tmp_path),), num_processes=2)
    got = json.loads((tmp_path / "acc.json").read_text())
    head = _head()
    for micro in range(2):
        data = _data(4, seed=10 + micro)
        loss, _ = global_infonce_loss(head, data["context"], data["actions"], SINGLE,
                                      context_mask=data["context_mask"])
        (loss / 2).backward()
    ref = torch.cat([p.grad.flatten() for p in head.parameters()])
    assert torch.allclose(torch.tensor(got["grads"], dtype=torch.float64), ref, rtol=1e-6, atol=1e-10)
    # Both micro-batches' 4 gathered chunks were staged and committed, identically on both ranks.
    assert got["bank"] == 8
    assert (tmp_path / "bank0.json").read_text() == (tmp_path / "bank1.json").read_text()


def test_bank_masks_own_sample_and_near_duplicates():
    bank = ActionBank(4, H, DA, eps=0.05)
    chunks = torch.randn(3, H, DA)
    bank.stage(chunks, sample_ids=torch.tensor([7, 8, 9]))
    assert len(bank) == 0  # staged only
    bank.commit()
    positives = torch.stack([chunks[0], chunks[1] + 0.01, torch.randn(H, DA) + 5])
    keep = bank.negative_mask(positives, torch.tensor([7, 1, 2]))
    assert keep.tolist() == [[False, True, True], [True, False, True], [True, True, True]]
    bank.stage(torch.randn(3, H, DA), sample_ids=torch.tensor([10, 11, 12]))
    bank.commit()  # FIFO: 6 staged into 4 slots keeps the newest 4, oldest first
    assert bank.entries()[2].tolist() == [9, 10, 11, 12]
    restored = ActionBank(4, H, DA, eps=0.05)
    restored.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.entries(), bank.entries()))
    with pytest.raises(ValueError, match=r"shape \(4, 4, 2\), expected \(5, 4, 2\)"):
        ActionBank(5, H, DA).load_state_dict(bank.state_dict())


def test_hybrid_decision_table_and_strategy_columns():
    assert plan_strategy("hybrid", 1, 3).batch == "local"
    assert plan_strategy("hybrid", 8, 6).batch == "global"
    assert plan_strategy("hybrid", 8, 5).batch == "none" and plan_strategy("hybrid", 8, 5).explicit
    assert plan_strategy("combined", 8, 3) == plan_strategy("combined", 1, 24)
    with pytest.raises(ValueError, match="expected one of"):
        plan_strategy("global_infonce", 2, 3)
    data = _data(5)
    head = _head()
    kw = dict(context_mask=data["context_mask"], negatives=data["negatives"], bank=_bank(),
              sample_ids=data["sample_ids"], negative_types=["noise0.1", "noise0.2", "shuffle"])
    _, combined = strategy_loss(plan_strategy("combined", 1, 5), head, data["context"], data["actions"], SINGLE, **kw)
    assert combined["num_negatives/batch"] == 4.0
    assert combined["num_negatives/noise0.1"] == 1.0 and combined["num_negatives/shuffle"] == 1.0
    # The bank holds ids 100..105: each of samples 100..104 finds its own entry masked.
    assert combined["num_negatives/bank"] == 5.0
    assert combined["num_negatives"] == 4 + 3 + 5
    _, layer = strategy_loss(plan_strategy("layer", 1, 5), head, data["context"], data["actions"], SINGLE, **kw)
    assert layer["num_negatives"] == 3.0 and "num_negatives/batch" not in layer
    _, local = strategy_loss(plan_strategy("inbatch", 1, 5), head, data["context"], data["actions"], SINGLE, **kw)
    assert local["num_negatives"] == 4.0


def _nonfinite_worker(out_dir: str) -> None:
    from vla_energy.training.nonfinite import all_finite

    accelerator = _fresh_accelerator()
    rank = accelerator.process_index
    nan_on_rank1 = torch.tensor(float("nan") if rank == 1 else 1.0)
    verdicts = [all_finite(accelerator, torch.tensor(1.0)), all_finite(accelerator, nan_on_rank1),
                all_finite(accelerator, torch.tensor(float("inf")) if rank == 0 else torch.tensor(2.0))]
    Path(out_dir, f"finite{rank}.json").write_text(json.dumps(verdicts))


def test_nonfinite_verdict_is_shared_by_all_ranks(tmp_path):
    """A NaN on one rank makes every rank skip the step (and nobody waits alone in a collective)."""
    debug_launcher(_nonfinite_worker, args=(str(tmp_path),), num_processes=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"finite{rank}.json").read_text()) == [True, False, False]
