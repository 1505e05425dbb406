"""The model card (README.md) of a policy directory."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_model_card", "MODEL_CARD_IMAGES"]

# Plots of a run that the model card shows when they sit in the policy directory.
MODEL_CARD_IMAGES = ("loss.png", "accuracy.png", "energy_hist.png")


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, (int, float, str)) and key != "history":
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines


def write_model_card(policy_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> Path:
    """README.md of a policy directory (huggingface_hub.ModelCard): base model, dataset, training options, metrics
    (`metrics`, else the directory's metrics.json), and the plots found beside it."""
    from huggingface_hub import ModelCard, ModelCardData

    policy_dir = Path(policy_dir)
    info = json.loads((policy_dir / "policy_config.json").read_text())
    run = json.loads((policy_dir / "run_config.json").read_text()) if (policy_dir / "run_config.json").exists() else {}
    if metrics is None and (policy_dir / "metrics.json").exists():
        metrics = json.loads((policy_dir / "metrics.json").read_text())
    data = run.get("DataConfig", {})
    dataset = data.get("dataset")
    base, revision = info["backbone"], info.get("revision")
    hub_base = base.count("/") == 1 and not Path(base).exists()
    hub_dataset = dataset is not None and dataset != "synthetic" and dataset.count("/") == 1 and not Path(dataset).exists()
    card_data = ModelCardData(
        library_name="vla_energy", pipeline_tag="robotics", tags=["robotics", "vla", "energy-based-model", "lora"],
        base_model=base if hub_base else None, datasets=[dataset] if hub_dataset else None,
    )
    plugin = info["plugin"]
    lines = [
        "# vla_energy policy", "",
        "A vision-language-action policy finetuned with vla_energy: a LoRA adapter on the "
        "backbone, an L1 action head and an energy head E(context, action chunk) trained with global InfoNCE.", "",
        "## Base model and data", "",
        f"- base model: `{base}`" + (f" at revision `{revision}`" if revision else "")
        + (" (a tiny random real-format checkpoint built offline by vla_energy)" if base.startswith("tiny-") else ""),
        f"- weights: {'LoRA merged into the backbone (merged/)' if info.get('merged') else 'LoRA adapter (adapter/)' if info['has_adapter'] else 'frozen backbone'}"
        f", loaded in {info.get('dtype', 'float32')}",
        f"- dataset: `{dataset}`" if dataset else "- dataset: not recorded",
        f"- action chunk: horizon {plugin['horizon']}, {plugin['action_dim']} action dims"
        + (f", normalization `{data['normalization']}`" if "normalization" in data else ""), "",
        "## Use", "", "```python", "from vla_energy import EnergyPolicy", "",
        "policy = EnergyPolicy.from_pretrained(\"<this repo or directory>\", dtype=\"bfloat16\", device=\"cuda\")",
        "policy.reset()",
        "action = policy.select_action({\"observation.images.<camera>\": image, \"task\": \"pick up the cube\"})",
        "```", "", "## Training configuration", "",
        "| option | value |", "|---|---|",
    ]
    train = run.get("TrainArguments", {})
    shown = {**{k: train[k] for k in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                                      "learning_rate", "seed") if k in train},
             **{k: plugin["args"][k] for k in ("strategy", "tau", "temperature", "num_negatives", "bank_size")}}
    lines += [f"| {k} | {v} |" for k, v in shown.items()]
    retrained = info.get("energy_head_retrained")
    if retrained:
        lines += ["", "## Energy head", "",
                  f"Trained alone by `vla-energy train-head` on the contexts of {retrained['samples']} training "
                  f"samples of the policy `{retrained.get('from', 'it was made from')}`: {retrained['max_steps']} "
                  f"steps of {retrained['batch_size']}, learning rate {retrained['learning_rate']}, seed "
                  f"{retrained['seed']}, energy loss {retrained['loss_first']:.4f} -> {retrained['loss_last']:.4f}. "
                  "The backbone, LoRA adapter and action head are that policy's; the metrics of its run describe "
                  "its own head, not this one (`vla-energy evaluate` on this directory measures this one)."]
    if metrics:
        lines += ["", "## Metrics", "", *_metrics_table(metrics)]
    images = [name for name in MODEL_CARD_IMAGES if (policy_dir / name).exists()]
    if images:
        lines += ["", "## Plots", "", *(f"![{Path(n).stem}]({n})" for n in images)]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(policy_dir / "README.md")
    return policy_dir / "README.md"
