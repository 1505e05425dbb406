"""candidates="neighbors": the chunks of the training samples whose contexts are nearest to the current one, their
context keys saved with the policy and computed the same way at inference."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.readout import hidden_size_of
from vla_energy.data.normalization import NormStats
from vla_energy.inference.candidates import (
    context_key,
    make_candidates,
    neighbor_candidates,
    retrieve_nearest,
)
from vla_energy.inference.policy import EnergyPolicy
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import save_policy, save_retrieval_chunks

H, DA = 4, 3
STATS = NormStats("mean_std", [0.0] * DA, [1.0] * DA, [-1.0] * DA, [1.0] * DA, [-3.0] * DA, [3.0] * DA, 100)


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)


def test_context_key_is_the_unit_mean_of_the_real_tokens():
    context = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [9.0, 9.0]]], dtype=torch.bfloat16)
    key = context_key(context, torch.tensor([[True, True, False]]))
    assert key.dtype == torch.float32 and torch.allclose(key, _unit([2.0, 2.0]))
    with pytest.raises(ValueError, match="context_mask"):
        context_key(context, torch.ones(1, 2, dtype=torch.bool))


def test_neighbors_are_the_chunks_of_the_nearest_contexts_not_of_the_nearest_chunks():
    # Sample 0's chunk equals the policy's, but its context is far; samples 1 and 2 have contexts near the query's
    # and opposite chunks (two modes), sample 3 is further away in context.
    contexts = _unit([-1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [1.0, -0.2, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    chunks = torch.stack([torch.zeros(H, DA), torch.ones(H, DA), -torch.ones(H, DA), 0.5 * torch.ones(H, DA),
                          0.1 * torch.ones(H, DA)])
    policy, query = torch.zeros(1, H, DA), torch.tensor([[2.0, 0.0, 0.0]])  # any norm: the cosine decides
    got = make_candidates("neighbors", policy, 4, chunks=chunks, contexts=contexts, query=query)
    assert got.shape == (1, 4, H, DA) and torch.equal(got[0, 0], policy[0])
    assert torch.equal(got[0, 1:], chunks[1:4])
    # Nearest to the policy's chunk are other chunks: sample 0's first.
    assert torch.equal(retrieve_nearest(policy, chunks, 2)[0, 1], chunks[0])
    # Read a block at a time, the same neighbours in the same order.
    assert torch.equal(neighbor_candidates(policy, query, contexts, chunks, 4, batch_size=2), got)


@pytest.mark.parametrize("kwargs, match", [
    ({"chunks": torch.zeros(5, H, DA), "query": torch.ones(2, 3)}, "train with --retrieval_contexts, or add them"),
    ({"contexts": torch.ones(5, 3), "query": torch.ones(2, 3)}, "needs the training chunks and their context keys"),
    ({"chunks": torch.zeros(5, H, DA), "contexts": torch.ones(5, 3)}, "needs the current context's key"),
    ({"chunks": torch.zeros(5, H, DA), "contexts": torch.ones(4, 3), "query": torch.ones(2, 3)},
     r"chunks has shape \(5, 4, 3\), expected \(N=4"),
    ({"chunks": torch.zeros(2, H, DA), "contexts": torch.ones(2, 3), "query": torch.ones(2, 3)},
     "needs 3 neighbours, but the policy holds the contexts of 2 training samples"),
])
def test_neighbor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_candidates("neighbors", torch.zeros(2, H, DA), 4, **kwargs)


def test_contexts_are_saved_one_per_chunk_only_with_chunks_and_unsharded_weights(tmp_path):
    from accelerate.utils import DistributedType

    from vla_energy.training.arguments import parse_config
    from vla_energy.training.preflight import ConfigError
    from vla_energy.training.train import check_retrieval_contexts

    with pytest.raises(ValueError, match="one key per chunk"):
        save_retrieval_chunks(tmp_path, torch.zeros(3, H, DA), {}, torch.zeros(2, 8))
    with pytest.raises(ValueError, match="set retrieval_chunks > 0 too"):
        parse_config(["--retrieval_contexts", "--retrieval_chunks", "0"])
    train = parse_config(["--retrieval_contexts"])[-1]
    with pytest.raises(ConfigError, match="add_retrieval_chunks"):
        check_retrieval_contexts(SimpleNamespace(distributed_type=DistributedType.FSDP), train)
    check_retrieval_contexts(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), train)


def test_a_training_sample_is_among_the_neighbours_of_its_own_observation(tmp_path, monkeypatch):
    """Round trip on the tiny backbone: add_retrieval_chunks(contexts=True), load, predict with neighbors."""
    from vla_energy.data import build_datasets
    from vla_energy.data.arguments import DataConfig
    from vla_energy.data.pipeline import retrieval_rows
    from vla_energy.training.retrieval_chunks import add_retrieval_chunks

    torch.manual_seed(0)
    loaded = load_backbone("tiny-llava")
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), hidden_size_of(loaded.model), DA,
                          H, loaded.action_token_id)
    model = EnergyVLAModel(apply_lora(loaded.model, LoraArguments(lora_r=4)), plugin)
    cfg = DataConfig(dataset="synthetic", num_episodes=6, horizon=H, min_episode_length=4, max_episode_length=6,
                     val_fraction=0.34)
    run_config = tmp_path / "run_config.json"
    run_config.write_text(json.dumps({cls: {} for cls in ("ModelArguments", "LoraArguments", "EnergyArguments",
                                                          "TrainArguments")} | {"DataConfig": dataclasses.asdict(cfg)}))
    out = save_policy(tmp_path / "policy", model, loaded.processor, STATS, base=loaded.name, run_config=run_config)
    monkeypatch.chdir(tmp_path)  # a relative synthetic cache is written here
    count = add_retrieval_chunks(out, count=12, progress=False, contexts=True, batch_size=5)
    info = json.loads((out / "policy_config.json").read_text())
    policy = EnergyPolicy.from_pretrained(out)
    contexts, chunks = policy.loaded.retrieval_contexts, policy.loaded.retrieval_chunks
    d = hidden_size_of(loaded.model)
    assert count == 12 and contexts.shape == (12, d) and chunks.shape == (12, H, DA)
    assert (info["retrieval_contexts"], info["retrieval_context_dim"]) == (12, d)
    assert torch.allclose(contexts.norm(dim=1), torch.ones(12))

    rows = retrieval_rows(build_datasets(cfg, progress=False)[0], 12)
    for i in (0, 7):  # a training sample's own key is the query: its chunk is a neighbour, the nearest
        readout = policy.encode([rows[i]["image"]], [rows[i]["instruction"]])
        query = context_key(readout.context, readout.context_mask)
        assert torch.allclose(query[0], contexts[i], atol=1e-5)
        own = torch.zeros(1, H, DA)
        cands = make_candidates("neighbors", own, 4, chunks=chunks, contexts=contexts, query=query)
        assert torch.equal(cands[0, 1], chunks[i])
    images, texts = [rows[i]["image"] for i in (0, 7)], [rows[i]["instruction"] for i in (0, 7)]
    picked = torch.from_numpy(policy.predict(images, texts, mode="rerank", candidates="neighbors", num_samples=4,
                                             normalized=True))
    own = torch.from_numpy(policy.predict(images, texts, normalized=True))
    for row, own_row in zip(picked, own):  # the policy's own chunk or a saved training chunk
        assert torch.allclose(row, own_row, atol=1e-5) or bool(((chunks - row).abs().amax(dim=(1, 2)) < 1e-6).any())

    # Saved again, the contexts stay; chunks added without them drop them, and neighbors says how to get them.
    copy = policy.loaded.save(tmp_path / "copy")
    assert torch.equal(load_file(str(copy / "retrieval_chunks.safetensors"))["contexts"], contexts.cpu())
    add_retrieval_chunks(copy, count=12, progress=False)
    assert "retrieval_contexts" not in json.loads((copy / "policy_config.json").read_text())
    with pytest.raises(ValueError, match="add_retrieval_chunks"):
        EnergyPolicy.from_pretrained(copy).predict(images, texts, mode="rerank", candidates="neighbors")
