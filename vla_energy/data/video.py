"""Decoding frames of video-backed image features with PyAV (an optional dependency)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Value

__all__ = ["VIDEO_FRAME", "is_video_frame_feature", "video_decoder_available", "require_video_decoder",
           "decode_video_frames", "decode_frame_refs"]

# A frame of a video feature, by reference: decoded when the row is read (see cameras.CameraTransform).
VIDEO_FRAME = {"video_path": Value("string"), "timestamp": Value("float64"), "tolerance_s": Value("float32")}


def is_video_frame_feature(feature: object) -> bool:
    """True for a column of VIDEO_FRAME structs."""
    return isinstance(feature, dict) and set(feature) == set(VIDEO_FRAME)


def video_decoder_available() -> bool:
    """True when PyAV (`import av`) is installed."""
    return importlib.util.find_spec("av") is not None


def require_video_decoder(feature: str) -> None:
    """Raise an ImportError naming the video feature and what to install, unless a decoder is installed."""
    if not video_decoder_available():
        raise ImportError(
            f"image feature {feature!r} is stored as video (dtype 'video' in meta/info.json) and no video decoder "
            "is installed: `pip install av` (PyAV) to decode it, or choose an image feature with --image_key"
        )


def decode_video_frames(path: str | Path, timestamps: Sequence[float], tolerance_s: float) -> list[np.ndarray]:
    """RGB uint8 frames [H, W, 3] of the video at `path` nearest to each timestamp (seconds), in one pass.

    Raises a ValueError when the nearest decoded frame is more than `tolerance_s` away from a timestamp.
    """
    import av

    wanted = np.asarray(timestamps, dtype=np.float64)
    order = np.argsort(wanted, kind="stable")
    out: list[np.ndarray | None] = [None] * len(wanted)
    best = np.full(len(wanted), np.inf)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        start = float(wanted[order[0]]) - tolerance_s if len(wanted) else 0.0
        if start > 0:
            container.seek(int(start / stream.time_base), stream=stream, backward=True, any_frame=False)
        k = 0  # first not-yet-passed request in time order
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base)
            # Requests this frame could be the nearest for: those within tolerance of t.
            j = k
            rgb = None
            while j < len(order) and wanted[order[j]] <= t + tolerance_s:
                i = order[j]
                err = abs(t - wanted[i])
                if err < best[i]:
                    rgb = frame.to_ndarray(format="rgb24") if rgb is None else rgb
                    best[i], out[i] = err, rgb
                j += 1
            while k < len(order) and wanted[order[k]] < t - tolerance_s:
                k += 1
            if k == len(order):
                break
    missing = [float(wanted[i]) for i in range(len(wanted)) if best[i] > tolerance_s]
    if missing:
        raise ValueError(
            f"{path}: no frame within {tolerance_s:.4f}s of timestamps {missing[:5]} (of {len(missing)} missing)"
        )
    return [o for o in out if o is not None]


def decode_frame_refs(refs: Sequence[dict], max_gap_s: float = 1.0) -> list[np.ndarray]:
    """RGB uint8 frames of VIDEO_FRAME structs, in order.

    Frames of one file closer than `max_gap_s` share one seek + decoding pass; farther ones get their own
    seek, so a batch of random rows never decodes the long stretches of video between them.
    """
    out: list[np.ndarray | None] = [None] * len(refs)
    by_file: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_file.setdefault(ref["video_path"], []).append(i)
    for path, idx in by_file.items():
        idx = sorted(idx, key=lambda i: refs[i]["timestamp"])
        groups = [[idx[0]]]
        for prev, i in zip(idx, idx[1:]):
            if refs[i]["timestamp"] - refs[prev]["timestamp"] > max_gap_s:
                groups.append([])
            groups[-1].append(i)
        for group in groups:
            tolerance = max(float(refs[i]["tolerance_s"]) for i in group)
            for i, rgb in zip(group, decode_video_frames(path, [refs[i]["timestamp"] for i in group], tolerance)):
                out[i] = rgb
    return out  # type: ignore[return-value]
