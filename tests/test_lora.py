"""LoRA options, the merged export and the action token on a real (offline) tokenizer."""

import copy
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from vla_energy.backbones.action_token import add_action_token
from vla_energy.backbones.loading import load_backbone
from vla_energy.backbones.lora import VISION_MODULES_PATTERN, LoraArguments, apply_lora
from vla_energy.backbones.tiny import TINY_FAMILIES, ensure_tiny_checkpoint
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.energy_plugin import EnergyPlugin
from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.modeling.serialization import save_policy

VISION_NAMES = ("vision_tower.", "vision_model.", "visual.")


def _model(family: str = "llava"):
    """The tiny real-format checkpoint's model, as AutoModelForImageTextToText loads it (no processor needed)."""
    return AutoModelForImageTextToText.from_pretrained(ensure_tiny_checkpoint(family))


def _lora_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


@pytest.mark.parametrize("kind", TINY_FAMILIES)
def test_lora_exclude_vision_leaves_the_vision_tower_alone(kind):
    every = _lora_names(apply_lora(_model(kind), LoraArguments(lora_r=4)))
    text_only = _lora_names(apply_lora(_model(kind), LoraArguments(lora_r=4, lora_exclude_vision=True)))
    in_vision = [n for n in every if any(v in n for v in VISION_NAMES)]
    assert in_vision, f"{kind}: all-linear LoRA should reach the vision tower (pattern {VISION_MODULES_PATTERN})"
    assert text_only and not [n for n in text_only if any(v in n for v in VISION_NAMES)]
    assert set(text_only) == set(every) - set(in_vision)  # the language model keeps all of its adapters


def test_use_lora_false_freezes_the_backbone():
    model = apply_lora(_model(), LoraArguments(use_lora=False))
    assert not any(p.requires_grad for p in model.parameters())


def test_merged_export_equals_the_adapter_model(tmp_path):
    torch.manual_seed(0)
    loaded = load_backbone("tiny-llava")
    base_model = copy.deepcopy(loaded.model)  # get_peft_model wraps in place
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=4))
    with torch.no_grad():  # lora_B starts at 0: make the adapters do something before merging
        for n, p in backbone.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    plugin = EnergyPlugin(EnergyArguments(energy_hidden_dim=32, action_head_dim=32), 64, 3, 4, loaded.action_token_id)
    out = save_policy(tmp_path / "policy", EnergyVLAModel(backbone, plugin), loaded.processor, base=loaded.name,
                      merge_lora=True)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    batch = loaded.processor(text=["<image>go to the red square" + loaded.action_token * 4],
                             images=[torch.zeros(32, 32, 3, dtype=torch.uint8).numpy()], return_tensors="pt")
    backbone.eval()
    with torch.no_grad():
        a = backbone(**batch, output_hidden_states=True).hidden_states[-1]
        b = merged(**batch, output_hidden_states=True).hidden_states[-1]
        base = base_model(**batch, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (a - base).abs().max() > 1e-3  # the merge carried the adapters, not the base weights
    assert json.loads((out / "policy_config.json").read_text())["has_adapter"] is True


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer built in memory (no hub): word-level over a small vocabulary."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "move", "to", "the", "red", "square"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def test_add_action_token_on_a_real_tokenizer():
    tokenizer = _word_tokenizer()
    model = _model()
    rows_before = model.get_input_embeddings().weight.shape[0]
    token_id = add_action_token(tokenizer, model, "<|action|>")
    assert token_id == 7 and len(tokenizer) == 8
    assert model.get_input_embeddings().weight.shape[0] == max(rows_before, 8)
    ids = tokenizer("move to the red square<|action|><|action|>")["input_ids"]
    assert ids == [2, 3, 4, 5, 6, 7, 7]  # one id per placeholder, never split into pieces
    # Idempotent: a second call (a resumed run) neither adds a token nor resizes.
    assert add_action_token(tokenizer, model, "<|action|>") == 7 and len(tokenizer) == 8
    small = _model()
    small.resize_token_embeddings(7)
    add_action_token(_word_tokenizer(), small, "<|action|>")
    assert small.get_input_embeddings().weight.shape[0] == 8  # grown to hold the new id


@pytest.mark.parametrize("trust", [False, True])
def test_real_backbone_path_passes_trust_remote_code_only_when_asked(monkeypatch, trust):
    """A hub/local name goes through AutoProcessor + AutoModelForImageTextToText with the user's trust flag."""
    import transformers

    from vla_energy.training.arguments import parse_config

    seen = {}

    def fake_processor(name, **kwargs):
        seen["processor"] = (name, kwargs)
        return _word_tokenizer()

    def fake_model(name, **kwargs):
        seen["model"] = (name, kwargs)
        return model

    model = _model()  # loaded before the loaders are patched
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fake_processor)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", fake_model)
    flags = ["--trust_remote_code", "true"] if trust else []
    model_args, *_ = parse_config(["--backbone", "openvla/openvla-7b", *flags])
    loaded = load_backbone(model_args.backbone, model_args.trust_remote_code, model_args.action_token)
    assert seen["processor"][1]["trust_remote_code"] is trust and seen["model"][1]["trust_remote_code"] is trust
    assert loaded.action_token_id == 7
