"""Writing a LeRobot v3.0 dataset directory episode by episode (PNG image cameras, state, action, task).

The layout is the one `load_lerobot_v3` reads: meta/info.json, meta/tasks.parquet, meta/episodes/chunk-000/
file-000.parquet (episode_index, length, tasks, row range) and data/chunk-000/file-NNN.parquet (frames, images as
{bytes, path} structs), a new data file every `episodes_per_file` episodes.

The dataset is written into a sibling directory `.<name>.partial` and renamed to its name when `close()` has written
the metadata: a directory under the dataset's name is always complete, and writing ended by an exception (or an
`abort()`) removes the partial directory.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image as PILImage

__all__ = ["LeRobotV3Writer", "png_bytes"]

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def png_bytes(rgb: np.ndarray) -> bytes:
    """An H x W x 3 uint8 array as PNG bytes (lossless: training sees exactly the rendered pixels)."""
    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class LeRobotV3Writer:
    """Appends episodes to a new LeRobot v3.0 directory; `close()` writes the metadata and puts the directory in
    place, `abort()` removes it (as a context manager: close on success, abort on an exception)."""

    def __init__(self, root: str | Path, cameras: Sequence[str], image_size: tuple[int, int], state_dim: int,
                 action_dim: int, fps: int = 10, robot_type: str = "unknown", episodes_per_file: int = 100) -> None:
        self.root = Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} exists and is not empty: choose a new dataset directory")
        if not cameras:
            raise ValueError("a LeRobot dataset for the training recipe needs at least one camera")
        self.cameras, self.image_size = list(cameras), (int(image_size[0]), int(image_size[1]))
        self.state_dim, self.action_dim, self.fps = int(state_dim), int(action_dim), int(fps)
        self.robot_type, self.episodes_per_file = robot_type, int(episodes_per_file)
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.frames = 0
        self._writer: Optional[pq.ParquetWriter] = None
        self._file_index = -1
        self.partial = self.root.parent / f".{self.root.name}.partial"
        if self.partial.exists():  # left by a writer that was killed: never a dataset (it was not renamed)
            shutil.rmtree(self.partial)
        (self.partial / "meta").mkdir(parents=True)
        (self.partial / "data" / "chunk-000").mkdir(parents=True)

    @property
    def keys(self) -> list[str]:
        return [f"observation.images.{c}" for c in self.cameras]

    def _schema(self) -> pa.Schema:
        fields = [pa.field(k, _IMAGE) for k in self.keys]
        fields += [pa.field("observation.state", pa.list_(pa.float32(), self.state_dim)),
                   pa.field("action", pa.list_(pa.float32(), self.action_dim)),
                   pa.field("timestamp", pa.float32()), pa.field("frame_index", pa.int64()),
                   pa.field("episode_index", pa.int64()), pa.field("index", pa.int64()),
                   pa.field("task_index", pa.int64())]
        return pa.schema(fields)

    def add_episode(self, images: Mapping[str, np.ndarray], state: np.ndarray, action: np.ndarray, task: str) -> int:
        """One episode: images {camera: [T, H, W, 3] uint8}, state [T, Ds], action [T, Da], its instruction;
        returns its episode_index."""
        self._check_open()
        state, action = np.asarray(state, np.float32), np.asarray(action, np.float32)
        length = len(action)
        if length == 0:
            raise ValueError("an episode needs at least one frame")
        if state.shape != (length, self.state_dim) or action.shape != (length, self.action_dim):
            raise ValueError(f"state {state.shape} / action {action.shape}, expected ({length}, {self.state_dim}) / "
                             f"({length}, {self.action_dim})")
        if sorted(images) != sorted(self.cameras):
            raise ValueError(f"images of cameras {sorted(images)}, expected {sorted(self.cameras)}")
        for cam, frames in images.items():
            if np.shape(frames) != (length, *self.image_size, 3):
                raise ValueError(f"camera {cam!r} frames have shape {np.shape(frames)}, expected "
                                 f"({length}, {self.image_size[0]}, {self.image_size[1]}, 3)")
        episode = len(self.episodes)
        if episode % self.episodes_per_file == 0:
            self._open_next_file()
        task_index = self.tasks.setdefault(task, len(self.tasks))
        columns: dict[str, list] = {
            key: [{"bytes": png_bytes(f), "path": None} for f in images[cam]] for key, cam in zip(self.keys, self.cameras)}
        columns.update({
            "observation.state": list(state), "action": list(action),
            "timestamp": (np.arange(length) / self.fps).astype(np.float32).tolist(),
            "frame_index": list(range(length)), "episode_index": [episode] * length,
            "index": list(range(self.frames, self.frames + length)), "task_index": [task_index] * length})
        self._writer.write_table(pa.table(columns, schema=self._schema()))
        self.episodes.append({"episode_index": episode, "length": length, "tasks": [task],
                              "data/chunk_index": 0, "data/file_index": self._file_index,
                              "dataset_from_index": self.frames, "dataset_to_index": self.frames + length})
        self.frames += length
        return episode

    def _open_next_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._file_index += 1
        path = self.partial / "data" / "chunk-000" / f"file-{self._file_index:03d}.parquet"
        self._writer = pq.ParquetWriter(path, self._schema())

    def add_meta_file(self, name: str, content: Mapping) -> None:
        """A JSON file meta/<name> of the dataset, put in place with it by `close()`."""
        self._check_open()
        (self.partial / "meta" / name).write_text(json.dumps(content, indent=2))

    def _check_open(self) -> None:
        if not self.partial.is_dir():
            raise RuntimeError(f"the writer of {self.root} was closed or aborted; write a dataset with a new writer")

    def abort(self) -> None:
        """Stop writing and remove the partial directory: nothing under the dataset's name is created."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        shutil.rmtree(self.partial, ignore_errors=True)

    def close(self) -> Path:
        """Finish the data file, write meta/info.json, meta/tasks.parquet and meta/episodes, and rename the partial
        directory to the dataset's name."""
        self._check_open()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        h, w = self.image_size
        features = {k: {"dtype": "image", "shape": [h, w, 3], "names": ["height", "width", "channel"]}
                    for k in self.keys}
        features.update({
            "observation.state": {"dtype": "float32", "shape": [self.state_dim], "names": None},
            "action": {"dtype": "float32", "shape": [self.action_dim], "names": None},
            **{k: {"dtype": dt, "shape": [1], "names": None} for k, dt in
               [("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"), ("index", "int64"),
                ("task_index", "int64")]}})
        info = {"codebase_version": "v3.0", "robot_type": self.robot_type, "fps": self.fps,
                "total_episodes": len(self.episodes), "total_frames": self.frames, "total_tasks": len(self.tasks),
                "chunks_size": 1000, "splits": {"train": f"0:{len(self.episodes)}"},
                "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet", "video_path": None,
                "features": features}
        meta = self.partial / "meta"
        pd.DataFrame({"task_index": list(self.tasks.values())},
                     index=pd.Index(list(self.tasks), name="task")).to_parquet(meta / "tasks.parquet")
        (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(self.episodes).to_parquet(meta / "episodes" / "chunk-000" / "file-000.parquet")
        (meta / "info.json").write_text(json.dumps(info, indent=2))
        if self.root.exists():
            self.root.rmdir()  # an empty directory (checked when the writer started)
        self.partial.rename(self.root)
        return self.root

    def __enter__(self) -> LeRobotV3Writer:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
