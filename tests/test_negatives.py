"""Layer-wise, noise and temporal-shuffle negatives (seeds 000 and 002), false-negative masking."""

import pytest
import torch

from vla_energy.losses.negatives import (
    Negatives,
    build_negatives,
    false_negative_mask,
    fixed_layer_indices,
    noise_negatives,
    select_layer_negatives,
    temporal_shuffle,
)

B, H, DA = 3, 5, 4


def _actions(b: int = B, h: int = H, da: int = DA) -> torch.Tensor:
    return torch.randn(b, h, da, generator=torch.Generator().manual_seed(123))


def _layers(actions: torch.Tensor, num_layers: int) -> list[torch.Tensor]:
    # Layer i sits i + 1 away from the ground truth: tagged layers can be recognised by their values.
    return [actions + (i + 1) for i in range(num_layers)]


@pytest.mark.parametrize(
    "num_layers, expected",
    [(0, []), (1, []), (2, [0]), (3, [0, 1]), (4, [0, 1, 2]), (6, [0, 2, 3, 4]), (32, [0, 10, 16, 30])],
)
def test_fixed_layer_indices(num_layers, expected):
    assert fixed_layer_indices(num_layers) == expected


def test_seed_002_defaults_types_and_values():
    actions = _actions()
    layers = _layers(actions, 32)
    neg = build_negatives(actions, layers, generator=torch.Generator().manual_seed(0))
    assert isinstance(neg, Negatives)
    assert neg.types == ["layer0", "layer10", "layer16", "layer30", "noise0.1", "noise0.2", "noise0.4", "shuffle"]
    assert neg.actions.shape == (B, 8, H, DA) and neg.mask.shape == (B, 8) and neg.mask.dtype == torch.bool
    for slot, layer in enumerate([0, 10, 16, 30]):
        assert torch.equal(neg.actions[:, slot], layers[layer])
    assert bool(neg.mask.all())


def test_noise_values_and_fill_sigmas_match_reference_draws():
    actions = _actions()
    neg = build_negatives(actions, None, layer_mode="none", noise_sigmas=(0.1, 0.3), shuffle=False,
                          generator=torch.Generator().manual_seed(7))
    # Seed 000 sigmas, then fill slot k with sigma 0.3 + 0.1 k: k = 2..7.
    sigmas = [0.1, 0.3] + [0.3 + 0.1 * k for k in range(2, 8)]
    assert neg.types == ["noise0.1", "noise0.3", "noise0.5", "noise0.6", "noise0.7", "noise0.8", "noise0.9", "noise1"]
    ref = torch.Generator().manual_seed(7)
    for slot, sigma in enumerate(sigmas):
        expected = actions + sigma * torch.randn(actions.shape, generator=ref)
        torch.testing.assert_close(neg.actions[:, slot], expected)


def test_fill_after_shuffle_uses_slot_index():
    neg = build_negatives(_actions(), None, layer_mode="none", generator=torch.Generator().manual_seed(0))
    assert neg.types == ["noise0.1", "noise0.2", "noise0.4", "shuffle", "noise0.7", "noise0.8", "noise0.9", "noise1"]


def test_mid_energy_picks_middle_of_all_but_final_layer():
    actions = _actions()
    layers = _layers(actions, 6)
    energies = [5.0, 1.0, 4.0, 2.0, 3.0, 0.0]  # per layer; sorted without the final: 1, 3, 4, 2, 0 -> middle 4
    scored = []

    def energy_fn(chunk: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        layer = int(round(float((chunk - actions).mean()))) - 1
        scored.append(layer)
        return torch.full((chunk.shape[0],), energies[layer])

    neg = build_negatives(actions, layers, layer_mode="mid_energy", energy_fn=energy_fn, noise_sigmas=(0.1, 0.3),
                          generator=torch.Generator().manual_seed(0))
    assert scored == [0, 1, 2, 3, 4]
    assert neg.types[:4] == ["layer4", "noise0.1", "noise0.3", "shuffle"] and len(neg.types) == 8
    assert torch.equal(neg.actions[:, 0], layers[4])


def test_mid_energy_small_l():
    actions = _actions()
    fn = lambda chunk: chunk.mean(dim=(1, 2))  # noqa: E731
    picked, types = select_layer_negatives(_layers(actions, 2), "mid_energy", fn)
    assert types == ["layer0"] and len(picked) == 1
    assert select_layer_negatives(_layers(actions, 1), "mid_energy", fn) == ([], [])


def test_single_layer_gives_no_layer_negatives():
    actions = _actions()
    neg = build_negatives(actions, _layers(actions, 1), num_negatives=4, generator=torch.Generator().manual_seed(0))
    assert neg.types == ["noise0.1", "noise0.2", "noise0.4", "shuffle"]


def test_truncates_in_order():
    actions = _actions()
    layers = _layers(actions, 32)
    g = torch.Generator().manual_seed(0)
    assert build_negatives(actions, layers, num_negatives=3, generator=g).types == ["layer0", "layer10", "layer16"]
    assert build_negatives(actions, layers, num_negatives=6, generator=g).types[4:] == ["noise0.1", "noise0.2"]


def test_detached_and_dtype_kept():
    actions = _actions().to(torch.bfloat16)
    layers = [layer.clone().requires_grad_() for layer in _layers(actions.float(), 4)]
    layers = [layer.to(torch.bfloat16) for layer in layers]
    neg = build_negatives(actions, layers, generator=torch.Generator().manual_seed(0))
    assert not neg.actions.requires_grad and neg.actions.dtype == torch.bfloat16


def test_deterministic_with_seeded_generator():
    actions = _actions()
    layers = _layers(actions, 8)
    a = build_negatives(actions, layers, generator=torch.Generator().manual_seed(3))
    b = build_negatives(actions, layers, generator=torch.Generator().manual_seed(3))
    c = build_negatives(actions, layers, generator=torch.Generator().manual_seed(4))
    assert a.types == b.types and torch.equal(a.actions, b.actions) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.actions, c.actions)


def test_noise_negatives_block():
    actions = _actions()
    negs, types = noise_negatives(actions, (0.1, 0.2, 0.4), generator=torch.Generator().manual_seed(0))
    assert types == ["noise0.1", "noise0.2", "noise0.4"]
    ref = torch.Generator().manual_seed(0)
    for neg, sigma in zip(negs, (0.1, 0.2, 0.4)):
        torch.testing.assert_close(neg, actions + sigma * torch.randn(actions.shape, generator=ref))


@pytest.mark.parametrize("h", [2, 3, 5])
def test_shuffle_is_a_non_identity_permutation(h):
    actions = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(2, h, 3).clone()
    seen = set()
    for seed in range(200):
        shuffled = temporal_shuffle(actions, torch.Generator().manual_seed(seed))
        perm = shuffled[0, :, 0].long()
        assert sorted(perm.tolist()) == list(range(h))
        assert perm.tolist() != list(range(h))
        assert torch.equal(shuffled, actions[:, perm])  # one permutation for the whole batch
        seen.add(tuple(perm.tolist()))
    if h == 2:
        assert seen == {(1, 0)}
    else:
        assert len(seen) > 1


def test_shuffle_skipped_for_single_step():
    actions = _actions(h=1)
    assert temporal_shuffle(actions, torch.Generator().manual_seed(0)) is None
    neg = build_negatives(actions, None, num_negatives=4, generator=torch.Generator().manual_seed(0))
    assert neg.types == ["noise0.1", "noise0.2", "noise0.4", "noise0.6"]


def test_near_duplicate_is_masked():
    actions = _actions()
    layers = _layers(actions, 4)
    layers[1] = actions + 1e-4  # a layer that predicts the ground truth is no negative
    neg = build_negatives(actions, layers, generator=torch.Generator().manual_seed(0))
    assert neg.types[1] == "layer1"
    assert not bool(neg.mask[:, 1].any())
    others = torch.ones(8, dtype=torch.bool)
    others[1] = False
    assert bool(neg.mask[:, others].all())


def test_false_negative_rms_threshold():
    actions = _actions()
    negatives = torch.stack([actions + 0.009, actions + 0.011, actions - 0.02], dim=1)
    mask = false_negative_mask(actions, negatives, eps=1e-2)
    assert mask.tolist() == [[False, True, True]] * B
    assert false_negative_mask(actions, actions[:, None], eps=0.0).tolist() == [[False]] * B


def test_false_negative_counts_only_real_steps():
    actions = _actions()
    action_mask = torch.ones(B, H, dtype=torch.bool)
    action_mask[:, 3:] = False
    far_in_padding = actions.clone()
    far_in_padding[:, 3:] += 5.0
    close_on_real = actions.clone()
    close_on_real[:, :3] += 0.009  # RMS over the 3 real steps is 0.009, not diluted by the padded ones
    diff_on_real = actions.clone()
    diff_on_real[:, :3] += 0.011
    negatives = torch.stack([far_in_padding, close_on_real, diff_on_real], dim=1)
    mask = false_negative_mask(actions, negatives, action_mask, eps=1e-2)
    assert mask.tolist() == [[False, False, True]] * B
    action_mask[0] = False  # no real step: nothing to contrast
    assert false_negative_mask(actions, negatives, action_mask)[0].tolist() == [False, False, False]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: build_negatives(torch.rand(2, 5)), r"actions has shape \(2, 5\), expected \(B, H, Da\)"),
        (
            lambda: build_negatives(torch.rand(2, 5, 3), [torch.rand(2, 5, 3), torch.rand(2, 4, 3)]),
            r"layer_actions\[1\] has shape \(2, 4, 3\), expected \(B=2, H=5, Da=3\)",
        ),
        (lambda: build_negatives(torch.rand(2, 5, 3), layer_mode="mid_energy"), r"needs energy_fn"),
        (lambda: build_negatives(torch.rand(2, 5, 3), layer_mode="hardest"), r"layer_mode 'hardest' is unknown"),
        (lambda: build_negatives(torch.rand(2, 5, 3), num_negatives=0), r"num_negatives=0"),
        (lambda: build_negatives(torch.rand(2, 5, 3), noise_sigmas=(0.1, -1.0)), r"sigma=-1.0"),
        (
            lambda: build_negatives(torch.rand(2, 5, 3), action_mask=torch.ones(2, 4, dtype=torch.bool)),
            r"action_mask has shape \(2, 4\), expected \(2, 5\)",
        ),
        (
            lambda: build_negatives(torch.rand(2, 5, 3), [torch.rand(2, 5, 3)] * 3, layer_mode="mid_energy",
                                    energy_fn=lambda chunk: chunk.mean(dim=2)),
            r"energy_fn\(layer_actions\[0\]\) has shape \(2, 5\), expected \(B=2\)",
        ),
        (
            lambda: false_negative_mask(torch.rand(2, 5, 3), torch.rand(2, 5, 3)),
            r"negatives has shape \(2, 5, 3\), expected \(B=2, M, H=5, Da=3\)",
        ),
        (lambda: select_layer_negatives([torch.rand(2, 5, 3), torch.rand(3, 5, 3)]), r"layer_actions\[1\] has shape"),
        (lambda: Negatives(torch.rand(2, 3, 5, 4), ["a"], torch.ones(2, 3, dtype=torch.bool)), r"types has 1"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_build_negatives_masks_with_action_mask():
    actions = _actions()
    action_mask = torch.ones(B, H, dtype=torch.bool)
    action_mask[:, 2:] = False
    layers = _layers(actions, 3)
    layers[0] = actions.clone()
    layers[0][:, 2:] += 3.0  # differs from the positive only on padded steps
    neg = build_negatives(actions, layers, action_mask=action_mask, generator=torch.Generator().manual_seed(0))
    assert neg.types[:2] == ["layer0", "layer1"]
    assert not bool(neg.mask[:, 0].any()) and bool(neg.mask[:, 1:].all())
