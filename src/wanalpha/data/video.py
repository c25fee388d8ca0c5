"""Video I/O with OpenCV: probing (decoded, not trusted from headers), reading and atomic writing.

Frames are numpy uint8 arrays in RGB order, (T, H, W, 3); alpha videos are (T, H, W) uint8 (0 = transparent).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
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


def write_image(path: Path, rgb: np.ndarray) -> None:
    """An RGB (H,W,3) or RGBA (H,W,4) uint8 image, its format from the suffix (PNG …): encoded in memory, then
    written atomically by Python, whose write errors (a full disk) are raised and leave no file."""
    from wanalpha.data.files import atomic_write_bytes

    code = cv2.COLOR_RGBA2BGRA if rgb.shape[-1] == 4 else cv2.COLOR_RGB2BGR
    ok, data = cv2.imencode(Path(path).suffix or ".png", cv2.cvtColor(np.ascontiguousarray(rgb), code))
    if not ok:
        raise VideoError(f"{path}: OpenCV cannot encode a {Path(path).suffix} image")
    atomic_write_bytes(Path(path), data.tobytes())


def count_frames(path: Path) -> int:
    """The frames a video decodes to (headers can lie, so every frame is grabbed)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoError(f"{path}: cannot be opened as a video")
        count = 0
        while cap.grab():
            count += 1
        return count
    finally:
        cap.release()


def _decodable_frames(path: Path) -> int:
    try:
        return count_frames(path)
    except VideoError:
        return 0


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
        # OpenCV's writer reports no errors (a full disk included): the file must decode whole before it is kept.
        if (found := _decodable_frames(tmp)) != len(frames):
            free = shutil.disk_usage(tmp.parent).free
            if free < 16 * 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise VideoError(
                f"{path}: the video writer wrote {found} of {len(frames)} decodable frames; check the "
                "disk and the output folder"
            )


# ------------------------------------------------------------------------------------ browser and alpha formats
# PyAV (FFmpeg) encoders: H.264 mp4s that play in browsers, and real alpha containers. Each format: container,
# codec, pixel format, options.
ALPHA_FORMATS = {
    # VP9 with alpha; cpu-used 4 encodes 2-7x faster than libvpx's default 0 for about 0.3 dB (docs/benchmarks.md);
    # lag-in-frames 0: libvpx's default (25) held the last 25 frames' encoding until the clip ended (a quarter of
    # the work after the last frame, generate's longest write), for the same bytes with the libvpx PyAV bundles
    # (measured with PyAV 18.1 and 19.0.2): with alpha it made no alt-ref frames, which are what the lag is for
    # (tests/test_outputs.py::test_webm_holds_no_frame_back_and_loses_nothing_by_it)
    "webm": (
        "webm",
        "libvpx-vp9",
        "yuva420p",
        {"crf": "18", "b": "0", "row-mt": "1", "cpu-used": "4", "lag-in-frames": "0"},
    ),
    "mov": ("mov", "prores_ks", "yuva444p10le", {"profile": "4", "alpha_bits": "16"}),  # ProRes 4444
    "webp": ("webp", "libwebp_anim", "yuva420p", {"loop": "0", "quality": "90"}),  # animated WebP
    "apng": ("apng", "apng", "rgba", {"plays": "0"}),  # animated PNG
}


# Encoders given FFmpeg's frame threads (each frame encoded by a thread of its own) instead of PyAV's slice threads:
# the same packets (ProRes codes each frame alone; tests/test_outputs.py), and the 81 × 480 × 832 ProRes 4444 of a
# generate run encodes in 1.96 s instead of 2.44 s on 2 cores (benchmarks/encoders.py, docs/benchmarks.md): the MOV
# is among the writers that end generate's write stage.
FRAME_THREADED = {"prores_ks"}


def _rate(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


class VideoEncoder:
    """One video file written as its frames arrive (PyAV): write() takes chunks of (t,H,W,C) uint8 frames (or
    (t,H,W) grey ones for an RGB stream: repeated into 3 channels), close() flushes the encoder and renames the
    finished file into place, abort() removes it; until close() the file exists only under a temporary name beside
    it. Not thread-safe: one thread feeds one encoder."""

    def __init__(
        self, path: Path, fps: float, container: str, codec: str, pix_fmt: str, options: dict, frame_format: str
    ) -> None:
        import av

        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._out = av.open(str(tmp), "w", format=container)
            self._stream = self._out.add_stream(codec, rate=_rate(fps), options=options)
            if codec in FRAME_THREADED:
                self._stream.codec_context.thread_type = "FRAME"
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._pix_fmt, self._frame_format, self._sized, self._open = pix_fmt, frame_format, False, True

    def write(self, frames: np.ndarray) -> None:
        import av

        frames = np.asarray(frames)
        if self._frame_format == "rgb24" and frames.ndim == 3:
            frames = np.repeat(frames[..., None], 3, axis=-1)
        if not self._sized:  # the stream takes its size from the first frames
            self._stream.height, self._stream.width = frames.shape[1:3]
            self._stream.pix_fmt = self._pix_fmt
            self._sized = True
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=self._frame_format)
            for packet in self._stream.encode(picture):
                self._out.mux(packet)

    def close(self) -> Path:
        """Flush and put the finished file in place; on any error the temporary file is removed."""
        if not self._open:
            return self.path
        self._open = False
        try:
            if not self._sized:
                raise VideoError(f"{self.path}: no frames to write")
            for packet in self._stream.encode():
                self._out.mux(packet)
            self._out.close()
        except BaseException:
            with contextlib.suppress(Exception):  # a failed flush can fail the trailer too: remove the file anyway
                self._out.close()
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop the file: close the container and remove the temporary file."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(Exception):
            self._out.close()
        with contextlib.suppress(VideoError):
            self._atomic.__exit__(VideoError, VideoError("aborted"), None)


def h264_encoder(path: Path, fps: float, crf: int = 18) -> VideoEncoder:
    """An H.264 (yuv420p) mp4 that plays in browsers, for (t,H,W,3) RGB or (t,H,W) grey uint8 chunks."""
    options = {"crf": str(crf), "preset": "medium", "movflags": "+faststart"}
    return VideoEncoder(path, fps, "mp4", "libx264", "yuv420p", options, "rgb24")


def rgba_encoder(path: Path, fps: float, fmt: str) -> VideoEncoder:
    """A video with a real alpha channel (fmt in ALPHA_FORMATS), for (t,H,W,4) straight-alpha RGBA uint8 chunks."""
    container, codec, pix_fmt, options = ALPHA_FORMATS[fmt]
    return VideoEncoder(path, fps, container, codec, pix_fmt, options, "rgba")


def _encode_all(encoder: VideoEncoder, frames: np.ndarray) -> None:
    try:
        encoder.write(frames)
    except BaseException:
        encoder.abort()
        raise
    encoder.close()


def write_h264(path: Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """(T,H,W,3) RGB or (T,H,W) grey uint8 → an H.264 (yuv420p) mp4 that plays in browsers, atomically."""
    _encode_all(h264_encoder(path, fps, crf), frames)


def rgba_frames(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight RGB (T,H,W,3) + alpha (T,H,W) → (T,H,W,4) RGBA, what rgba_encoder takes."""
    return np.concatenate([rgb, alpha[..., None]], axis=-1)


def write_rgba_video(path: Path, rgb: np.ndarray, alpha: np.ndarray, fps: float, fmt: str) -> None:
    """Straight RGB (T,H,W,3) + alpha (T,H,W) uint8 → a video with a real alpha channel (fmt in ALPHA_FORMATS)."""
    _encode_all(rgba_encoder(path, fps, fmt), rgba_frames(rgb, alpha))


def read_rgba_video(path: Path) -> np.ndarray:
    """All frames of an alpha video as (T,H,W,4) uint8 RGBA. VP9 goes through the libvpx-vp9 decoder: FFmpeg's
    native vp9 decoder drops the alpha plane."""
    import av

    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.codec_context.name == "vp9":
            decoder = av.CodecContext.create("libvpx-vp9", "r")
            for packet in container.demux(stream):
                if packet.size:
                    frames += [f.to_ndarray(format="rgba") for f in decoder.decode(packet)]
            frames += [f.to_ndarray(format="rgba") for f in decoder.decode(None)]
        else:
            frames = [f.to_ndarray(format="rgba") for f in container.decode(stream)]
    if not frames:
        raise VideoError(f"{path}: no decodable frames")
    return np.stack(frames)
