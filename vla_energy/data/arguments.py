"""DataConfig: which dataset, its column names, chunking, split and normalization (HfArgumentParser-friendly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from vla_energy.data.synthetic import SYNTHETIC_STATES, VIEWS, check_modes

__all__ = ["DataConfig", "DATASET_FORMATS", "NORMALIZATIONS", "CAMERA_LAYOUTS", "VIDEO_DECODING"]

DATASET_FORMATS = ("auto", "lerobot", "hf")
CAMERA_LAYOUTS = ("separate", "tile")
VIDEO_DECODING = ("lazy", "eager")
NORMALIZATIONS = ("q01_q99", "mean_std", "none")


@dataclass
class DataConfig:
    """Dataset options. Column names left as None take the format's default (see docs/data.md)."""

    dataset: str = field(
        default="synthetic",
        metadata={"help": "'synthetic' (built-in task), a LeRobot v3 directory, a save_to_disk directory, "
                          "parquet file(s) / a directory of them, or a hub dataset repo id (e.g. lerobot/libero_10)."},
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "auto | lerobot | hf. A hub repo id (org/name) is fetched with snapshot_download into "
                          "the hub cache (HF_HUB_CACHE) unless 'hf', where datasets.load_dataset reads it."},
    )
    dataset_revision: Optional[str] = field(
        default=None, metadata={"help": "Hub dataset: branch, tag or commit to download (default: main)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read from a DatasetDict / hub dataset."})
    image_key: Optional[str] = field(
        default=None,
        metadata={"help": "Image column(s), comma-separated for several cameras, in the order the processor gets "
                          "them. Default: 'image' (hf), every observation.images.<camera> image/video feature in "
                          "meta/info.json order (lerobot)."},
    )
    camera_layout: str = field(
        default="separate",
        metadata={"help": "Several cameras: separate (a list of images per sample, one image placeholder each) | "
                          "tile (side by side in one image)."},
    )
    decode_video: str = field(
        default="lazy",
        metadata={"help": "LeRobot video features: lazy (decode a row's frame when the row is read, in the "
                          "DataLoader workers) | eager (decode every frame up front, in memory)."},
    )
    instruction_key: Optional[str] = field(
        default=None, metadata={"help": "Instruction column. Default: 'instruction' (hf), 'task' (lerobot)."}
    )
    action_key: str = field(default="action", metadata={"help": "Action column (one vector per frame)."})
    use_state: bool = field(
        default=False,
        metadata={"help": "Give each example the proprioceptive `state` [Ds], normalized with training-split "
                          "statistics (saved as NormStats.state)."},
    )
    state_key: Optional[str] = field(
        default=None,
        metadata={"help": "State column (with use_state). Default: 'state' (synthetic), 'observation.state' "
                          "(lerobot), none (hf: set it)."},
    )
    episode_key: str = field(default="episode_index", metadata={"help": "Episode index column."})
    frame_key: str = field(default="frame_index", metadata={"help": "Frame index (within the episode) column."})
    horizon: int = field(default=8, metadata={"help": "Action chunk length H: actions[t : t+H] of the episode."})
    val_fraction: float = field(default=0.1, metadata={"help": "Fraction of episodes held out for validation."})
    data_seed: int = field(default=0, metadata={"help": "Seed of the episode split and of the synthetic data."})
    normalization: str = field(
        default="q01_q99",
        metadata={"help": "q01_q99 (q01..q99 -> [-1, 1], clipped; OpenVLA) | mean_std | none."},
    )
    num_episodes: int = field(default=160, metadata={"help": "Synthetic: number of episodes."})
    image_size: int = field(default=32, metadata={"help": "Synthetic: image side in pixels."})
    num_targets: int = field(default=3, metadata={"help": "Synthetic: coloured targets per image (1..6)."})
    synthetic_state: str = field(
        default="agent",
        metadata={"help": "Synthetic state: agent (x, y; the image already shows it) | goal_offset (x, y, ox, oy: "
                          "the goal is the named square + a per-episode offset (ox, oy) given only in the state)."},
    )
    synthetic_view: str = field(
        default="top_down",
        metadata={"help": "Synthetic camera: top_down (whole table, agent drawn) | wrist (eye-in-hand, centred "
                          "on the agent; learnable by a random tiny VLM in minutes)."},
    )
    synthetic_modes: str = field(
        default="none",
        metadata={"help": "Synthetic demonstrations: none (one valid target) | targets (two squares of the named "
                          "colour, both valid; the expert heads for one chosen at random per episode)."},
    )
    min_episode_length: int = field(default=20, metadata={"help": "Synthetic: shortest episode (frames)."})
    max_episode_length: int = field(default=40, metadata={"help": "Synthetic: longest episode (frames)."})
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Synthetic cache. Default: $VLA_ENERGY_CACHE or ~/.cache/vla_energy."}
    )

    def __post_init__(self) -> None:
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"dataset_format={self.dataset_format!r}, expected one of {DATASET_FORMATS}")
        if self.synthetic_view not in VIEWS:
            raise ValueError(f"synthetic_view={self.synthetic_view!r}, expected one of {VIEWS}")
        if self.synthetic_state not in SYNTHETIC_STATES:
            raise ValueError(f"synthetic_state={self.synthetic_state!r}, expected one of {SYNTHETIC_STATES}")
        check_modes(self.synthetic_modes, self.synthetic_state)
        if self.camera_layout not in CAMERA_LAYOUTS:
            raise ValueError(f"camera_layout={self.camera_layout!r}, expected one of {CAMERA_LAYOUTS}")
        if self.decode_video not in VIDEO_DECODING:
            raise ValueError(f"decode_video={self.decode_video!r}, expected one of {VIDEO_DECODING}")
        if self.state_key is not None and not self.use_state:
            raise ValueError(f"state_key={self.state_key!r} is set but use_state=False: set use_state=True to use it")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={self.normalization!r}, expected one of {NORMALIZATIONS}")
        if self.horizon < 1:
            raise ValueError(f"horizon={self.horizon}, expected >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}, expected 0 <= val_fraction < 1")

    @property
    def image_keys(self) -> Optional[list[str]]:
        """image_key split on commas (None when unset)."""
        if self.image_key is None:
            return None
        keys = [k.strip() for k in self.image_key.split(",") if k.strip()]
        if not keys:
            raise ValueError(f"image_key={self.image_key!r} names no column")
        return keys
