"""wanalpha.quality on synthetic clips with controlled defects: each metric moves the right way, by a monotone amount,
as the defect grows (haze added at rising levels, flicker injected, edges hardened, alpha emptied or filled)."""

from __future__ import annotations

import numpy as np
import pytest

from wanalpha import quality

T, H, W = 9, 64, 64


def clean_clip(step: float = 2.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc (radius 14, edge feathered over ~6 px) moving `step` px right per frame over black; alpha in
    [0,1]. The texture moves with the disc, so the optical flow can follow it."""
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, (H // 4, 2 * W // 4, 3)).astype(np.uint8)
    texture = np.kron(texture, np.ones((4, 4, 1), np.uint8))  # 4-px cells: structure the flow can match
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    rgb, alpha = np.zeros((T, H, W, 3), np.uint8), np.zeros((T, H, W), np.float32)
    for t in range(T):
        cx = 20 + step * t
        alpha[t] = np.clip((14 - np.hypot(xs - cx, ys - 32)) / 6 + 0.5, 0, 1)
        offset = int(round(step * t))
        rgb[t] = texture[:, W - offset : 2 * W - offset]
    rgb = (rgb * (alpha[..., None] > 0)).astype(np.uint8)  # black where nothing is
    return rgb, alpha


def strictly(values: list[float], direction: str) -> bool:
    pairs = list(zip(values, values[1:], strict=False))
    return all(b > a for a, b in pairs) if direction == "up" else all(b < a for a, b in pairs)


def test_haze_at_rising_levels_raises_the_haze_metrics() -> None:
    rgb, alpha = clean_clip()
    noise = np.random.default_rng(1).random(alpha.shape).astype(np.float32)
    rows = [quality.clip_quality(rgb, np.maximum(alpha, level * noise)) for level in (0.0, 0.1, 0.2, 0.3, 0.45)]
    assert rows[0]["background_haze"] == 0 and rows[0]["clean_frames"] == 1 and rows[0]["haze_level"] == 0
    assert strictly([r["background_haze"] for r in rows], "up")
    assert strictly([r["haze_level"] for r in rows], "up")
    clean = [r["clean_frames"] for r in rows]
    assert clean == sorted(clean, reverse=True) and clean[-1] == 0
    assert rows[-1]["background_haze"] == pytest.approx(1 - quality.TRANSPARENT / 0.45, abs=0.02)  # P(0.45 u > τ)
    assert all(r["empty"] == 0 and r["opaque"] == 0 for r in rows)


def test_haze_on_some_frames_lowers_the_clean_frame_share() -> None:
    rgb, alpha = clean_clip()
    shares = []
    for hazy_frames in (0, 2, 5, 9):
        hazy = alpha.copy()
        hazy[:hazy_frames] = np.maximum(hazy[:hazy_frames], 0.3)
        shares.append(quality.background(hazy)["clean_frames"])
    assert shares == pytest.approx([1.0, 7 / 9, 4 / 9, 0.0])


def test_background_is_far_from_the_subject_only() -> None:
    """A soft edge is no haze: the background starts `margin` px from the subject."""
    _, alpha = clean_clip()
    assert quality.background(alpha, margin=8)["background_haze"] == 0
    assert quality.background(alpha, margin=0)["background_haze"] > 0  # the feathered rim, counted when adjacent


def test_injected_flicker_raises_the_flicker_metrics() -> None:
    rgb, alpha = clean_clip()
    odd = (np.arange(T) % 2 == 1)[:, None, None]
    rows = [quality.clip_quality(rgb, alpha * (1 - amount * odd)) for amount in (0.0, 0.1, 0.2, 0.4)]
    assert strictly([r["alpha_flicker"] for r in rows], "up")
    assert strictly([r["alpha_temporal_flickering"] for r in rows], "down")
    # VBench's score is for still clips ("please ensure the video is static"): the moving texture dominates it
    still_rgb, still_alpha = clean_clip(step=0.0)
    still = [quality.clip_quality(still_rgb, still_alpha * (1 - amount * odd)) for amount in (0.0, 0.1, 0.2, 0.4)]
    assert still[0]["temporal_flickering"] == 1 and strictly([r["temporal_flickering"] for r in still], "down")


def test_motion_compensation_does_not_punish_real_motion() -> None:
    """A disc moving 2 px a frame: differencing alone sees change at its edges, the flow-compensated flicker almost
    none; a still disc has none at all."""
    rgb, alpha = clean_clip(step=2.0)
    compensated = quality.alpha_flicker(rgb, alpha)
    active = (alpha[1:] > quality.TRANSPARENT) | (alpha[:-1] > quality.TRANSPARENT)
    plain = float(np.abs(np.diff(alpha, axis=0))[active].mean())
    assert compensated < 0.3 * plain, (compensated, plain)
    flickering = quality.alpha_flicker(rgb, alpha * (1 - 0.2 * (np.arange(T) % 2 == 1)[:, None, None]))
    assert compensated < 0.5 * flickering
    still_rgb, still_alpha = clean_clip(step=0.0)
    assert quality.alpha_flicker(still_rgb, still_alpha) == pytest.approx(0, abs=1e-6)


def test_hardened_edges_lower_the_soft_edge_share() -> None:
    rgb, alpha = clean_clip()
    rows = [quality.edges(np.clip((alpha - 0.5) * k + 0.5, 0, 1)) for k in (1, 1.5, 2, 4, 16)]
    assert strictly([r["edge_soft"] for r in rows], "down")
    assert rows[0]["edge_soft"] > 0.5 and rows[-1]["edge_soft"] < 0.25


def test_edges_hardened_on_alternate_frames_raise_the_edge_change() -> None:
    rgb, alpha = clean_clip()
    odd = (np.arange(T) % 2 == 1)[:, None, None]
    changes = []
    for k in (1, 1.5, 2, 4):
        hard = np.clip((alpha - 0.5) * k + 0.5, 0, 1)
        changes.append(quality.edges(np.where(odd, hard, alpha))["edge_soft_change"])
    assert changes[0] < 0.02 and strictly(changes, "up")


def test_emptied_alpha_lowers_coverage_and_raises_the_empty_flag() -> None:
    rgb, alpha = clean_clip()
    rows = [quality.clip_quality(rgb, alpha * scale) for scale in (1.0, 0.5, 0.2, 0.1, 0.04, 0.0)]
    coverage = [r["coverage"] for r in rows]
    assert strictly(coverage[:4], "down") and coverage[-2:] == [0.0, 0.0]
    assert [r["empty"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert np.isnan(rows[-1]["edge_soft"])  # no subject, no edge: missing, not a number that could win


def test_filled_alpha_raises_opaque_share_and_flag() -> None:
    rgb, alpha = clean_clip()
    rows = []
    for columns in (0, 16, 32, 48, 62, 64):  # an opaque slab over a rising share of the frame
        filled = alpha.copy()
        filled[:, :, :columns] = 1
        rows.append(quality.clip_quality(rgb, filled))
    opaque = [r["opaque_share"] for r in rows]
    assert strictly(opaque, "up") and opaque[-1] == 1
    assert [r["opaque"] for r in rows] == [0, 0, 0, 0, 1, 1]
    assert np.isnan(rows[-1]["background_haze"])  # no background left to judge


def test_vbench_temporal_flickering_formula() -> None:
    frames = np.zeros((3, 4, 4), np.uint8)
    frames[1] = 51  # |Δ| = 51 then 51: mean 51 → (255 − 51)/255 = 0.8
    assert quality.temporal_flickering(frames) == pytest.approx(0.8)
    assert quality.temporal_flickering(frames[:1]) == 1.0


def test_composites_and_uint8_input() -> None:
    rgb, alpha = clean_clip()
    alpha_u8 = (alpha * 255 + 0.5).astype(np.uint8)
    assert quality.clip_quality(rgb, alpha_u8)["background_haze"] == 0
    half = np.full((1, 2, 2), 128, np.uint8)
    red = np.zeros((1, 2, 2, 3), np.uint8)
    red[..., 0] = 255
    assert quality.composite(red, half, "black")[0, 0, 0].tolist() == [128, 0, 0]
    assert quality.composite(red, half, "white")[0, 0, 0].tolist() == [255, 127, 127]
    with pytest.raises(ValueError, match="unknown background"):
        quality.composite(red, half, "green")


class BrightnessScorer:
    """A stand-in for CLIP: 'similarity' = mean brightness of each image (what the plumbing passes on is checked)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def similarity(self, text: str, images: np.ndarray) -> np.ndarray:
        self.calls.append((text, images.shape))
        return images.reshape(len(images), -1).mean(1) / 255


def test_clip_score_averages_frames_and_backgrounds() -> None:
    rgb, alpha = clean_clip()
    scorer = BrightnessScorer()
    scores = quality.clip_score(scorer, "a disc", rgb, alpha, frames=4)
    assert [c[1] for c in scorer.calls] == [(4, H, W, 3)] * 3 and all(c[0] == "a disc" for c in scorer.calls)
    assert scores["clip_score_black"] < scores["clip_score_checkerboard"] < scores["clip_score_white"]
    mean = np.mean([scores[f"clip_score_{b}"] for b in quality.BACKGROUNDS])
    assert scores["clip_score"] == pytest.approx(mean)
    assert quality.sample_frames(4, 9) == [0, 3, 5, 8] and quality.sample_frames(8, 3) == [0, 1, 2]
