"""Wan-Alpha v2.0 Gaussian ellipse masks and the noise mean shift (reference NOTES §10.1–10.2).

`gaussian_mask_from_alpha` is the official `gen_gaussian_mask.py` procedure: binarise the alpha (> 0.1), optionally
move each row's filled span sideways, compress to the latent grid (frame 0, then 4-frame means of 8×8 INTER_AREA
blocks), and per latent frame fit an ellipse (PCA of the pixels > 0.2, orientation from those > 0.9, axes enlarged
by 1.12 until they cover 98 % of the shape) and render it as a min-max normalised Gaussian. `shift_noise` is the v2
generate step: noise + (1 − mask)·α with the mask resized bilinearly in bf16 and α, (1 − m) and the product in bf16.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def binarize(alpha: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    return (alpha > threshold).astype(np.float32)


def shift_rows(binary: np.ndarray, shift: int) -> np.ndarray:
    """Per frame and row: the span from the first to the last 1, FILLED, moved by `shift` pixels (+ right, − left),
    kept inside the frame (placed flush against the border it would cross)."""
    out = np.zeros_like(binary)
    width = binary.shape[-1]
    for t in range(binary.shape[0]):
        for y in range(binary.shape[1]):
            cols = np.flatnonzero(binary[t, y] > 0)
            if cols.size == 0:
                continue
            length = cols[-1] - cols[0] + 1
            start = min(max(cols[0] + shift, 0), width - length)
            out[t, y, start : start + length] = 1
    return out


def compress(frames: np.ndarray) -> np.ndarray:
    """[T, H, W] → [1 + (T−1)//4, H/8, W/8]: frame 0 alone, then means of 4-frame groups, each frame INTER_AREA."""
    height, width = frames.shape[1:]

    def small(f: np.ndarray) -> np.ndarray:
        return cv2.resize(f, (width // 8, height // 8), interpolation=cv2.INTER_AREA)

    out = [small(frames[0])]
    for start in range(1, 1 + (frames.shape[0] - 1) // 4 * 4, 4):
        out.append(np.mean([small(f) for f in frames[start : start + 4]], axis=0))
    return np.stack(out).astype(np.float32)


def _principal_angle(points: np.ndarray) -> float:
    values, vectors = np.linalg.eigh(np.cov(points.T))
    v = vectors[:, np.argsort(values)[::-1]][:, 0]
    return math.degrees(math.atan2(v[1], v[0]))


def fit_gaussian(
    m: np.ndarray,
    orient_threshold: float = 0.9,
    shape_threshold: float = 0.2,
    coverage_target: float = 0.98,
    max_enlarge_iters: int = 10,
    enlarge_step: float = 1.12,
) -> tuple[np.ndarray, np.ndarray]:
    """One latent frame → (Gaussian mask float32 in [0,1], [cx, cy, major, minor, angle_deg]; NaNs when empty)."""
    height, width = m.shape
    ys, xs = np.nonzero(m > shape_threshold)
    if xs.size == 0:
        return np.zeros_like(m, dtype=np.float32), np.full(5, np.nan)
    points = np.stack([xs, ys], axis=1).astype(np.float64)
    if len(points) < 5:
        x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        major, minor, angle = max(x1 - x0, 2), max(y1 - y0, 2), 0.0
    else:
        cx, cy = points.mean(axis=0)
        values, vectors = np.linalg.eigh(np.cov(points.T))
        vectors = vectors[:, np.argsort(values)[::-1]]
        projected = (points - [cx, cy]) @ vectors
        extent = projected.max(axis=0) - projected.min(axis=0)
        major, minor = max(extent[0], 2), max(extent[1], 2)
        oy, ox = np.nonzero(m > orient_threshold)
        strong = np.stack([ox, oy], axis=1).astype(np.float64)
        angle = _principal_angle(strong if len(strong) >= 5 else points)
    shape = m > shape_threshold
    best, best_axes = -1.0, (major, minor)
    for _ in range(max_enlarge_iters):
        canvas = np.zeros((height, width), np.uint8)
        centre = (min(max(round(cx), 0), width - 1), min(max(round(cy), 0), height - 1))
        axes = (max(1, round(major / 2)), max(1, round(minor / 2)))
        cv2.ellipse(canvas, centre, axes, angle, 0, 360, 1, -1)
        cover = float((canvas.astype(bool) & shape).sum()) / float(shape.sum())
        if cover > best:
            best, best_axes = cover, (major, minor)
        if cover >= coverage_target:
            break
        major, minor = major * enlarge_step, minor * enlarge_step
    major, minor = best_axes
    g = gaussian_from_ellipse(height, width, cx, cy, major, minor, angle)
    return g, np.array([cx, cy, major, minor, angle], dtype=np.float64)


def gaussian_from_ellipse(
    height: int, width: int, cx: float, cy: float, major: float, minor: float, angle: float = 0.0
) -> np.ndarray:
    """Upstream `create_gaussian_mask_from_ellipse`: a Gaussian with σ = axes/2 along the ellipse's rotated axes,
    min-max normalised to [0, 1] (zeros when flat); coordinates in cells of the (latent) grid."""
    gx, gy = np.meshgrid(np.arange(width), np.arange(height))
    theta = math.radians(angle)
    dx, dy = gx - cx, gy - cy
    xr = dx * math.cos(theta) + dy * math.sin(theta)
    yr = -dx * math.sin(theta) + dy * math.cos(theta)
    sx, sy = max(major / 2, 0.01), max(minor / 2, 0.01)
    g = np.exp(np.clip(-0.5 * ((xr / sx) ** 2 + (yr / sy) ** 2), -50, 0))
    span = g.max() - g.min()
    g = (g - g.min()) / span if span >= 1e-9 else np.zeros_like(g)
    return g.astype(np.float32)


def parse_ellipse(spec: str) -> tuple[float, ...]:
    """ "cx,cy,w,h[,angle]": centre and full axes as fractions of the frame width/height, angle in degrees."""
    from wanalpha.config import parse_ellipse_spec
    from wanalpha.errors import WanAlphaError

    try:
        return parse_ellipse_spec(spec)
    except ValueError as exc:
        raise WanAlphaError(str(exc)) from None


def ellipse_mask(num_frames: int, height: int, width: int, start: str, end: str | None = None) -> torch.Tensor:
    """A mask on the latent grid of a (num_frames, height, width) video from an ellipse spec (see parse_ellipse),
    static, or moving linearly from `start` to `end` over the clip: (T_lat, height/8, width/8) float32."""
    t_lat, h, w = 1 + (num_frames - 1) // 4, height // 8, width // 8
    a, b = np.array(parse_ellipse(start)), np.array(parse_ellipse(end or start))
    frames = []
    for i in range(t_lat):
        cx, cy, ew, eh, angle = a + (b - a) * (i / max(t_lat - 1, 1))
        frames.append(gaussian_from_ellipse(h, w, cx * w - 0.5, cy * h - 0.5, ew * w, eh * h, angle))
    return torch.from_numpy(np.stack(frames))


def gaussian_mask_from_alpha(
    alpha: np.ndarray | torch.Tensor, shift: int = 0, threshold: float = 0.1, max_enlarge_iters: int = 10
) -> tuple[torch.Tensor, np.ndarray]:
    """alpha (T, H, W) in [0, 1] → (mask (T_lat, H/8, W/8) float32 in [0,1], ellipse parameters per latent frame).

    shift: pixels to move each row's span (+ right, − left; the official script uses int(H/2)); 0 = none.
    The T2V training variant (NOTES §10.5) is threshold 0.5 on alpha in [−1, 1], no shift, 8 enlargements."""
    a = alpha.float().numpy() if isinstance(alpha, torch.Tensor) else np.asarray(alpha, dtype=np.float32)
    binary = binarize(a.astype(np.float32), threshold)
    if shift:
        binary = shift_rows(binary, shift)
    compressed = compress(binary)
    fits = [fit_gaussian(frame, max_enlarge_iters=max_enlarge_iters) for frame in compressed]
    return torch.from_numpy(np.stack([f[0] for f in fits])), np.stack([f[1] for f in fits])


def shift_noise(noise: torch.Tensor, mask: torch.Tensor, alpha_shift_mean: float = 0.05) -> torch.Tensor:
    """The v2 noise mean shift, once, before sampling: noise (B,16,T,h,w) float32 + (1 − m)·α, where the mask
    (T or 1, h', w') is resized per frame bilinearly to (h, w) in bf16 and α, (1 − m) and the product are bf16."""
    if mask.shape[0] not in (1, noise.shape[2]):
        raise ValueError(f"the mask has {mask.shape[0]} frames; this latent has {noise.shape[2]} (or give 1 frame)")
    m = F.interpolate(
        mask.to(torch.bfloat16).unsqueeze(1), size=noise.shape[-2:], mode="bilinear", align_corners=False
    ).squeeze(1)
    alpha = torch.tensor(alpha_shift_mean, dtype=torch.bfloat16)
    return noise + ((1 - m) * alpha).to(noise.device)


# ---------------------------------------------------------------------------------------- v2 T2V training (§10.5)
def training_alpha(alpha_u8: torch.Tensor) -> torch.Tensor:
    """The T2V data prep's `preprocess_image` of an alpha video (uint8, any shape): to bf16, × 2/255, − 1, each
    operation rounded to bf16."""
    return alpha_u8.float().to(torch.bfloat16) * (2 / 255) + (-1)


def training_mask(alpha_u8: torch.Tensor) -> torch.Tensor:
    """The per-clip Gaussian mask the v2 T2V training caches (`gen_gauss_mask_for_video`): alpha (T, H, W) uint8 →
    (T_lat, H/8, W/8) float32; threshold 0.5 on the bf16-preprocessed alpha in [−1, 1], no shift, 8 enlargements."""
    mask, _ = gaussian_mask_from_alpha(training_alpha(alpha_u8), threshold=0.5, max_enlarge_iters=8)
    return mask


def shift_training_noise(noise: torch.Tensor, mask: torch.Tensor, alpha_shift_mean: float = 0.05) -> torch.Tensor:
    """The v2 training noise: ε' = (1 − g)·(ε + α) + g·ε with ε bf16 (B,16,T,h,w), the mask g (B,T,h,w) in bf16
    broadcast over the channels and α a float32 0-dim tensor (upstream's fixed `learnable_alpha`), so all the
    arithmetic is bf16 as upstream. Returns bf16."""
    eps = noise.to(torch.bfloat16)
    g = mask.to(device=eps.device, dtype=torch.bfloat16).unsqueeze(1)
    alpha = torch.tensor(alpha_shift_mean, dtype=torch.float32, device=eps.device)
    return (1 - g) * (eps + alpha) + g * eps


def load_mask(path) -> torch.Tensor:
    """A mask file as gen_gaussian_mask.py writes it (and the released `gauss_mask`): a torch.save of one float tensor
    [T_lat, h, w]; read with weights_only=True."""
    import pickle
    from pathlib import Path

    from wanalpha.errors import WanAlphaError

    if not Path(path).is_file():
        raise WanAlphaError(f"mask file {path} does not exist")
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise WanAlphaError(f"mask file {path} is not a saved tensor ({str(exc).splitlines()[0]})") from None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 3:
        raise WanAlphaError(f"mask file {path} must hold one [frames, height, width] tensor")
    return mask.float()


def save_mask(mask: torch.Tensor, path) -> None:
    """The official mask format: torch.save of one float32 tensor [T_lat, h, w] (atomically)."""
    from pathlib import Path

    from wanalpha.data.files import atomic_path

    with atomic_path(Path(path)) as tmp:
        torch.save(mask.float().contiguous().clone(), tmp)


def make_mask(
    num_frames: int,
    height: int,
    width: int,
    *,
    mask_file=None,
    alpha_video=None,
    shift: int = 0,
    ellipse: str | None = None,
    ellipse_end: str | None = None,
) -> tuple[torch.Tensor | None, str]:
    """The mask from the first source given (None when none), and a word on where it came from: a saved mask file,
    an alpha video (the official gen_gaussian_mask.py procedure, its rows moved by `shift` pixels), or an ellipse
    spec 'cx,cy,w,h[,angle]' (moving linearly to `ellipse_end` when given) for a video of the given size."""
    from wanalpha.data.video import read_video

    if mask_file is not None:
        return load_mask(mask_file), f"file {mask_file}"
    if alpha_video is not None:
        frames, _ = read_video(alpha_video)
        grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]).astype(np.float32) / 255
        mask, _ = gaussian_mask_from_alpha(grey, shift=shift)
        return mask, f"alpha video {alpha_video}"
    if ellipse is not None:
        mask = ellipse_mask(num_frames, height, width, ellipse, ellipse_end)
        return mask, f"ellipse {ellipse}" + (f" → {ellipse_end}" if ellipse_end else "")
    return None, "none"


def preview(mask: torch.Tensor, background: np.ndarray | None, height: int, width: int) -> np.ndarray:
    """A PNG-ready RGB image: the first mask frame as a heat map over the first video frame (or a grey board)."""
    if background is None:
        background = np.full((height, width, 3), 128, np.uint8)
    heat = cv2.resize((mask[0].numpy() * 255).astype(np.uint8), (width, height), interpolation=cv2.INTER_LINEAR)
    colour = cv2.cvtColor(cv2.applyColorMap(heat, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.5 * background + 0.5 * colour).astype(np.uint8)
