"""RGBA training clips: `metadata.csv` + `NNN_rgb.mp4` / `NNN_alpha.mp4` → fixed-size uint8 frame stacks.

Frames stay uint8 until they reach the device (`to_model_space`), so the cached and uncached training paths compare
their losses against bit-identical targets. Each clip is resized to cover `height`×`width` and centre-cropped; it
takes `num_frames` frames (4n+1) every `frame_stride` source frames from the start; clips that are too short are
skipped with a reason, or looped with `loop_short_clips`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from wanalpha.errors import WanAlphaError

RGB_SUFFIX, ALPHA_SUFFIX = "_rgb.mp4", "_alpha.mp4"


@dataclass(frozen=True)
class ClipSpec:
    """How every clip is cut: output size, frame count and stride, and whether short clips loop."""

    height: int
    width: int
    num_frames: int
    frame_stride: int = 1
    loop_short_clips: bool = False

    def __post_init__(self) -> None:
        if (self.num_frames - 1) % 4:
            lo = 1 + 4 * ((self.num_frames - 1) // 4)
            raise WanAlphaError(f"num_frames must be 4n+1 (1, 5, 9, …, 81) for the Wan VAE; got {self.num_frames}: "
                                f"use {lo} or {lo + 4}")  # fmt: skip
        if self.height % 16 or self.width % 16:
            raise WanAlphaError(f"height and width must be multiples of 16; got {self.height}x{self.width}")

    @classmethod
    def from_config(cls, cfg) -> ClipSpec:
        """From a run config's clip options (height, width, num_frames, frame_stride, loop_short_clips)."""
        return cls(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)

    def frame_indices(self, available: int) -> list[int] | None:
        """Source frame indices to read, or None when the clip is too short and may not loop."""
        needed = (self.num_frames - 1) * self.frame_stride + 1
        if needed <= available:
            return list(range(0, needed, self.frame_stride))
        if not self.loop_short_clips or available < 1:
            return None
        return [(i * self.frame_stride) % available for i in range(self.num_frames)]


@dataclass(frozen=True)
class ClipFiles:
    name: str
    rgb: Path
    alpha: Path
    prompt: str = ""


def read_metadata(base: Path, metadata: Path | None = None) -> list[ClipFiles]:
    """The clips of a prepared dataset. `video` holds base names (`001` → 001_rgb.mp4 + 001_alpha.mp4)."""
    base = Path(base)
    metadata = Path(metadata) if metadata is not None else base / "metadata.csv"
    if not metadata.is_file():
        raise WanAlphaError(f"metadata file {metadata} does not exist; run `wanalpha prepare` or pass "
                            "--dataset_metadata_path")  # fmt: skip
    with metadata.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "video" not in (reader.fieldnames or []):
            raise WanAlphaError(f"{metadata}: no 'video' column (found: {', '.join(reader.fieldnames or [])})")
        rows = list(reader)
    clips = []
    for row in rows:
        name = row["video"].strip()
        for suffix in (RGB_SUFFIX, ".mp4"):
            name = name.removesuffix(suffix)
        clips.append(
            ClipFiles(name, base / f"{name}{RGB_SUFFIX}", base / f"{name}{ALPHA_SUFFIX}", row.get("prompt") or "")
        )
    if not clips:
        raise WanAlphaError(f"{metadata} lists no clips")
    return clips


def count_frames(path: Path) -> int:
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise WanAlphaError(f"{path}: cannot be opened as a video")
        count = 0
        while cap.grab():
            count += 1
        return count
    finally:
        cap.release()


def read_frames(path: Path, indices: list[int]) -> np.ndarray:
    """The frames at `indices` (any order, repeats allowed) as (N, H, W, 3) uint8 RGB, decoding only up to the last."""
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise WanAlphaError(f"{path}: cannot be opened as a video")
        for i in range(max(indices) + 1):
            if not cap.grab():
                break
            if i in wanted:
                ok, frame = cap.retrieve()
                if not ok:
                    break
                frames[i] = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    finally:
        cap.release()
    missing = wanted - set(frames)
    if missing:
        raise WanAlphaError(f"{path}: could not decode frame {min(missing)} (the file is shorter than it says)")
    return np.stack([frames[i] for i in indices])


def resize_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (N,H,W,C) so it covers height×width, keeping the aspect ratio, then centre-crop."""
    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    top, left = (new_h - height) // 2, (new_w - width) // 2
    out = [cv2.resize(f, (new_w, new_h), interpolation=interp)[top : top + height, left : left + width] for f in frames]
    return np.stack(out).reshape(len(frames), height, width, *frames.shape[3:])


def load_clip(clip: ClipFiles, spec: ClipSpec, available: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (T,H,W,3) uint8, alpha (T,H,W) uint8) cut to `spec`. Raises WanAlphaError for a clip that is too short."""
    available = available if available is not None else min(count_frames(clip.rgb), count_frames(clip.alpha))
    indices = spec.frame_indices(available)
    if indices is None:
        needed = (spec.num_frames - 1) * spec.frame_stride + 1
        raise WanAlphaError(f"{clip.name}: too short ({available} frames, needs {needed}; --loop_short_clips loops it)")
    rgb = resize_crop(read_frames(clip.rgb, indices), spec.height, spec.width)
    alpha_rgb = resize_crop(read_frames(clip.alpha, indices), spec.height, spec.width)
    # The alpha video is grey; codecs add a little chroma noise, so take the rounded channel mean.
    alpha = ((alpha_rgb.astype(np.uint16).sum(-1) + 1) // 3).astype(np.uint8)
    return rgb, alpha


def to_model_space(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B,T,H,W,3) and (B,T,H,W) → float32 rgb (B,3,T,H,W) and alpha (B,1,T,H,W) in [-1,1] (official
    ToTensor + Normalize(0.5, 0.5))."""
    rgb = (rgb.permute(0, 4, 1, 2, 3).float() / 255 - 0.5) / 0.5
    alpha = (alpha.unsqueeze(1).float() / 255 - 0.5) / 0.5
    return rgb, alpha


class RGBAClipDataset(torch.utils.data.Dataset):
    """Clips of a prepared dataset, checked up front: unusable ones are listed in `skipped` with their reason."""

    def __init__(self, base: Path, metadata: Path | None, spec: ClipSpec) -> None:
        self.spec = spec
        self.clips: list[ClipFiles] = []
        self.available: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for clip in read_metadata(base, metadata):
            missing = [p.name for p in (clip.rgb, clip.alpha) if not p.is_file()]
            if missing:
                self.skipped.append((clip.name, f"missing {', '.join(missing)}"))
                continue
            try:
                available = min(count_frames(clip.rgb), count_frames(clip.alpha))
            except WanAlphaError as exc:
                self.skipped.append((clip.name, str(exc)))
                continue
            if spec.frame_indices(available) is None:
                needed = (spec.num_frames - 1) * spec.frame_stride + 1
                self.skipped.append((clip.name, f"too short ({available} frames, needs {needed})"))
                continue
            self.clips.append(clip)
            self.available.append(available)
        if not self.clips:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped[:3])
            raise WanAlphaError(f"no usable clips in {base} for {spec.num_frames} frames × stride "
                                f"{spec.frame_stride} ({reasons})")  # fmt: skip

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        rgb, alpha = load_clip(clip, self.spec, self.available[index])
        return {"rgb": torch.from_numpy(rgb), "alpha": torch.from_numpy(alpha), "index": index}
