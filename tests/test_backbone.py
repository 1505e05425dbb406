"""Backbone attachment per tiny VLM kind: readout, layer-wise predictions, LoRA, save/load, overfitting, errors."""

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from vla_energy.backbone import backbone_inputs, hidden_size_of, num_layers_of, read_backbone
from vla_energy.export import load_policy, save_policy
from vla_energy.lora import LoraArguments, apply_lora, param_groups
from vla_energy.models import load_backbone
from vla_energy.plugin import EnergyArguments, EnergyPlugin
from vla_energy.testing import TINY_VLM_KINDS

H, DA, B = 4, 3, 6


def _batch(loaded, n=B, placeholders=H):
    g = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]
    text = [f"move to target {i}" + loaded.action_token * placeholders for i in range(n)]
    batch = dict(loaded.processor(text=text, images=images, return_tensors="pt", padding=True))
    batch["actions"] = torch.rand(n, H, DA, generator=g) * 2 - 1
    batch["action_mask"] = torch.ones(n, H, dtype=torch.bool)
    batch["sample_id"] = torch.arange(n)
    return batch


def _setup(kind, strategy="inbatch"):
    torch.manual_seed(0)
    loaded = load_backbone(f"tiny-{kind}")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=8))
    args = EnergyArguments(strategy=strategy, energy_hidden_dim=32, action_head_dim=64, num_negatives=4)
    plugin = EnergyPlugin(args, hidden_size_of(loaded.model), DA, H, loaded.action_token_id)
    accelerator = Accelerator(cpu=True)
    plugin.setup(accelerator, local_batch=B)
    return loaded, backbone, plugin, accelerator


@pytest.mark.parametrize("kind", TINY_VLM_KINDS)
def test_readout_layers_lora_and_overfit(kind, tmp_path):
    loaded, backbone, plugin, accelerator = _setup(kind)
    batch = _batch(loaded)
    outputs = backbone(**backbone_inputs(batch), output_hidden_states=True)
    readout = plugin.read(outputs, batch)
    layers = num_layers_of(loaded.model)
    d = hidden_size_of(loaded.model)
    assert readout.action_hidden.shape == (layers, B, H, d)
    assert readout.context.shape[0] == B and readout.context.shape[-1] == d
    assert not readout.context.requires_grad  # detach_context=True by default
    # Padding is not part of the energy head's context; the placeholders are unless switched off.
    is_action = batch["input_ids"] == loaded.action_token_id
    assert torch.equal(readout.context_mask, batch["attention_mask"].bool())
    plugin.args.context_includes_placeholders = False
    assert not bool((plugin.read(outputs, batch).context_mask & is_action).any())
    plugin.args.context_includes_placeholders = True
    policy, layer_preds = plugin.predict_actions(readout)
    assert policy.shape == (B, H, DA) and len(layer_preds) == layers
    assert all(p.shape == (B, H, DA) and not p.requires_grad for p in layer_preds)

    # LoRA only on the backbone; heads fully trainable.
    names = [n for n, p in backbone.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(p.requires_grad for p in plugin.energy_head.parameters())
    assert all(p.requires_grad for p in plugin.action_head.parameters())
    groups = param_groups(backbone, plugin.action_head, plugin.energy_modules(), 1e-3, energy_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["policy", "energy"] and groups[1]["lr"] == pytest.approx(1e-4)

    # A real overfit test: both losses fall on a fixed batch.
    optimizer = torch.optim.AdamW(param_groups(backbone, plugin.action_head, plugin.energy_modules(), 3e-3, 1.0))
    first = None
    for _ in range(60):
        outputs = backbone(**backbone_inputs(batch), output_hidden_states=True)
        loss, metrics = plugin.compute_loss(outputs, batch, accelerator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first or metrics
    assert metrics["l1"] < 0.7 * first["l1"]
    assert metrics["energy_loss"] < 0.9 * first["energy_loss"]

    # Save -> load reproduces identical actions and energies.
    save_policy(tmp_path / "policy", backbone, plugin, None, loaded)
    assert (tmp_path / "policy" / "energy_head" / "model.safetensors").exists()
    assert (tmp_path / "policy" / "adapter" / "adapter_model.safetensors").exists()
    reloaded = load_policy(tmp_path / "policy")
    for m in (backbone, plugin.action_head, plugin.energy_head):
        m.eval()
    with torch.no_grad():
        ref = plugin.read(backbone(**backbone_inputs(batch), output_hidden_states=True), batch)
        new = reloaded.plugin.read(reloaded.backbone(**backbone_inputs(batch), output_hidden_states=True), batch)
        assert torch.allclose(plugin.predict_actions(ref)[0], reloaded.plugin.predict_actions(new)[0], atol=1e-5)
        e_ref = plugin.energy_head(ref.context, batch["actions"], context_mask=ref.context_mask)
        e_new = reloaded.plugin.energy_head(new.context, batch["actions"], context_mask=new.context_mask)
        assert torch.allclose(e_ref, e_new, atol=1e-5)


def test_bad_inputs_raise():
    loaded, backbone, plugin, accelerator = _setup("llava")
    batch = _batch(loaded, placeholders=2)
    outputs = backbone(**backbone_inputs(batch), output_hidden_states=True)
    with pytest.raises(ValueError, match=r"have \[2, 2, 2, 2, 2, 2\] action placeholders .* expected horizon=4"):
        plugin.compute_loss(outputs, batch, accelerator)
    batch = _batch(loaded)
    outputs = backbone(**backbone_inputs(batch))
    with pytest.raises(ValueError, match="returned no hidden_states"):
        plugin.compute_loss(outputs, batch, accelerator)
    outputs = backbone(**backbone_inputs(batch), output_hidden_states=True)
    batch["actions"] = torch.zeros(B, H, DA + 1)
    with pytest.raises(ValueError, match=r"actions has shape \(6, 4, 4\), expected \(B, H=4, Da=3\)"):
        plugin.compute_loss(outputs, batch, accelerator)


def test_read_backbone_left_padding_order():
    hidden = [torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1).expand(2, 5, 2) + i for i in range(3)]
    ids = torch.tensor([[0, 7, 9, 9, 1], [7, 9, 1, 9, 1]])
    r = read_backbone(hidden, ids, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), action_token_id=9, horizon=2,
                      include_placeholders=False)
    assert r.action_hidden.shape == (2, 2, 2, 2)
    assert r.action_hidden[0, 0, :, 0].tolist() == [3.0, 4.0]  # layer 1, row 0: positions 2, 3
    assert r.action_hidden[1, 1, :, 0].tolist() == [8.0, 10.0]  # layer 2, row 1: positions 1, 3
    assert r.context_mask.tolist() == [[False, True, False, False, True], [True, False, True, False, True]]
