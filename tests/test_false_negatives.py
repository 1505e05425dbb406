"""False negatives among the gathered batch columns: own sample ids and look-alike chunks are masked, exactly."""

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from test_distributed import DA, SINGLE, D, H, S, _head  # the same small float64 head and sizes

from vla_energy.losses.bank import ActionBank
from vla_energy.losses.distances import chunk_rms
from vla_energy.losses.false_negatives import lookalike_mask
from vla_energy.losses.global_infonce import global_infonce_loss
from vla_energy.losses.negatives import false_negative_mask


def _data() -> dict:
    """6 samples (ranks of 3): sample 4 (rank 1) repeats sample 0's chunk; sample 5 repeats sample 1's id."""
    g = torch.Generator().manual_seed(3)
    actions = torch.randn(6, H, DA, generator=g, dtype=torch.float64)
    actions[4] = actions[0] + 1e-4
    amask = torch.ones(6, H, dtype=torch.bool)
    amask[2, 2:] = False
    return {
        "context": torch.randn(6, S, D, generator=g, dtype=torch.float64),
        "actions": actions,
        "action_mask": amask,
        "sample_ids": torch.tensor([10, 11, 12, 13, 14, 11]),
    }


def _loss(head, data, accelerator, eps):
    return global_infonce_loss(head, data["context"], data["actions"], accelerator, tau=0.3, action_mask=data["action_mask"],
                               sample_ids=data["sample_ids"], false_negative_eps=eps)


def _worker(out_dir: str) -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    local = {k: v[3 * rank: 3 * rank + 3] for k, v in _data().items()}
    model = accelerator.prepare(_head())
    loss, stats = _loss(model, local, accelerator, 1e-2)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.module.parameters()])
    mean_loss = accelerator.reduce(loss.detach().reshape(1), reduction="mean")
    if rank == 0:
        Path(out_dir, "result.json").write_text(json.dumps({"loss": float(mean_loss), "grads": grads.tolist(),
                                                            "stats": stats}))


def test_duplicate_in_other_rank_is_masked_and_exact(tmp_path):
    debug_launcher(_worker, args=(str(tmp_path),), num_processes=2)
    got = json.loads((tmp_path / "result.json").read_text())
    head = _head()
    ref, ref_stats = _loss(head, _data(), SINGLE, 1e-2)
    ref.backward()
    assert got["loss"] == pytest.approx(float(ref.detach()), rel=1e-6)
    ref_grads = torch.cat([p.grad.flatten() for p in head.parameters()])
    assert torch.allclose(torch.tensor(got["grads"], dtype=torch.float64), ref_grads, rtol=1e-6, atol=1e-10)
    # Rows 0 and 4 see each other as look-alikes, rows 1 and 5 share a sample id: 4 masked columns over 6 rows.
    assert got["stats"]["false_negatives"] == pytest.approx(4 / 6)
    assert ref_stats["false_negatives"] == pytest.approx(4 / 6)
    assert got["stats"]["num_negatives"] == pytest.approx(5 - 4 / 6)


def test_masked_loss_equals_infonce_without_the_lookalike_columns():
    data, head = _data(), _head()
    with torch.no_grad():
        masked, _ = _loss(head, data, SINGLE, 1e-2)
        unmasked, stats0 = _loss(head, data, SINGLE, 0.0)
        energies = head(data["context"], pool=data["actions"], pool_action_mask=data["action_mask"])
    assert stats0["false_negatives"] == pytest.approx(2 / 6)  # eps 0 still masks the repeated sample id
    drop = {0: 4, 4: 0, 1: 5, 5: 1}
    rows = []
    for i in range(6):
        cols = [j for j in range(6) if j != drop.get(i)]
        logits = -energies[i, cols] / 0.3
        rows.append(torch.logsumexp(logits, 0) - logits[cols.index(i)])
    assert float(masked) == pytest.approx(float(torch.stack(rows).mean()), rel=1e-9)
    assert float(masked) != pytest.approx(float(unmasked), rel=1e-6)


def test_lookalike_mask_agrees_with_bank_and_explicit_negatives():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, H, DA, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    chunks = torch.cat([pos + 0.004 * torch.randn(3, H, DA, generator=g), torch.randn(2, H, DA, generator=g)])
    chunks[1, 2:] += 5.0  # far only on padded steps: still a look-alike of positive 1
    same = lookalike_mask(pos, chunks, 0.01, mask)
    assert torch.equal(same[:, :3].diagonal(), torch.ones(3, dtype=torch.bool))
    assert not bool(same[:, 3:].any())
    explicit = false_negative_mask(pos, chunks[None].expand(3, -1, -1, -1), mask, 0.01)
    assert torch.equal(~same, explicit)
    bank = ActionBank(5, H, DA, eps=0.01)
    bank.stage(chunks, sample_ids=torch.tensor([0, 1, 2, 3, 4]))
    bank.commit()
    assert torch.equal(bank.negative_mask(pos, None, mask), ~same)
    # Unknown ids (-1) never match each other.
    ids = torch.tensor([-1, -1, 7])
    by_id = lookalike_mask(pos, chunks[3:], 0.0, None, ids, torch.tensor([-1, 7]))
    assert by_id.tolist() == [[False, False], [False, False], [False, True]]
    assert chunk_rms(pos, pos).diagonal().abs().max() == 0
    with pytest.raises(ValueError, match="false_negative_eps=-1"):
        lookalike_mask(pos, chunks, -1.0)


def test_symmetric_term_leaves_out_lookalike_contexts():
    """actions -> contexts: a context whose own chunk is a look-alike of the action is not a negative either."""
    data, head = _data(), _head()
    context, actions, mask = data["context"], data["actions"], data["action_mask"]
    ids = data["sample_ids"]

    def loss(symmetric: bool) -> torch.Tensor:
        return global_infonce_loss(head, context, actions, SINGLE, tau=0.3, action_mask=mask, sample_ids=ids,
                                   false_negative_eps=1e-2, symmetric=symmetric)[0]

    with torch.no_grad():
        energies = head(context, pool=actions, pool_action_mask=mask)  # [contexts, actions]
    logits = -energies.t() / 0.3  # [actions, contexts]
    same = lookalike_mask(actions, actions, 1e-2, mask, ids, ids)
    same.fill_diagonal_(False)
    assert same[0, 4] and same[4, 0] and same[1, 5] and same[5, 1]  # a look-alike pair and a repeated sample id
    expected = torch.nn.functional.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(6))
    torch.testing.assert_close(loss(True) - loss(False), expected, rtol=1e-9, atol=1e-9)
