"""RGBA training clips: `metadata.csv` + `NNN_rgb.mp4` / `NNN_alpha.mp4` → fixed-size uint8 frame stacks.

Frames stay uint8 until they reach the device (`to_model_space`), so the cached and uncached training paths compare
their losses against bit-identical targets. Without augmentation each clip is resized to cover `height`×`width` and
centre-cropped; it takes `num_frames` frames (4n+1) every `frame_stride` source frames from the start; clips that are
too short are skipped with a reason, or looped with `loop_short_clips`.

`augment="official"` is the Wan-Alpha v2 VAE dataset's (Wan-Alpha-VAE-train/transparent_video_dataset_image.py): a
random start frame, short clips played forwards and backwards, a random 1-2× cover scale and a random crop; a still
image pair becomes a clip that pans slowly across the scaled image. Every draw comes from a generator seeded by
(seed, epoch, dataset index) (`augment_generator`), never from a global or per-worker RNG, so what an item looks like
does not depend on the process count, the worker count, the order of loading or an interruption.

Rows may also be still images: `NNN_rgb.png` + `NNN_alpha.png` in our layout, or the official CSV (`video_fgr`,
`video_pha`, optional `status` static/dynamic and `prompt`, paths relative to the CSV), as the v2 VAE data ships.
"""

from __future__ import annotations

import csv
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import cv2
import numpy as np
import torch

from wanalpha.config import frames_problem, side_problem
from wanalpha.data.files import escapes
from wanalpha.data.video import count_frames
from wanalpha.errors import WanAlphaError

RGB_SUFFIX, ALPHA_SUFFIX = "_rgb.mp4", "_alpha.mp4"
RGB_STILL, ALPHA_STILL = "_rgb.png", "_alpha.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
Augment = Literal["none", "official"]


@dataclass(frozen=True)
class ClipSpec:
    """How every clip is cut: output size, frame count and stride, and whether short clips loop."""

    height: int
    width: int
    num_frames: int
    frame_stride: int = 1
    loop_short_clips: bool = False

    def __post_init__(self) -> None:
        for name, problem in (
            ("num_frames", frames_problem(self.num_frames)),
            ("height", side_problem(self.height)),
            ("width", side_problem(self.width)),
        ):
            if problem:
                raise WanAlphaError(f"clip {name} {problem}")

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
    """One row: an RGB and an alpha video, or (`still`) an RGB and an alpha image; they may be one RGBA image."""

    name: str
    rgb: Path
    alpha: Path
    prompt: str = ""
    still: bool = False


def read_metadata(base: Path, metadata: Path | None = None) -> list[ClipFiles]:
    """The clips of a dataset. Our layout: `video` holds base names (`001` → 001_rgb.mp4 + 001_alpha.mp4, or
    001_rgb.png + 001_alpha.png for a still image). The official layout: `video_fgr`, `video_pha` (paths relative to
    the CSV; an empty `video_pha` takes a still's alpha from its RGBA image), optional `status` (static = still image,
    dynamic = video; without it the file suffix decides) and `prompt`."""
    base = Path(base)
    metadata = Path(metadata) if metadata is not None else base / "metadata.csv"
    if not metadata.is_file():
        raise WanAlphaError(
            f"metadata file {metadata} does not exist; run `wanalpha prepare` or pass --dataset_metadata_path"
        )
    with metadata.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if "video" not in fields and not {"video_fgr", "video_pha"} <= set(fields):
            raise WanAlphaError(
                f"{metadata}: no 'video' column, nor the official 'video_fgr' and 'video_pha' "
                f"(found: {', '.join(fields)})"
            )
        rows = list(reader)
    if "video" in fields:  # our layout names clips inside the dataset folder; a row leaving it is refused
        for line, row in enumerate(rows, start=2):
            if escapes((row.get("video") or "").strip()):
                raise WanAlphaError(
                    f"{metadata} line {line}: video {row['video'].strip()!r} points outside the "
                    f"dataset folder {base}; name clips inside it (001 for 001_rgb.mp4)"
                )
    clips = [_row_clip(row, base) if "video" in fields else _official_row_clip(row, metadata.parent) for row in rows]
    if not clips:
        raise WanAlphaError(f"{metadata} lists no clips")
    return clips


def _row_clip(row: dict, base: Path) -> ClipFiles:
    name = row["video"].strip()
    for suffix in (RGB_SUFFIX, ".mp4", RGB_STILL, ".png"):
        name = name.removesuffix(suffix)
    prompt = row.get("prompt") or ""
    if not (base / f"{name}{RGB_SUFFIX}").exists() and (base / f"{name}{RGB_STILL}").exists():
        return ClipFiles(name, base / f"{name}{RGB_STILL}", base / f"{name}{ALPHA_STILL}", prompt, still=True)
    return ClipFiles(name, base / f"{name}{RGB_SUFFIX}", base / f"{name}{ALPHA_SUFFIX}", prompt)


def _official_row_clip(row: dict, folder: Path) -> ClipFiles:
    fgr, pha = (row.get("video_fgr") or "").strip(), (row.get("video_pha") or "").strip()
    status = (row.get("status") or "").strip().lower()
    still = status == "static" if status else PurePosixPath(fgr).suffix.lower() in IMAGE_SUFFIXES
    # The name (also a cache shard's) is the fgr path inside the dataset: anchors and '..' dropped.
    parts = [p if p != ".." else "__" for p in PurePosixPath(fgr.replace("\\", "/")).parts if p not in ("/", ".")]
    rgb = folder / fgr
    return ClipFiles("/".join(parts) or "unnamed", rgb, folder / pha if pha else rgb, row.get("prompt") or "", still)


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


def read_still(clip: ClipFiles) -> tuple[np.ndarray, np.ndarray]:
    """A still row's images as (rgb (H,W,3), alpha (H,W,3)) uint8; alpha from the 4th channel when the row names
    one RGBA image for both, else the alpha image's channels (the official dataset reads both with convert('RGB'))."""
    rgb = _read_image(clip.rgb)
    if clip.alpha == clip.rgb:
        if rgb.shape[2] != 4:
            raise WanAlphaError(f"{clip.rgb}: no alpha channel; give the alpha image (video_pha) as well")
        return rgb[..., :3], np.repeat(rgb[..., 3:], 3, axis=2)
    return rgb[..., :3], _read_image(clip.alpha)[..., :3]


def _read_image(path: Path) -> np.ndarray:
    """(H,W,3) RGB or (H,W,4) RGBA uint8 (grey is replicated, 16-bit scaled down)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise WanAlphaError(f"{path}: cannot be read as an image")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    code = cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return cv2.cvtColor(image, code)


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


def _resize_pil_bilinear(frames: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """(N,H,W,C) uint8 → (N,new_h,new_w,C) as the official dataset resizes its PIL frames (torchvision → PIL's
    BILINEAR, antialiased when shrinking): torch's antialiased bilinear on uint8 gives the same to ±1."""
    if frames.shape[1:3] == (new_h, new_w):
        return frames
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _grey(alpha_rgb: np.ndarray) -> np.ndarray:
    # The alpha video is grey; codecs add a little chroma noise, so take the rounded channel mean.
    return ((alpha_rgb.astype(np.uint16).sum(-1) + 1) // 3).astype(np.uint8)


def load_clip(
    clip: ClipFiles, spec: ClipSpec, available: int | None = None, generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(rgb (T,H,W,3) uint8, alpha (T,H,W) uint8) cut to `spec`: centre crop from the start, or with `generator`
    the official v2 augmentation drawn from it. Raises WanAlphaError for a clip that is too short."""
    if clip.still:
        rgb, alpha = read_still(clip)
        if generator is not None:
            (new_h, new_w), places = still_motion(*rgb.shape[:2], spec.height, spec.width, spec.num_frames, generator)
            return _crops(rgb, new_h, new_w, places, spec), _grey(_crops(alpha, new_h, new_w, places, spec))
        rgb, alpha = (
            np.repeat(resize_crop(a[None], spec.height, spec.width), spec.num_frames, 0) for a in (rgb, alpha)
        )
        return rgb, _grey(alpha)
    available = available if available is not None else min(count_frames(clip.rgb), count_frames(clip.alpha))
    if generator is not None:
        indices = official_frame_indices(available, spec.num_frames, spec.frame_stride, generator)
        rgb, alpha = read_frames(clip.rgb, indices), read_frames(clip.alpha, indices)
        new_h, new_w, top, left = official_crop(*rgb.shape[1:3], spec.height, spec.width, generator)
        box = (slice(None), slice(top, top + spec.height), slice(left, left + spec.width))
        rgb, alpha = (_resize_pil_bilinear(a, new_h, new_w)[box] for a in (rgb, alpha))
        return np.ascontiguousarray(rgb), _grey(alpha)
    indices = spec.frame_indices(available)
    if indices is None:
        needed = (spec.num_frames - 1) * spec.frame_stride + 1
        raise WanAlphaError(f"{clip.name}: too short ({available} frames, needs {needed}; --loop_short_clips loops it)")
    rgb = resize_crop(read_frames(clip.rgb, indices), spec.height, spec.width)
    alpha = resize_crop(read_frames(clip.alpha, indices), spec.height, spec.width)
    return rgb, _grey(alpha)


def _crops(image: np.ndarray, new_h: int, new_w: int, places: list[tuple[int, int]], spec: ClipSpec) -> np.ndarray:
    """The image scaled once to new_h×new_w, then one height×width crop per (top, left): (T,H,W,C)."""
    scaled = _resize_pil_bilinear(image[None], new_h, new_w)[0]
    return np.stack([scaled[top : top + spec.height, left : left + spec.width] for top, left in places])


# ------------------------------------------------------------------------------------------ official augmentation
# The rules of Wan-Alpha-VAE-train/transparent_video_dataset_image.py (TextVideoDataset), drawn from a seeded torch
# generator instead of Python's global `random`; the same draws, in the same order, with the same inclusive ranges.


def augment_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation draws of dataset item `index` in `epoch`: a function of (seed, epoch, index) only, in a
    stream apart from `training.Draws`' (which are seeded by (seed, epoch, place))."""
    key = ((seed * 1_000_003 + epoch) * 1_000_003 + index) * 1_000_003 + 0x5EED_A06
    return torch.Generator().manual_seed(key % 2**63)


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high], both ends included, as Python's random.randint."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def official_frame_indices(available: int, num_frames: int, stride: int, generator: torch.Generator) -> list[int]:
    """Source frames of one draw (transparent_video_dataset_image.py:214-228). A clip with enough frames: a start
    in [0, available − needed], both ends included. A shorter one is played forwards then backwards (0…n−1, n−1…0,
    0…), from a start in [0, n] — n itself included, as upstream. `stride` > 1 (ours; upstream has 1) steps through
    the same sequences."""
    needed = (num_frames - 1) * stride + 1
    if available < needed:
        start = _randint(generator, 0, available)
        return [_ping_pong(start + i * stride, available) for i in range(num_frames)]
    start = _randint(generator, 0, available - needed)
    return list(range(start, start + needed, stride))


def _ping_pong(position: int, n: int) -> int:
    """Entry `position` of [0, 1, …, n−1, n−1, …, 1, 0] repeated (the ends are played twice, as upstream)."""
    p = position % (2 * n)
    return p if p < n else 2 * n - 1 - p


def official_cover_size(h: int, w: int, height: int, width: int, generator: torch.Generator) -> tuple[int, int]:
    """The scaled size (new_h, new_w) of an h×w source (transparent_video_dataset_image.py:36-44, 70-77): target
    sizes drawn in [width, 2·width] and [height, 2·height] (both ends included, width first), the scale that makes
    the source cover both, Python's round. So the crop shows between all and a quarter of the covering frame."""
    tmp_w = _randint(generator, width, 2 * width)
    tmp_h = _randint(generator, height, 2 * height)
    scale = max(tmp_w / w, tmp_h / h)
    # round(h·scale) ≥ height always holds up to float rounding; max() keeps that rounding from cutting a pixel.
    return max(height, round(h * scale)), max(width, round(w * scale))


def official_crop(h: int, w: int, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) for a video's frames (transparent_video_dataset_image.py:35-60): the cover size, then
    the crop's top in [0, new_h − height] and left in [0, new_w − width], both ends included, top first."""
    new_h, new_w = official_cover_size(h, w, height, width, generator)
    top = _randint(generator, 0, new_h - height)
    return new_h, new_w, top, _randint(generator, 0, new_w - width)


# The pan directions per quadrant of the start (transparent_video_dataset_image.py:136-144): toward the image's far
# sides, horizontally, vertically or diagonally.
_DIRECTIONS = {
    0: ((1, 0), (0, 1), (1, 1)),  # start in the top-left quarter
    1: ((-1, 0), (0, 1), (-1, 1)),  # top-right
    2: ((1, 0), (0, -1), (1, -1)),  # bottom-left
    3: ((-1, 0), (0, -1), (-1, -1)),  # bottom-right
}


def still_motion(
    h: int, w: int, height: int, width: int, frames: int, generator: torch.Generator
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """A still image as a slow pan (transparent_video_dataset_image.py:62-200): ((new_h, new_w), [(top, left)] per
    frame). The image is scaled as a video frame (`official_cover_size`); the first crop's corner is drawn in
    [0, new − size] (x first); its quarter of the scaled image (by the halves new_w//2, new_h//2) picks three
    directions toward the far sides, one drawn uniformly; the step per frame is direction × the room left that
    way, floor-divided by the frame count (so the pan covers (frames−1)/frames of the room; a negative step rounds
    away from zero); each corner is clamped to the image before its crop, and the next adds the step. Upstream
    makes 17 frames (static_frames) whatever num_frames is; we make `frames` (17 in the official recipe)."""
    new_h, new_w = official_cover_size(h, w, height, width, generator)
    x = _randint(generator, 0, max(0, new_w - width))
    y = _randint(generator, 0, max(0, new_h - height))
    region = int(x >= new_w // 2) + 2 * int(y >= new_h // 2)
    dx, dy = _DIRECTIONS[region][_randint(generator, 0, 2)]
    room_x = (new_w - width - x) if dx > 0 else x if dx < 0 else 0
    room_y = (new_h - height - y) if dy > 0 else y if dy < 0 else 0
    step_x, step_y = (dx * room_x) // frames, (dy * room_y) // frames
    places = []
    for _ in range(frames):
        x, y = max(0, min(x, new_w - width)), max(0, min(y, new_h - height))
        places.append((y, x))
        x, y = x + step_x, y + step_y
    return (new_h, new_w), places


def clip_colour(seed: int, name: str, colours: list[int]) -> int:
    """The one background colour of a clip for DiT data with --colour-draw clip: uniform among `colours`, a
    function of (seed, the clip's name) only (so a cache and training from videos agree, whatever the clip order).
    Upstream draws it once per clip at data prep with an unseeded torch.randint(0, 8)
    (Wan-Alpha-train/diffsynth/pipelines/wan_video_new_trans_random_pre.py:738-739)."""
    key = (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) * 1_000_003 + 0xC0104
    return colours[int(torch.randint(0, len(colours), (1,), generator=torch.Generator().manual_seed(key % 2**63)))]


def to_model_space(rgb: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B,T,H,W,3) and (B,T,H,W) → float32 rgb (B,3,T,H,W) and alpha (B,1,T,H,W) in [-1,1] (official
    ToTensor + Normalize(0.5, 0.5))."""
    rgb = (rgb.permute(0, 4, 1, 2, 3).float() / 255 - 0.5) / 0.5
    alpha = (alpha.unsqueeze(1).float() / 255 - 0.5) / 0.5
    return rgb, alpha


class RGBAClipDataset(torch.utils.data.Dataset):
    """Clips of a dataset, checked up front: unusable ones are listed in `skipped` with their reason. With
    augment="official" every item is drawn anew from (seed, epoch, index): the training loop calls `set_epoch`."""

    def __init__(
        self, base: Path, metadata: Path | None, spec: ClipSpec, augment: Augment = "none", seed: int = 0
    ) -> None:
        self.spec, self.augment, self.seed, self.epoch = spec, augment, seed, 0
        self.clips: list[ClipFiles] = []
        self.available: list[int] = []
        self.skipped: list[tuple[str, str]] = []
        for clip in read_metadata(base, metadata):
            missing = [p.name for p in dict.fromkeys((clip.rgb, clip.alpha)) if not p.is_file()]
            if missing:
                self.skipped.append((clip.name, f"missing {', '.join(missing)}"))
                continue
            if clip.still:  # one frame, shown num_frames times (or panned across, with the official augmentation)
                if cv2.imread(str(clip.rgb), cv2.IMREAD_REDUCED_GRAYSCALE_8) is None:
                    self.skipped.append((clip.name, f"{clip.rgb.name} cannot be read as an image"))
                    continue
                self.clips.append(clip)
                self.available.append(1)
                continue
            if clip.alpha == clip.rgb:
                self.skipped.append((clip.name, "no alpha video (video_pha is empty)"))
                continue
            try:
                available = min(count_frames(clip.rgb), count_frames(clip.alpha))
            except WanAlphaError as exc:
                self.skipped.append((clip.name, str(exc)))
                continue
            if available < 1:
                self.skipped.append((clip.name, "no frames"))
                continue
            if augment == "none" and spec.frame_indices(available) is None:
                needed = (spec.num_frames - 1) * spec.frame_stride + 1
                self.skipped.append((clip.name, f"too short ({available} frames, needs {needed})"))
                continue
            self.clips.append(clip)
            self.available.append(available)
        if not self.clips:
            reasons = "; ".join(f"{n}: {r}" for n, r in self.skipped[:3])
            raise WanAlphaError(
                f"no usable clips in {base} for {spec.num_frames} frames × stride {spec.frame_stride} ({reasons})"
            )

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation draws the next items get (DataLoader workers copy the dataset as it is)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        generator = augment_generator(self.seed, self.epoch, index) if self.augment == "official" else None
        rgb, alpha = load_clip(clip, self.spec, self.available[index], generator)
        return {"rgb": torch.from_numpy(rgb), "alpha": torch.from_numpy(alpha), "index": index}
