"""The `vla-energy` command: `train` (the training recipe), `evaluate` (a trained run on a dataset split), and with
the `sim` extra `sim-demos` (Meta-World expert demonstrations) and `rollout` (closed-loop success rates)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional

__all__ = ["main", "evaluate_run"]


def evaluate_run(run_dir: str | Path, split: str = "val", out_dir: Optional[str | Path] = None,
                 max_samples: int = 256, device: str = "cpu", progress: bool = True,
                 trust_remote_code: bool = False, num_candidates: int = 16) -> dict[str, float]:
    """Ranking metrics (as in training), per-type accuracy and gaps, and the selection baselines with 95% intervals.

    Writes metrics.json, report.md and PNGs (energies per type, accuracy per type, L1 per candidate source).
    """
    from torch.utils.data import DataLoader

    from vla_energy.data import VLACollator, build_datasets
    from vla_energy.evaluation.metrics import collect_eval_outputs, metrics_by_negative_type, spread_indices
    from vla_energy.evaluation.report import plot_energy_histograms, write_metrics, write_report
    from vla_energy.evaluation.selection import plot_selection, selection_metrics
    from vla_energy.inference.serialization import load_policy
    from vla_energy.training.arguments import load_run_config

    run_dir = Path(run_dir)
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r}, expected 'train' or 'val'")
    model_cfg, data_cfg, _, energy_args, train = load_run_config(run_dir)
    policy = load_policy(run_dir, device=device, trust_remote_code=trust_remote_code)
    train_ds, val_ds, _ = build_datasets(data_cfg, progress=progress)
    ds = val_ds if split == "val" else train_ds
    ds = ds.select(spread_indices(len(ds), max_samples))
    collator = VLACollator(policy.processor, horizon=data_cfg.horizon, action_token=policy.info["action_token"],
                           state_token=policy.info.get("state_token"), processor_kwargs=model_cfg.processor_kwargs)
    loader = DataLoader(ds, batch_size=32, collate_fn=collator)
    batches = ({k: v.to(device) for k, v in b.items()} for b in loader)
    result = collect_eval_outputs(policy.backbone, policy.plugin, batches, progress=progress)
    head = policy.plugin.energy_head
    metrics, energies = metrics_by_negative_type(
        head, result, tuple(energy_args.noise_sigmas), train.eval_num_negatives, seed=data_cfg.data_seed,
        false_negative_eps=energy_args.false_negative_eps)
    train_chunks = train_ds.select_columns(["actions"]).with_format("torch")[:]["actions"].float()
    selection, table = selection_metrics(head, result, train_chunks, num_samples=num_candidates,
                                         seed=data_cfg.data_seed, tau=energy_args.tau)
    metrics.update(selection)
    out = Path(out_dir) if out_dir else run_dir / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out / "metrics.json", metrics)
    groups = {k: v.flatten().tolist() for k, v in energies.items()}
    plot_energy_histograms(out / "energy_by_type.png", groups, f"energies on {split}: positive vs each type")
    _bar(out / "accuracy_by_type.png", {k[4:]: v for k, v in metrics.items() if k.startswith("acc/")},
         "top-1 accuracy of the true chunk per negative type", metrics["chance_acc"])
    plot_selection(out / "selection.png", table,
                   f"L1 per candidate source ({num_candidates} candidates, 95% bootstrap intervals)")
    write_report(out / "report.md", f"Evaluation of `{run_dir.name}` on {split} ({len(ds)} samples)", metrics,
                 ["energy_by_type.png", "accuracy_by_type.png", "selection.png"])
    return metrics


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


def train_command(argv: list[str]) -> int:
    """`vla-energy train [--num_processes N | --accelerate_config FILE] OPTIONS`: the training recipe.

    Without launcher options it trains in this process; with them it re-launches through `accelerate launch -m
    vla_energy.training.train`, as `trl sft` does.
    """
    launcher = argparse.ArgumentParser(prog="vla-energy train", add_help=False)
    launcher.add_argument("--num_processes", type=int, default=None)
    launcher.add_argument("--accelerate_config", default=None)
    launcher.add_argument("--main_process_port", type=int, default=None)
    known, rest = launcher.parse_known_args(argv)
    if known.num_processes is None and known.accelerate_config is None:
        from vla_energy.training.train import main as train_main

        train_main(rest)
        return 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if known.accelerate_config is not None:
        cmd += ["--config_file", known.accelerate_config]
    if known.num_processes is not None:
        if known.num_processes < 1:
            raise SystemExit(f"--num_processes {known.num_processes}: expected >= 1")
        # `--multi_gpu` also starts several gloo processes on a machine without GPUs.
        cmd += (["--multi_gpu"] if known.num_processes > 1 else []) + ["--num_processes", str(known.num_processes)]
    if known.main_process_port is not None:
        cmd += ["--main_process_port", str(known.main_process_port)]
    cmd += ["-m", "vla_energy.training.train", *rest]
    return subprocess.call(cmd)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train_command(argv[1:])
    if argv[:1] == ["sim-demos"]:
        from vla_energy.sim import demos

        return demos.main(argv[1:], prog="vla-energy sim-demos")
    if argv[:1] == ["rollout"]:
        from vla_energy.sim import rollout

        return rollout.main(argv[1:], prog="vla-energy rollout")
    parser = argparse.ArgumentParser(prog="vla-energy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", add_help=False,
                   help="train (options: vla-energy train --help; --num_processes N or --accelerate_config FILE "
                        "launch several processes)")
    sub.add_parser("sim-demos", add_help=False,
                   help="write Meta-World scripted-expert demonstrations as a LeRobot v3.0 dataset (vla_energy[sim]; "
                        "options: vla-energy sim-demos --help)")
    sub.add_parser("rollout", add_help=False,
                   help="closed-loop success rates of a trained policy in Meta-World (vla_energy[sim]; options: "
                        "vla-energy rollout --help)")
    ev = sub.add_parser("evaluate", help="evaluate a run directory written by the training recipe")
    ev.add_argument("run_dir")
    ev.add_argument("--split", default="val", choices=["train", "val"])
    ev.add_argument("--out_dir", default=None)
    ev.add_argument("--max_samples", type=int, default=256)
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--trust_remote_code", action="store_true")
    ev.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    ev.add_argument("--num_candidates", type=int, default=16, help="candidates per source (the policy's included)")
    th = sub.add_parser("train-head", help="train a fresh energy head on a saved policy's own contexts and write it "
                                           "into the policy (docs/selection.md)")
    th.add_argument("run_dir", help="a run directory, its model/, or a checkpoint directory")
    th.add_argument("--max_steps", type=int, default=400)
    th.add_argument("--batch_size", type=int, default=32)
    th.add_argument("--learning_rate", type=float, default=1e-3)
    th.add_argument("--max_samples", type=int, default=4096, help="training samples whose contexts are collected")
    th.add_argument("--seed", type=int, default=0)
    th.add_argument("--candidate_ranking", type=int, default=None, help="candidates of the ranking loss (default: "
                                                                        "the run's)")
    th.add_argument("--device", default="cpu")
    th.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "train-head":
        from vla_energy.training.head_only import retrain_energy_head

        overrides = {} if args.candidate_ranking is None else {"candidate_ranking": args.candidate_ranking}
        out = retrain_energy_head(args.run_dir, args.max_steps, args.batch_size, args.learning_rate, args.max_samples,
                                  args.seed, overrides, args.device, not args.disable_tqdm)
        print(f"wrote a new energy head into {out}")
        return 0
    metrics = evaluate_run(args.run_dir, args.split, args.out_dir, args.max_samples, args.device,
                           not args.disable_tqdm, args.trust_remote_code, args.num_candidates)
    for key, value in metrics.items():
        print(f"{key:28s} {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
