"""Selection baselines on a toy head: one metric definition, oracle/random/rerank/refine, candidate sources."""

import pytest
import torch

from vla_energy import EnergyHead, EnergyHeadConfig
from vla_energy.evaluation.intervals import bootstrap_interval
from vla_energy.evaluation.metrics import (
    EvalResult,
    chunk_spread,
    metrics_by_negative_type,
    ranking_metrics,
    summarize_ranking,
)
from vla_energy.evaluation.selection import (
    SELECTIONS,
    choose,
    l1_sums,
    plot_selection,
    selection_metrics,
)
from vla_energy.inference.candidates import leave_one_group_out_error, retrieve_nearest
from vla_energy.inference.rerank import energy_weighted_mean, refine

H, DA, D, L = 4, 2, 8, 3


def _head() -> EnergyHead:
    torch.manual_seed(0)
    return EnergyHead(EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=16, num_heads=2,
                                       num_layers=1)).eval()


def _result(n: int = 40) -> EvalResult:
    g = torch.Generator().manual_seed(1)
    out = EvalResult()
    for i in range(n):
        truth = torch.rand(H, DA, generator=g) * 1.6 - 0.8
        mask = torch.ones(H, dtype=torch.bool)
        if i % 3 == 0:
            mask[2:] = False  # episode end: padded steps
        out.contexts.append(torch.randn(3 + i % 4, D, generator=g))
        out.actions.append(truth)
        out.action_mask.append(mask)
        out.policy.append((truth + 0.2 * torch.randn(H, DA, generator=g)).clamp(-1, 1))
        out.layer_actions.append(torch.stack([truth + s * torch.randn(H, DA, generator=g) for s in (0.5, 0.3, 0.2)]))
        out.episode_index.append(i // 5)
    if n > 20:
        out.actions[1] = out.actions[20].clone()  # a look-alike from another episode
        out.action_mask[1] = out.action_mask[20].clone()
    return out


def test_training_and_cli_ranking_are_one_definition():
    head, result = _head(), _result()
    training = ranking_metrics(head, result, num_negatives=8, seed=0, false_negative_eps=1e-2)
    cli, energies = metrics_by_negative_type(head, result, num_negatives=8, seed=0, false_negative_eps=1e-2)
    for key in ("top1_acc", "e_pos", "e_neg", "gap", "lookalikes", "argmin_rms", "action_l1", "policy_spread"):
        assert cli[key] == training[key], key
    assert {"acc/layer", "acc/noise0.1", "acc/shuffle", "acc/other_episodes"} <= set(cli)
    assert energies["positive"].shape == (40, 1) and energies["other_episodes"].shape == (40, 8)
    # The masks matter: treating padded steps as real gives other energies.
    unmasked = _result()
    unmasked.action_mask = [torch.ones(H, dtype=torch.bool) for _ in unmasked.action_mask]
    assert ranking_metrics(head, unmasked, num_negatives=8)["e_pos"] != training["e_pos"]


def test_policy_spread_says_whether_the_policy_depends_on_the_observation():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(30, H, DA, generator=g)
    mask = torch.ones(30, H, dtype=torch.bool)
    mask[:5, 2:] = False
    cands = torch.cat([truth[:, None], truth.roll(1, dims=0)[:, None]], dim=1)
    masks, energies = mask[:, None].expand(-1, 2, -1), torch.zeros(30, 2)

    def spread(policy):
        return summarize_ranking(energies, cands, masks, policy)["policy_spread"]

    assert spread(truth) == pytest.approx(1.0)
    assert spread(truth.mean(dim=0, keepdim=True).expand(30, -1, -1) + 1.0) == pytest.approx(0.0, abs=1e-6)
    assert spread(0.5 * truth) == pytest.approx(0.5)
    # Padded steps do not count: values there change nothing.
    padded = truth.clone()
    padded[:5, 2:] = 100.0
    assert chunk_spread(padded, mask) == pytest.approx(float(chunk_spread(truth, mask)))


def test_lookalikes_are_masked_in_the_ranking():
    head, result = _head(), _result()
    strict = ranking_metrics(head, result, num_negatives=35, false_negative_eps=1e-2)
    assert strict["lookalikes"] == pytest.approx(2 / 40)  # samples 1 and 20 see each other
    loose = ranking_metrics(head, result, num_negatives=35, false_negative_eps=10.0)
    assert loose["lookalikes"] == 35 and loose["top1_acc"] == 1.0 and loose["argmin_rms"] == 0.0


def test_line_search_never_increases_energy_and_moves_downhill():
    head, result = _head(), _result(8)
    ctx = torch.stack([c[:3] for c in result.contexts])
    start = torch.stack(result.policy)
    refined, trace = refine(head, ctx, start, steps=6)
    assert trace.shape == (7, 8)
    assert bool((trace[1:] <= trace[:-1]).all())
    assert float(trace[-1].sum()) < float(trace[0].sum())
    torch.testing.assert_close(trace[-1], head(ctx, refined))
    multi, trace_k = refine(head, ctx, torch.stack([start, start.flip(1)], dim=1), steps=3,
                            action_mask=torch.stack(result.action_mask))
    assert multi.shape == (8, 2, H, DA) and bool((trace_k[1:] <= trace_k[:-1]).all())
    assert bool((multi.abs() <= 1).all())
    with pytest.raises(ValueError, match="step_sizes"):
        refine(head, ctx, start, step_sizes=())


def test_baselines_definitions_on_toy_head():
    head, result = _head(), _result()
    train_chunks = torch.rand(50, H, DA, generator=torch.Generator().manual_seed(2)) * 2 - 1
    metrics, table = selection_metrics(head, result, train_chunks, num_samples=6, refine_steps=2, batch_size=16,
                                       num_resamples=200)
    assert set(table) == {"policy", "gaussian", "policy_error", "residuals", "layers", "retrieval", "multistart"}
    policy = table["policy"]["policy"][0]
    for source, cells in table.items():
        if source == "policy":
            continue
        oracle = cells["oracle"][0]
        # The policy chunk is every source's first candidate: the oracle is never worse than any choice among them.
        assert oracle <= min(cells["random"][0], cells["rerank"][0], policy) + 1e-12, source
        assert oracle <= cells["random"][0] <= cells["worst"][0], source
        # L1 is convex: the plain mean of the candidates is never worse than a uniformly random one on average.
        assert {"uniform", "mean"} <= set(cells), source
        for mean, lo, hi in cells.values():
            assert lo <= mean <= hi
    assert metrics["delta/residuals/oracle"] < 0 and metrics["delta/residuals/oracle_hi"] <= 0
    for rows in ("all", "policy_wrong"):
        key = f"calibration/prefers_policy/{rows}"
        assert 0.0 <= metrics[key + "_lo"] <= metrics[key] <= metrics[key + "_hi"] <= 1.0
    # A tiny tau makes the weighted mean the rerank choice; a huge one the plain mean.
    sharp, _ = selection_metrics(head, result, train_chunks, num_samples=6, refine_steps=0, batch_size=16,
                                 num_resamples=10, sources=["gaussian"], tau=1e-6)
    flat, _ = selection_metrics(head, result, train_chunks, num_samples=6, refine_steps=0, batch_size=16,
                                num_resamples=10, sources=["gaussian"], tau=1e6)
    assert sharp["l1/gaussian/mean"] == pytest.approx(sharp["l1/gaussian/rerank"], rel=1e-4)
    assert flat["l1/gaussian/mean"] == pytest.approx(flat["l1/gaussian/uniform"], rel=1e-4)
    again, _ = selection_metrics(head, result, train_chunks, num_samples=6, refine_steps=2, batch_size=16,
                                 num_resamples=200)
    assert again == metrics


def test_choose_and_l1_sums_by_hand(tmp_path):
    truth = torch.zeros(2, H, DA)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    chunks = torch.stack([torch.full((3, H, DA), v) for v in (0.1, 0.2)])  # [2,3,H,DA]
    chunks[:, 1] = 0.5
    chunks[1, 2, 2:] = 9.0  # padded steps do not count
    l1 = l1_sums(chunks, truth, mask)
    assert l1.flatten().tolist() == pytest.approx([0.8, 4.0, 0.8, 0.8, 2.0, 0.8])
    picks = choose(torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 3.0]]), l1, torch.Generator().manual_seed(0))
    assert picks["rerank"].tolist() == [1, 0] and picks["worst"].tolist() == [1, 1]
    mean, lo, hi = bootstrap_interval(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0]), 500, 0)
    assert mean == 2.5 and 1.0 <= lo < 2.5 < hi <= 4.0
    assert bootstrap_interval(torch.full((5,), 2.0), torch.ones(5)) == (2.0, 2.0, 2.0)
    table = {"policy": {"policy": (1.0, 0.9, 1.1)}, "x": {s: (1.0, 0.9, 1.1) for s in SELECTIONS}}
    assert plot_selection(tmp_path / "s.png", table, "t").stat().st_size > 0


def test_candidate_sources():
    g = torch.Generator().manual_seed(3)
    policy, truth = torch.randn(6, H, DA, generator=g), torch.randn(6, H, DA, generator=g)
    mask, groups = torch.ones(6, H, dtype=torch.bool), torch.tensor([0, 0, 1, 1, 2, 2])
    scale = leave_one_group_out_error(policy, truth, mask, groups)
    changed = truth.clone()
    changed[0] += 3.0
    other = leave_one_group_out_error(policy, changed, mask, groups)
    assert torch.equal(other[:2], scale[:2]), "a sample's scale must not use its own episode"
    assert not torch.equal(other[2:], scale[2:])
    pool = torch.randn(30, H, DA, generator=g)
    near = retrieve_nearest(policy, pool, 4, batch_size=7)
    assert torch.equal(near[:, 0], policy)
    brute = torch.cdist(policy.reshape(6, -1), pool.reshape(30, -1)).topk(3, largest=False).indices
    assert torch.equal(near[:, 1:], pool[brute])


def test_recipe_and_cli_evaluation_paths_agree_on_a_real_model(tmp_path):
    """The recipe's evaluation (model forward on ranking batches, RankingTally) and `vla-energy evaluate`'s
    (collect_eval_outputs + ranking_metrics) give the same metrics on the same model and samples."""
    from torch.utils.data import DataLoader

    from vla_energy import (
        DataConfig,
        EnergyArguments,
        EnergyPlugin,
        EnergyVLAModel,
        VLACollator,
        build_datasets,
    )
    from vla_energy.backbones.loading import load_backbone
    from vla_energy.backbones.readout import hidden_size_of
    from vla_energy.data.split import spread_indices
    from vla_energy.evaluation.metrics import collect_eval_outputs
    from vla_energy.evaluation.ranking import RankingCollator, RankingDataset, RankingTally

    torch.manual_seed(0)
    _, val_ds, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=24, horizon=4, val_fraction=0.5,
                                             cache_dir=str(tmp_path)), progress=False)
    rows = val_ds.select(spread_indices(len(val_ds), 40))
    loaded = load_backbone("tiny-llava")
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), hidden_size_of(loaded.model),
                          len(rows[0]["actions"][0]), 4, loaded.action_token_id)
    model = EnergyVLAModel(loaded.model, plugin).eval()
    collator = VLACollator(loaded.processor, horizon=4, action_token=loaded.action_token)
    tally = RankingTally(1e-2)
    with torch.no_grad():
        for batch in DataLoader(RankingDataset(rows, 8, seed=0), batch_size=16, collate_fn=RankingCollator(collator)):
            out = model(**batch)
            tally.add(out.ranking_energies, batch["candidate_actions"], batch["candidate_mask"], out.policy)
        result = collect_eval_outputs(model, DataLoader(rows, batch_size=16, collate_fn=collator), progress=False)
    recipe = tally.metrics()
    cli = ranking_metrics(plugin.energy_head, result, num_negatives=8, seed=0, false_negative_eps=1e-2)
    assert bool((torch.stack(result.action_mask) == 0).any())  # padded steps past an episode's end are present
    for key in ("top1_acc", "e_pos", "e_neg", "gap", "lookalikes", "argmin_rms", "action_l1", "policy_spread", "eval_samples"):
        assert recipe[key] == pytest.approx(cli[key], rel=1e-5, abs=1e-6), key


def test_energy_weighted_mean_weights_by_energy():
    cands = torch.stack([torch.zeros(2, H, DA), torch.ones(2, H, DA)], dim=1)  # [2,2,H,DA]
    energies = torch.tensor([[0.0, 0.0], [0.0, 0.3 * torch.log(torch.tensor(3.0))]])
    out = energy_weighted_mean(cands, energies, tau=0.3)
    assert torch.allclose(out[0], torch.full((H, DA), 0.5)) and torch.allclose(out[1], torch.full((H, DA), 0.25))
    with pytest.raises(ValueError, match="tau=0"):
        energy_weighted_mean(cands, energies, 0.0)
    with pytest.raises(ValueError, match="energies has shape"):
        energy_weighted_mean(cands, energies[:, :1], 0.3)


def test_calibration_counts_the_policy_preferred_over_the_truth_where_it_is_wrong():
    from vla_energy.evaluation.selection import calibration_metrics

    first = torch.tensor([True, True, False, False, True, False])
    l1 = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])  # median 0.3 (lower median): rows 3, 4, 5 are the wrong half
    m = calibration_metrics(first, l1)
    assert m["calibration/prefers_policy/all"] == pytest.approx(0.5)
    assert m["calibration/prefers_policy/policy_wrong"] == pytest.approx(1 / 3)
    assert m["calibration/prefers_policy/policy_wrong_lo"] < 1 / 3 < m["calibration/prefers_policy/policy_wrong_hi"]
