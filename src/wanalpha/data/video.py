"""Video I/O with OpenCV: probing (decoded, not trusted from headers), reading and atomic writing.

Frames are numpy uint8 arrays in RGB order, (T, H, W, 3); alpha videos are (T, H, W) uint8 (0 = transparent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wanalpha.data.files import atomic_path
from wanalpha.errors import WanAlphaError


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int
    max_channel_spread: int  # largest |R-G|, |G-B|, |R-B| over the sampled frames: 0 for a grey video


class VideoError(WanAlphaError):
    """A video that cannot be opened or decoded."""


def probe_video(path: Path, samples: int = 3) -> VideoInfo:
    """Decode the whole file (frame counts in headers can lie) and measure size, fps and greyness.

    Greyness is measured on `samples` frames spread over the clip.
    """
    path = Path(path)
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"{path}: cannot be opened as a video")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        header_count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        wanted = set(np.linspace(0, max(header_count - 1, 0), samples).round().astype(int).tolist())
        count, spread, width, height = 0, 0, 0, 0
        while cap.grab():
            if count in wanted or count == 0:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                height, width = frame.shape[:2]
                spread = max(spread, _channel_spread(frame))
            count += 1
        if count == 0 or width == 0:
            raise VideoError(f"{path}: no decodable frames")
        return VideoInfo(count, fps, width, height, spread)
    finally:
        cap.release()


def _channel_spread(frame_bgr: np.ndarray) -> int:
    f = frame_bgr.astype(np.int16)
    return int(
        max(
            np.abs(f[..., 0] - f[..., 1]).max(),
            np.abs(f[..., 1] - f[..., 2]).max(),
            np.abs(f[..., 0] - f[..., 2]).max(),
        )
    )


def read_video(path: Path) -> tuple[np.ndarray, float]:
    """All frames as (T, H, W, 3) uint8 RGB, and the fps."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"{path}: cannot be opened as a video")
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if not frames:
        raise VideoError(f"{path}: no decodable frames")
    return np.stack(frames), fps


def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    """Write (T, H, W, 3) RGB or (T, H, W) grey uint8 frames as an MPEG-4 file, atomically."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim not in (3, 4) or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty uint8 (T,H,W[,3]) array, got {frames.dtype} {frames.shape}")
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    height, width = frames.shape[1:3]
    with atomic_path(Path(path)) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
        if not writer.isOpened():
            raise VideoError(f"{path}: OpenCV cannot write MPEG-4 video here (no mp4v encoder)")
        try:
            for frame in frames:
                writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
        finally:
            writer.release()
