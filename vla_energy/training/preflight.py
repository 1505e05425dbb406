"""Checks run before the first training step: what the evaluation needs, and the optional extras a run asks for."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Callable

__all__ = ["EVAL_STRATEGIES", "check_evaluation", "check_trackers"]

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


def check_trackers(report_to: str) -> None:
    """An ImportError naming the extra to install when a requested tracker's package is missing."""
    trackers = [t.strip() for t in report_to.split(",") if t.strip()]
    if "tensorboard" in trackers:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401  # accelerate's TensorBoardTracker accepts either
            except ImportError as e:
                raise ImportError("report_to=tensorboard needs tensorboard: pip install 'vla_energy[tensorboard]' "
                                  "(or --report_to none)") from e
