"""Small LeRobot v3.0 datasets written offline (image or mp4 cameras), and a hub cache that holds one."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

__all__ = ["TASKS", "frame_rgb", "write_lerobot_v3", "write_hub_cache"]

TASKS = ("pick up the cube", "open the drawer")


def frame_rgb(e: int, f: int, size: int = 16, camera: int = 0) -> np.ndarray:
    """The frame of episode `e`, frame `f`, camera `camera`: flat colour (40e, 10f, 60*camera) mod 256."""
    img = np.zeros((size, size, 3), np.uint8)
    img[..., 0] = (40 * e) % 256
    img[..., 1] = (10 * f) % 256
    img[..., 2] = 60 * camera
    return img


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_lerobot_v3(root: Union[str, Path], lengths: Sequence[int] = (4, 3, 5), video: bool = False, fps: int = 10,
                     cameras: Sequence[str] = ("top",), size: int = 16,
                     frame: Callable[..., np.ndarray] = frame_rgb) -> Path:
    """A LeRobot v3.0 dataset: `observation.images.<camera>` (PNG images, or mp4 when `video`), a 2-D
    observation.state [f, -f], a 3-D action [e, f, e*f], tasks TASKS[e % 2]; episodes concatenated in one file.
    `frame(e, f, size, camera)` draws the pictures."""
    root = Path(root)
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    keys = [f"observation.images.{c}" for c in cameras]
    features = {k: {"dtype": "video" if video else "image", "shape": [size, size, 3],
                    "names": ["height", "width", "channel"]} for k in keys}
    features.update({
        "observation.state": {"dtype": "float32", "shape": [2], "names": None},
        "action": {"dtype": "float32", "shape": [3], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    })
    info = {
        "codebase_version": "v3.0", "robot_type": "fake", "fps": fps, "total_episodes": len(lengths),
        "total_frames": int(sum(lengths)), "total_tasks": 2, "chunks_size": 1000,
        "splits": {"train": f"0:{len(lengths)}"},
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4" if video else None,
        "features": features,
    }
    (root / "meta" / "info.json").write_text(json.dumps(info, indent=2))
    pd.DataFrame({"task_index": [0, 1]}, index=pd.Index(list(TASKS), name="task")).to_parquet(
        root / "meta" / "tasks.parquet")
    rows: dict[str, list] = {k: [] for k in ["action", "observation.state", "timestamp", "frame_index",
                                             "episode_index", "index", "task_index"]}
    for e, n in enumerate(lengths):
        for f in range(n):
            rows["action"].append([float(e), float(f), float(e * f)])
            rows["observation.state"].append([float(f), -float(f)])
            rows["timestamp"].append(f / fps)
            rows["frame_index"].append(f)
            rows["episode_index"].append(e)
            rows["index"].append(len(rows["index"]))
            rows["task_index"].append(e % 2)
    if not video:
        for c, key in enumerate(keys):
            rows[key] = [{"bytes": _png(frame(e, f, size, c)), "path": None}
                         for e, n in enumerate(lengths) for f in range(n)]
    pq.write_table(pa.table(rows), root / "data" / "chunk-000" / "file-000.parquet")
    if video:
        _write_videos(root, keys, lengths, fps, size, frame)
    return root


def _write_videos(root: Path, keys: Sequence[str], lengths: Sequence[int], fps: int, size: int,
                  frame: Callable[..., np.ndarray]) -> None:
    """One lossless mp4 per camera holding all episodes, and meta/episodes with each episode's from_timestamp."""
    import av

    starts = np.cumsum([0, *lengths[:-1]]) / fps
    meta: dict[str, list] = {"episode_index": list(range(len(lengths))), "length": list(lengths)}
    for c, key in enumerate(keys):
        path = root / "videos" / key / "chunk-000" / "file-000.mp4"
        path.parent.mkdir(parents=True)
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264rgb", rate=fps, options={"crf": "0"})
            stream.width = stream.height = size
            stream.pix_fmt = "rgb24"
            for e, n in enumerate(lengths):
                for f in range(n):
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame(e, f, size, c), format="rgb24")):
                        out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        meta[f"videos/{key}/chunk_index"] = [0] * len(lengths)
        meta[f"videos/{key}/file_index"] = [0] * len(lengths)
        meta[f"videos/{key}/from_timestamp"] = starts.tolist()
        meta[f"videos/{key}/to_timestamp"] = (starts + np.asarray(lengths) / fps).tolist()
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    pd.DataFrame(meta).to_parquet(root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")


def write_hub_cache(cache: Union[str, Path], repo_id: str, source: Union[str, Path],
                    commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay `source` out as huggingface_hub caches dataset `repo_id` (datasets--org--name/snapshots/<commit>,
    refs/main = commit); returns the snapshot directory."""
    repo = Path(cache) / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
