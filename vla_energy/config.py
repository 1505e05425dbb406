"""Command-line / YAML configuration of the training recipe: HfArgumentParser dataclasses."""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml
from transformers import HfArgumentParser

from .data import DataConfig
from .lora import LoraArguments
from .plugin import EnergyArguments

__all__ = [
    "ModelArguments", "TrainArguments", "CONFIG_CLASSES", "parse_config", "load_yaml", "save_run_config",
    "load_run_config",
]


@dataclass
class ModelArguments:
    """Which backbone to finetune."""

    backbone: str = field(
        default="tiny-llava",
        metadata={"help": "tiny-llava, tiny-paligemma, tiny-qwen2_vl or tiny-idefics3 (random offline tiny VLMs), "
                          "or an HF model path/id."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code (OpenVLA-style repos). Off unless you pass it."}
    )
    action_token: str = field(
        default="<|action|>", metadata={"help": "Action placeholder token added to a real tokenizer."}
    )
    torch_dtype: str = field(default="float32", metadata={"help": "Backbone weights dtype: float32 | bfloat16."})
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "A saved policy (run directory or its model/) to start from: its backbone, LoRA adapter and "
                          "action head; the energy head starts fresh. With use_lora false the backbone stays frozen."},
    )


@dataclass
class TrainArguments:
    """The training loop: batch layout, optimisation, evaluation, checkpoints, logging."""

    run_name: str = field(default="demo", metadata={"help": "Run directory name under output_dir."})
    output_dir: str = field(default="runs", metadata={"help": "Where runs/<run_name>/ is written."})
    per_device_batch_size: int = field(default=8, metadata={"help": "Local batch b per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Base lr (backbone LoRA + action head)."})
    energy_lr_scale: float = field(default=0.1, metadata={"help": "Energy head lr = base lr x this (seed 000: 0.1)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup of all groups."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the policy parameters."})
    progressive_schedule: bool = field(
        default=True, metadata={"help": "Seed 000 progressive lr scale / grad clip on the energy head."}
    )
    schedule_stable_steps: int = field(default=5000, metadata={"help": "Seed 000: steps at lr scale 0.1, clip 0.3."})
    schedule_ramp_end_step: int = field(default=15000, metadata={"help": "Seed 000: ramp to 0.5 / 0.5 ends here."})
    schedule_start_lr_scale: float = field(default=0.1, metadata={"help": "Seed 000: 0.1."})
    schedule_end_lr_scale: float = field(default=0.5, metadata={"help": "Seed 000: 0.5."})
    schedule_start_max_grad_norm: float = field(default=0.3, metadata={"help": "Seed 000: 0.3."})
    schedule_end_max_grad_norm: float = field(default=0.5, metadata={"help": "Seed 000: 0.5."})
    eval_every: int = field(default=100, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."})
    eval_max_samples: int = field(default=256, metadata={"help": "Held-out samples used for evaluation."})
    eval_num_negatives: int = field(default=31, metadata={"help": "Pool of chunks from other episodes (chance 1/32)."})
    save_every: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: no intermediate checkpoints)."})
    resume_from: Optional[str] = field(default=None, metadata={"help": "Checkpoint directory to resume from."})
    stop_after_steps: int = field(
        default=0,
        metadata={"help": "Leave after this many optimizer steps of this launch with a checkpoint and no final eval, "
                          "as a job with a time limit would; --resume_from latest goes on (0: run to max_steps)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of model init, data order and negatives."})
    log_with: str = field(default="tensorboard", metadata={"help": "accelerate tracker(s), comma-separated, or none."})
    log_every: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    on_nonfinite: str = field(default="skip", metadata={"help": "raise | skip: what a NaN/Inf loss does."})
    unsynced_energy_head: bool = field(
        default=False,
        metadata={"help": "Benchmark only: keep the energy head out of DDP (each rank trains its own, as the seeds)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars on the main process."})

    def __post_init__(self) -> None:
        from .nonfinite import NONFINITE_MODES

        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}, expected one of {NONFINITE_MODES}")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}, expected >= 1")
        if self.stop_after_steps < 0:
            raise ValueError(f"stop_after_steps={self.stop_after_steps}, expected >= 0")


CONFIG_CLASSES = (ModelArguments, DataConfig, LoraArguments, EnergyArguments, TrainArguments)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option -> value from a YAML file (safe_load; sections are flattened)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # optional sections: model:, data:, lora:, energy:, train:
            flat.update(value)
        else:
            flat[key] = value
    known = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known options are {sorted(known)}")
    return flat


def parse_config(argv: Optional[list[str]] = None) -> tuple:
    """(model, data, lora, energy, train) arguments from `--config file.yaml` plus command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(CONFIG_CLASSES)
    parser.add_argument("--config", type=str, default=None, help="YAML file of options (CLI flags override it).")
    if "--config" in argv:
        i = argv.index("--config")
        parser.set_defaults(**load_yaml(argv[i + 1]))
    *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if extra:
        raise ValueError(f"unknown command-line arguments: {extra}")
    # The extra `--config` argument comes back as a Namespace; keep only the dataclasses, in order.
    return tuple(p for p in parsed if isinstance(p, CONFIG_CLASSES))


RUN_CONFIG = "run_config.json"


def save_run_config(run_dir: str | Path, configs: tuple) -> Path:
    """All options of a run as JSON, one section per dataclass (read back by load_run_config)."""
    path = Path(run_dir) / RUN_CONFIG
    path.write_text(json.dumps({type(c).__name__: asdict(c) for c in configs}, indent=2))
    return path


def load_run_config(run_dir: str | Path) -> tuple:
    """The dataclasses saved by save_run_config, in CONFIG_CLASSES order."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no {RUN_CONFIG}: not a run directory of recipes/train_energy.py")
    raw = json.loads(path.read_text())
    return tuple(cls(**raw[cls.__name__]) for cls in CONFIG_CLASSES)


def config_reference_markdown() -> str:
    """docs/configuration.md: every option with its default and help, generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `vla_energy/config.py` by `python -m vla_energy.config > "
        "docs/configuration.md` (a test keeps it current). Every option works as a YAML key in `--config` "
        "files and as a `--flag` of `recipes/train_energy.py`; flags override the YAML.",
    ]
    for cls in CONFIG_CLASSES:
        lines += ["", f"## {cls.__name__}", "", (cls.__doc__ or "").strip(), "", "| option | default | meaning |",
                  "|---|---|---|"]
        for f in fields(cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            shown = "`" + repr(default) + "`" if default is not MISSING else "(required)"
            lines.append(f"| `{f.name}` | {shown} | {f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
