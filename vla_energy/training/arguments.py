"""Command-line / YAML configuration of the training recipe: HfArgumentParser dataclasses."""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml
from transformers import HfArgumentParser

from vla_energy.backbones.lora import LoraArguments
from vla_energy.data import DataConfig
from vla_energy.losses.strategy import STRATEGIES

__all__ = [
    "ModelArguments", "EnergyArguments", "TrainArguments", "RENAMED_OPTIONS", "CONFIG_CLASSES", "parse_config", "load_yaml", "save_run_config",
    "load_run_config",
]


@dataclass
class ModelArguments:
    """Which backbone to finetune, and how to load it."""

    backbone: str = field(
        default="tiny-llava",
        metadata={"help": "An HF model id or local directory loadable with AutoProcessor + AutoModelForImageTextToText, "
                          "or a tiny random real-format checkpoint built offline for tests and the demo: tiny-llava, "
                          "tiny-paligemma, tiny-idefics3, tiny-qwen2_vl, tiny-qwen2_5_vl (docs/backbones.md)."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the checkpoint (OpenVLA-style repos)."}
    )
    action_token: str = field(
        default="<|action|>",
        metadata={"help": "Action placeholder token, added to the tokenizer as a special token."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Backbone weights dtype: auto (bfloat16 with CUDA, float32 without) | float32 | bfloat16 | "
                          "float16."},
    )
    processor_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={"help": "Options for every processor call, a YAML mapping or a JSON object on the command line, e.g. "
                          "{do_image_splitting: false} (Idefics3) or {min_pixels: 50176, max_pixels: 200704} (Qwen)."},
    )
    state_token: str = field(
        default="<|state|>",
        metadata={"help": "State token (with use_state), added to the tokenizer as a special token; its input "
                          "embedding is the state projector's output."},
    )
    init_from: Optional[str] = field(
        default=None,
        metadata={"help": "A saved policy (run directory or its model/) to start from: its backbone, LoRA adapter and "
                          "action head; the energy head starts fresh. With use_lora false the backbone stays frozen."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.processor_kwargs, str):
            try:
                self.processor_kwargs = json.loads(self.processor_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"processor_kwargs={self.processor_kwargs!r} is not a JSON object: {e}") from None
        if self.processor_kwargs is not None and not isinstance(self.processor_kwargs, dict):
            raise ValueError(f"processor_kwargs={self.processor_kwargs!r}, expected a mapping of processor options")


@dataclass
class EnergyArguments:
    """Energy-head options: loss weights, negatives, temperature, head size (docs/background.md: the defaults)."""

    energy_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the energy loss in the total."})
    l1_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the policy's action L1 loss."})
    strategy: str = field(
        default="combined",
        metadata={"help": f"Which negatives each positive meets, one of {STRATEGIES} (docs/concepts.md)."},
    )
    tau: float = field(default=0.3, metadata={"help": "InfoNCE temperature (logits = -energy / tau)."})
    temperature: str = field(
        default="fixed",
        metadata={"help": "fixed | adaptive (tau halves when the energy gap is < 0.1, doubles when > 1.0) | "
                          "learnable (CLIP-style, clamped)."},
    )
    num_negatives: int = field(default=8, metadata={"help": "Explicit negatives per positive (M)."})
    layer_negatives: str = field(
        default="fixed",
        metadata={"help": "Layer-wise action predictions as negatives: fixed (layers [0, L//3, L//2, -2]) | "
                          "mid_energy (the middle-energy layer) | none."},
    )
    noise_sigmas: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.4],
        metadata={"help": "Standard deviations of the Gaussian-noise negatives (ground truth + noise)."},
    )
    shuffle_negative: bool = field(default=True, metadata={"help": "Add a temporal-shuffle negative of the chunk."})
    false_negative_eps: float = field(
        default=1e-2, metadata={"help": "Negatives within this RMS distance of the positive are masked."}
    )
    policy_error_negatives: int = field(
        default=0, metadata={"help": "Near negatives per positive: truth + noise at the running policy error's scale "
                                     "per step and action dim (0: none; needs explicit negatives)."}
    )
    policy_negative: bool = field(
        default=False, metadata={"help": "The policy's own chunk (detached) as a negative when farther than "
                                         "false_negative_eps from the truth (needs explicit negatives)."}
    )
    candidate_ranking: int = field(
        default=0, metadata={"help": "Candidates per positive for a listwise ranking loss (0: off): the policy's chunk, "
                                     "it plus other rows' errors and it plus noise at its error scale, whose energies "
                                     "are trained to follow their distance to the truth (docs/selection.md)."}
    )
    candidate_ranking_weight: float = field(default=1.0, metadata={"help": "Weight of the candidate ranking loss."})
    ranking_target_temperature: float = field(
        default=0.1, metadata={"help": "Ranking targets softmax(-d / (t * mean d)) over candidate distances d: this t."}
    )
    grad_align_weight: float = field(
        default=0.0, metadata={"help": "Weight of a term making -dE/da at truth + policy-scale noise point toward the "
                                       "truth (for refinement; 0: off)."}
    )
    bank_size: int = field(default=0, metadata={"help": "ActionBank size: recent gathered chunks as negatives (0: none)."})
    symmetric: bool = field(default=False, metadata={"help": "Add the symmetric (action -> contexts) term."})
    context_layer: int = field(default=-1, metadata={"help": "Backbone layer whose hidden states are the context."})
    state_in_energy_context: bool = field(
        default=True, metadata={"help": "With use_state: the projected state is one more token of the energy head's "
                                        "context (besides its state token in the backbone's input)."}
    )
    context_includes_placeholders: bool = field(
        default=True, metadata={"help": "The energy context includes the action placeholders' hidden states."}
    )
    detach_context: bool = field(
        default=True, metadata={"help": "Stop the energy loss's gradient at the backbone (it then moves only heads)."}
    )
    energy_hidden_dim: int = field(default=128, metadata={"help": "Energy head width."})
    energy_num_heads: int = field(default=4, metadata={"help": "Energy head attention heads."})
    energy_num_layers: int = field(default=2, metadata={"help": "Energy head blocks."})
    energy_dropout: float = field(default=0.0, metadata={"help": "Energy head dropout."})
    energy_activation: str = field(
        default="sigmoid",
        metadata={"help": "Bounding of the energy: sigmoid (E = scale * sigmoid(input_scale * raw) + offset) | "
                          "softplus | none."},
    )
    energy_input_scale: float = field(default=0.5, metadata={"help": "Factor on the raw energy inside the sigmoid."})
    energy_scale: float = field(default=2.0, metadata={"help": "Range of the bounded energy."})
    energy_offset: float = field(default=0.1, metadata={"help": "Lowest energy: E in (offset, offset + scale)."})
    action_head_dim: int = field(default=256, metadata={"help": "Width of the action head's MLP."})
    negatives_seed: int = field(
        default=0, metadata={"help": "Seed of the noise/shuffle negatives (mixed with the process index and step)."}
    )

    def __post_init__(self) -> None:
        if self.candidate_ranking < 0 or self.candidate_ranking == 1:
            raise ValueError(f"candidate_ranking={self.candidate_ranking}, expected 0 (off) or >= 2 candidates")
        if self.grad_align_weight < 0 or self.candidate_ranking_weight < 0:
            raise ValueError(f"grad_align_weight={self.grad_align_weight} and candidate_ranking_weight="
                             f"{self.candidate_ranking_weight}: expected >= 0")
        if self.ranking_target_temperature <= 0:
            raise ValueError(f"ranking_target_temperature={self.ranking_target_temperature}, expected > 0")


@dataclass
class TrainArguments:
    """The training loop: batch layout, optimisation, evaluation, checkpoints, logging (TrainingArguments names)."""

    run_name: str = field(default="demo", metadata={"help": "Run directory name under output_dir, and tracker run."})
    output_dir: str = field(default="runs", metadata={"help": "The run is written to <output_dir>/<run_name>/."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Local training batch per process."})
    per_device_eval_batch_size: int = field(default=32, metadata={"help": "Local evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=300, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Base lr (backbone LoRA + action head)."})
    energy_lr_scale: float = field(default=0.1, metadata={"help": "Energy head lr = learning_rate x this."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup of all groups."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping of the policy parameters."})
    progressive_schedule: bool = field(
        default=True,
        metadata={"help": "Grow the energy head's lr scale and grad clip with the step (the schedule_* options); "
                          "false: energy lr scale 1 and max_grad_norm throughout."},
    )
    schedule_stable_steps: int = field(
        default=5000, metadata={"help": "Steps at the start lr scale and clip of the progressive schedule."}
    )
    schedule_ramp_end_step: int = field(
        default=15000, metadata={"help": "Step where the linear ramp to the end lr scale and clip ends."}
    )
    schedule_start_lr_scale: float = field(default=0.1, metadata={"help": "Energy lr scale at the start."})
    schedule_end_lr_scale: float = field(default=0.5, metadata={"help": "Energy lr scale after the ramp."})
    schedule_start_max_grad_norm: float = field(default=0.3, metadata={"help": "Energy grad clip at the start."})
    schedule_end_max_grad_norm: float = field(default=0.5, metadata={"help": "Energy grad clip after the ramp."})
    eval_strategy: str = field(
        default="steps",
        metadata={"help": "no | steps: evaluate every eval_steps and at the end, or never (val_fraction 0 also "
                          "skips it). What the evaluation needs is checked before training starts."},
    )
    eval_steps: int = field(default=100, metadata={"help": "Evaluate every N optimizer steps (0: only at the end)."})
    eval_max_samples: int = field(default=256, metadata={"help": "Held-out samples used for evaluation."})
    eval_num_negatives: int = field(default=31, metadata={"help": "Pool of chunks from other episodes (chance 1/32)."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps (0: no intermediate checkpoints)."})
    save_total_limit: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many checkpoints, deleting the oldest (None: keep all)."}
    )
    retrieval_chunks: int = field(
        default=16384, metadata={"help": "Normalized training action chunks saved with the policy (evenly spread over "
                                         "the training split), the candidates of candidates='retrieval' (0: none)."}
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "Checkpoint directory to resume from, or 'latest' (the newest complete one)."}
    )
    stop_after_steps: int = field(
        default=0,
        metadata={"help": "Leave after this many optimizer steps of this launch with a checkpoint and no final eval, "
                          "as a job with a time limit would; --resume_from_checkpoint latest goes on "
                          "(0: run to max_steps)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of model init, data order and negatives."})
    report_to: str = field(
        default="tensorboard", metadata={"help": "accelerate tracker(s), comma-separated (tensorboard, wandb, ...), or none."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N steps."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    on_nonfinite: str = field(default="skip", metadata={"help": "raise | skip: what a NaN/Inf loss does."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars (they show on the main process)."})
    ddp_find_unused_parameters: bool = field(
        default=False,
        metadata={"help": "DDP's find_unused_parameters (slower): for trainable parameters that some forward does not "
                          "use; without it such parameters stop training with an error naming them."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the backbone's activations in backward (less memory, slower)."}
    )

    def __post_init__(self) -> None:
        from vla_energy.training.nonfinite import NONFINITE_MODES

        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite={self.on_nonfinite!r}, expected one of {NONFINITE_MODES}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "max_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}, expected >= 1")
        from vla_energy.training.preflight import EVAL_STRATEGIES

        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(f"eval_strategy={self.eval_strategy!r}, expected one of {EVAL_STRATEGIES}")
        if self.stop_after_steps < 0:
            raise ValueError(f"stop_after_steps={self.stop_after_steps}, expected >= 0")
        if self.retrieval_chunks < 0:
            raise ValueError(f"retrieval_chunks={self.retrieval_chunks}, expected >= 0 (0: none)")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit}, expected >= 1 or None")


# Options renamed to the transformers.TrainingArguments names: an old name fails with a message naming the new one.
RENAMED_OPTIONS = {
    "per_device_batch_size": "per_device_train_batch_size",
    "log_with": "report_to",
    "eval_every": "eval_steps",
    "save_every": "save_steps",
    "log_every": "logging_steps",
    "resume_from": "resume_from_checkpoint",
    "num_workers": "dataloader_num_workers",
    "torch_dtype": "dtype",
    "progress": "disable_tqdm",
    "no_progress": "disable_tqdm",
}
REMOVED_OPTIONS = {
    "unsynced_energy_head": "it was a benchmark-only switch; benchmarks/bench_learning.py keeps the experiment",
}


def check_option_names(names: list[str], source: str) -> None:
    """A clear error for options under their old names (or removed), naming the new one."""
    for name in names:
        if name in RENAMED_OPTIONS:
            raise ValueError(f"{source}: option {name!r} is now called {RENAMED_OPTIONS[name]!r} "
                             "(the transformers.TrainingArguments name)")
        if name in REMOVED_OPTIONS:
            raise ValueError(f"{source}: option {name!r} was removed: {REMOVED_OPTIONS[name]}")


CONFIG_CLASSES = (ModelArguments, DataConfig, LoraArguments, EnergyArguments, TrainArguments)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A flat mapping of option -> value from a YAML file (safe_load; sections are flattened)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
    known = {f.name for cls in CONFIG_CLASSES for f in fields(cls)}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key not in known:  # optional sections: model:, data:, lora:, energy:, train:
            flat.update(value)
        else:
            flat[key] = value
    check_option_names(list(flat), str(path))
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"{path}: unknown options {unknown}; known options are {sorted(known)}")
    return flat


CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> list[str]:
    """Names of the configs shipped with the package (`--config demo`)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def resolve_config(name_or_path: str) -> Path:
    """A YAML path as given, or a shipped config by name (`demo` -> vla_energy/training/configs/demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():  # a directory named like a shipped config (e.g. runs' `demo`) is not a config
        return path
    shipped = CONFIGS_DIR / f"{name_or_path}.yaml"
    if path.suffix not in (".yaml", ".yml") and shipped.exists():
        return shipped
    raise FileNotFoundError(f"--config {name_or_path!r}: no such file, and not a shipped config "
                            f"(shipped: {shipped_configs()})")


def _config_argument(argv: list[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a YAML file or a shipped config name")
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def parse_config(argv: Optional[list[str]] = None) -> tuple:
    """(model, data, lora, energy, train) arguments from `--config file.yaml|name` plus command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_option_names([a[2:].split("=", 1)[0] for a in argv if a.startswith("--")], "command line")
    parser = HfArgumentParser(CONFIG_CLASSES)
    parser.add_argument("--config", type=str, default=None,
                        help=f"YAML file of options, or a shipped config name {shipped_configs()}; flags override it.")
    config = _config_argument(argv)
    if config is not None:
        parser.set_defaults(**load_yaml(resolve_config(config)))
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
        raise FileNotFoundError(f"{run_dir} has no {RUN_CONFIG}: not a run directory of the training recipe")
    raw = json.loads(path.read_text())
    return tuple(cls(**raw[cls.__name__]) for cls in CONFIG_CLASSES)


def config_reference_markdown() -> str:
    """docs/configuration.md: every option with its default and help, generated from the dataclasses."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `vla_energy/training/arguments.py` by "
        "`python -m vla_energy.training.arguments > "
        "docs/configuration.md` (a test keeps it current). Every option works as a YAML key in `--config` "
        "files and as a `--flag` of `vla-energy train` (the same as `accelerate launch -m vla_energy.training.train` "
        "and `recipes/train_energy.py`); flags override the YAML.",
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
