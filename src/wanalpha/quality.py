"""No-reference quality metrics of generated RGBA video (`wanalpha eval`): is this clip's alpha good?

Plain numpy functions of one clip: rgb (T,H,W,3) uint8 and alpha (T,H,W) uint8 (or float in [0,1]). Alpha is used in
[0,1] throughout; shares are fractions in [0,1]. Every formula is written out in docs/eval.md; the symbols there are
the names here:

- τ = TRANSPARENT (0.05, ≈13/255: codec noise): below it a pixel counts as transparent, above 1 − τ as opaque.
- the subject S_t = {α_t ≥ 0.5}, opened with a 5×5 disc (specks of haze above 0.5 are no subject);
- the background far from it F_t = pixels farther than `margin` from S_t (all pixels when S_t is empty).

Metrics (`clip_quality` returns them all; `METRICS` tells for each whether lower or higher is better):
- background: `background_haze` (mean over frames of the share of F_t with α > τ), `haze_level` (mean α over F_t),
  `clean_frames` (share of frames whose haze share is ≤ CLEAN_FRAME), `coverage` / `opaque_share` and the failure
  flags `empty` / `opaque` (alpha empty or opaque almost everywhere);
- time: `alpha_flicker` (mean |α_t − W_t(α_{t−1})| where W_t warps the previous alpha along the optical flow of the
  RGB, over pixels whose flow passes the forward–backward check and that are not transparent in both), and the
  VBench temporal flickering score (1 − mean |x_t − x_{t−1}|/255) of the alpha and of the checkerboard composite;
- edges: `edge_soft` (share of soft pixels, τ < α < 1 − τ, in a band of `radius` around the subject's boundary) and
  `edge_soft_change` (its mean change from frame to frame).

The CLIP text–video score needs a model (wanalpha.clip) and is `clip_score` below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

TRANSPARENT = 0.05  # τ
SUBJECT = 0.5  # α at or above: the subject
CLEAN_FRAME = 0.01  # a frame's background is clean when at most 1% of it is hazy
EMPTY_BELOW = 0.005  # flag `empty`: on average less than 0.5% of a frame is visible (α > τ)
OPAQUE_ABOVE = 0.95  # flag `opaque`: on average more than 95% of a frame is opaque (α ≥ 1 − τ)
BACKGROUNDS = ("checkerboard", "black", "white")  # what the composites of the CLIP score and the report lie over

# name → (better: "lower" | "higher" | None for descriptive values, one-line meaning). The report's comparison and
# docs/eval.md follow this table.
METRICS: dict[str, tuple[str | None, str]] = {
    "background_haze": ("lower", "share of the background far from the subject with alpha above τ"),
    "haze_level": ("lower", "mean alpha of the background far from the subject"),
    "clean_frames": ("higher", "share of frames whose far background is clean (≤ 1% hazy)"),
    "coverage": (None, "mean share of each frame that is visible (alpha above τ)"),
    "opaque_share": (None, "mean share of each frame that is opaque (alpha ≥ 1 − τ)"),
    "empty": ("lower", "1 when the alpha is empty almost everywhere (a failure)"),
    "opaque": ("lower", "1 when the alpha is opaque almost everywhere (a failure)"),
    "alpha_flicker": ("lower", "mean motion-compensated change of alpha between frames"),
    "alpha_temporal_flickering": ("higher", "VBench temporal flickering score of the alpha (1 = steady)"),
    "temporal_flickering": ("higher", "VBench temporal flickering score of the checkerboard composite"),
    "edge_soft": ("higher", "share of soft pixels (τ < alpha < 1 − τ) in the band around the subject's edge"),
    "edge_soft_change": ("lower", "mean frame-to-frame change of that share"),
    "clip_score": ("higher", "100 × cosine of CLIP text and composite image embeddings, mean over backgrounds"),
}


def unit_alpha(alpha: np.ndarray) -> np.ndarray:
    """uint8 alpha (0–255) → float32 in [0,1]; float alpha is taken as already in [0,1]."""
    alpha = np.asarray(alpha)
    return alpha.astype(np.float32) / 255 if alpha.dtype == np.uint8 else alpha.astype(np.float32)


def default_margin(height: int, width: int) -> int:
    """How far from the subject the background starts: 5% of the shorter side, at least 4 px (24 px at 480×832)."""
    return max(4, round(0.05 * min(height, width)))


def default_radius(height: int, width: int) -> int:
    """Half-width of the edge band: 1% of the shorter side, at least 2 px (5 px at 480×832)."""
    return max(2, round(0.01 * min(height, width)))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


# ------------------------------------------------------------------------------------------------ background


def subject_mask(alpha_t: np.ndarray) -> np.ndarray:
    """S_t: α ≥ 0.5, opened (eroded, then dilated) with a 5×5 disc so that isolated specks do not count."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    return cv2.morphologyEx((alpha_t >= SUBJECT).astype(np.uint8), cv2.MORPH_OPEN, disc) > 0


def far_background(alpha_t: np.ndarray, margin: int) -> np.ndarray:
    """F_t: the pixels of one frame (α in [0,1]) farther than `margin` pixels (Euclidean) from the subject S_t;
    every pixel when there is no subject."""
    subject = subject_mask(alpha_t)
    if not subject.any():
        return np.ones_like(subject)
    distance = cv2.distanceTransform((~subject).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return distance > margin


def background(alpha: np.ndarray, margin: int | None = None) -> dict[str, float]:
    """Haze of the background far from the subject: background_haze = mean_t |{p ∈ F_t: α > τ}| / |F_t|,
    haze_level = mean_t mean_{F_t} α, clean_frames = share of frames with a haze share ≤ CLEAN_FRAME. Frames without
    background (opaque all over) are left out; NaN when no frame has one (the `opaque` flag tells why)."""
    alpha = unit_alpha(alpha)
    margin = default_margin(*alpha.shape[1:]) if margin is None else margin
    shares, levels = [], []
    for frame in alpha:
        far = far_background(frame, margin)
        if far.any():
            shares.append(float((frame[far] > TRANSPARENT).mean()))
            levels.append(float(frame[far].mean()))
    clean = _mean([float(s <= CLEAN_FRAME) for s in shares])
    return {"background_haze": _mean(shares), "haze_level": _mean(levels), "clean_frames": clean}


def failure_flags(alpha: np.ndarray) -> dict[str, float]:
    """coverage = mean_t share of α > τ, opaque_share = mean_t share of α ≥ 1 − τ; the flags empty (coverage <
    EMPTY_BELOW) and opaque (opaque_share > OPAQUE_ABOVE) as 0/1."""
    alpha = unit_alpha(alpha)
    coverage = float((alpha > TRANSPARENT).mean())
    opaque_share = float((alpha >= 1 - TRANSPARENT).mean())
    return {
        "coverage": coverage,
        "opaque_share": opaque_share,
        "empty": float(coverage < EMPTY_BELOW),
        "opaque": float(opaque_share > OPAQUE_ABOVE),
    }


# ------------------------------------------------------------------------------------------------ time


def _grey(rgb_t: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb_t), cv2.COLOR_RGB2GRAY)


def optical_flow(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Dense flow (H,W,2) of two uint8 RGB frames (Farnebäck, OpenCV): source(y,x) ≈ target(y + f_y, x + f_x)."""
    levels = max(1, min(3, int(math.log2(max(1, min(source.shape[:2]) // 8)))))  # no level smaller than ~8 px
    return cv2.calcOpticalFlowFarneback(
        _grey(source),
        _grey(target),
        None,
        pyr_scale=0.5,
        levels=levels,
        winsize=15,
        iterations=3,
        poly_n=5,
        poly_sigma=1.2,
        flags=0,
    )


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """image sampled at p + flow(p) (bilinear; outside the frame: the nearest border pixel)."""
    h, w = flow.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        image, grid_x + flow[..., 0], grid_y + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def consistent_flow(forward: np.ndarray, backward: np.ndarray) -> np.ndarray:
    """Pixels whose flow is trusted (Sundaram et al. 2010): the backward flow at the forward target undoes the
    forward flow, |f + b(p + f)|² ≤ 0.01 (|f|² + |b(p + f)|²) + 0.5, and p + f lies inside the frame."""
    h, w = forward.shape[:2]
    back = warp(backward, forward)
    error = ((forward + back) ** 2).sum(-1)
    bound = 0.01 * ((forward**2).sum(-1) + (back**2).sum(-1)) + 0.5
    grid_x, grid_y = np.meshgrid(np.arange(w), np.arange(h))
    x, y = grid_x + forward[..., 0], grid_y + forward[..., 1]
    return (error <= bound) & (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def alpha_flicker(rgb: np.ndarray, alpha: np.ndarray) -> float:
    """Motion-compensated alpha flicker: for each t ≥ 1 the flow f_t from frame t to t−1 of the RGB warps α_{t−1}
    onto frame t; the frame's value is mean |α_t − W_t(α_{t−1})| over the pixels that pass the flow check and are
    not transparent in both (α_t > τ or W_t(α_{t−1}) > τ); the clip's is the mean over frames that have such pixels
    (0 when none has). Real motion that the flow follows costs nothing; a matte that changes on its own does."""
    alpha = unit_alpha(alpha)
    values = []
    for t in range(1, len(alpha)):
        forward = optical_flow(rgb[t], rgb[t - 1])
        backward = optical_flow(rgb[t - 1], rgb[t])
        previous = warp(alpha[t - 1], forward)
        active = consistent_flow(forward, backward) & ((alpha[t] > TRANSPARENT) | (previous > TRANSPARENT))
        if active.any():
            values.append(float(np.abs(alpha[t] - previous)[active].mean()))
    return _mean(values) if values else 0.0


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal flickering score of uint8 frames (T,H,W[,C]): (255 − mean_t mean |x_t − x_{t−1}|) / 255;
    1 for a still clip (VBench, vbench/temporal_flickering.py; one frame: 1)."""
    frames = np.asarray(frames, dtype=np.float32)
    if len(frames) < 2:
        return 1.0
    return float((255.0 - np.abs(np.diff(frames, axis=0)).mean(axis=tuple(range(1, frames.ndim))).mean()) / 255.0)


# ------------------------------------------------------------------------------------------------ edges


def edge_band(alpha_t: np.ndarray, radius: int) -> np.ndarray:
    """The band around the subject's boundary: dilate(S_t, r) minus erode(S_t, r) with a disc of radius r (empty when
    the frame has no subject or no background)."""
    subject = subject_mask(alpha_t).astype(np.uint8)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return (cv2.dilate(subject, disc) > 0) & ~(cv2.erode(subject, disc) > 0)


def edges(alpha: np.ndarray, radius: int | None = None) -> dict[str, float]:
    """edge_soft = mean_t e_t with e_t = |{p ∈ B_t: τ < α < 1 − τ}| / |B_t| (B_t = edge_band), over frames with a
    band; edge_soft_change = mean |e_t − e_{t−1}| over consecutive frames that both have one (0 when none)."""
    alpha = unit_alpha(alpha)
    radius = default_radius(*alpha.shape[1:]) if radius is None else radius
    soft = []
    for frame in alpha:
        band = edge_band(frame, radius)
        soft.append(
            float(((frame[band] > TRANSPARENT) & (frame[band] < 1 - TRANSPARENT)).mean()) if band.any() else math.nan
        )
    changes = [abs(b - a) for a, b in zip(soft, soft[1:], strict=False) if not (math.isnan(a) or math.isnan(b))]
    return {
        "edge_soft": _mean([s for s in soft if not math.isnan(s)]),
        "edge_soft_change": _mean(changes) if changes else 0.0,
    }


# ------------------------------------------------------------------------------------------------ composites


def composite(rgb: np.ndarray, alpha: np.ndarray, over: str) -> np.ndarray:
    """uint8 rgb (T,H,W,3) with its alpha over `over` (checkerboard: the grey board of generate's composite; black;
    white) → uint8 (T,H,W,3)."""
    a = unit_alpha(alpha)[..., None]
    if over == "checkerboard":
        from wanalpha.data.render import checkerboard

        board = ((checkerboard(rgb.shape[1], rgb.shape[2]).permute(1, 2, 0) + 1) * 127.5).numpy()
    elif over in ("black", "white"):
        board = np.full(3, 0.0 if over == "black" else 255.0, np.float32)
    else:
        raise ValueError(f"unknown background {over!r}; choose from {', '.join(BACKGROUNDS)}")
    return np.clip(rgb.astype(np.float32) * a + board * (1 - a) + 0.5, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ one clip


def clip_quality(
    rgb: np.ndarray, alpha: np.ndarray, margin: int | None = None, radius: int | None = None
) -> dict[str, float]:
    """Every no-reference metric of one clip (the CLIP score apart): see the module's list and METRICS."""
    alpha = np.asarray(alpha)
    if rgb.shape[:3] != alpha.shape or rgb.shape[-1] != 3:
        raise ValueError(f"expected rgb (T,H,W,3) and alpha (T,H,W) of one size, got {rgb.shape} and {alpha.shape}")
    alpha_u8 = alpha if alpha.dtype == np.uint8 else np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)
    return {
        **background(alpha, margin),
        **failure_flags(alpha),
        "alpha_flicker": alpha_flicker(rgb, alpha),
        "alpha_temporal_flickering": temporal_flickering(alpha_u8),
        "temporal_flickering": temporal_flickering(composite(rgb, alpha_u8, "checkerboard")),
        **edges(alpha, radius),
    }


def sample_frames(count: int, frames: int) -> list[int]:
    """`count` frame indices spread evenly over a clip of `frames` (all of them when it has fewer)."""
    if frames <= count:
        return list(range(frames))
    return sorted({round(i * (frames - 1) / (count - 1)) for i in range(count)}) if count > 1 else [frames // 2]


def clip_score(
    scorer, prompt: str, rgb: np.ndarray, alpha: np.ndarray, frames: int = 8, backgrounds: Sequence[str] = BACKGROUNDS
) -> dict[str, float]:
    """CLIP text–video score: 100 × cos(E_text(prompt), E_image(composite)) averaged over `frames` evenly spaced
    frames, per background (clip_score_<bg>) and over the backgrounds (clip_score). `scorer` is a
    wanalpha.clip.CLIPScorer (or anything with .similarity(text, images (N,H,W,3) uint8) → (N,) cosines)."""
    chosen = sample_frames(frames, len(rgb))
    scores = {}
    for over in backgrounds:
        images = composite(rgb[chosen], np.asarray(alpha)[chosen], over)
        scores[f"clip_score_{over}"] = 100 * float(np.mean(scorer.similarity(prompt, images)))
    scores["clip_score"] = float(np.mean(list(scores.values())))
    return scores
