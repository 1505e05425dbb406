"""Backbone attachment per tiny VLM kind: readout, layer-wise predictions, LoRA, save/load, overfitting, errors."""

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import backbone_inputs, hidden_size_of, num_layers_of, read_backbone
from vla_energy.inference.serialization import load_policy, save_policy
from vla_energy.testing.tiny_vlms import TINY_VLM_KINDS
from vla_energy.training.plugin import EnergyArguments, EnergyPlugin

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


# ---------------------------------------------------------------- per-family processor-equivalents


def _forward_two_rows(tiny, images):
    """Right-padded rows of different lengths through the model; each row must match a forward on it alone."""
    texts = ["go" + "<act>" * H, "move to the red cube" + "<act>" * H]
    batch = tiny.processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = tiny.model(**batch, output_hidden_states=True)
    layers, d = num_layers_of(tiny.model), hidden_size_of(tiny.model)
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (len(texts), batch["input_ids"].shape[1], d) for h in out.hidden_states)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths[0] < lengths[1] and batch["attention_mask"][0, lengths[0]:].eq(0).all()  # right padding
    for row, n in enumerate(lengths):
        alone = tiny.processor(text=[texts[row]], images=[images[row]], return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = tiny.model(**alone, output_hidden_states=True).hidden_states
        for h, r in zip(out.hidden_states, ref):
            assert torch.allclose(h[row, :n], r[0], atol=1e-5)
    return batch, out


def _random_images(n, size=32):
    g = torch.Generator().manual_seed(2)
    return [Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_tiny_qwen2_vl_processor_matches_the_model():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vla_energy.testing.tiny_vlms import IMAGE, VISION_END, VISION_START, make_tiny_vlm

    tiny = make_tiny_vlm("qwen2_vl")
    proc, images = tiny.processor, _random_images(2)
    batch, _ = _forward_two_rows(tiny, images)
    ids = batch["input_ids"]
    # Patches as the real image processor lays them out (x / 127.5 - 1 == normalize(mean=std=0.5)).
    real = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                    image_std=[0.5] * 3, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    expected = real(images, return_tensors="pt")
    assert torch.equal(batch["image_grid_thw"], expected["image_grid_thw"])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert batch["pixel_values"].shape == (2 * 16, 3 * 2 * 8 * 8)
    assert torch.allclose(batch["pixel_values"], expected["pixel_values"], atol=1e-6)
    # t*h*w / merge^2 image tokens per row, between vision start and end; mm_token_type_ids marks exactly them.
    n = proc.num_image_tokens
    assert n == 4 == int(batch["image_grid_thw"][0].prod()) // 2**2
    assert (ids == IMAGE).sum(1).tolist() == [n, n]
    assert ids[:, 0].eq(VISION_START).all() and ids[:, 1 : 1 + n].eq(IMAGE).all() and ids[:, 1 + n].eq(VISION_END).all()
    assert torch.equal(batch["mm_token_type_ids"], (ids == IMAGE).long())
    # The image tokens get 2D (height, width) rope positions on the 2x2 merged grid, padding position 0.
    pos, _ = tiny.model.model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                             image_grid_thw=batch["image_grid_thw"],
                                             attention_mask=batch["attention_mask"])
    assert pos[:, 0, 1 : 1 + n].tolist() == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]]
    assert pos[:, 0, 1 + n].tolist() == [3, 3, 3]  # vision end continues after the grid
    assert pos[:, 0, batch["attention_mask"][0] == 0].eq(0).all()


def test_tiny_idefics3_processor_matches_the_model_black_and_grey_images():
    from vla_energy.testing.tiny_vlms import FAKE_IMAGE, GLOBAL_IMAGE, IMAGE, make_tiny_vlm

    tiny = make_tiny_vlm("idefics3")
    n = tiny.processor.num_image_tokens
    assert n == 4 == tiny.model.model.image_seq_len  # (32 / 8)^2 / scale_factor^2
    black = Image.new("RGB", (32, 32), (0, 0, 0))
    for grey in (127, 128):  # x / 127.5 - 1 is never 0, so no image looks like Idefics3's all-zero padding
        images = [black, Image.new("RGB", (32, 32), (grey,) * 3)]
        batch, _ = _forward_two_rows(tiny, images)
        ids = batch["input_ids"]
        assert (ids == IMAGE).sum(1).tolist() == [n, n]
        assert ids[:, 1:3].eq(torch.tensor([FAKE_IMAGE, GLOBAL_IMAGE])).all() and ids[:, 3 + n].eq(FAKE_IMAGE).all()
        assert batch["pixel_values"].shape == (2, 1, 3, 32, 32)
        assert batch["pixel_attention_mask"].shape == (2, 1, 32, 32) and batch["pixel_attention_mask"].eq(1).all()
        assert batch["pixel_values"][0].eq(-1).all() and batch["pixel_values"][1].abs().max() < 0.01
        assert batch["pixel_values"].flatten(1).ne(0).any(1).all()
    # What the guard is for: an all-zero image is dropped as padding and its image tokens are left unmatched.
    batch["pixel_values"][1] = 0
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        tiny.model(**batch)
