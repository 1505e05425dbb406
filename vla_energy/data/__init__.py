"""Data pipeline: loading (LeRobot v3, HF datasets, synthetic), action chunks, normalization, collation."""

from vla_energy.data.arguments import DATASET_FORMATS, NORMALIZATIONS, DataConfig
from vla_energy.data.cameras import CAMERA_LAYOUTS, CameraTransform, tile_images, with_cameras
from vla_energy.data.chunking import add_action_chunks, chunk_indices
from vla_energy.data.collator import VLACollator, to_pil_image
from vla_energy.data.hub import download_dataset
from vla_energy.data.lerobot import is_lerobot_dataset, load_lerobot_v3, read_lerobot_info, read_lerobot_tasks
from vla_energy.data.loading import FRAME_COLUMNS, load_frames, standardize_frames
from vla_energy.data.normalization import NORM_STATS_NAME, NormStats, compute_norm_stats
from vla_energy.data.pipeline import build_datasets
from vla_energy.data.split import split_episodes, split_rows
from vla_energy.data.synthetic import (
    SYNTHETIC_ACTION_NAMES,
    default_cache_dir,
    make_synthetic_dataset,
    render_scene,
)
from vla_energy.data.video import video_decoder_available

__all__ = [
    "DataConfig",
    "DATASET_FORMATS",
    "NORMALIZATIONS",
    "build_datasets",
    "load_frames",
    "standardize_frames",
    "tile_images",
    "CAMERA_LAYOUTS",
    "CameraTransform",
    "with_cameras",
    "download_dataset",
    "FRAME_COLUMNS",
    "load_lerobot_v3",
    "is_lerobot_dataset",
    "read_lerobot_info",
    "read_lerobot_tasks",
    "chunk_indices",
    "add_action_chunks",
    "NormStats",
    "NORM_STATS_NAME",
    "compute_norm_stats",
    "split_episodes",
    "split_rows",
    "make_synthetic_dataset",
    "render_scene",
    "default_cache_dir",
    "SYNTHETIC_ACTION_NAMES",
    "VLACollator",
    "to_pil_image",
    "video_decoder_available",
]
