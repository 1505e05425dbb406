"""Checks run before any training process starts or the first training step: the options, the dataset's presence,
the run directory, what the evaluation needs, and the optional extras a run asks for."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from vla_energy.checks import UsageError

__all__ = ["EVAL_STRATEGIES", "ConfigError", "checked_config", "check_backbone", "check_run_dir", "clear_run_dir", "check_resume_options",
           "check_evaluation", "check_trackers", "TRACKER_PACKAGES"]


class ConfigError(UsageError):
    """A configuration the run cannot start with (bad option, missing dataset, occupied run directory): reported
    in one line, before training starts."""


def checked_config(argv: Optional[list[str]] = None) -> tuple:
    """The parsed (model, data, lora, energy, train) options, checked against the dataset's presence and the run
    directory; any problem is a ConfigError."""
    from vla_energy.data.loading import check_dataset
    from vla_energy.training.arguments import parse_config

    try:
        configs = parse_config(argv)
        check_backbone(configs[0])
        check_dataset(configs[1])
        check_run_dir(configs[-1])
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return configs


def check_backbone(model: Any) -> None:
    """The backbone can load: a tiny name, an existing checkpoint directory, or a hub name (offline: one in the
    cache); else a ConfigError before any process starts."""
    from vla_energy.backbones.loading import TINY_PREFIX, check_backbone_available

    if model.backbone.startswith(TINY_PREFIX):
        return  # built on first use
    try:
        check_backbone_available(model.backbone)
    except OSError as e:  # FileNotFoundError included
        raise ConfigError(str(e)) from e


def run_dir_of(train: Any) -> Path:
    """<output_dir>/<run_name>."""
    return Path(train.output_dir) / train.run_name


def check_run_dir(train: Any) -> None:
    """A ConfigError when the run directory holds a run that this one would overwrite or mix with: it is reused
    only with overwrite_output_dir (cleared first) or resume_from_checkpoint."""
    from vla_energy.training.checkpoints import latest_checkpoint

    run_dir = run_dir_of(train)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is a file, not a run directory: choose another --output_dir or --run_name")
    if train.overwrite_output_dir or not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not train.resume_from_checkpoint:
        raise ConfigError(f"{run_dir} already holds a run: --overwrite_output_dir replaces it, "
                          f"--resume_from_checkpoint latest continues it, another --run_name trains beside it")
    finished = (run_dir / "model").is_dir() or (run_dir / "metrics.json").exists()
    if train.resume_from_checkpoint == "latest" and latest_checkpoint(run_dir / "checkpoints") is None and finished:
        raise ConfigError(f"--resume_from_checkpoint latest: {run_dir} holds a finished run without checkpoints, "
                          "nothing to continue: --overwrite_output_dir replaces it, another --run_name trains "
                          "beside it")


def clear_run_dir(train: Any) -> None:
    """Delete what the run directory holds (overwrite_output_dir); the main process calls it before anything is
    written."""
    run_dir = run_dir_of(train)
    if train.overwrite_output_dir and run_dir.is_dir():
        shutil.rmtree(run_dir)


# Options a resumed run must share with the checkpoint it continues: they shape the model or its data. The rest
# (steps, learning rates, logging, evaluation, ...) may change between launches.
_FREE_TO_CHANGE = {"DataConfig": {"cache_dir", "decode_video"}, "ModelArguments": {"trust_remote_code"}}
_MUST_MATCH = ("ModelArguments", "DataConfig", "LoraArguments", "EnergyArguments")


def check_resume_options(checkpoint: Path, current: dict[str, dict[str, Any]]) -> None:
    """A ConfigError naming the options that differ from those the checkpoint was trained with (its
    run_config.json); a checkpoint without one is not checked."""
    path = checkpoint / "run_config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(current))  # compared as JSON holds them (tuples become lists)
    differ = []
    for section in _MUST_MATCH:
        old, new = saved.get(section, {}), current.get(section, {})
        for name in sorted(set(old) & set(new) - _FREE_TO_CHANGE.get(section, set())):
            if old[name] != new[name]:
                differ.append(f"{name} {old[name]!r} -> {new[name]!r}")
    if differ:
        raise ConfigError(f"--resume_from_checkpoint {checkpoint}: it was trained with other options ("
                          + ", ".join(differ) + "): resume with the options of its run_config.json, or start a new "
                          "run (--run_name, --overwrite_output_dir)")

EVAL_STRATEGIES = ("no", "steps")


def check_evaluation(eval_strategy: str, episode_index: Sequence[int], eval_num_negatives: int,
                     log: Callable[[str], Any] = print) -> bool:
    """Whether this run evaluates; a clear error, before training, when the evaluation could not run.

    episode_index: the episode of every evaluated sample (the spread selection of the validation split). The
    ranking needs at least eval_num_negatives + 1 samples and, for each, eval_num_negatives outside its episode.
    """
    if eval_strategy not in EVAL_STRATEGIES:
        raise ValueError(f"eval_strategy={eval_strategy!r}, expected one of {EVAL_STRATEGIES}")
    if eval_strategy == "no":
        log("eval_strategy no: evaluation is skipped")
        return False
    n = len(episode_index)
    if n == 0:
        log("no validation split (val_fraction 0): evaluation is skipped")
        return False
    counts = Counter(int(e) for e in episode_index)
    fewest_outside = n - max(counts.values())
    if n < eval_num_negatives + 1 or fewest_outside < eval_num_negatives:
        raise ValueError(
            f"the evaluation ranks each validation sample against eval_num_negatives={eval_num_negatives} samples "
            f"of other episodes, so it needs at least {eval_num_negatives + 1} samples and, for each, "
            f"{eval_num_negatives} outside its episode; the evaluated validation samples are {n} from "
            f"{len(counts)} episode(s), with as few as {fewest_outside} outside one episode. Hold out more episodes "
            "(--val_fraction, --num_episodes), evaluate more samples (--eval_max_samples), lower "
            "--eval_num_negatives, or turn evaluation off (--eval_strategy no, or --val_fraction 0)"
        )
    return True


# The package(s) each tracker needs (any one of them) and what to install.
TRACKER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'vla_energy[tensorboard]'"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
    "aim": (("aim",), "pip install aim"),
    "clearml": (("clearml",), "pip install clearml"),
    "dvclive": (("dvclive",), "pip install dvclive"),
    "swanlab": (("swanlab",), "pip install swanlab"),
    "trackio": (("trackio",), "pip install trackio"),
}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent package
        return False


def check_trackers(report_to: str, log: Callable[[str], Any] = print) -> list[str]:
    """The trackers of report_to whose packages are installed; one line for each one skipped, naming what to
    install (metrics.json keeps every logged value either way)."""
    usable = []
    for tracker in (t.strip() for t in report_to.split(",")):
        if tracker in ("", "none"):
            continue
        packages, install = TRACKER_PACKAGES.get(tracker, ((tracker,), f"pip install {tracker}"))
        if any(_installed(p) for p in packages):
            usable.append(tracker)
        else:
            log(f"report_to {tracker}: not installed, skipped ({install} to log there)")
    return usable
