"""Reading a local LeRobot v3.0 dataset directory into a `datasets` frame table.

Layout: meta/info.json (features, fps, paths), meta/tasks.parquet (task string -> task_index),
data/chunk-*/file-*.parquet (frames; image features as {bytes, path} structs), and for video features
meta/episodes/chunk-*/file-*.parquet + videos/<feature>/chunk-*/file-*.mp4.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from datasets import Dataset, Features, Image, concatenate_datasets
from PIL import Image as PILImage
from tqdm.auto import tqdm

from vla_energy.data.columns import read_column
from vla_energy.data.video import VIDEO_FRAME, decode_video_frames, require_video_decoder

__all__ = ["is_lerobot_dataset", "read_lerobot_info", "lerobot_image_features", "read_lerobot_tasks",
           "load_lerobot_v3"]

_DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def is_lerobot_dataset(path: str | Path) -> bool:
    """A directory with meta/info.json."""
    return (Path(path) / "meta" / "info.json").is_file()


def read_lerobot_info(root: str | Path) -> dict:
    """meta/info.json, checked to be a v3.x dataset with features."""
    root = Path(root)
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a LeRobot dataset: {path} does not exist")
    info = json.loads(path.read_text())
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3"):
        raise ValueError(
            f"{path}: codebase_version={version!r}, expected v3.x; convert older datasets with LeRobot's "
            "convert_dataset_v21_to_v30 script first"
        )
    if not isinstance(info.get("features"), dict):
        raise ValueError(f"{path} has no 'features' mapping")
    return info


def lerobot_image_features(info: dict) -> dict[str, str]:
    """Image-like features in declaration order: name -> 'image' | 'video'."""
    return {k: f["dtype"] for k, f in info["features"].items() if f.get("dtype") in ("image", "video")}


def read_lerobot_tasks(root: str | Path) -> dict[int, str]:
    """task_index -> task string from meta/tasks.parquet (task strings are its index, as LeRobot writes it)."""
    path = Path(root) / "meta" / "tasks.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: LeRobot v3 keeps the task strings there")
    df = pd.read_parquet(path)
    if "task_index" not in df.columns:
        raise ValueError(f"{path} has columns {list(df.columns)}, expected a 'task_index' column")
    tasks = df["task"] if "task" in df.columns else pd.Series(df.index, index=df.index)
    return {int(i): str(t) for i, t in zip(df["task_index"], tasks)}


def _episode_video_meta(root: Path, key: str) -> pd.DataFrame:
    """Per episode: chunk_index, file_index, from_timestamp of one video feature (meta/episodes/*)."""
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'meta' / 'episodes'} has no chunk-*/file-*.parquet: cannot locate videos")
    cols = ["episode_index"] + [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp")]
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"episode metadata has no columns {missing}; available: {sorted(df.columns)}")
    return df[cols].set_index("episode_index")


def _video_frame_locations(ds: Dataset, root: Path, info: dict, key: str) -> tuple[list[str], np.ndarray, float]:
    """Per row: the mp4 holding its frame of video feature `key`, the frame's time in that file, the tolerance."""
    fps = float(info.get("fps") or 0)
    if fps <= 0:
        raise ValueError(f"meta/info.json has fps={info.get('fps')!r}, needed to locate video frames")
    meta = _episode_video_meta(root, key)
    episodes = read_column(ds, "episode_index")
    if "timestamp" in ds.column_names:
        t_in_episode = np.asarray(ds.select_columns(["timestamp"]).with_format("numpy")[:]["timestamp"], np.float64)
    else:
        t_in_episode = read_column(ds, "frame_index") / fps
    unknown = sorted(set(episodes.tolist()) - set(meta.index.tolist()))
    if unknown:
        raise ValueError(f"episodes {unknown[:5]} have no video metadata for {key!r}")
    rows = meta.loc[episodes]
    template = info.get("video_path") or _DEFAULT_VIDEO_PATH
    names = {(int(c), int(f)): str(root / template.format(video_key=key, chunk_index=int(c), file_index=int(f)))
             for c, f in set(zip(rows[f"videos/{key}/chunk_index"], rows[f"videos/{key}/file_index"]))}
    files = [names[(int(c), int(f))] for c, f in zip(rows[f"videos/{key}/chunk_index"], rows[f"videos/{key}/file_index"])]
    missing = sorted({f for f in names.values() if not Path(f).is_file()})
    if missing:
        raise FileNotFoundError(f"video feature {key!r}: {missing[:3]} do not exist ({len(missing)} files missing)")
    times = rows[f"videos/{key}/from_timestamp"].to_numpy(np.float64) + t_in_episode
    return files, times, 0.5 / fps


def _video_frame_column(ds: Dataset, root: Path, info: dict, key: str) -> Dataset:
    """Add a column `key` of VIDEO_FRAME structs (file, time): decoded when a row is read (lazy_video_transform)."""
    files, times, tolerance = _video_frame_locations(ds, root, info, key)
    column = {"video_path": files, "timestamp": times.tolist(), "tolerance_s": [tolerance] * len(files)}
    refs = Dataset.from_dict({key: [dict(zip(column, v)) for v in zip(*column.values())]},
                             features=Features({key: VIDEO_FRAME}))
    return concatenate_datasets([ds, refs], axis=1)


def _decode_video_feature(ds: Dataset, root: Path, info: dict, key: str, progress: bool) -> Dataset:
    """Add an image column `key` holding the PNG-encoded video frame of each row (all decoded now, in memory)."""
    files, times, tolerance = _video_frame_locations(ds, root, info, key)
    images: list[Optional[dict]] = [None] * len(ds)
    by_file: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_file.setdefault(f, []).append(i)
    for f, idx in tqdm(by_file.items(), desc=f"decoding {key}", disable=not progress, leave=False):
        frames = decode_video_frames(f, times[idx], tolerance_s=tolerance)
        for i, rgb in zip(idx, frames):
            buf = io.BytesIO()
            PILImage.fromarray(rgb).save(buf, format="PNG")
            images[i] = {"bytes": buf.getvalue(), "path": None}
    return ds.add_column(key, images, feature=Image())


def load_lerobot_v3(root: str | Path, image_keys: Optional[list[str]] = None, progress: bool = False,
                    decode_video: str = "lazy") -> Dataset:
    """All frame columns of a LeRobot v3 dataset, image features as `datasets.Image`, a `task` string column.

    `image_keys` (default: every image/video feature, in meta/info.json order) are the camera features to keep usable; video
    features among them need PyAV (else an ImportError naming the feature and what to install). Each becomes
    a column of VIDEO_FRAME structs decoded when a row is read (`decode_video="lazy"`), or an Image column of
    every frame decoded now (`"eager"`: memory grows with the dataset).
    """
    if decode_video not in ("lazy", "eager"):
        raise ValueError(f"decode_video={decode_video!r}, expected 'lazy' or 'eager'")
    root = Path(root)
    info = read_lerobot_info(root)
    visual = lerobot_image_features(info)
    if image_keys is None:
        if not visual:
            raise ValueError(f"{root}/meta/info.json declares no image or video feature; features: {list(info['features'])}")
        image_keys = list(visual)
    for key in image_keys:
        if key not in visual:
            raise ValueError(f"image_key {key!r} is not an image/video feature of {root}; those are {list(visual)}")
        if visual[key] == "video":
            require_video_decoder(key)
    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    if not files:
        raise FileNotFoundError(f"{root / 'data'} has no chunk-*/file-*.parquet files")
    ds = Dataset.from_parquet([str(f) for f in files])
    for key, dtype in visual.items():
        if dtype == "image" and key in ds.column_names and not isinstance(ds.features[key], Image):
            ds = ds.cast_column(key, Image())
    for key in image_keys:
        if visual[key] == "video" and decode_video == "eager":
            ds = _decode_video_feature(ds, root, info, key, progress)
        elif visual[key] == "video":
            ds = _video_frame_column(ds, root, info, key)
    if "task_index" in ds.column_names and "task" not in ds.column_names:
        tasks = read_lerobot_tasks(root)
        task_index = read_column(ds, "task_index")
        unknown = sorted(set(task_index.tolist()) - set(tasks))
        if unknown:
            raise ValueError(f"task_index values {unknown[:5]} are not in meta/tasks.parquet")
        ds = ds.add_column("task", [tasks[int(i)] for i in task_index])
    return ds
