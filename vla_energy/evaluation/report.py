"""Run outputs: metrics.json, report.md and PNG plots (curves, energy histograms).

Plots need matplotlib, an optional extra: `pip install vla_energy[plots]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["write_metrics", "plot_curves", "plot_energy_histograms", "write_report", "plots_available", "pyplot"]


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
