"""`vla-energy evaluate`: a trained run on a split of its dataset, with the ranking metrics of training, accuracy and
energy gap per negative type, and the selection baselines (policy / random / rerank / mean / refine / oracle)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

__all__ = ["evaluate_run", "evaluation_tables"]


def evaluate_run(run_dir: str | Path, split: str = "val", out_dir: Optional[str | Path] = None,
                 max_samples: int = 256, device: str = "cpu", progress: bool = True,
                 trust_remote_code: bool = False, num_candidates: int = 16) -> dict[str, float]:
    """Ranking metrics (as in training), per-type accuracy and gaps, and the selection baselines with 95% intervals.

    Writes metrics.json, report.md (the tables of evaluation_tables) and, with matplotlib, PNGs (energies per
    type, accuracy per type, L1 per candidate source). Each stage says what it does on stderr as it starts.
    """
    from torch.utils.data import DataLoader

    from vla_energy.data import build_datasets
    from vla_energy.data.split import spread_indices
    from vla_energy.evaluation.metrics import collect_eval_outputs, metrics_by_negative_type
    from vla_energy.evaluation.report import plot_energy_histograms, plots_available, write_metrics
    from vla_energy.evaluation.selection import plot_selection, selection_metrics
    from vla_energy.modeling.serialization import load_policy

    def stage(text: str) -> None:
        print(f"evaluate: {text}", file=sys.stderr, flush=True)

    run_dir = Path(run_dir)
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}, expected 'train' or 'val'")
    stage(f"loading the policy of {run_dir}")
    policy = load_policy(run_dir, device=device, trust_remote_code=trust_remote_code)
    data_cfg, energy_args, eval_num_negatives = run_settings(policy)
    stage(f"reading the dataset {data_cfg.dataset!r}")
    train_ds, val_ds, _ = build_datasets(data_cfg, progress=progress)
    ds = val_ds if split == "val" else train_ds
    ds = ds.select(spread_indices(len(ds), max_samples))
    check_ranking_pool(ds["episode_index"], eval_num_negatives, split, max_samples)
    stage(f"encoding {len(ds)} {split} samples")
    loader = DataLoader(ds, batch_size=32, collate_fn=policy.collator())
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
    result = collect_eval_outputs(policy.model, batches, progress=progress, total=len(loader),
                                  flow_samples=num_candidates - 1, seed=data_cfg.data_seed)
    head = policy.plugin.energy_head
    stage(f"ranking against {eval_num_negatives} chunks of other episodes and each negative type")
    metrics, energies = metrics_by_negative_type(
        head, result, tuple(energy_args.noise_sigmas), eval_num_negatives, seed=data_cfg.data_seed,
        false_negative_eps=energy_args.false_negative_eps)
    train_chunks = train_ds.select_columns(["actions"]).with_format("torch")[:]["actions"].float()
    stage(f"selecting among {num_candidates} candidates per source, with bootstrap intervals")
    selection, table = selection_metrics(head, result, train_chunks, num_samples=num_candidates,
                                         seed=data_cfg.data_seed, tau=energy_args.tau, progress=progress)
    metrics.update(selection)
    out = Path(out_dir) if out_dir else run_dir / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    images = []
    if plots_available():
        groups = {k: v.flatten().tolist() for k, v in energies.items()}
        plot_energy_histograms(out / "energy_by_type.png", groups, f"energies on {split}: positive vs each type")
        _bar(out / "accuracy_by_type.png", {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")},
             "top-1 accuracy of the true chunk per negative type", metrics["chance_acc"])
        plot_selection(out / "selection.png", table,
                       f"L1 per candidate source ({num_candidates} candidates, 95% bootstrap intervals)")
        images = ["energy_by_type.png", "accuracy_by_type.png", "selection.png"]
    else:
        stage("matplotlib is not installed: no plots (pip install 'vla_energy[plots]')")
    lines = [f"# Evaluation of `{run_dir.name}` on {split} ({len(ds)} samples)", "", evaluation_tables(metrics), "",
             "Every value: metrics.json.", "", *(f"![{Path(n).stem}]({n})" for n in images)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return metrics


def check_ranking_pool(episode_index: list[int], num_negatives: int, split: str, max_samples: int) -> None:
    """A UsageError, before anything is computed, when some sample has fewer than num_negatives evaluated samples
    of other episodes (the ranking's pool)."""
    from collections import Counter

    from vla_energy.checks import UsageError

    counts = Counter(episode_index)
    fewest = len(episode_index) - max(counts.values(), default=0)
    if fewest < num_negatives:
        raise UsageError(f"the ranking scores each sample against {num_negatives} chunks of other episodes, but the "
                         f"{len(episode_index)} evaluated {split} samples ({len(counts)} episodes) have as few as "
                         f"{fewest} outside one episode: pass a larger --max_samples (now {max_samples}), or hold out "
                         "more episodes when training (--val_fraction)")


def _cell(metrics: Mapping[str, float], key: str) -> str:
    """`mean [low, high]` of an L1 with its interval."""
    return f"{metrics[key]:.4f} [{metrics[key + '_lo']:.4f}, {metrics[key + '_hi']:.4f}]"


def evaluation_tables(metrics: Mapping[str, float]) -> str:
    """The evaluation as markdown tables: ranking, accuracy and gap per negative type, and action L1 per candidate
    source and selection with 95% intervals (what `vla-energy evaluate` prints and report.md shows)."""
    from vla_energy.evaluation.selection import SELECTIONS, SOURCES

    chance = metrics["chance_acc"]
    lines = [f"Ranking: the true chunk among {round(1 / chance)} ({round(1 / chance) - 1} from other episodes), "
             f"{int(metrics['eval_samples'])} samples", "",
             "| top-1 accuracy | chance | energy gap (e_neg - e_pos) | e_pos | e_neg | policy action L1 |",
             "|---|---|---|---|---|---|",
             f"| {metrics['top1_acc']:.3f} | {chance:.3f} | {metrics['gap']:.3f} | {metrics['e_pos']:.3f} | "
             f"{metrics['e_neg']:.3f} | {metrics['action_l1']:.4f} |", "",
             "Per negative type: how often the true chunk has the lowest energy, and the energy gap", "",
             "| negative type | acc | gap |", "|---|---|---|"]
    kinds = [k[len("acc/"):] for k in metrics if k.startswith("acc/")]
    lines += [f"| {k} | {metrics['acc/' + k]:.3f} | {metrics['gap/' + k]:.3f} |" for k in kinds]
    if "l1/policy" in metrics:
        sources = [s for s in SOURCES if f"l1/{s}/rerank" in metrics]
        lines += ["", f"Action L1 (normalized units, mean [95% interval]) of each selection among "
                      f"{int(metrics['candidates'])} candidates per source; the policy: {_cell(metrics, 'l1/policy')}"
                      + (f", refined: {_cell(metrics, 'l1/policy/refine')}" if "l1/policy/refine" in metrics else ""),
                  "", "| candidates | " + " | ".join(SELECTIONS) + " |", "|---|" + "---|" * len(SELECTIONS)]
        lines += [f"| {s} | " + " | ".join(_cell(metrics, f"l1/{s}/{sel}") if f"l1/{s}/{sel}" in metrics else "-"
                                           for sel in SELECTIONS) + " |" for s in sources]
    key = "calibration/prefers_policy"
    if f"{key}/all" in metrics:
        lines += ["", "Calibration against the policy: how often the head gives the policy's chunk a lower energy "
                      "than the demonstrated one [95% Wilson interval]: all samples "
                      f"{metrics[f'{key}/all']:.2f} [{metrics[f'{key}/all_lo']:.2f}, {metrics[f'{key}/all_hi']:.2f}]"
                  + (f"; the half where the policy is most wrong {metrics[f'{key}/policy_wrong']:.2f} "
                     f"[{metrics[f'{key}/policy_wrong_lo']:.2f}, {metrics[f'{key}/policy_wrong_hi']:.2f}]"
                     if f"{key}/policy_wrong" in metrics else "") + "."]
    return "\n".join(lines)


def _bar(path: Path, values: dict[str, float], title: str, chance: Optional[float] = None) -> None:
    from vla_energy.evaluation.report import pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(values), list(values.values()))
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label=f"chance ({round(1 / chance) - 1} others)")
        ax.legend()
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_settings(policy: Any) -> tuple[Any, Any, int]:
    """The dataset options, energy options and ranking pool size of the run that trained `policy`."""
    from vla_energy.data import DataConfig
    from vla_energy.modeling.configuration_energy import EnergyArguments

    run = policy.run_config()
    if run is None:
        raise FileNotFoundError(f"{policy.path} has no run_config.json: evaluate needs the run's dataset options "
                                "(train it with the recipe, or copy the run's run_config.json into the policy)")
    return (DataConfig(**run["DataConfig"]), EnergyArguments(**policy.info["plugin"]["args"]),
            int(run.get("TrainArguments", {}).get("eval_num_negatives", 31)))
