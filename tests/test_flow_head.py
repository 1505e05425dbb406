"""The flow-matching action head (action_head flow): it learns a bimodal toy problem whose samples cover both modes
(where an L1 head predicts between them), is seeded, has clear errors, and trains, saves and predicts with
candidates='samples' through the recipe."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vla_energy import EnergyArguments, EnergyPlugin
from vla_energy.backbones.readout import BackboneReadout
from vla_energy.inference.candidates import make_candidates
from vla_energy.modeling.action_head import ActionHead, ActionHeadConfig
from vla_energy.modeling.flow_action_head import FlowActionHead, FlowActionHeadConfig, sample_time
from vla_energy.testing.toys import bimodal_chunks

H, DA, D = 4, 2, 16
SINGLE = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))


def bimodal(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [n,H,D], target +c or -c [n,H,Da], c)."""
    return bimodal_chunks(n, generator, H, DA, D)


def _flow(**kw) -> FlowActionHead:
    return FlowActionHead(FlowActionHeadConfig(hidden_size=D, action_dim=DA, horizon=H, mlp_dim=32, **kw))


def _mode_distances(chunks: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |chunk - c| and |chunk + c| per chunk, chunks [n,(N,)H,Da]."""
    c = c[:, None] if chunks.dim() == 4 else c
    return (chunks - c).abs().mean((-2, -1)), (chunks + c).abs().mean((-2, -1))


@pytest.fixture(scope="module")
def trained() -> tuple[FlowActionHead, ActionHead, list[float]]:
    """A flow head and an L1 head trained on the same bimodal batches (seeded, a few seconds)."""
    torch.manual_seed(0)
    flow = _flow(flow_steps=8)
    l1 = ActionHead(ActionHeadConfig(hidden_size=D, action_dim=DA, horizon=H, mlp_dim=32))
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (flow, l1)]
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(300):
        hidden, target, _ = bimodal(64, g)
        flow_loss = flow(hidden, target, generator=g).mean()
        l1_loss = (l1(hidden) - target).abs().mean()
        for opt in opts:
            opt.zero_grad()
        (flow_loss + l1_loss).backward()
        for opt in opts:
            opt.step()
        losses.append(float(flow_loss.detach()))
    return flow.eval(), l1.eval(), losses


def test_flow_samples_cover_both_modes_where_l1_predicts_between(trained):
    flow, l1, losses = trained
    assert np.mean(losses[-50:]) < 0.6 * np.mean(losses[:20]), (losses[:20], losses[-50:])
    hidden, _, c = bimodal(128, torch.Generator().manual_seed(7))
    with torch.no_grad():
        samples = flow.sample(hidden, 16, torch.Generator().manual_seed(0))  # [128,16,H,Da]
        regressed = l1(hidden)
    scale = float(c.abs().mean())
    d_plus, d_minus = _mode_distances(samples, c)
    near = torch.minimum(d_plus, d_minus)
    assert float(near.mean()) < 0.4 * scale, (float(near.mean()), scale)  # samples sit on a mode
    plus = (d_plus < d_minus).float().mean(dim=1)  # share of a row's samples on +c
    assert 0.3 < float(plus.mean()) < 0.7, float(plus.mean())  # both modes, about evenly
    assert float(((plus > 0) & (plus < 1)).float().mean()) > 0.8  # most rows see both modes among 16 samples
    l1_plus, l1_minus = _mode_distances(regressed, c)
    assert float(torch.minimum(l1_plus, l1_minus).mean()) > 0.6 * scale  # the regression sits between the modes
    with torch.no_grad():
        policy = flow(hidden)  # the deterministic sample is one of the modes too
    assert float(torch.minimum(*_mode_distances(policy, c)).mean()) < 0.4 * scale


def test_sampling_and_the_loss_are_seeded_and_the_policy_chunk_is_per_row(trained):
    flow = trained[0]
    hidden, target, _ = bimodal(6, torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = flow.sample(hidden, 5, torch.Generator().manual_seed(11))
        b = flow.sample(hidden, 5, torch.Generator().manual_seed(11))
        c = flow.sample(hidden, 5, torch.Generator().manual_seed(12))
        assert torch.equal(a, b) and not torch.equal(a, c)
        # The deterministic chunk of a row does not depend on its batch, and equals the fixed-noise integration.
        together, alone = flow(hidden), flow(hidden[2:3])
        assert torch.allclose(together[2:3], alone, atol=1e-6)
        fixed = flow.policy_noise(hidden.device).expand(6, H, DA)
        assert torch.allclose(together, flow.integrate(flow.condition(hidden), fixed), atol=1e-6)
        assert torch.equal(flow.policy_noise(hidden.device), _flow().policy_noise(hidden.device))
        assert not torch.equal(flow.policy_noise(hidden.device), _flow(noise_seed=1).policy_noise(hidden.device))
        l_a = flow(hidden, target, generator=torch.Generator().manual_seed(5))
        l_b = flow(hidden, target, generator=torch.Generator().manual_seed(5))
    assert torch.equal(l_a, l_b) and l_a.shape == (6, H, DA)


def test_shapes_time_sampling_and_errors():
    flow = _flow(flow_steps=3)
    hidden = torch.randn(3, 2, H, D)  # [L,B,H,D]
    with torch.no_grad():
        assert flow(hidden).shape == (3, 2, H, DA)
        assert flow.sample(hidden[-1], 7).shape == (2, 7, H, DA)
        assert flow.sample(hidden, 4).shape == (3, 2, 4, H, DA)
    g = torch.Generator().manual_seed(0)
    beta, uniform = sample_time((20000,), "beta", g), sample_time((20000,), "uniform", g)
    assert 1e-3 <= float(beta.min()) and float(beta.max()) <= 1.0
    assert float(beta.mean()) == pytest.approx(1e-3 + 0.999 * 0.6, abs=0.01)  # Beta(1.5, 1) has mean 0.6
    assert float(uniform.mean()) == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match=r"hidden has shape \(2, 3, 16\), expected \(B, H=4, D=16\)"):
        flow(torch.randn(2, 3, D))
    with pytest.raises(ValueError, match=r"actions has shape \(2, 4, 3\), expected \(B=2, H=4, Da=2\)"):
        flow(hidden[0], torch.randn(2, H, 3))
    with pytest.raises(ValueError, match="num_samples=0, expected >= 1"):
        flow.sample(hidden[0], 0)
    with pytest.raises(ValueError, match="steps=0, expected >= 1"):
        flow.sample(hidden[0], 2, steps=0)
    with pytest.raises(ValueError, match=r"time_sampling='cosine', expected one of \('beta', 'uniform'\)"):
        _flow(time_sampling="cosine")
    with pytest.raises(ValueError, match="mlp_dim=33, expected an even width"):
        FlowActionHeadConfig(mlp_dim=33)
    with pytest.raises(ValueError, match=r"action_head='diffusion', expected one of \('l1', 'flow'\)"):
        EnergyArguments(action_head="diffusion")
    with pytest.raises(ValueError, match="flow_steps=0"):
        EnergyArguments(action_head="flow", flow_steps=0)
    policy = torch.zeros(2, H, DA)
    with pytest.raises(ValueError, match="candidates='samples' needs a stochastic action head's sampler"):
        make_candidates("samples", policy, 4)
    with pytest.raises(ValueError, match=r"sampler\(...\) draws has shape \(2, 2, 4, 2\), expected \(B=2, K=3"):
        make_candidates("samples", policy, 4, sampler=lambda k, g: torch.zeros(2, 2, H, DA))
    cands = make_candidates("samples", policy, 4, sampler=lambda k, g: torch.full((2, k, H, DA), 5.0))
    assert cands.shape == (2, 4, H, DA) and torch.equal(cands[:, 0], policy) and float(cands.max()) == 1.0


def _plugin(**options) -> EnergyPlugin:
    args = EnergyArguments(strategy="layer", num_negatives=4, energy_hidden_dim=16, energy_num_heads=2,
                           energy_num_layers=1, action_head_dim=16, **options)
    plugin = EnergyPlugin(args, hidden_size=8, action_dim=DA, horizon=H, action_token_id=0)
    plugin.setup(SINGLE, local_batch=4)
    return plugin


def test_plugin_layer_predictions_samples_and_loss():
    torch.manual_seed(0)
    plugin = _plugin(action_head="flow", flow_steps=3)
    assert plugin.is_flow and isinstance(plugin.action_head, FlowActionHead)
    readout = BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))
    policy, layers = plugin.predict_actions(readout)
    assert policy.shape == (4, H, DA) and len(layers) == 3 and all(la.shape == (4, H, DA) for la in layers)
    assert torch.equal(layers[-1], policy) and not policy.requires_grad
    # Every layer's chunk is the head's deterministic sample conditioned on that layer's placeholder states.
    assert torch.allclose(layers[0], plugin.action_head(readout.action_hidden[0]), atol=1e-6)
    draws = plugin.sample_actions(readout, 5, torch.Generator().manual_seed(0))
    assert draws.shape == (4, 5, H, DA)

    class Outputs:  # a backbone output: embeddings + 3 layers, the action placeholders at positions 1..H
        hidden_states = tuple(torch.randn(4, H + 2, 8, requires_grad=True) for _ in range(4))

    batch = {"input_ids": torch.tensor([[1] + [0] * H + [1]] * 4), "actions": torch.rand(4, H, DA) * 2 - 1}
    out = plugin(Outputs(), batch, SINGLE)
    assert {"flow_loss", "l1", "energy_loss", "loss"} <= set(out.metrics)
    total = plugin.args.flow_loss_weight * out.metrics["flow_loss"] + out.metrics["energy_loss"]
    assert out.metrics["loss"] == pytest.approx(total, rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in plugin.action_head.parameters())
    assert Outputs.hidden_states[-1].grad is not None  # the flow loss trains the backbone through its states
    with pytest.raises(ValueError, match="sample_actions needs a flow action head .* 'l1'"):
        _plugin().sample_actions(readout, 2)


def test_sample_negatives_are_the_flow_heads_own_draws_masked_near_the_truth():
    torch.manual_seed(0)
    plugin = _plugin(action_head="flow", flow_steps=3, sample_negatives=3)
    readout = BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))
    plugin.generator.manual_seed(7)
    actions = torch.rand(4, H, DA) * 2 - 1
    negs = plugin.sample_negatives(readout, actions, None)
    assert negs.types == ["flow_sample"] * 3 and negs.actions.shape == (4, 3, H, DA) and bool(negs.mask.all())
    torch.testing.assert_close(negs.actions, plugin.sample_actions(readout, 3, torch.Generator().manual_seed(7)))
    near = negs.actions[:, 0].clone()  # a truth the first draw already matches: not pushed away
    plugin.generator.manual_seed(7)
    assert not bool(plugin.sample_negatives(readout, near, None).mask[:, 0].any())
    _, layers = plugin.predict_actions(readout)
    loss, stats = plugin.energy_loss(readout, actions, None, None, layers, SINGLE)
    assert torch.isfinite(loss) and stats["num_negatives/flow_sample"] == 3
    empty = BackboneReadout(readout.context, readout.context_mask, readout.context.new_zeros(0, 4, H, 8))
    with pytest.raises(ValueError, match="sample_negatives needs the backbone's placeholder states"):
        plugin.sample_negatives(empty, actions, None)
    with pytest.raises(ValueError, match="sample_negatives=2 with action_head='l1'"):
        EnergyArguments(sample_negatives=2)


def test_ranking_samples_are_best_of_n_candidates_ranked_by_the_loss():
    torch.manual_seed(0)
    plugin = _plugin(action_head="flow", flow_steps=3, candidate_ranking=4, ranking_candidates="samples")
    readout = BackboneReadout(torch.randn(4, 5, 8), torch.ones(4, 5, dtype=torch.bool), torch.randn(3, 4, H, 8))
    policy, layers = plugin.predict_actions(readout)
    plugin.generator.manual_seed(7)
    cands = plugin.ranking_samples(readout, policy, 4)
    assert cands.shape == (4, 4, H, DA) and not cands.requires_grad
    torch.testing.assert_close(cands[:, 0], policy.clamp(-1, 1))
    drawn = plugin.sample_actions(readout, 3, torch.Generator().manual_seed(7)).clamp(-1, 1)
    torch.testing.assert_close(cands[:, 1:], drawn)
    actions = torch.rand(4, H, DA) * 2 - 1
    loss, stats = plugin.energy_loss(readout, actions, None, None, layers, SINGLE)
    assert torch.isfinite(loss) and stats["ranking_loss"] > 0 and 0 <= stats["ranking_top1"] <= 1
    loss.backward()
    assert all(p.grad is not None for p in plugin.energy_head.parameters() if p.requires_grad)
    empty = BackboneReadout(readout.context, readout.context_mask, readout.context.new_zeros(0, 4, H, 8))
    with pytest.raises(ValueError, match="ranking_candidates='samples' needs the backbone's placeholder states"):
        plugin.ranking_samples(empty, policy, 4)
    with pytest.raises(ValueError, match="ranking_candidates='samples' with action_head='l1'"):
        EnergyArguments(candidate_ranking=4, ranking_candidates="samples")
    with pytest.raises(ValueError, match="ranking_candidates='nearest', expected one of"):
        EnergyArguments(ranking_candidates="nearest")


def test_l1_plugin_loss_is_the_l1_term():
    torch.manual_seed(0)
    plugin = _plugin()
    assert not plugin.is_flow and type(plugin.action_head) is ActionHead

    class Outputs:
        hidden_states = tuple(torch.randn(4, H + 2, 8) for _ in range(4))

    batch = {"input_ids": torch.tensor([[1] + [0] * H + [1]] * 4), "actions": torch.rand(4, H, DA) * 2 - 1}
    out = plugin(Outputs(), batch, SINGLE)
    assert "flow_loss" not in out.metrics
    assert out.metrics["loss"] == pytest.approx(out.metrics["l1"] + out.metrics["energy_loss"], rel=1e-5)


def test_recipe_trains_a_flow_policy_that_predicts_with_samples(tmp_path):
    import json

    from safetensors.torch import load_file

    from vla_energy.inference.policy import EnergyPolicy
    from vla_energy.training.train import main as train_main

    train_main(["--backbone", "tiny-llava", "--dataset", "synthetic", "--num_episodes", "12", "--horizon", "4",
                "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_strategy", "no", "--lora_r", "4",
                "--energy_hidden_dim", "16", "--action_head_dim", "16", "--report_to", "none", "--disable_tqdm",
                "--action_head", "flow", "--flow_steps", "4", "--retrieval_chunks", "0", "--bound_negatives", "true",
                "--output_dir", str(tmp_path), "--run_name", "run", "--cache_dir", str(tmp_path / "cache")])
    model = tmp_path / "run" / "model"
    info = json.loads((model / "policy_config.json").read_text())
    assert info["plugin"]["args"]["action_head"] == "flow" and info["plugin"]["args"]["flow_steps"] == 4
    assert info["plugin"]["args"]["bound_negatives"]  # the recipe handed the data's bounds to the plugin
    weights = load_file(str(model / "plugin.safetensors"))
    assert any(k.startswith("action_head.x_in.") for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())

    policy = EnergyPolicy.from_pretrained(tmp_path / "run")
    assert policy.plugin.is_flow
    image = np.zeros((32, 32, 3), np.uint8)
    chunks = {mode: policy.predict([image, image], ["go", "go"], mode=mode, candidates="samples", num_samples=6,
                                   seed=3, normalized=True) for mode in ("policy", "rerank", "mean")}
    for chunk in chunks.values():
        assert chunk.shape == (2, 4, 3) and np.isfinite(chunk).all()
    assert np.allclose(chunks["policy"][0], chunks["policy"][1], atol=1e-5)  # deterministic per observation
    again = policy.predict([image, image], ["go", "go"], mode="rerank", candidates="samples", num_samples=6, seed=3,
                           normalized=True)
    assert np.allclose(again, chunks["rerank"], atol=1e-6)  # seeded

    # Evaluation: the flow samples are a candidate source of the selection baselines.
    from torch.utils.data import DataLoader

    from vla_energy.data import DataConfig, build_datasets
    from vla_energy.data.split import spread_indices
    from vla_energy.evaluation.metrics import collect_eval_outputs
    from vla_energy.evaluation.selection import selection_metrics

    rows, _, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=12, horizon=4,
                                          cache_dir=str(tmp_path / "cache")), progress=False)
    loader = DataLoader(rows.select(spread_indices(len(rows), 8)), batch_size=4, collate_fn=policy.loaded.collator())
    result = collect_eval_outputs(policy.loaded.model, loader, progress=False, flow_samples=5, seed=0)
    assert len(result.samples) == 8 and result.samples[0].shape == (5, 4, 3)
    metrics, table = selection_metrics(policy.plugin.energy_head, result, num_samples=6, num_resamples=20,
                                       sources=("samples",))
    assert set(table) == {"policy", "samples"} and "l1/samples/rerank" in metrics
    assert table["samples"]["oracle"][0] <= table["policy"]["policy"][0] + 1e-9
    with pytest.raises(ValueError, match="needs 7 flow samples per row, the evaluation outputs hold 5"):
        selection_metrics(policy.plugin.energy_head, result, num_samples=8, sources=("samples",))


def test_the_saved_config_records_the_kind_and_an_old_one_builds_an_l1_head():
    flow = _plugin(action_head="flow", flow_steps=3, flow_noise_seed=2)
    again = EnergyPlugin.from_config_dict(flow.config_dict())
    assert again.is_flow and again.action_head.config.flow_steps == 3 and again.action_head.config.noise_seed == 2
    again.load_state_dict(flow.state_dict())  # strict: the same weights
    l1 = _plugin()
    old = l1.config_dict()
    old["args"] = {k: v for k, v in old["args"].items() if k != "action_head" and not k.startswith("flow_")}
    loaded = EnergyPlugin.from_config_dict(old)  # a policy saved before the flow head existed
    assert type(loaded.action_head) is ActionHead
    loaded.load_state_dict(l1.state_dict())
