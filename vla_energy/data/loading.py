"""Loading any supported source into the standard frame table.

Standard frame columns: image (datasets.Image), instruction (str), action (list[float], Da), optional
state (list[float]), episode_index (int), frame_index (int).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import datasets
from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk
from PIL import Image as PILImage

from vla_energy.data.arguments import DataConfig
from vla_energy.data.columns import require_columns
from vla_energy.data.lerobot import is_lerobot_dataset, load_lerobot_v3, read_lerobot_info
from vla_energy.data.synthetic import make_synthetic_dataset

__all__ = ["FRAME_COLUMNS", "load_frames", "load_source", "standardize_frames", "tile_images", "detect_format"]

FRAME_COLUMNS = ("image", "instruction", "action", "state", "episode_index", "frame_index")

_HF_DEFAULTS = {"image_key": "image", "instruction_key": "instruction", "state_key": None}
_LEROBOT_STATE = "observation.state"


def detect_format(dataset: str) -> str:
    """'synthetic', 'lerobot' (a directory with meta/info.json) or 'hf' (anything else)."""
    if dataset == "synthetic":
        return "synthetic"
    return "lerobot" if is_lerobot_dataset(dataset) else "hf"


def _pick_split(obj, split: str, source: str) -> Dataset:
    if isinstance(obj, DatasetDict):
        if split not in obj:
            raise ValueError(f"{source} has splits {list(obj)}, dataset_split={split!r} is not one of them")
        return obj[split]
    return obj


def _load_hf(dataset: str, split: str) -> Dataset:
    """save_to_disk directory, parquet file(s) or directory of parquet files, else a hub name."""
    path = Path(dataset)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        return _pick_split(load_from_disk(str(path)), split, dataset)
    if path.is_file() and path.suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*.parquet"))
        if not files:
            raise ValueError(
                f"dataset={dataset!r} is a directory without a saved dataset (dataset_info.json), LeRobot "
                "metadata (meta/info.json) or parquet files"
            )
        return Dataset.from_parquet(files)
    try:
        return _pick_split(load_dataset(dataset, split=split), split, dataset)
    except Exception as e:  # the hub's own errors are long; say first what was tried
        raise ValueError(
            f"dataset={dataset!r} is not a local path, and loading it as a hub dataset failed "
            f"({type(e).__name__}: {e}); offline, pass a local directory"
        ) from e


def load_source(cfg: DataConfig, progress: bool = False) -> tuple[Dataset, dict[str, Optional[str]]]:
    """The source's raw table and the column defaults of its format."""
    fmt = detect_format(cfg.dataset) if cfg.dataset_format == "auto" else cfg.dataset_format
    if cfg.dataset == "synthetic" and fmt in ("synthetic", "hf"):
        ds = make_synthetic_dataset(cfg.num_episodes, cfg.image_size, cfg.num_targets, cfg.min_episode_length,
                                    cfg.max_episode_length, cfg.data_seed, cfg.synthetic_view, cfg.cache_dir,
                                    progress=progress)
        return ds, {"image_key": "image", "instruction_key": "instruction", "state_key": "state"}
    if fmt == "lerobot":
        info = read_lerobot_info(cfg.dataset)
        ds = load_lerobot_v3(cfg.dataset, cfg.image_keys, progress=progress)
        visual = [k for k, f in info["features"].items() if f.get("dtype") in ("image", "video")]
        state = _LEROBOT_STATE if _LEROBOT_STATE in ds.column_names else None
        return ds, {"image_key": visual[0] if visual else None, "instruction_key": "task", "state_key": state}
    return _load_hf(cfg.dataset, cfg.dataset_split), dict(_HF_DEFAULTS)


def tile_images(images: list[PILImage.Image]) -> PILImage.Image:
    """Cameras side by side (each resized to the first one's height), one RGB image."""
    images = [im.convert("RGB") for im in images]
    h = images[0].height
    images = [im if im.height == h else im.resize((max(1, round(im.width * h / im.height)), h)) for im in images]
    out = PILImage.new("RGB", (sum(im.width for im in images), h))
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def _check_image_feature(ds: Dataset, column: str) -> Dataset:
    """Cast {bytes, path} structs to Image; video needs a decoder; anything else is an error."""
    feature = ds.features[column]
    if isinstance(feature, Image):
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
) -> Dataset:
    """Select the configured columns, rename them to FRAME_COLUMNS, tile several cameras into one image."""
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
    if len(image_keys) > 1:
        ds = ds.map(lambda batch: {"image": [tile_images(list(ims)) for ims in zip(*(batch[k] for k in image_keys))]},
                    batched=True, batch_size=64, remove_columns=image_keys, desc="tiling cameras")
        ds = ds.cast_column("image", Image())
        image_keys = ["image"]
    renames = {image_keys[0]: "image", instruction_key: "instruction", action_key: "action",
               episode_key: "episode_index", frame_key: "frame_index"}
    if state_key:
        renames[state_key] = "state"
    ds = ds.rename_columns({k: v for k, v in renames.items() if k != v})
    return ds.select_columns([c for c in FRAME_COLUMNS if c in ds.column_names])


def load_frames(cfg: DataConfig, progress: bool = False) -> Dataset:
    """The standard frame table of `cfg.dataset` (synthetic, LeRobot v3 or any HF dataset)."""
    raw, defaults = load_source(cfg, progress=progress)
    image_keys = cfg.image_keys or ([defaults["image_key"]] if defaults["image_key"] else None)
    if not image_keys:
        raise ValueError(f"no image column: set image_key; available columns: {sorted(raw.column_names)}")
    return standardize_frames(
        raw,
        image_keys=image_keys,
        instruction_key=cfg.instruction_key or defaults["instruction_key"],
        action_key=cfg.action_key,
        state_key=cfg.state_key if cfg.state_key is not None else defaults["state_key"],
        episode_key=cfg.episode_key,
        frame_key=cfg.frame_key,
        source=f"dataset {cfg.dataset!r}",
    )
