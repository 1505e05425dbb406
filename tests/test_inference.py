"""Inference with a trained energy head: rerank picks the ground truth, refine descends the energy in bounds."""

import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.inference.candidates import gaussian_candidates, layer_candidates, make_candidates
from vla_energy.inference.rerank import RerankResult, refine, rerank
from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss

H, DA, D, S = 4, 2, 16, 3
TRAIN_STEPS, BATCH, TAU = 300, 16, 0.1


def toy_task(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Contexts [n,S,D] whose first token encodes a target point; the right chunk [n,H,Da] walks straight to it."""
    encoder = torch.randn(DA, D, generator=torch.Generator().manual_seed(1234))
    target = torch.rand(n, DA, generator=generator) * 1.6 - 0.8
    context = 0.3 * torch.randn(n, S, D, generator=generator)
    context[:, 0] = target @ encoder
    fraction = torch.arange(1, H + 1, dtype=torch.float32) / H
    return context, target[:, None, :] * fraction[None, :, None]


def perturb(chunks: torch.Tensor, sigmas: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """[n,H,Da] -> [n,len(sigmas),H,Da]: Gaussian perturbations of each chunk, kept in [-1, 1]."""
    noise = torch.randn(chunks.shape[0], len(sigmas), H, DA, generator=generator)
    return (chunks[:, None] + noise * torch.tensor(sigmas)[None, :, None, None]).clamp(-1, 1)


@pytest.fixture(scope="module")
def trained_head() -> EnergyHead:
    """A small head trained with in-batch + explicit-negative InfoNCE on the toy task (seeded, a few seconds)."""
    torch.manual_seed(0)
    # A larger init than the default 0.02 skips the long flat start of a tiny head (and keeps the test fast).
    cfg = EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=32, num_heads=4, num_layers=1,
                           initializer_range=0.2)
    head = EnergyHead(cfg)
    opt = torch.optim.AdamW(head.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        context, chunks = toy_task(BATCH, g)
        pooled, _ = inbatch_infonce_loss(head(context, pool=chunks), torch.arange(BATCH), tau=TAU)
        negatives = perturb(chunks, (0.1, 0.2, 0.4), g)
        energies = head(context, torch.cat([chunks[:, None], negatives], dim=1))
        explicit, _ = infonce_loss(energies[:, 0], energies[:, 1:], tau=TAU)
        opt.zero_grad()
        (pooled + explicit).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return head.eval()


def test_rerank_picks_ground_truth(trained_head):
    g = torch.Generator().manual_seed(1)
    context, chunks = toy_task(64, g)
    others = torch.stack([chunks.roll(1, 0), chunks.roll(2, 0)], dim=1)
    cands = torch.cat([chunks[:, None], perturb(chunks, (0.2, 0.3, 0.4), g), others], dim=1)
    # The ground truth sits at a different position in every row.
    order = torch.stack([torch.randperm(cands.shape[1], generator=g) for _ in range(64)])
    cands = cands[torch.arange(64)[:, None], order]
    gt_index = (order == 0).float().argmax(dim=1)

    result = rerank(trained_head, context, cands)
    assert isinstance(result, RerankResult)
    assert result.energies.shape == (64, 6) and result.energies.dtype == torch.float32
    assert result.index.shape == (64,) and result.best.shape == (64, H, DA)
    assert torch.equal(result.index, result.energies.argmin(dim=1))
    assert torch.equal(result.best, cands[torch.arange(64), result.index])
    hit_rate = (result.index == gt_index).float().mean().item()
    assert hit_rate >= 0.9, hit_rate


def test_rerank_matches_scoring_one_by_one_and_respects_masks(trained_head):
    g = torch.Generator().manual_seed(2)
    context, chunks = toy_task(3, g)
    cands = perturb(chunks, (0.1, 0.3, 0.5), g)
    mask = torch.ones(3, S, dtype=torch.bool)
    mask[1, 2:] = False
    result = rerank(trained_head, context, cands, context_mask=mask)
    with torch.no_grad():
        apart = torch.stack([trained_head(context, cands[:, k], context_mask=mask) for k in range(3)], dim=1)
    torch.testing.assert_close(result.energies, apart, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"candidates has shape \(3, 4, 2\), expected \(B=3, K, H, Da\)"):
        rerank(trained_head, context, chunks)
    with pytest.raises(ValueError, match=r"candidates has shape \(2, 3, 4, 2\)"):
        rerank(trained_head, context, cands[:2])


def test_refine_descends_monotonically_in_bounds(trained_head):
    g = torch.Generator().manual_seed(3)
    context, chunks = toy_task(32, g)
    start = chunks + 0.3 * torch.randn(chunks.shape, generator=g)
    start[:4] *= 4.0  # far out of [-1, 1]
    before = start.clone()
    refined, trace = refine(trained_head, context, start, steps=20)

    assert refined.shape == (32, H, DA) and trace.shape == (21, 32)
    assert torch.equal(start, before), "refine must not modify its input"
    assert bool((refined >= -1).all() and (refined <= 1).all())
    assert bool((trace[1:] <= trace[:-1]).all()), "energy went up for some sample"
    with torch.no_grad():
        torch.testing.assert_close(trace[0], trained_head(context, start.clamp(-1, 1)))
        torch.testing.assert_close(trace[-1], trained_head(context, refined))
    assert (trace[-1] < trace[0]).float().mean().item() >= 0.9
    # Descending the learned energy moves the chunks toward the right one.
    closer = (refined - chunks).norm(dim=(1, 2)) < (start.clamp(-1, 1) - chunks).norm(dim=(1, 2))
    assert closer.float().mean().item() >= 0.75
    assert all(p.grad is None for p in trained_head.parameters()), "refine created parameter gradients"


def test_refine_steps_are_the_line_search_sizes_and_custom_bounds_hold(trained_head):
    g = torch.Generator().manual_seed(4)
    context, chunks = toy_task(8, g)
    start = 3.0 * torch.randn(chunks.shape, generator=g)
    one, trace = refine(trained_head, context, start, steps=1, step_sizes=(0.02,), low=-0.5, high=0.5)
    assert trace.shape == (2, 8)
    moved = (one - start.clamp(-0.5, 0.5)).square().mean(dim=(1, 2)).sqrt()
    assert bool((moved <= 0.02 + 1e-6).all()), "a step moves a chunk by at most its RMS step size"
    many, _ = refine(trained_head, context, start, steps=5, low=-0.5, high=0.5)
    assert bool((many >= -0.5).all() and (many <= 0.5).all())
    per_dim, _ = refine(trained_head, context, start, steps=3, low=torch.tensor([-0.2, -0.9]),
                        high=torch.tensor([0.1, 0.9]))
    assert bool((per_dim[..., 0] >= -0.2).all() and (per_dim[..., 0] <= 0.1).all())
    same, trace0 = refine(trained_head, context, start, steps=0)
    assert trace0.shape == (1, 8) and torch.equal(same, start.clamp(-1, 1))


def test_refine_under_no_grad_with_masks(trained_head):
    g = torch.Generator().manual_seed(5)
    context, chunks = toy_task(4, g)
    cmask = torch.ones(4, S, dtype=torch.long)
    cmask[0, 1:] = 0
    amask = torch.ones(4, H, dtype=torch.bool)
    amask[2, 3:] = False
    start = perturb(chunks, (0.3,), g)[:, 0]
    with torch.no_grad():  # callers often are; refine still needs the action gradient
        refined, trace = refine(trained_head, context, start, context_mask=cmask, action_mask=amask)
    assert bool((trace[1:] <= trace[:-1]).all()) and bool((trace[-1] < trace[0]).any())
    # A masked-out step does not enter the energy, so descent leaves it where it was.
    torch.testing.assert_close(refined[2, 3], start[2, 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": -1}, "steps=-1"),
        ({"step_sizes": ()}, r"step_sizes=\(\)"),
        ({"step_sizes": (0.1, 0.0)}, "step sizes > 0"),
        ({"low": 1.0, "high": -1.0}, "the bounds are empty"),
    ],
)
def test_refine_errors(trained_head, kwargs, match):
    context, chunks = toy_task(2, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match=match):
        refine(trained_head, context, chunks, **kwargs)
    with pytest.raises(ValueError, match=r"actions has shape \(1, 1, 4, 2\), expected \(B=2, K, H, Da\)"):
        refine(trained_head, context, chunks[:1])


def test_gaussian_candidates_shapes_bounds_and_seeds():
    policy = torch.rand(3, H, DA) * 2.4 - 1.2  # partly out of [-1, 1]
    cands = gaussian_candidates(policy, 6, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert cands.shape == (3, 6, H, DA)
    assert bool((cands >= -1).all() and (cands <= 1).all())
    assert torch.equal(cands[:, 0], policy.clamp(-1, 1))
    assert not torch.equal(cands[:, 1], cands[:, 2]), "perturbations should differ"
    narrow = gaussian_candidates(policy, 5, sigma=1.0, low=-0.2, high=0.3)
    assert narrow.shape == (3, 5, H, DA) and bool((narrow >= -0.2).all() and (narrow <= 0.3).all())
    exact = gaussian_candidates(policy, 3, sigma=0.0, low=None, high=None)
    assert torch.equal(exact[:, 1], policy) and torch.equal(exact[:, 2], policy)
    assert gaussian_candidates(policy, 1).shape == (3, 1, H, DA)
    a, b, c = (gaussian_candidates(policy, 6, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_layer_and_retrieval_candidates_start_with_the_policy():
    policy, layers = torch.rand(2, H, DA), torch.rand(3, 2, H, DA) * 2 - 1
    cands = make_candidates("layers", policy, 16, layer_actions=list(layers))
    assert cands.shape == (2, 3, H, DA)  # the policy + every layer but the last (the policy's own)
    assert torch.equal(cands[:, 0], policy) and torch.equal(cands[:, 1:], layers[:2].transpose(0, 1))
    assert torch.equal(layer_candidates(policy, list(layers)), cands)
    chunks = torch.rand(10, H, DA)
    chunks[4] = policy[0] + 0.001
    near = make_candidates("retrieval", policy, 4, chunks=chunks)
    assert near.shape == (2, 4, H, DA) and torch.equal(near[0, 1], chunks[4])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: gaussian_candidates(p[0], 4), r"policy has shape \(4, 2\), expected \(B, H, Da\)"),
        (lambda p: layer_candidates(p, [p[:1]]), r"layer_actions\[0\] has shape \(1, 4, 2\), expected \(B=2, H=4, Da=2\)"),
        (lambda p: gaussian_candidates(p, 0), "num_samples=0"),
        (lambda p: gaussian_candidates(p, 4, sigma=-0.1), "sigma=-0.1"),
        (lambda p: gaussian_candidates(p.long(), 4), "policy has dtype torch.int64"),
        (lambda p: make_candidates("retrieval", p, 4), "needs the training chunks"),
        (lambda p: make_candidates("layers", p, 4), "needs the policy's layer-wise predictions"),
        (lambda p: make_candidates("nearest", p, 4), "expected one of"),
    ],
)
def test_candidate_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, H, DA))
