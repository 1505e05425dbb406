"""The `vla-energy` command: `train` (the training recipe), `evaluate` (a trained run on a dataset split),
`train-head` (a fresh energy head on a saved policy), and with the `sim` extra `sim-demos` (Meta-World expert
demonstrations) and `rollout` (closed-loop success rates). Dispatch only: each command lives with its part."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from vla_energy.training.launcher import train_command

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
    ev = sub.add_parser("evaluate", help="evaluate a trained run (or policy) on a split of its dataset",
                        description="Evaluate a trained run on a split of its dataset: the ranking of training's "
                                    "evaluation, accuracy and energy gap per negative type, and the action L1 of "
                                    "each way of choosing among candidates, with 95%% intervals. Prints the tables, "
                                    "writes metrics.json, report.md and (with matplotlib) plots.")
    ev.add_argument("run_dir", help="a run directory of the training recipe, its model/, a checkpoint, or any saved "
                                    "policy with its run_config.json")
    ev.add_argument("--split", default="val", choices=["train", "val"],
                    help="the run's held-out episodes (val) or its training episodes (default: %(default)s)")
    ev.add_argument("--out_dir", default=None, help="where to write the results (default: <run_dir>/eval_<split>)")
    ev.add_argument("--max_samples", type=int, default=256,
                    help="samples evaluated, evenly spread over the split (default: %(default)s)")
    ev.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    ev.add_argument("--trust_remote_code", action="store_true", help="allow custom model code of the base model")
    ev.add_argument("--disable_tqdm", action="store_true", help="no progress bars (the stages are still named)")
    ev.add_argument("--num_candidates", type=int, default=16,
                    help="candidates per source, the policy's own chunk included (default: %(default)s)")
    th = sub.add_parser("train-head", help="train a fresh energy head on a saved policy's own contexts and write a "
                                           "new policy with it",
                        description="Train a fresh energy head on a saved policy's own contexts (its backbone, "
                                    "LoRA and action head stay as trained) and write a new policy with it; the "
                                    "saved policy and its run's results stay as they were.")
    th.add_argument("run_dir", help="a run directory, its model/, or a checkpoint directory")
    th.add_argument("--output_dir", default=None,
                    help="the new policy's directory (default: beside the policy, <policy dir>_head, e.g. "
                         "runs/demo/model_head)")
    th.add_argument("--overwrite_output_dir", action="store_true", help="replace what output_dir holds")
    th.add_argument("--max_steps", type=int, default=400, help="optimizer steps (default: %(default)s)")
    th.add_argument("--batch_size", type=int, default=32, help="(default: %(default)s)")
    th.add_argument("--learning_rate", type=float, default=1e-3, help="(default: %(default)s)")
    th.add_argument("--max_samples", type=int, default=4096, help="training samples whose contexts are collected "
                                                                   "(default: %(default)s)")
    th.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    th.add_argument("--candidate_ranking", type=int, default=None, help="candidates of the ranking loss (default: "
                                                                        "the run's)")
    th.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default: %(default)s)")
    th.add_argument("--disable_tqdm", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from vla_energy.checks import UsageError

    try:
        if args.command == "train-head":
            from vla_energy.training.head_only import retrain_energy_head

            overrides = {} if args.candidate_ranking is None else {"candidate_ranking": args.candidate_ranking}
            out = retrain_energy_head(args.run_dir, args.max_steps, args.batch_size, args.learning_rate,
                                      args.max_samples, args.seed, overrides, args.device, not args.disable_tqdm,
                                      args.output_dir, args.overwrite_output_dir)
            print(f"wrote a policy with the new energy head to {out} (EnergyPolicy.from_pretrained({str(out)!r}); "
                  f"evaluate it with: vla-energy evaluate {out})")
            return 0
        from vla_energy.evaluation.evaluate import evaluate_run, evaluation_tables

        metrics = evaluate_run(args.run_dir, args.split, args.out_dir, args.max_samples, args.device,
                               not args.disable_tqdm, args.trust_remote_code, args.num_candidates)
    except (UsageError, FileNotFoundError, FileExistsError) as e:  # what the user asked for: the message says why
        print(f"vla-energy {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(evaluation_tables(metrics))
    out = args.out_dir or f"{args.run_dir.rstrip('/')}/eval_{args.split}"
    print(f"\nevery value in {out}/metrics.json, the report in {out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
