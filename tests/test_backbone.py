"""Backbone attachment per tiny real-format checkpoint: loading, readout, layer-wise predictions, LoRA, save/load,
overfitting, errors."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForImageTextToText, AutoProcessor

from vla_energy.backbones.action_token import add_action_token, check_action_token
from vla_energy.backbones.loading import load_backbone, resolve_backbone, resolve_dtype
from vla_energy.backbones.lora import LoraArguments, apply_lora
from vla_energy.backbones.param_groups import param_groups
from vla_energy.backbones.readout import (
    backbone_forward,
    backbone_inputs,
    hidden_size_of,
    num_layers_of,
    read_backbone,
)
from vla_energy.backbones.tiny import TINY_FAMILIES, ensure_tiny_checkpoint, processor_unavailable
from vla_energy.data.collator import VLACollator
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import load_policy, save_policy

H, DA, B = 4, 3, 6
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(processor_unavailable(f) is not None,
                                                     reason=str(processor_unavailable(f))))
            for f in TINY_FAMILIES]


def _examples(n=B, seed=1):
    rng = np.random.RandomState(seed)
    return [{"image": rng.randint(0, 256, (32, 32, 3), dtype=np.uint8), "instruction": f"move to target {i}",
             "actions": rng.uniform(-1, 1, (H, DA)).astype(np.float32), "sample_id": i, "episode_index": i}
            for i in range(n)]


def _batch(loaded, n=B, placeholders=H, **processor_kwargs):
    collator = VLACollator(loaded.processor, horizon=placeholders, action_token=loaded.action_token,
                           processor_kwargs=processor_kwargs)
    batch = collator([{**ex, "actions": ex["actions"][:placeholders]} for ex in _examples(n)])
    if placeholders != H:  # actions keep the plugin's horizon; only the prompt is wrong
        batch["actions"] = torch.from_numpy(np.stack([ex["actions"] for ex in _examples(n)]))
        batch["action_mask"] = torch.ones(n, H, dtype=torch.bool)
    return batch


def _setup(kind, strategy="inbatch"):
    torch.manual_seed(0)
    loaded = load_backbone(str(ensure_tiny_checkpoint(kind)))
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=8))
    args = EnergyArguments(strategy=strategy, energy_hidden_dim=32, action_head_dim=64, num_negatives=4)
    plugin = EnergyPlugin(args, hidden_size_of(loaded.model), DA, H, loaded.action_token_id)
    accelerator = Accelerator(cpu=True)
    plugin.setup(accelerator, local_batch=B)
    return loaded, backbone, plugin, accelerator


@pytest.mark.parametrize("kind", FAMILIES)
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
        out = plugin(outputs, batch, accelerator)
        loss, metrics = out.loss, out.metrics
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first or metrics
    assert metrics["l1"] < 0.7 * first["l1"]
    assert metrics["energy_loss"] < 0.9 * first["energy_loss"]

    # Save -> load reproduces identical actions and energies.
    save_policy(tmp_path / "policy", EnergyVLAModel(backbone, plugin), loaded.processor, base=loaded.name)
    assert (tmp_path / "policy" / "plugin.safetensors").exists()
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
        plugin(outputs, batch, accelerator)
    batch = _batch(loaded)
    outputs = backbone(**backbone_inputs(batch))
    with pytest.raises(ValueError, match="returned no hidden_states"):
        plugin(outputs, batch, accelerator)
    outputs = backbone(**backbone_inputs(batch), output_hidden_states=True)
    batch["actions"] = torch.zeros(B, H, DA + 1)
    with pytest.raises(ValueError, match=r"actions has shape \(6, 4, 4\), expected \(B, H=4, Da=3\)"):
        plugin(outputs, batch, accelerator)


def test_read_backbone_left_padding_order():
    hidden = [torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1).expand(2, 5, 2) + i for i in range(3)]
    ids = torch.tensor([[0, 7, 9, 9, 1], [7, 9, 1, 9, 1]])
    r = read_backbone(hidden, ids, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), action_token_id=9, horizon=2,
                      include_placeholders=False)
    assert r.action_hidden.shape == (2, 2, 2, 2)
    assert r.action_hidden[0, 0, :, 0].tolist() == [3.0, 4.0]  # layer 1, row 0: positions 2, 3
    assert r.action_hidden[1, 1, :, 0].tolist() == [8.0, 10.0]  # layer 2, row 1: positions 1, 3
    assert r.context_mask.tolist() == [[False, True, False, False, True], [True, False, True, False, True]]


# ---------------------------------------------------------------- loading by name, dtype, errors


def test_tiny_names_resolve_to_the_real_format_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("VLA_ENERGY_CACHE", str(tmp_path))
    path = Path(resolve_backbone("tiny-paligemma"))
    assert path.parent == tmp_path / "tiny_checkpoints" and (path / "config.json").is_file()
    assert resolve_backbone("google/paligemma-3b-pt-224") == "google/paligemma-3b-pt-224"
    by_name, by_dir = load_backbone("tiny-paligemma"), load_backbone(str(path))
    # The same classes and weights as the hub path takes for that directory.
    assert type(by_name.model) is type(AutoModelForImageTextToText.from_pretrained(path))
    assert type(by_name.processor) is type(AutoProcessor.from_pretrained(path))
    assert by_name.name == "tiny-paligemma" and by_name.action_token_id == by_dir.action_token_id
    w_name, w_dir = by_name.model.state_dict(), by_dir.model.state_dict()
    row = by_name.action_token_id
    assert all(torch.equal(w_name[k][:row], w_dir[k][:row]) if w_name[k].shape[0] > row else
               torch.equal(w_name[k], w_dir[k]) for k in w_name)
    with pytest.raises(ValueError, match=r"backbone='tiny-gpt2': the tiny backbones are \['tiny-idefics3'"):
        load_backbone("tiny-gpt2")


def test_dtype_auto_and_bad_dtype():
    assert resolve_dtype("auto") == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert load_backbone("tiny-llava", dtype="bfloat16").model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype='fp8', expected auto \| float32"):
        load_backbone("tiny-llava", dtype="fp8")


def test_hub_name_offline_and_not_cached_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"backbone='vla-energy-tests/not-a-model' is not a local directory nor in the "
                                      r"Hugging Face cache .* HF_HUB_OFFLINE=1 .*hf download vla-energy-tests"):
        load_backbone("vla-energy-tests/not-a-model")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_backbone(str(tmp_path / "missing"))


def test_processor_that_splits_or_drops_the_placeholder_is_refused():
    loaded = load_backbone("tiny-idefics3")
    tokenizer = loaded.processor.tokenizer
    # A placeholder the tokenizer does not hold as one special token is split into pieces.
    with pytest.raises(ValueError, match=r"action_token='<act>': GPT2Tokenizer splits it into \["):
        check_action_token(tokenizer, "<act>", tokenizer.unk_token_id)
    collator = VLACollator(loaded.processor, horizon=H, action_token="<act>")
    with pytest.raises(ValueError, match=r"Idefics3Processor turned the 4 placeholders action_token='<act>' into "
                                         r"\[0, 0\] ids"):
        collator(_examples(2))
    # Truncation (a processor option) drops placeholders from the end of the prompt.
    with pytest.raises(ValueError, match=r"into \[0, 0\] ids .* processor_kwargs"):
        _batch(loaded, n=2, truncation=True, max_length=20)
    with pytest.raises(ValueError, match=r"processor_kwargs sets \['padding'\]"):
        VLACollator(loaded.processor, horizon=H, action_token=loaded.action_token, processor_kwargs={"padding": False})


def test_processor_kwargs_reach_the_processor():
    loaded = load_backbone("tiny-idefics3")
    plain = _batch(loaded, n=2)
    split = _batch(loaded, n=2, do_image_splitting=True)
    assert plain["pixel_values"].shape[1] == 1 and split["pixel_values"].shape[1] > 1
    assert split["input_ids"].shape[1] > plain["input_ids"].shape[1]  # image tokens per tile
    with torch.no_grad():
        out = loaded.model(**backbone_inputs(split), output_hidden_states=True)
    assert out.hidden_states[-1].shape[:2] == split["input_ids"].shape


# ---------------------------------------------------------------- OpenVLA-style models, LM logits, hidden states


def _prismatic(padding_side="right"):
    """A Prismatic-like tiny model (patches inserted after BOS in forward) with tiny-llava's tokenizer and CLIP
    image processor, and a batch of OpenVLA-style prompts (no image token) ending in the placeholders."""
    from vla_energy.testing.prismatic import TinyPrismaticConfig, TinyPrismaticForConditionalGeneration

    processor = AutoProcessor.from_pretrained(ensure_tiny_checkpoint("llava"))
    tok = processor.tokenizer
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = TinyPrismaticForConditionalGeneration(TinyPrismaticConfig(text_config=text)).eval()
    action_id = add_action_token(processor, model, "<|action|>")
    tok.padding_side = padding_side
    prompts = [f"In: What action should the robot take to {t}?\nOut:" + "<|action|>" * H
               for t in ("go", "pick up the red block")]
    batch = dict(tok(prompts, return_tensors="pt", padding=True))
    images = [ex["image"] for ex in _examples(2)]
    batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return model, batch, action_id


def test_openvla_style_inserted_tokens_are_read_at_the_right_positions():
    model, batch, action_id = _prismatic()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = model.config.num_patches
    with torch.no_grad():
        out = backbone_forward(model, batch)
    assert out.hidden_states[-1].shape[1] == ids.shape[1] + n == ids.shape[1] + 16
    assert out.logits.shape[1] == 1  # logits_to_keep reached the language model
    r = read_backbone(out.hidden_states, ids, mask, action_id, H, include_placeholders=False)
    # The multimodal sequence as the model builds it: BOS, n patches, then the rest of input_ids.
    mm_ids = torch.cat([ids[:, :1], torch.full((2, n), -1), ids[:, 1:]], dim=1)
    for row in range(2):
        where = (mm_ids[row] == action_id).nonzero().flatten()
        assert len(where) == H
        for layer in range(4):
            assert torch.equal(r.action_hidden[layer, row], out.hidden_states[layer + 1][row, where])
        real = int(mask[row].sum()) + n
        assert r.context_mask[row, :real].sum() == real - H and not r.context_mask[row, real:].any()
    assert int(mask[0].sum()) < int(mask[1].sum())  # the rows differ in length: padding was exercised

    left_model, left, left_id = _prismatic("left")
    with torch.no_grad():
        hidden = backbone_forward(left_model, left).hidden_states
    with pytest.raises(ValueError, match=r"inserted 16 tokens inside its forward .* left-padded.*padding_side"):
        read_backbone(hidden, left["input_ids"], left["attention_mask"], left_id, H)
    with pytest.raises(ValueError, match=r"T' >= T .* drops input tokens"):
        read_backbone([h[:, :5] for h in out.hidden_states], ids, mask, action_id, H)


def test_openvla_style_model_trains_through_the_plugin():
    model, batch, action_id = _prismatic()
    backbone = apply_lora(model, LoraArguments(lora_r=4))
    plugin = EnergyPlugin(EnergyArguments(strategy="inbatch", energy_hidden_dim=32, action_head_dim=32), 64, DA, H,
                          action_id)
    accelerator = Accelerator(cpu=True)
    plugin.setup(accelerator, local_batch=2)
    batch["actions"] = torch.rand(2, H, DA)
    batch["action_mask"] = torch.ones(2, H, dtype=torch.bool)
    batch["sample_id"] = torch.arange(2)
    loss = plugin(backbone_forward(backbone, batch), batch, accelerator).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in backbone.named_parameters() if "lora_B" in n and "language_model" in n)


def test_backbone_forward_keeps_only_the_last_logits_unless_labels():
    loaded = load_backbone("tiny-llava")
    batch = _batch(loaded, n=2)
    with torch.no_grad():
        short = backbone_forward(apply_lora(loaded.model, LoraArguments(lora_r=4)), batch)
        assert short.logits.shape == (2, 1, loaded.model.config.get_text_config().vocab_size)
        full = backbone_forward(loaded.model, {**batch, "labels": batch["input_ids"]})
    assert full.logits.shape[1] == batch["input_ids"].shape[1] and full.loss is not None
    assert torch.equal(short.hidden_states[-1], full.hidden_states[-1])


def test_checkpoint_without_hidden_states_is_refused():
    class NoHidden(torch.nn.Module):
        """A model whose forward ignores output_hidden_states."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            return SimpleNamespace(logits=self.inner(**kwargs).logits, hidden_states=None)

    loaded = load_backbone("tiny-llava")
    _, _, plugin, accelerator = _setup("llava")
    batch = _batch(loaded)
    with pytest.raises(ValueError, match="the backbone returned no hidden_states: call it with output_hidden_states"):
        plugin(backbone_forward(NoHidden(loaded.model), batch), batch, accelerator)


def test_processor_kwargs_option_from_yaml_and_command_line(tmp_path):
    from vla_energy.training.arguments import parse_config

    config = tmp_path / "c.yaml"
    config.write_text("processor_kwargs: {min_pixels: 3136, max_pixels: 12544}\n")
    model, *_ = parse_config(["--config", str(config)])
    assert model.processor_kwargs == {"min_pixels": 3136, "max_pixels": 12544} and model.dtype == "auto"
    model, *_ = parse_config(["--processor_kwargs", '{"do_image_splitting": true}'])
    assert model.processor_kwargs == {"do_image_splitting": True}
    with pytest.raises(ValueError, match="processor_kwargs='do_image_splitting' is not a JSON object"):
        parse_config(["--processor_kwargs", "do_image_splitting"])
    with pytest.raises(ValueError, match=r"processor_kwargs=\[1\], expected a mapping"):
        parse_config(["--processor_kwargs", "[1]"])
