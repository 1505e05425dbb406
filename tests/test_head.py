"""EnergyHead: shapes, K-at-once == one-by-one, padding, activation, save/load, errors."""

import math

import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig


def _head(dtype=torch.float64, **kw) -> EnergyHead:
    cfg = EnergyHeadConfig(context_dim=16, action_dim=3, horizon=4, hidden_dim=32, num_heads=4, num_layers=2, **kw)
    return EnergyHead(cfg).to(dtype).eval()


def _inputs(b=3, s=6, k=5, dtype=torch.float64):
    context = torch.randn(b, s, 16, dtype=dtype)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return context, mask, torch.randn(b, k, 4, 3, dtype=dtype)


def test_shapes_and_single_chunk():
    head = _head()
    context, mask, cands = _inputs()
    assert head(context, cands, context_mask=mask).shape == (3, 5)
    single = head(context, cands[:, 0], context_mask=mask)
    assert single.shape == (3,)
    assert torch.allclose(single, head(context, cands, context_mask=mask)[:, 0], atol=1e-12)


def test_k_at_once_equals_one_by_one():
    head = _head()
    context, mask, cands = _inputs()
    action_mask = torch.ones(3, 5, 4, dtype=torch.bool)
    action_mask[0, 1, 2:] = False
    together = head(context, cands, context_mask=mask, action_mask=action_mask)
    apart = torch.stack(
        [head(context, cands[:, k], context_mask=mask, action_mask=action_mask[:, k]) for k in range(5)], dim=1
    )
    assert (together - apart).abs().max() < 1e-6


def test_pool_equals_expanded_candidates_and_forward():
    head = _head()
    context, mask, _ = _inputs()
    pool = torch.randn(7, 4, 3, dtype=torch.float64)
    scored = head.score_pool(context, pool, context_mask=mask)
    assert scored.shape == (3, 7)
    expanded = head(context, pool.unsqueeze(0).expand(3, 7, 4, 3), context_mask=mask)
    assert (scored - expanded).abs().max() < 1e-6
    assert torch.equal(head(context, pool=pool, context_mask=mask), scored)


def test_pool_and_actions_in_one_call():
    head = _head()
    context, mask, cands = _inputs()
    pool = torch.randn(7, 4, 3, dtype=torch.float64)
    both = head(context, cands, context_mask=mask, pool=pool)
    assert both.shape == (3, 12)
    assert torch.equal(both[:, :7], head.score_pool(context, pool, context_mask=mask))
    assert torch.equal(both[:, 7:], head(context, cands, context_mask=mask))


def test_empty_batch_keeps_graph():
    head = _head(dtype=torch.float32)
    e = head(torch.randn(0, 5, 16), pool=torch.randn(4, 4, 3))
    assert e.shape == (0, 4)
    e.sum().backward()
    assert all(p.grad is not None and not p.grad.abs().any() for p in head.parameters())


def test_padded_tokens_have_no_influence():
    head = _head()
    context, mask, cands = _inputs()
    before = head(context, cands, context_mask=mask)
    noisy = context.clone()
    noisy[mask == 0] = 1e3 * torch.randn(int((mask == 0).sum()), 16, dtype=torch.float64)
    assert (head(noisy, cands, context_mask=mask) - before).abs().max() < 1e-9
    # A padded action step does not count either.
    am = torch.ones(3, 5, 4, dtype=torch.bool)
    am[:, :, 3] = False
    moved = cands.clone()
    moved[:, :, 3] += 5.0
    assert (head(context, moved, mask, am) - head(context, cands, mask, am)).abs().max() < 1e-9


def test_sigmoid_bounds_and_seed_formula():
    head = _head()
    cfg = head.config
    assert (cfg.energy_input_scale, cfg.energy_scale, cfg.energy_offset) == (0.5, 2.0, 0.1)
    assert head.energy_range == (0.1, 2.1)
    raw = torch.tensor([-100.0, 0.0, 2.0])
    expected = torch.tensor([0.1, 1.1, 2.0 / (1.0 + math.exp(-1.0)) + 0.1])
    assert torch.allclose(head._activate(raw), expected, atol=1e-6)
    assert _head(energy_activation="softplus").energy_range is None


def test_float32_energies_under_autocast():
    head = _head(dtype=torch.float32)
    context, mask, cands = _inputs(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = head(context, cands, context_mask=mask)
    assert e.dtype == torch.float32
    assert (e - head(context, cands, context_mask=mask)).abs().max() < 5e-2


def test_save_load_roundtrip(tmp_path):
    head = _head(dtype=torch.float32)
    context, mask, cands = _inputs(dtype=torch.float32)
    head.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = EnergyHead.from_pretrained(tmp_path).eval()
    assert torch.allclose(loaded(context, cands, mask), head(context, cands, mask), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(actions=torch.randn(3, 5, 4, 2)), r"actions has shape \(3, 5, 4, 2\), expected \(B=3, K, H=4, Da=3\)"),
        (dict(actions=torch.randn(2, 4, 3)), r"actions has shape \(2, 4, 3\), expected \(B=3, H=4, Da=3\)"),
        (dict(actions=torch.randn(3, 4, 3), context_mask=torch.ones(3, 5)), r"context_mask has shape \(3, 5\)"),
        (dict(pool=torch.randn(7, 3, 3)), r"pool has shape \(7, 3, 3\), expected \(N, H=4, Da=3\)"),
        (dict(), "pass `actions`"),
    ],
)
def test_bad_shapes_raise(kwargs, match):
    head = _head(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        head(torch.randn(3, 6, 16), **kwargs)


def test_all_padding_row_raises():
    head = _head(dtype=torch.float32)
    mask = torch.ones(2, 6)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"context_mask rows \[1\] have no real token"):
        head(torch.randn(2, 6, 16), torch.randn(2, 4, 3), context_mask=mask)


def test_bad_config():
    with pytest.raises(ValueError, match="energy_activation"):
        EnergyHeadConfig(energy_activation="tanh")
    with pytest.raises(ValueError, match="divisible"):
        EnergyHeadConfig(hidden_dim=30, num_heads=4)
