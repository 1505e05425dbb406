"""Cameras of a frame table: columns camera_0..camera_{n-1} (fixed order) become `image` when a row is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from datasets import Dataset
from PIL import Image as PILImage

from vla_energy.data.arguments import CAMERA_LAYOUTS
from vla_energy.data.collator import to_pil_image
from vla_energy.data.video import decode_frame_refs

__all__ = ["CAMERA_LAYOUTS", "camera_column", "camera_columns", "tile_images", "CameraTransform", "with_cameras"]


def camera_column(i: int) -> str:
    """Name of the i-th camera column of a frame table."""
    return f"camera_{i}"


def camera_columns(ds: Dataset) -> list[str]:
    """The frame table's camera columns, in camera order."""
    n = 0
    while camera_column(n) in ds.column_names:
        n += 1
    return [camera_column(i) for i in range(n)]


def tile_images(images: Sequence[PILImage.Image]) -> PILImage.Image:
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


@dataclass(frozen=True)
class CameraTransform:
    """A `datasets` transform: decode video frames by reference and put the cameras in `image`.

    `image` is one PIL image per row with one camera or layout "tile", else a list of PIL images in camera
    order. Runs when rows are read (in DataLoader workers), so no frame is decoded ahead of use.
    """

    columns: tuple[str, ...]
    layout: str = "separate"

    def _pil(self, values: list[Any]) -> list[PILImage.Image]:
        if values and isinstance(values[0], dict) and "video_path" in values[0]:
            return [PILImage.fromarray(rgb) for rgb in decode_frame_refs(values)]
        return [to_pil_image(v) for v in values]

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if not all(c in batch for c in self.columns):  # a read of other columns only (e.g. ds["actions"])
            return batch
        per_camera = [self._pil(batch.pop(c)) for c in self.columns]
        rows = list(zip(*per_camera))
        if len(self.columns) == 1:
            batch["image"] = [r[0] for r in rows]
        elif self.layout == "tile":
            batch["image"] = [tile_images(r) for r in rows]
        else:
            batch["image"] = [list(r) for r in rows]
        return batch


def with_cameras(ds: Dataset, layout: str, columns: Optional[list[str]] = None) -> Dataset:
    """`ds` with a CameraTransform over its camera columns (unchanged when it has none)."""
    if layout not in CAMERA_LAYOUTS:
        raise ValueError(f"camera_layout={layout!r}, expected one of {CAMERA_LAYOUTS}")
    columns = camera_columns(ds) if columns is None else columns
    if not columns:
        return ds
    return ds.with_transform(CameraTransform(tuple(columns), layout))
