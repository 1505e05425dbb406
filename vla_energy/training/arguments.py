"""Command-line / YAML configuration of the training recipe: HfArgumentParser dataclasses."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union, get_type_hints

import yaml
from transformers import HfArgumentParser

from vla_energy.backbones.lora import LoraArguments
from vla_energy.data import DataConfig
from vla_energy.modeling.configuration_energy import EnergyArguments

__all__ = [
    "ModelArguments", "EnergyArguments", "TrainArguments", "RENAMED_OPTIONS", "CONFIG_CLASSES",
    "parse_config", "build_parser", "load_yaml", "save_run_config", "load_run_config", "run_config_dict",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelArguments:
    """Which backbone to finetune, and how to load it."""

    backbone: str = field(
        default="tiny-llava",
        metadata={"help": "An HF model id or local directory loadable with AutoProcessor + AutoModelForImageTextToText, "
                          "or a tiny random real-format checkpoint built offline for tests and the demo: tiny-llava, "
                          "tiny-paligemma, tiny-idefics3, tiny-qwen2_vl, tiny-qwen2_5_vl (docs/backbones.md)."},
    )
    base_model_id: Optional[str] = field(
        default=None,
        metadata={"help": "With a local backbone directory: the hub id (org/name) it is a copy of, recorded in the "
                          "saved policy so that it loads elsewhere and can be pushed to the hub (a copy in the hub "
                          "cache is recognised without it)."},
    )
    base_model_revision: Optional[str] = field(
        default=None,
        metadata={"help": "The hub commit (or tag) of base_model_id that the local copy holds, recorded in the "
                          "policy (default: none, the policy loads the hub's current revision)."},
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
                          "action head (a fresh one when its kind differs from action_head); the energy head starts "
                          "fresh. With use_lora false the backbone stays frozen."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.processor_kwargs, str):
            try:
                self.processor_kwargs = json.loads(self.processor_kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"processor_kwargs={self.processor_kwargs!r} is not a JSON object: {e}") from None
        if self.processor_kwargs is not None and not isinstance(self.processor_kwargs, dict):
            raise ValueError(f"processor_kwargs={self.processor_kwargs!r}, expected a mapping of processor options")
        if self.base_model_id is not None and not _HUB_ID.match(self.base_model_id):
            raise ValueError(f"base_model_id={self.base_model_id!r}, expected a hub model id like org/name")
        if self.base_model_revision is not None and self.base_model_id is None:
            raise ValueError(f"base_model_revision={self.base_model_revision!r} needs base_model_id (the hub id the "
                             "revision belongs to)")


@dataclass
class TrainArguments:
    """The training loop: batch layout, optimisation, evaluation, checkpoints, logging (TrainingArguments names)."""

    run_name: str = field(default="demo", metadata={"help": "Run directory name under output_dir, and tracker run."})
    output_dir: str = field(default="runs", metadata={"help": "The run is written to <output_dir>/<run_name>/."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Delete what <output_dir>/<run_name>/ holds before training. Without it (or "
                          "resume_from_checkpoint) a run directory that holds a run is refused."},
    )
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
    retrieval_contexts: bool = field(
        default=False,
        metadata={"help": "Also save the context keys of the retrieval chunks' samples, encoded by the trained model "
                          "after training (one forward per sample), for candidates='neighbors': the chunks of the "
                          "training samples whose contexts are nearest to the current one. Needs retrieval_chunks > 0 "
                          "and unsharded weights (not FSDP or DeepSpeed ZeRO-3)."},
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
        default="tensorboard",
        metadata={"help": "accelerate tracker(s), comma-separated (tensorboard, wandb, ...), or none; a tracker whose "
                          "package is not installed is skipped with a message (metrics.json has every logged value)."},
    )
    logging_steps: int = field(
        default=10, metadata={"help": "Log metrics every N steps (to the trackers; with disable_tqdm also printed)."}
    )
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
        if self.retrieval_contexts and self.retrieval_chunks == 0:
            raise ValueError("retrieval_contexts are the keys of the retrieval chunks' samples: set retrieval_chunks "
                             "> 0 too")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ValueError(f"save_total_limit={self.save_total_limit}, expected >= 1 or None")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(f"overwrite_output_dir deletes the run that resume_from_checkpoint="
                             f"{self.resume_from_checkpoint!r} would continue: pass one of them")


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


class GroupedArgumentParser(HfArgumentParser):
    """HfArgumentParser whose --help shows each dataclass's options under its name and docstring."""

    def _add_dataclass_arguments(self, dtype: Any) -> None:
        group = self.add_argument_group(dtype.__name__, _without_doc_links(dtype.__doc__ or ""))
        hints = get_type_hints(dtype)
        for f in fields(dtype):
            if f.init:
                f.type = hints[f.name]
                self._parse_dataclass_field(group, f)


_DOC_LINK = re.compile(r"\s*\((?:see )?docs/[^)]*\)")


def _without_doc_links(text: str) -> str:
    # A pip install has no docs/ directory: --help leaves those references out.
    return _DOC_LINK.sub("", " ".join(text.split()))


class CompactHelpFormatter(argparse.HelpFormatter):
    """One name per option (not HfArgumentParser's --dashed-alias too), a short value placeholder, the default."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or not action.option_strings[0].startswith("--"):
            return super()._format_action_invocation(action)
        name = action.option_strings[0]
        if action.nargs == 0:
            return name
        if action.nargs == "?":
            return f"{name} [true|false]"
        if action.choices:
            return f"{name} {{{','.join(map(str, action.choices))}}}"
        return f"{name} {({int: 'INT', float: 'FLOAT'}).get(action.type, 'VALUE')}"

    def _get_help_string(self, action: argparse.Action) -> str:
        shown = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
            and action.nargs != 0
        return (action.help or "") + (f" (default: {action.default})".replace("%", "%%") if shown else "")


def build_parser(prog: Optional[str] = None, description: Optional[str] = None) -> HfArgumentParser:
    """The recipe's option parser: one group per dataclass of CONFIG_CLASSES, and --config."""
    parser = GroupedArgumentParser(CONFIG_CLASSES, prog=prog, description=description,
                                   formatter_class=CompactHelpFormatter)
    for action in parser._actions:
        if action.option_strings and action.option_strings[0].startswith("--no_"):
            action.help = f"The same as --{action.dest} false."
        elif action.help:
            action.help = _without_doc_links(action.help)
    parser.add_argument("--config", type=str, default=None,
                        help=f"YAML file of options, or a shipped config name {shipped_configs()}; flags override it.")
    return parser


def parse_config(argv: Optional[list[str]] = None) -> tuple:
    """(model, data, lora, energy, train) arguments from `--config file.yaml|name` plus command-line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_option_names([a[2:].split("=", 1)[0] for a in argv if a.startswith("--")], "command line")
    parser = build_parser()
    config = _config_argument(argv)
    if config is not None:
        parser.set_defaults(**load_yaml(resolve_config(config)))
    *parsed, extra = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if extra:
        raise ValueError(f"unknown command-line arguments: {extra}")
    # The extra `--config` argument comes back as a Namespace; keep only the dataclasses, in order.
    return tuple(p for p in parsed if isinstance(p, CONFIG_CLASSES))


RUN_CONFIG = "run_config.json"


def run_config_dict(configs: tuple) -> dict[str, dict[str, Any]]:
    """All options of a run, one section per dataclass: the content of run_config.json."""
    return {type(c).__name__: asdict(c) for c in configs}


def save_run_config(run_dir: str | Path, configs: tuple | dict[str, Any]) -> Path:
    """All options of a run as JSON, one section per dataclass (read back by load_run_config)."""
    path = Path(run_dir) / RUN_CONFIG
    content = configs if isinstance(configs, dict) else run_config_dict(configs)
    path.write_text(json.dumps(content, indent=2))
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
        "Generated from the option dataclasses (`ModelArguments` and `TrainArguments` in "
        "`vla_energy/training/arguments.py`, `DataConfig` in `vla_energy/data/arguments.py`, `LoraArguments` in "
        "`vla_energy/backbones/lora.py`, `EnergyArguments` in `vla_energy/modeling/configuration_energy.py`) by "
        "`python -m vla_energy.training.arguments > docs/configuration.md` (a test keeps it current). Every option works as a YAML key in `--config` "
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
