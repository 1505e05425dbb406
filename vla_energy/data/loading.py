"""Loading any supported source into the standard frame table.

Standard frame columns: image (datasets.Image), instruction (str), action (list[float], Da), optional
state (list[float]), episode_index (int), frame_index (int).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk

from vla_energy.checks import means_local_path, missing_path
from vla_energy.data.arguments import DataConfig
from vla_energy.data.cameras import camera_column, with_cameras
from vla_energy.data.columns import require_columns
from vla_energy.data.hub import download_dataset, looks_like_repo_id
from vla_energy.data.lerobot import (
    is_lerobot_dataset,
    lerobot_image_features,
    load_lerobot_v3,
    read_lerobot_info,
)
from vla_energy.data.synthetic import make_synthetic_dataset
from vla_energy.data.video import is_video_frame_feature

__all__ = ["FRAME_COLUMNS", "load_frames", "load_source", "resolve_dataset", "standardize_frames", "detect_format",
           "check_dataset", "image_columns"]

FRAME_COLUMNS = ("image", "instruction", "action", "state", "episode_index", "frame_index")

_HF_DEFAULTS = {"image_key": "image", "instruction_key": "instruction", "state_key": None}
_LEROBOT_STATE = "observation.state"


def detect_format(dataset: str) -> str:
    """'synthetic', 'lerobot' (a directory with meta/info.json) or 'hf' (anything else); a directory laid out like
    a LeRobot dataset without its meta/info.json is an error."""
    if dataset == "synthetic":
        return "synthetic"
    if is_lerobot_dataset(dataset):
        return "lerobot"
    path = Path(dataset)
    if path.is_dir() and ((path / "meta").is_dir() or any(path.glob("data/chunk-*"))):
        raise FileNotFoundError(
            f"dataset={dataset!r} is laid out like a LeRobot dataset (meta/ or data/chunk-*/) but "
            f"{(path / 'meta' / 'info.json').absolute()} does not exist: a LeRobot v3.0 dataset describes its "
            "features there; copy the whole dataset (or pass dataset_format hf for plain parquet files)"
        )
    return "hf"


def _pick_split(obj, split: str, source: str) -> Dataset:
    if isinstance(obj, DatasetDict):
        if split not in obj:
            raise ValueError(f"{source} has splits {list(obj)}, dataset_split={split!r} is not one of them")
        return obj[split]
    return obj


def _local_parquet(dataset: str) -> Optional[list[str]]:
    """The parquet files of a local hf-format source (None for a save_to_disk directory or a hub name); a
    directory with neither is an error."""
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return None
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"dataset={dataset!r} is a file but not a .parquet file")
        return [str(path)]
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*.parquet"))
        if not files:
            raise ValueError(
                f"dataset={dataset!r} is a directory without a saved dataset (dataset_info.json), LeRobot "
                "metadata (meta/info.json) or parquet files"
            )
        return files
    return None


def _load_hf(dataset: str, split: str) -> Dataset:
    """save_to_disk directory, parquet file(s) or directory of parquet files, else a hub name."""
    path = Path(dataset)
    files = _local_parquet(dataset)
    if files is not None:
        try:
            return Dataset.from_parquet(files if len(files) > 1 else files[0])
        except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
            # Files of different tables (e.g. a dataset's metadata beside its frames) do not share one schema.
            raise ValueError(
                f"dataset={dataset!r}: its {len(files)} parquet file(s) do not form one table ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300]}); point dataset at the directory or file of the frames alone"
            ) from None
    if path.is_dir():
        return _pick_split(load_from_disk(str(path)), split, dataset)
    try:
        return _pick_split(load_dataset(dataset, split=split), split, dataset)
    except Exception as e:  # the hub's own errors are long; say what was tried, and where
        raise ValueError(
            f"dataset={dataset!r}: {missing_path(dataset)}, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
        ) from None


def resolve_dataset(cfg: DataConfig) -> tuple[str, str]:
    """(format, location): a hub repo id is downloaded (or found in the hub cache) unless dataset_format='hf',
    where `datasets.load_dataset` reads it by name."""
    if cfg.dataset == "synthetic" and cfg.dataset_format in ("auto", "hf"):
        return "synthetic", cfg.dataset
    location = cfg.dataset
    exists = Path(location).expanduser().exists()
    local_only = means_local_path(location) or (cfg.dataset_format == "auto" and "/" not in location)
    if not exists and local_only:  # a hub dataset is named org/name
        raise FileNotFoundError(f"dataset={location!r}: {missing_path(location)}")
    if exists:
        location = str(Path(location).expanduser())
    elif cfg.dataset_format != "hf" and looks_like_repo_id(cfg.dataset):
        try:
            location = str(download_dataset(cfg.dataset, cfg.dataset_revision))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"dataset={location!r}: {missing_path(location)}; as a hub dataset repo: {e}") from None
    fmt = detect_format(location) if cfg.dataset_format == "auto" else cfg.dataset_format
    return fmt, location


def check_dataset(cfg: DataConfig) -> None:
    """A clear error, without reading its frames, when cfg.dataset is not there or not a dataset (a hub id is
    downloaded into the hub cache once, so that training processes find it there)."""
    fmt, location = resolve_dataset(cfg)
    if fmt == "lerobot":
        read_lerobot_info(location)
    elif fmt == "hf":
        _local_parquet(location)


def image_columns(cfg: DataConfig) -> list[str]:
    """The source's image column(s) the pipeline reads, in camera order: image_key, else the format's default
    (every image/video feature of a LeRobot dataset, `image` otherwise)."""
    if cfg.image_keys:
        return cfg.image_keys
    fmt, location = resolve_dataset(cfg)
    if fmt == "lerobot":
        return list(lerobot_image_features(read_lerobot_info(location)))
    return [_HF_DEFAULTS["image_key"]]


def load_source(cfg: DataConfig, progress: bool = False) -> tuple[Dataset, dict[str, Optional[str]]]:
    """The source's raw table and the column defaults of its format."""
    fmt, location = resolve_dataset(cfg)
    if fmt == "synthetic":
        ds = make_synthetic_dataset(cfg.num_episodes, cfg.image_size, cfg.num_targets, cfg.min_episode_length,
                                    cfg.max_episode_length, cfg.data_seed, cfg.synthetic_view, cfg.cache_dir,
                                    state=cfg.synthetic_state, progress=progress,
                                    modes=cfg.synthetic_modes)
        return ds, {"image_key": "image", "instruction_key": "instruction", "state_key": "state"}
    if fmt == "lerobot":
        info = read_lerobot_info(location)
        visual = list(lerobot_image_features(info))
        ds = load_lerobot_v3(location, cfg.image_keys or visual, progress=progress, decode_video=cfg.decode_video)
        state = _LEROBOT_STATE if _LEROBOT_STATE in ds.column_names else None
        return ds, {"image_key": ",".join(visual) or None, "instruction_key": "task", "state_key": state}
    return _load_hf(location, cfg.dataset_split), dict(_HF_DEFAULTS)


def _check_image_feature(ds: Dataset, column: str) -> Dataset:
    """Cast {bytes, path} structs to Image; keep video frame references; anything else is an error."""
    feature = ds.features[column]
    if isinstance(feature, Image) or is_video_frame_feature(feature):
        return ds
    if isinstance(feature, getattr(datasets, "Video", ())):  # datasets >= 3
        raise ValueError(
            f"image_key {column!r} is a datasets.Video column (a clip per row), expected one image per frame row: "
            "decode the clips into an Image column first, or use a LeRobot v3 directory (its video features "
            "are decoded by the loader when PyAV is installed)"
        )
    if isinstance(feature, dict) and set(feature) >= {"bytes", "path"}:
        return ds.cast_column(column, Image())
    raise ValueError(f"image_key {column!r} has feature {feature}, expected datasets.Image or a {{bytes, path}} struct")


def standardize_frames(
    ds: Dataset,
    image_keys: list[str],
    instruction_key: str,
    action_key: str,
    state_key: Optional[str],
    episode_key: str,
    frame_key: str,
    source: str = "dataset",
    camera_layout: str = "separate",
) -> Dataset:
    """Select the configured columns and rename them to FRAME_COLUMNS.

    One image camera becomes the `image` column. Several cameras, or a video camera, become camera_0.. (in
    `image_keys` order) with a CameraTransform that builds `image` when a row is read (see cameras.py).
    """
    if len(set(image_keys)) != len(image_keys):
        raise ValueError(f"image_key names a column twice: {image_keys}")
    wanted = {f"image_key[{i}]" if len(image_keys) > 1 else "image_key": k for i, k in enumerate(image_keys)}
    wanted.update({"instruction_key": instruction_key, "action_key": action_key, "state_key": state_key,
                   "episode_key": episode_key, "frame_key": frame_key})
    require_columns(ds, wanted, source)
    for key in image_keys:
        ds = _check_image_feature(ds, key)
    instr = ds.features[instruction_key]
    if getattr(instr, "dtype", None) not in ("string", "large_string"):
        raise ValueError(f"instruction_key {instruction_key!r} has feature {instr}, expected a string column")
    keep = list(dict.fromkeys([*image_keys, instruction_key, action_key, episode_key, frame_key]
                              + ([state_key] if state_key else [])))
    ds = ds.select_columns(keep)
    single_image = len(image_keys) == 1 and isinstance(ds.features[image_keys[0]], Image)
    cameras = {"image": image_keys[0]} if single_image else {camera_column(i): k for i, k in enumerate(image_keys)}
    # Rename through temporary names: a camera may be called like another column's standard name.
    renames = {**{v: k for k, v in cameras.items()}, instruction_key: "instruction", action_key: "action",
               episode_key: "episode_index", frame_key: "frame_index"}
    if state_key:
        renames[state_key] = "state"
    ds = ds.rename_columns({k: f"__vla_{v}" for k, v in renames.items()})
    ds = ds.rename_columns({f"__vla_{v}": v for v in renames.values()})
    ds = ds.select_columns([c for c in FRAME_COLUMNS if c in ds.column_names] + [c for c in cameras if c != "image"])
    return with_cameras(ds, camera_layout)


def load_frames(cfg: DataConfig, progress: bool = False) -> Dataset:
    """The standard frame table of `cfg.dataset` (synthetic, LeRobot v3 or any HF dataset)."""
    raw, defaults = load_source(cfg, progress=progress)
    image_keys = cfg.image_keys or (defaults["image_key"].split(",") if defaults["image_key"] else None)
    if not image_keys:
        raise ValueError(f"no image column: set image_key; available columns: {sorted(raw.column_names)}")
    state_key = None
    if cfg.use_state:
        state_key = cfg.state_key or defaults["state_key"]
        if state_key is None:
            raise ValueError(
                f"use_state=True but dataset {cfg.dataset!r} has no default state column: set state_key; "
                f"available columns: {sorted(raw.column_names)}"
            )
    return standardize_frames(
        raw,
        image_keys=image_keys,
        instruction_key=cfg.instruction_key or defaults["instruction_key"],
        action_key=cfg.action_key,
        state_key=state_key,
        episode_key=cfg.episode_key,
        frame_key=cfg.frame_key,
        source=f"dataset {cfg.dataset!r}",
        camera_layout=cfg.camera_layout,
    )
