"""Inference with a trained energy head: rerank picks the ground truth, refine descends the energy in bounds."""

import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.inference.rerank import RerankResult, propose_candidates, refine, rerank
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
    refined, trace = refine(trained_head, context, start, steps=20, step_size=0.05)

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


def test_refine_step_is_clipped_and_custom_bounds_hold(trained_head):
    g = torch.Generator().manual_seed(4)
    context, chunks = toy_task(8, g)
    start = 3.0 * torch.randn(chunks.shape, generator=g)
    one, trace = refine(trained_head, context, start, steps=1, step_size=10.0, max_step=0.02, low=-0.5, high=0.5)
    assert trace.shape == (2, 8)
    assert float((one - start.clamp(-0.5, 0.5)).abs().max()) <= 0.02 + 1e-6
    many, _ = refine(trained_head, context, start, steps=5, step_size=10.0, low=-0.5, high=0.5)
    assert bool((many >= -0.5).all() and (many <= 0.5).all())
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
        ({"step_size": 0.0}, "step_size=0.0"),
        ({"max_step": -0.1}, "max_step=-0.1"),
    ],
)
def test_refine_errors(trained_head, kwargs, match):
    context, chunks = toy_task(2, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match=match):
        refine(trained_head, context, chunks, **kwargs)
    with pytest.raises(ValueError, match=r"actions has shape \(1, 4, 2\), expected \(B=2, H, Da\)"):
        refine(trained_head, context, chunks[:1])


def test_propose_candidates_shapes_types_bounds():
    policy = torch.rand(3, H, DA) * 2.4 - 1.2  # partly out of [-1, 1]
    layers = [torch.rand(3, H, DA) * 3 - 1.5, torch.rand(3, H, DA)]
    cands, types = propose_candidates(policy, layers, num_samples=5, sigma=0.5,
                                      generator=torch.Generator().manual_seed(0))
    assert cands.shape == (3, 8, H, DA)
    assert types == ["policy", "layer0", "layer1"] + [f"perturb{k}" for k in range(5)]
    assert bool((cands >= -1).all() and (cands <= 1).all())
    assert torch.equal(cands[:, 0], policy.clamp(-1, 1))
    assert torch.equal(cands[:, 1], layers[0].clamp(-1, 1)) and torch.equal(cands[:, 2], layers[1])
    assert not torch.equal(cands[:, 3], cands[:, 4]), "perturbations should differ"

    narrow, _ = propose_candidates(policy, num_samples=4, sigma=1.0, low=-0.2, high=0.3)
    assert narrow.shape == (3, 5, H, DA) and bool((narrow >= -0.2).all() and (narrow <= 0.3).all())
    exact, types = propose_candidates(policy, num_samples=2, sigma=0.0)
    assert types == ["policy", "perturb0", "perturb1"]
    assert torch.equal(exact[:, 1], exact[:, 0]) and torch.equal(exact[:, 2], exact[:, 0])
    alone, types = propose_candidates(policy, num_samples=0)
    assert alone.shape == (3, 1, H, DA) and types == ["policy"]


def test_propose_candidates_accepts_stacked_layers():
    # plugin.predict_actions gives a list; a stacked [L,B,H,Da] tensor is the same L predictions.
    policy, layers = torch.rand(2, H, DA), torch.rand(3, 2, H, DA) * 2 - 1
    cands, types = propose_candidates(policy, layers, num_samples=1)
    assert types == ["policy", "layer0", "layer1", "layer2", "perturb0"]
    assert torch.equal(cands[:, 1:4], layers.transpose(0, 1))


def test_propose_candidates_seeded():
    policy = torch.rand(2, H, DA) - 0.5
    a, _ = propose_candidates(policy, num_samples=6, generator=torch.Generator().manual_seed(7))
    b, _ = propose_candidates(policy, num_samples=6, generator=torch.Generator().manual_seed(7))
    c, _ = propose_candidates(policy, num_samples=6, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p: propose_candidates(p[0]), r"policy has shape \(4, 2\), expected \(B, H, Da\)"),
        (lambda p: propose_candidates(p, [p[:1]]), r"layer_actions\[0\] has shape \(1, 4, 2\), expected \(B=2, H=4, Da=2\)"),
        (lambda p: propose_candidates(p, [p, p[:, :3]]), r"layer_actions\[1\] has shape \(2, 3, 2\)"),
        (lambda p: propose_candidates(p, num_samples=-1), "num_samples=-1"),
        (lambda p: propose_candidates(p, sigma=-0.1), "sigma=-0.1"),
        (lambda p: propose_candidates(p.long()), "policy has dtype torch.int64"),
    ],
)
def test_propose_candidates_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, H, DA))
