"""`vla-energy train`: the training recipe in this process, or re-launched through `accelerate launch`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["train_command", "TRAIN_DESCRIPTION"]

TRAIN_DESCRIPTION = (
    "Finetune a vision-language backbone with LoRA, an action head and an energy head trained with global InfoNCE. "
    "Options come from --config (a YAML file or a shipped config name) and the flags below, which override it. "
    "The options are checked, and the dataset looked up, before any training process starts."
)


def _launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vla-energy train", add_help=False)
    group = parser.add_argument_group(
        "launcher", "Without these the recipe trains in this process; with them it is re-launched through "
                    "`accelerate launch -m vla_energy.training.train`.")
    group.add_argument("--num_processes", type=int, default=None,
                       help="Training processes on this machine (several also run on a CPU-only machine, with gloo).")
    group.add_argument("--accelerate_config", default=None,
                       help="An `accelerate config` YAML file (DDP, FSDP, DeepSpeed, mixed precision, machines).")
    group.add_argument("--main_process_port", type=int, default=None,
                       help="Port of the processes' rendezvous (change it when two runs share a machine).")
    return parser


def print_help() -> None:
    """`vla-energy train --help`: the launcher's options, then every training option grouped by its dataclass."""
    from vla_energy.training.arguments import build_parser

    launcher = _launcher_parser()
    parser = build_parser(prog="vla-energy train", description=TRAIN_DESCRIPTION)
    # The launcher's group first: argparse prints groups in the order they were added.
    parser._action_groups.insert(2, launcher._action_groups[-1])
    parser.usage = "vla-energy train [--num_processes N | --accelerate_config FILE] [--config CONFIG] [--OPTION VALUE ...]"
    parser.print_help()


def train_command(argv: list[str]) -> int:
    """`vla-energy train [--num_processes N | --accelerate_config FILE] OPTIONS`: the training recipe.

    The options are parsed and checked (and the dataset looked up) here, so that a mistake is one line before
    anything starts. Without launcher options it trains in this process; with them it re-launches through
    `accelerate launch -m vla_energy.training.train`, as `trl sft` does, and ends with the line of the error that
    stopped a process.
    """
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    known, rest = _launcher_parser().parse_known_args(argv)
    from vla_energy.training.preflight import ConfigError, checked_config

    try:
        if known.num_processes is not None and known.num_processes < 1:
            raise ConfigError(f"--num_processes {known.num_processes}: expected >= 1")
        if known.accelerate_config is not None and not Path(known.accelerate_config).is_file():
            raise ConfigError(f"--accelerate_config {known.accelerate_config!r}: no such file")
        checked_config(rest)
    except ConfigError as e:
        print(f"vla-energy train: error: {e}", file=sys.stderr)
        return 2
    from vla_energy.training.train import ERROR_DIR_ENV, run

    if known.num_processes is None and known.accelerate_config is None:
        return run(rest)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if known.accelerate_config is not None:
        cmd += ["--config_file", known.accelerate_config]
    if known.num_processes is not None:
        # `--multi_gpu` also starts several gloo processes on a machine without GPUs.
        cmd += (["--multi_gpu"] if known.num_processes > 1 else []) + ["--num_processes", str(known.num_processes)]
    if known.main_process_port is not None:
        cmd += ["--main_process_port", str(known.main_process_port)]
    cmd += ["-m", "vla_energy.training.train", *rest]
    with tempfile.TemporaryDirectory(prefix="vla_energy_errors_") as errors:
        code = subprocess.call(cmd, env={**os.environ, ERROR_DIR_ENV: errors})
        if code != 0:
            print(f"vla-energy train: {failure_summary(Path(errors), code)}", file=sys.stderr)
    return code


def failure_summary(errors: Path, code: int) -> str:
    """One line: the first error (and every process that failed with it); the processes that failed after it, as a
    consequence (a peer's closed connection), are only counted. Without error files: the exit code."""
    records = []
    for path in errors.glob("rank_*.txt"):
        when, _, line = path.read_text().partition("\n")
        records.append((float(when), int(path.stem.split("_")[1]), line.strip()))
    if not records:
        return f"training failed (exit code {code}); the output above says why"
    records.sort()
    first = records[0][2]
    same = sorted(r for _, r, line in records if line == first)
    after = sorted(r for _, r, line in records if line != first)
    return f"training failed: {_ranks(same)}: {first}" + (f" ({_ranks(after)} stopped after it)" if after else "")


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
