"""Property tests of the InfoNCE losses: finite, above the bounded-energy floor, permutation invariant, stats add up."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss

# Deterministic: the same examples on every run and machine, no flaky deadlines on a loaded CPU.
PROPERTY = settings(derandomize=True, max_examples=60, deadline=None, database=None)
E_MIN, E_MAX = 0.1, 2.1  # the seed-000 sigmoid head's energy range
KINDS = ("layer0", "layer3", "noise0.1", "shuffle")
OVERALL = ("e_pos", "e_neg", "gap", "acc", "num_negatives", "loss_floor", "rows_without_negatives")


@st.composite
def explicit_case(draw, require_negative: bool = True, low: float = E_MIN, high: float = E_MAX):
    """e_pos [B], e_neg [B,M], neg_mask [B,M], neg types (M), tau, dtype."""
    b, m = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    energy = st.floats(low, high, allow_nan=False, allow_infinity=False)
    e_pos = draw(arrays(np.float64, (b,), elements=energy))
    e_neg = draw(arrays(np.float64, (b, m), elements=energy))
    mask = draw(arrays(np.bool_, (b, m)))
    if require_negative:
        keep = draw(arrays(np.int64, (b,), elements=st.integers(0, m - 1)))
        mask[np.arange(b), keep] = True
    types = draw(st.lists(st.sampled_from(KINDS), min_size=m, max_size=m))
    tau = draw(st.floats(0.05, 2.0))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (torch.tensor(e_pos, dtype=dtype), torch.tensor(e_neg, dtype=dtype), torch.from_numpy(mask), types,
            tau, dtype)


def reference_rows(e_pos: torch.Tensor, e_neg: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-row -log softmax of the positive among itself and its valid negatives, in float64."""
    gaps = (e_pos.double()[:, None] - e_neg.double()) / tau  # logit(neg) - logit(pos)
    gaps = gaps.masked_fill(~mask, -math.inf)
    zeros = torch.zeros_like(gaps[:, :1])
    return torch.logsumexp(torch.cat([zeros, gaps], dim=1), dim=1)


@PROPERTY
@given(explicit_case(require_negative=False))
def test_finite_equals_reference_and_rows_without_negatives_excluded(case):
    e_pos, e_neg, mask, _, tau, dtype = case
    e_pos, e_neg = e_pos.requires_grad_(), e_neg.requires_grad_()
    loss, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask, energy_range=(E_MIN, E_MAX))
    assert torch.isfinite(loss) and loss.dtype == dtype
    assert all(math.isfinite(v) for v in stats.values()), stats
    has = mask.any(dim=1)
    assert stats["rows_without_negatives"] == float((~has).sum())
    expected = reference_rows(e_pos, e_neg, mask, tau)[has].mean() if bool(has.any()) else torch.tensor(0.0)
    # 1e-6 even for float64: losses.resolve_tau holds a number tau as a float32 scalar (rel. error ~1e-8).
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    assert abs(loss.item() - expected.item()) <= tol * (1 + abs(expected.item()))
    loss.backward()
    assert bool(torch.isfinite(e_pos.grad).all() and torch.isfinite(e_neg.grad).all())
    # A masked negative gets no gradient; nor does the positive of a row without negatives.
    assert bool((e_neg.grad[~mask] == 0).all()) and bool((e_pos.grad[~has] == 0).all())


@PROPERTY
@given(explicit_case(require_negative=False, low=-1e3, high=1e3))
def test_finite_for_unbounded_energies(case):
    e_pos, e_neg, mask, _, tau, _ = case
    e_pos, e_neg = e_pos.requires_grad_(), e_neg.requires_grad_()
    loss, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0 and stats["loss_floor"] == 0.0
    assert bool(torch.isfinite(e_pos.grad).all() and torch.isfinite(e_neg.grad).all())


@PROPERTY
@given(explicit_case(require_negative=False))
def test_never_below_loss_floor(case):
    e_pos, e_neg, mask, _, tau, _ = case
    loss, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask, energy_range=(E_MIN, E_MAX))
    assert loss.item() >= stats["loss_floor"] - 1e-6, (loss.item(), stats["loss_floor"])


@PROPERTY
@given(explicit_case(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_negatives_per_row(case, rnd):
    e_pos, e_neg, mask, _, tau, dtype = case
    b, m = e_neg.shape
    order = torch.tensor([rnd.sample(range(m), m) for _ in range(b)])
    rows = torch.arange(b)[:, None]
    loss, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask, energy_range=(E_MIN, E_MAX))
    loss_p, stats_p = infonce_loss(e_pos, e_neg[rows, order], tau=tau, neg_mask=mask[rows, order],
                                   energy_range=(E_MIN, E_MAX))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert math.isclose(loss.item(), loss_p.item(), rel_tol=tol, abs_tol=tol)
    for key in OVERALL:
        assert math.isclose(stats[key], stats_p[key], rel_tol=1e-9, abs_tol=1e-9), key


@PROPERTY
@given(explicit_case(), st.randoms(use_true_random=False))
def test_invariant_to_permuting_negative_columns_with_types(case, rnd):
    e_pos, e_neg, mask, types, tau, dtype = case
    order = rnd.sample(range(len(types)), len(types))
    loss, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask, neg_types=types)
    loss_p, stats_p = infonce_loss(e_pos, e_neg[:, order], tau=tau, neg_mask=mask[:, order],
                                   neg_types=[types[i] for i in order])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert math.isclose(loss.item(), loss_p.item(), rel_tol=tol, abs_tol=tol)
    assert stats.keys() == stats_p.keys()
    for key in stats.keys() - {"loss"}:
        assert math.isclose(stats[key], stats_p[key], rel_tol=1e-9, abs_tol=1e-9), key


@PROPERTY
@given(explicit_case(require_negative=False))
def test_per_type_stats_add_up(case):
    e_pos, e_neg, mask, types, tau, _ = case
    _, stats = infonce_loss(e_pos, e_neg, tau=tau, neg_mask=mask, neg_types=types)
    counts = mask.sum(dim=1).double()
    assert math.isclose(stats["num_negatives"], float(counts.mean()), abs_tol=1e-12)
    assert "num_negatives/positive" not in stats  # the positive column is never its own negative
    per_type_count, per_type_energy = 0.0, 0.0
    e_pos64, e_neg64 = e_pos.double(), e_neg.double()
    for kind in KINDS:
        sel = mask & torch.tensor([t == kind for t in types])[None, :]
        has = sel.any(dim=1)
        if not bool(has.any()):
            assert f"num_negatives/{kind}" not in stats and f"acc/{kind}" not in stats
            continue
        n = stats[f"num_negatives/{kind}"]
        assert math.isclose(n, float(sel.sum(dim=1).double().mean()), abs_tol=1e-12)
        per_type_count += n
        per_type_energy += n * stats[f"e_neg/{kind}"]
        lowest = e_neg64.masked_fill(~sel, math.inf).min(dim=1).values
        assert math.isclose(stats[f"acc/{kind}"], float((e_pos64[has] < lowest[has]).double().mean()), abs_tol=1e-12)
    assert math.isclose(per_type_count, stats["num_negatives"], rel_tol=1e-9, abs_tol=1e-12)
    # Mean negative energy over all negatives = count-weighted mean of the per-type means.
    assert math.isclose(per_type_energy, stats["num_negatives"] * stats["e_neg"], rel_tol=1e-9, abs_tol=1e-9)
    if stats["acc"] == 1.0:
        assert all(stats[k] == 1.0 for k in stats if k.startswith("acc/"))


@st.composite
def inbatch_case(draw):
    """energies [B,N], labels [B], valid_mask [B,N] with every positive valid, tau."""
    b = draw(st.integers(1, 5))
    n = draw(st.integers(b, b + 4))  # in-batch columns plus a few bank/extra chunks
    energy = st.floats(E_MIN, E_MAX, allow_nan=False, allow_infinity=False)
    e = draw(arrays(np.float64, (b, n), elements=energy))
    labels = draw(arrays(np.int64, (b,), elements=st.integers(0, n - 1)))
    mask = draw(arrays(np.bool_, (b, n)))
    mask[np.arange(b), labels] = True
    return torch.tensor(e), torch.from_numpy(labels), torch.from_numpy(mask), draw(st.floats(0.05, 2.0))


@PROPERTY
@given(inbatch_case(), st.randoms(use_true_random=False))
def test_inbatch_finite_floor_and_permutation_invariant(case, rnd):
    e, labels, mask, tau = case
    b, n = e.shape
    loss, stats = inbatch_infonce_loss(e, labels, tau=tau, valid_mask=mask, energy_range=(E_MIN, E_MAX))
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in stats.values())
    assert loss.item() >= stats["loss_floor"] - 1e-6
    negatives = mask.sum(dim=1) - 1
    assert math.isclose(stats["num_negatives"], float(negatives.double().mean()), abs_tol=1e-12)
    assert stats["rows_without_negatives"] == float((negatives == 0).sum())

    # Relabel the columns (labels follow) and reorder the rows: nothing changes.
    cols = torch.tensor(rnd.sample(range(n), n))
    new_label = torch.argsort(cols)[labels]
    rows = torch.tensor(rnd.sample(range(b), b))
    loss_p, stats_p = inbatch_infonce_loss(e[rows][:, cols], new_label[rows], tau=tau,
                                           valid_mask=mask[rows][:, cols], energy_range=(E_MIN, E_MAX))
    assert math.isclose(loss.item(), loss_p.item(), rel_tol=1e-12, abs_tol=1e-12)
    for key in OVERALL:
        assert math.isclose(stats[key], stats_p[key], rel_tol=1e-9, abs_tol=1e-9), key
