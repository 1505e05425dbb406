"""The energy head's context encoded once: the same energies as from hidden states, and rerank / refine /
EnergyPolicy give what they gave when every call projected the context again."""

import numpy as np
import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.inference.candidates import make_candidates
from vla_energy.inference.cuda_graphs import GraphedRefine
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.inference.rerank import (
    REFINE_STEP_SIZES,
    clamp_to_bounds,
    energy_weighted_mean,
    refine,
    relative_energy,
    rerank,
)
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.modeling_energy_head import EncodedContext
from vla_energy.modeling.serialization import LoadedPolicy

H, DA, D, S = 4, 3, 16, 6


def _head(num_layers: int = 2) -> EnergyHead:
    torch.manual_seed(0)
    cfg = EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=32, num_heads=4, num_layers=num_layers,
                           initializer_range=0.2)
    return EnergyHead(cfg).eval()


def _inputs(b: int = 3, k: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    context_mask = torch.ones(b, S, dtype=torch.bool)
    context_mask[0, 4:] = False
    context_mask[2, 1:] = False
    action_mask = torch.rand(b, k, H, generator=g) > 0.3
    action_mask[..., 0] = True
    return {"context": torch.randn(b, S, D, generator=g), "context_mask": context_mask,
            "actions": torch.rand(b, k, H, DA, generator=g) * 2 - 1, "action_mask": action_mask,
            "pool": torch.rand(7, H, DA, generator=g) * 2 - 1}


def reference_refine(head, context, actions, steps, step_sizes, context_mask=None, action_mask=None, low=-1.0,
                     high=1.0):
    """refine as first written: every call of the head projects the context again."""
    chunks = actions[:, None] if actions.dim() == 3 else actions
    b, k = chunks.shape[:2]
    mask = None if action_mask is None else (
        action_mask[:, None].expand(b, k, -1) if action_mask.dim() == 2 else action_mask)

    def energy(x):
        m = None if mask is None else mask.repeat(1, x.shape[1] // k, 1)
        return head(context, x, context_mask=context_mask, action_mask=m)

    a = clamp_to_bounds(chunks.detach(), low, high).clone()
    with torch.no_grad():
        e = energy(a)
    trace = [e]
    scale = torch.tensor(step_sizes, dtype=a.dtype)[:, None, None, None, None]
    for _ in range(steps):
        with torch.enable_grad():
            x = a.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x).sum(), x)
        direction = grad / grad.square().mean(dim=(-2, -1), keepdim=True).sqrt().clamp(min=1e-12)
        proposals = clamp_to_bounds(a[None] - scale * direction[None], low, high)
        with torch.no_grad():
            e_new = energy(proposals.transpose(0, 1).reshape(b, len(step_sizes) * k, *a.shape[2:]))
        best, j = e_new.view(b, len(step_sizes), k).min(dim=1)
        better = best < e
        picked = proposals.permute(1, 2, 0, 3, 4)[torch.arange(b)[:, None], torch.arange(k)[None], j]
        a = torch.where(better[..., None, None], picked, a)
        e = torch.where(better, best, e)
        trace.append(e)
    trace = torch.stack(trace)
    return (a[:, 0], trace[..., 0]) if actions.dim() == 3 else (a, trace)


def test_encoded_context_gives_the_energies_of_the_hidden_states():
    head, x = _head(), _inputs()
    ctx, cmask, acts, amask, pool = x["context"], x["context_mask"], x["actions"], x["action_mask"], x["pool"]
    with torch.no_grad():
        enc = head.encode_context(ctx, cmask)
        assert isinstance(enc, EncodedContext) and enc.batch_size == 3 and len(enc.kv) == 2
        torch.testing.assert_close(head(enc, acts[:, 0]), head(ctx, acts[:, 0], context_mask=cmask))
        torch.testing.assert_close(head(enc, acts, action_mask=amask),
                                   head(ctx, acts, context_mask=cmask, action_mask=amask))
        torch.testing.assert_close(head(enc, pool=pool), head(ctx, pool=pool, context_mask=cmask))
        torch.testing.assert_close(head.score_pool(enc, pool), head.score_pool(ctx, pool, context_mask=cmask))
        torch.testing.assert_close(head(enc, acts, pool=pool), head(ctx, acts, context_mask=cmask, pool=pool))
        # Without a mask too, and the first sample alone (its padding dropped) scores the same.
        torch.testing.assert_close(head(head.encode_context(ctx), acts), head(ctx, acts))
        alone = head(ctx[:1, :4], acts[:1], action_mask=amask[:1])
        torch.testing.assert_close(head(enc, acts, action_mask=amask)[:1], alone)


def test_encoded_context_keeps_gradients_and_is_encoded_once_per_forward():
    head, x = _head(), _inputs()
    ctx = x["context"].clone().requires_grad_(True)
    calls = []
    encode = head.encode_context
    head.encode_context = lambda *a, **kw: calls.append(1) or encode(*a, **kw)
    energies = head(ctx, x["actions"], context_mask=x["context_mask"], pool=x["pool"])
    assert energies.shape == (3, 7 + 5) and len(calls) == 1  # pool and own candidates share one encoding
    energies.sum().backward()
    assert ctx.grad is not None and bool(ctx.grad[0, :4].abs().sum() > 0)
    assert bool((ctx.grad[0, 4:] == 0).all())  # padding tokens get no gradient
    assert head.context_proj[0].weight.grad is not None


def test_encoded_context_errors():
    head, x = _head(), _inputs()
    enc = head.encode_context(x["context"], x["context_mask"])
    with pytest.raises(ValueError, match="already encoded"):
        head(enc, x["actions"], context_mask=x["context_mask"])
    with pytest.raises(ValueError, match="1 blocks"):
        head(_head(num_layers=1).encode_context(x["context"]), x["actions"])
    with pytest.raises(ValueError, match="actions"):
        head(enc, x["actions"][:2])
    with pytest.raises(ValueError, match="no real token"):
        head.encode_context(x["context"], torch.zeros(3, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="candidates"):
        rerank(head, enc, x["actions"][:2])


@pytest.mark.parametrize("case", ["single", "starts_masked", "tensor_bounds", "no_steps"])
def test_refine_and_rerank_give_what_they_gave_uncached(case):
    head, x = _head(), _inputs()
    ctx, cmask = x["context"], x["context_mask"]
    kwargs = {"steps": 4, "step_sizes": REFINE_STEP_SIZES}
    actions = x["actions"][:, 0]
    if case == "starts_masked":
        actions, kwargs["action_mask"] = x["actions"], x["action_mask"]
    elif case == "tensor_bounds":
        kwargs.update(low=torch.tensor([-0.5, -1.0, -0.2]), high=torch.tensor([0.5, 0.3, 1.0]))
    elif case == "no_steps":
        kwargs["steps"] = 0
    want = reference_refine(head, ctx, actions, context_mask=cmask, **kwargs)
    raw = refine(head, ctx, actions, context_mask=cmask, **kwargs)
    encoded = refine(head, head.encode_context(ctx, cmask), actions, **kwargs)
    for got in (raw, encoded):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    assert bool((want[1][-1] < want[1][0]).any()) or case == "no_steps"  # the comparison saw moves
    cands, amask = x["actions"], x["action_mask"]
    ranked = rerank(head, head.encode_context(ctx, cmask), cands, action_mask=amask)
    plain = rerank(head, ctx, cands, context_mask=cmask, action_mask=amask)
    assert torch.equal(ranked.index, plain.index)
    torch.testing.assert_close(ranked.energies, plain.energies)
    torch.testing.assert_close(ranked.best, plain.best)


@pytest.fixture(scope="module")
def tiny_policy() -> EnergyPolicy:
    """The tiny llava backbone with a fresh default plugin, as an in-memory EnergyPolicy."""
    torch.manual_seed(0)
    loaded = load_backbone("tiny-llava", dtype="float32")
    plugin = EnergyPlugin(EnergyArguments(), hidden_size_of(loaded.model), DA, H, loaded.action_token_id)
    model = EnergyVLAModel(loaded.model, plugin).eval()
    info = {"action_token": loaded.action_token, "action_token_id": loaded.action_token_id, "inputs": {}}
    chunks = torch.rand(64, H, DA, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return EnergyPolicy(LoadedPolicy(model, loaded.processor, None, info, retrieval_chunks=chunks))


@pytest.mark.parametrize("mode,candidates", [("refine", "gaussian"), ("rerank", "gaussian"),
                                             ("rerank", "retrieval"), ("mean", "layers")])
def test_energy_policy_encodes_the_context_once_and_chooses_as_before(tiny_policy, mode, candidates):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    observation = {"observation.image": image, "task": "go to the red square"}
    head = tiny_policy.plugin.energy_head
    encodes, raw_calls = [], []
    encode, forward = head.encode_context, head.forward
    head.encode_context = lambda *a, **kw: encodes.append(1) or encode(*a, **kw)
    head.forward = lambda context, *a, **kw: (raw_calls.append(1) if not isinstance(context, EncodedContext)
                                              else None) or forward(context, *a, **kw)
    try:
        got = tiny_policy.predict_action_chunk(observation, mode=mode, candidates=candidates, refine_steps=3,
                                               num_samples=6)
    finally:
        del head.encode_context, head.forward
    assert len(encodes) == 1 and not raw_calls
    # The same choice from the hidden states, as EnergyPolicy made it before the context was encoded once.
    readout = tiny_policy.encode(*tiny_policy._parse_observation(observation)[:2])
    policy, layers = tiny_policy.plugin.predict_actions(readout)
    ctx, cmask = readout.context, readout.context_mask
    if mode == "refine":
        want = reference_refine(head, ctx, policy.detach(), 3, REFINE_STEP_SIZES, context_mask=cmask,
                                low=None, high=None)[0]
    else:
        cands = make_candidates(candidates, policy.detach(), 6, layer_actions=layers, sigma=0.1,
                                chunks=tiny_policy.loaded.retrieval_chunks,
                                generator=torch.Generator().manual_seed(0), low=None, high=None)
        ranked = rerank(head, ctx, cands, context_mask=cmask)
        want = ranked.best if mode == "rerank" else energy_weighted_mean(cands, ranked.energies, 0.3)
    torch.testing.assert_close(got, want[0])


def test_graphed_refine_refuses_what_it_cannot_capture():
    head, x = _head(), _inputs()
    with pytest.raises(ValueError, match="CUDA"):
        GraphedRefine()(head, x["context"], x["actions"][:, 0], context_mask=x["context_mask"])
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        EnergyPolicy(None, "cpu", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu on a GPU host)")
def test_graphed_refine_gives_refine_on_cuda():
    head, x = _head(), _inputs()
    head = head.cuda()
    ctx, cmask = x["context"].cuda(), x["context_mask"].cuda()
    graphed = GraphedRefine(max_graphs=2)
    for actions, low, high in [(x["actions"][:, 0], -1.0, 1.0), (x["actions"], None, None),
                               (x["actions"][:, 0], torch.tensor([-0.5, -1.0, -0.2]), torch.tensor([0.5, 0.3, 1.0]))]:
        for scale in (1.0, 0.5):  # a capture, then a replay on new inputs
            want = refine(head, ctx * scale, actions.cuda(), steps=4, context_mask=cmask, low=low, high=high)
            got = graphed(head, head.encode_context(ctx * scale, cmask), actions.cuda(), steps=4, low=low, high=high)
            torch.testing.assert_close(got[0], want[0])
            torch.testing.assert_close(got[1], want[1])
    assert len(graphed._graphs) == 2  # the least recently used graph went


class _Offset(torch.nn.Module):
    """A head whose energies are another head's plus a constant per context: InfoNCE cannot tell them apart."""

    def __init__(self, head: EnergyHead, offsets: torch.Tensor) -> None:
        super().__init__()
        self.head, self.offsets = head, offsets

    def forward(self, context, actions, **kwargs):
        return self.head(context, actions, **kwargs) + self.offsets[:, None]


def test_relative_energy_is_the_energy_minus_the_soft_minimum_over_the_references():
    head, x = _head(), _inputs()
    chunks, refs = x["actions"][:, 0], x["pool"]
    got = relative_energy(head, x["context"], chunks, refs, tau=0.3)
    e = head(x["context"], torch.cat([chunks[:, None], refs[None].expand(3, -1, -1, -1)], dim=1))
    soft_min = -0.3 * torch.log(torch.exp(-e[:, 1:] / 0.3).mean(dim=1))
    torch.testing.assert_close(got, e[:, 0] - soft_min)
    # With the chunks' energies given, only the references are scored: the same result.
    torch.testing.assert_close(relative_energy(head, x["context"], chunks, refs, tau=0.3, energy=e[:, 0]), got)
    # A context's energy level cancels.
    offsets = torch.tensor([0.0, 5.0, -2.0])
    torch.testing.assert_close(relative_energy(_Offset(head, offsets), x["context"], chunks, refs, tau=0.3), got)
    # The soft minimum lies between the references' lowest and mean energy: the lowest-energy reference scores
    # <= 0 and the highest >= 0.
    lowest, highest = refs[e[:, 1:].argmin(dim=1)], refs[e[:, 1:].argmax(dim=1)]
    assert bool((relative_energy(head, x["context"], lowest, refs, tau=0.3) <= 0).all())
    assert bool((relative_energy(head, x["context"], highest, refs, tau=0.3) >= 0).all())
    with pytest.raises(ValueError, match="references"):
        relative_energy(head, x["context"], chunks, refs[:, :2], tau=0.3)
    with pytest.raises(ValueError, match="tau"):
        relative_energy(head, x["context"], chunks, refs, tau=0.0)
