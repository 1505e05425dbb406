"""`vla-energy` console entry: evaluate a trained run on a dataset split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main", "evaluate_run"]


def evaluate_run(run_dir: str | Path, split: str = "val", out_dir: Optional[str | Path] = None,
                 max_samples: int = 256, device: str = "cpu", progress: bool = True,
                 trust_remote_code: bool = False) -> dict[str, float]:
    """Per-negative-type accuracy, energy gaps and L1 of policy / rerank / refine; writes metrics, report, PNGs."""
    from torch.utils.data import DataLoader

    from .config import load_run_config
    from .data import VLACollator, build_datasets
    from .evaluation import collect_eval_outputs, metrics_by_negative_type, spread_indices
    from .export import load_policy
    from .report import plot_energy_histograms, write_metrics, write_report

    run_dir = Path(run_dir)
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}, expected 'train' or 'val'")
    _, data_cfg, _, energy_args, train = load_run_config(run_dir)
    policy = load_policy(run_dir, device=device, trust_remote_code=trust_remote_code)
    train_ds, val_ds, _ = build_datasets(data_cfg, progress=progress)
    ds = val_ds if split == "val" else train_ds
    ds = ds.select(spread_indices(len(ds), max_samples))
    collator = VLACollator(policy.processor, horizon=data_cfg.horizon, action_token=policy.info["action_token"])
    loader = DataLoader(ds, batch_size=32, collate_fn=collator)
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
    result = collect_eval_outputs(policy.backbone, policy.plugin, batches, progress=progress)
    metrics, energies = metrics_by_negative_type(
        policy.plugin.energy_head, result, tuple(energy_args.noise_sigmas), train.eval_num_negatives,
        seed=data_cfg.data_seed)
    out = Path(out_dir) if out_dir else run_dir / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    groups = {k: v.flatten().tolist() for k, v in energies.items()}
    plot_energy_histograms(out / "energy_by_type.png", groups, f"energies on {split}: positive vs each type")
    _bar(out / "accuracy_by_type.png", {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")},
         "top-1 accuracy of the true chunk per negative type", metrics["chance_acc"])
    _bar(out / "action_l1.png", {k[10:]: v for k, v in metrics.items() if k.startswith("action_l1/")},
         "action L1 (normalized units)")
    write_report(out / "report.md", f"Evaluation of `{run_dir.name}` on {split} ({len(ds)} samples)", metrics,
                 ["energy_by_type.png", "accuracy_by_type.png", "action_l1.png"])
    return metrics


def _bar(path: Path, values: dict[str, float], title: str, chance: Optional[float] = None) -> None:
    from .report import plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(values), list(values.values()))
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=1, label="chance (31 others)")
        ax.legend()
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-energy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate a run directory written by recipes/train_energy.py")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="val", choices=["train", "val"])
    ev.add_argument("--out_dir", default=None)
    ev.add_argument("--max_samples", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--trust_remote_code", action="store_true")
    ev.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    metrics = evaluate_run(args.run_dir, args.split, args.out_dir, args.max_samples, args.device,
                           not args.no_progress, args.trust_remote_code)
    for key, value in metrics.items():
        print(f"{key:28s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
