"""Run outputs: metrics.json, report.md, PNG plots (curves, energy histograms) and the policy's model card.

Plots need matplotlib, an optional extra: `pip install vla_energy[plots]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_metrics", "plot_curves", "plot_energy_histograms", "write_report", "plots_available",
           "write_model_card", "MODEL_CARD_IMAGES", "add_results_to_policy", "pyplot"]

# Plots of a run that the model card shows when they sit in the policy directory.
MODEL_CARD_IMAGES = ("loss.png", "accuracy.png", "energy_hist.png")


def plots_available() -> bool:
    """Whether matplotlib (the `plots` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or an ImportError naming the extra to install."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'vla_energy[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write metrics as indented JSON (atomically: temp file, then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))
    tmp.replace(path)
    return path


def plot_curves(path: str | Path, history: Sequence[Mapping[str, float]], keys: Sequence[str], title: str) -> Path:
    """One line per key against the step, from a list of {"step": ..., key: ...} records."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in keys:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_energy_histograms(path: str | Path, groups: Mapping[str, Sequence[float]], title: str) -> Path:
    """Overlaid energy histograms, e.g. {"positive": [...], "other episodes": [...], "noise0.1": [...]}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in groups.items():
        if len(values):
            ax.hist(list(values), bins=40, alpha=0.5, density=True, label=f"{name} (n={len(values)})")
    ax.set_xlabel("energy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(path: str | Path, title: str, metrics: Mapping[str, Any], images: Sequence[str],
                 notes: Sequence[str] = ()) -> Path:
    """A short markdown report: the metrics table, notes and the plots."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    lines += ["", *notes, ""] if notes else [""]
    lines += [f"![{Path(img).stem}]({Path(img).name})" for img in images]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


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
        + (" (a tiny random test backbone of vla_energy.testing)" if base.startswith("tiny-") else ""),
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
    if metrics:
        lines += ["", "## Metrics", "", *_metrics_table(metrics)]
    images = [name for name in MODEL_CARD_IMAGES if (policy_dir / name).exists()]
    if images:
        lines += ["", "## Plots", "", *(f"![{Path(n).stem}]({n})" for n in images)]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    card.save(policy_dir / "README.md")
    return policy_dir / "README.md"


def add_results_to_policy(policy_dir: str | Path, metrics: Mapping[str, Any], run_dir: str | Path) -> Path:
    """metrics.json and the run's plots into a saved policy directory, and its model card rewritten with them."""
    import shutil

    policy_dir, run_dir = Path(policy_dir), Path(run_dir)
    write_metrics(policy_dir / "metrics.json", metrics)
    for name in MODEL_CARD_IMAGES:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, policy_dir / name)
    return write_model_card(policy_dir, metrics)
