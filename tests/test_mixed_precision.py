"""Mixed precision on CPU: energies stay float32 under bf16/fp16 autocast and the InfoNCE loss barely moves."""

import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.inference.rerank import refine
from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss

B, S, K, H, DA, D = 8, 5, 9, 4, 2, 16

# Measured on the seeded example below (torch 2.13 CPU), |autocast - float32|:
#   bfloat16: energies max 5.5e-3, explicit InfoNCE 3.0e-3, in-batch InfoNCE 3.0e-3 (losses ~2.2)
#   float16:  energies max 6.7e-4, explicit InfoNCE 1.8e-5, in-batch InfoNCE 4.3e-5
# The tolerances are a few times the measured differences.
TOLERANCE = {
    torch.bfloat16: {"energy": 2e-2, "loss": 1e-2},
    torch.float16: {"energy": 2e-3, "loss": 2e-4},
}


def _example() -> tuple[EnergyHead, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 head (init 0.2 so energies spread out) and a padded batch of K candidates per context."""
    torch.manual_seed(0)
    cfg = EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=32, num_heads=4, num_layers=2,
                           initializer_range=0.2)
    head = EnergyHead(cfg).eval()
    g = torch.Generator().manual_seed(0)
    context = torch.randn(B, S, D, generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[2, 3:] = False
    cands = torch.rand(B, K, H, DA, generator=g) * 2 - 1
    return head, context, mask, cands


def _losses(head, context, mask, cands) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Energies [B,K], explicit InfoNCE (candidate 0 positive) and in-batch InfoNCE over the positives."""
    energies = head(context, cands, context_mask=mask)
    explicit, _ = infonce_loss(energies[:, 0], energies[:, 1:], tau=0.3)
    pooled = head(context, pool=cands[:, 0], context_mask=mask)
    inbatch, _ = inbatch_infonce_loss(pooled, torch.arange(B), tau=0.3)
    return energies, explicit, inbatch


def _cpu_autocast_works(dtype: torch.dtype) -> bool:
    """Whether CPU autocast really computes a matmul in `dtype` (older torch ignores fp16 on CPU)."""
    with torch.autocast("cpu", dtype=dtype):
        return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_energies_float32_and_loss_close(dtype):
    if not _cpu_autocast_works(dtype):
        pytest.skip(f"torch {torch.__version__} does not run {dtype} autocast on CPU")
    head, context, mask, cands = _example()
    head.requires_grad_(False)
    energies32, explicit32, inbatch32 = _losses(head, context, mask, cands)
    with torch.autocast("cpu", dtype=dtype):
        # Sanity: autocast is really on, so the comparison below is not float32 against float32.
        assert head.context_proj[0](context).dtype == dtype
        energies, explicit, inbatch = _losses(head, context, mask, cands)

    assert energies.dtype == torch.float32 and explicit.dtype == torch.float32 and inbatch.dtype == torch.float32
    low, high = head.energy_range
    assert bool((energies > low).all() and (energies < high).all())
    tol = TOLERANCE[dtype]
    assert not torch.equal(energies, energies32)
    assert float((energies - energies32).abs().max()) <= tol["energy"]
    assert abs(explicit.item() - explicit32.item()) <= tol["loss"]
    assert abs(inbatch.item() - inbatch32.item()) <= tol["loss"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_backward_gives_float32_gradients_along_float32_ones(dtype):
    if not _cpu_autocast_works(dtype):
        pytest.skip(f"torch {torch.__version__} does not run {dtype} autocast on CPU")
    head, context, mask, cands = _example()
    _, explicit, inbatch = _losses(head, context, mask, cands)
    (explicit + inbatch).backward()
    ref = torch.cat([p.grad.flatten() for p in head.parameters()])
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        _, explicit, inbatch = _losses(head, context, mask, cands)
    (explicit + inbatch).backward()
    grads = [p.grad for p in head.parameters()]
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]), ref, dim=0)
    assert cosine.item() > 0.98, cosine.item()  # measured 0.9997 (bf16), 0.999995 (fp16)


def test_bfloat16_weights_give_float32_energies():
    head, context, mask, cands = _example()
    head.requires_grad_(False)
    energies32 = head(context, cands, context_mask=mask)
    energies = head.to(torch.bfloat16)(context, cands, context_mask=mask)
    assert energies.dtype == torch.float32
    assert float((energies - energies32).abs().max()) <= 2e-2  # measured 5.1e-3


def test_refine_under_bf16_autocast_still_descends_in_bounds():
    head, context, mask, cands = _example()
    start = cands[:, 0] * 1.5  # partly out of bounds
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refined, trace = refine(head, context, start, steps=5, step_sizes=(0.1,), context_mask=mask)
    assert trace.dtype == torch.float32 and trace.shape == (6, B)
    assert bool((trace[1:] <= trace[:-1]).all())
    assert bool((refined >= -1).all() and (refined <= 1).all())
    assert all(p.grad is None for p in head.parameters())
