"""Column checks and batched reads of numeric columns (no image decoding)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import numpy as np
from datasets import Dataset
from tqdm.auto import tqdm

__all__ = ["require_columns", "read_column", "read_vectors", "iter_vector_batches", "READ_BATCH_SIZE"]

READ_BATCH_SIZE = 8192


def require_columns(ds: Dataset, wanted: dict[str, Optional[str]], source: str = "dataset") -> None:
    """Raise a ValueError naming every missing column (by option name) and listing the available ones."""
    missing = {opt: col for opt, col in wanted.items() if col is not None and col not in ds.column_names}
    if missing:
        named = ", ".join(f"{opt}={col!r}" for opt, col in missing.items())
        raise ValueError(
            f"{source} has no column for {named}; available columns: {sorted(ds.column_names)}. "
            "Set the column names in DataConfig (e.g. --image_key, --instruction_key, --action_key)."
        )


def iter_vector_batches(
    ds: Dataset, column: str, batch_size: int = READ_BATCH_SIZE, progress: bool = False, desc: Optional[str] = None
) -> Iterable[np.ndarray]:
    """Batches [n, D] float64 of a fixed-length numeric list column, read without touching other columns."""
    view = ds.select_columns([column]).with_format("numpy")
    width = None
    bar = tqdm(total=len(ds), desc=desc or f"reading {column}", disable=not progress, unit="rows", leave=False)
    with bar:
        for start, batch in enumerate(view.iter(batch_size=batch_size)):
            values = batch[column]
            arr = _as_2d(values, column, start * batch_size)
            if width is None:
                width = arr.shape[1]
            elif arr.shape[1] != width:
                raise ValueError(f"column {column!r} has vectors of length {width} and {arr.shape[1]}, expected one Da")
            bar.update(len(arr))
            yield arr


def _as_2d(values, column: str, offset: int) -> np.ndarray:
    """A batch of a list column as a float64 [n, D] array, or a ValueError saying what is wrong with it."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        arr = values
    else:
        rows = list(values)
        lengths = {len(np.atleast_1d(r)) for r in rows}
        if len(lengths) > 1:
            raise ValueError(
                f"column {column!r} has vectors of lengths {sorted(lengths)} (rows from {offset}), expected one Da"
            )
        arr = np.stack([np.atleast_1d(np.asarray(r)) for r in rows]) if rows else np.zeros((0, 0))
    if arr.ndim == 1:
        arr = arr[:, None]  # a scalar per frame is a 1-D action
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(
            f"column {column!r} has values of shape {arr.shape[1:]} and dtype {arr.dtype}, "
            "expected one numeric vector (Da,) per row"
        )
    return arr.astype(np.float64)


def read_vectors(ds: Dataset, column: str, progress: bool = False) -> np.ndarray:
    """A fixed-length numeric list column as [N, D] float64."""
    parts = list(iter_vector_batches(ds, column, progress=progress))
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def read_column(ds: Dataset, column: str, progress: bool = False) -> np.ndarray:
    """A scalar integer column as int64 [N]."""
    view = ds.select_columns([column]).with_format("numpy")
    parts = []
    bar = tqdm(total=len(ds), desc=f"reading {column}", disable=not progress, unit="rows", leave=False)
    with bar:
        for batch in view.iter(batch_size=READ_BATCH_SIZE):
            arr = np.asarray(batch[column])
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
                raise ValueError(
                    f"column {column!r} has values of shape {arr.shape[1:]} and dtype {arr.dtype}, "
                    "expected one integer per row"
                )
            if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
                raise ValueError(f"column {column!r} has non-integer values, expected integer indices")
            parts.append(arr.astype(np.int64))
            bar.update(len(arr))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
