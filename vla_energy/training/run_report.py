"""What a finished run writes: metrics.json, learning curves and energy histograms, report.md, and the same results
in the saved policy (its metrics.json, plots and model card)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from vla_energy.evaluation.ranking import RankingTally
from vla_energy.evaluation.report import (
    plot_curves,
    plot_energy_histograms,
    plots_available,
    write_metrics,
    write_report,
)
from vla_energy.modeling.model_card import MODEL_CARD_IMAGES, write_model_card

__all__ = ["write_outputs", "add_results_to_policy"]


def write_outputs(run_dir: Path, final: dict, history: list[dict], tally: Optional[RankingTally],
                  num_negatives: int) -> None:
    """metrics.json, learning curves, energy histograms (with the plots extra) and report.md; `tally` is None
    when the run did not evaluate."""
    write_metrics(run_dir / "metrics.json", {**final, "history": history})
    title = f"vla_energy run `{run_dir.name}`"
    if not plots_available():
        print("matplotlib is not installed: no plots (pip install 'vla_energy[plots]')")
        write_report(run_dir / "report.md", title, final, [])
        return
    plot_curves(run_dir / "loss.png", history, ["loss", "l1", "energy_loss", "energy/loss_floor"], "training loss")
    plot_curves(run_dir / "accuracy.png", history, ["energy/acc", "eval/top1_acc", "eval/chance_acc"], "accuracy")
    if tally is None:
        write_report(run_dir / "report.md", title, final, ["loss.png", "accuracy.png"],
                     notes=["No evaluation (eval_strategy no, or no validation split)."])
        return
    e = tally.ranking_energies()
    plot_energy_histograms(run_dir / "energy_hist.png",
                           {"positive": e[:, 0].tolist(), "other episodes": e[:, 1:].flatten().tolist()},
                           "held-out energies")
    write_report(run_dir / "report.md", title, final, ["loss.png", "accuracy.png", "energy_hist.png"],
                 notes=[f"Top-1 ranking of the true chunk among {num_negatives + 1} chunks "
                        f"({num_negatives} from other episodes)."])


def add_results_to_policy(policy_dir: str | Path, metrics: Mapping[str, Any], run_dir: str | Path) -> Path:
    """metrics.json and the run's plots into a saved policy directory, and its model card rewritten with them."""
    policy_dir, run_dir = Path(policy_dir), Path(run_dir)
    write_metrics(policy_dir / "metrics.json", metrics)
    for name in MODEL_CARD_IMAGES:
        if (run_dir / name).exists():
            shutil.copyfile(run_dir / name, policy_dir / name)
    return write_model_card(policy_dir, metrics)
