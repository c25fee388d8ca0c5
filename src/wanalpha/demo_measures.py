"""How well a generated RGBA clip shows what its prompt names, for the demo's synthetic vocabulary
(`wanalpha.data.synthetic`: a colour, a shape, opaque inside, nothing around it).

Each measure works on uint8 frames (rgb (T,H,W,3), alpha (T,H,W)) and is checked on the synthetic clips themselves
(tests/test_demo_measures.py), where the truth is known:

- object mask: alpha ≥ 128 (where the synthetic clips' soft edges cross the shape's outline);
- colour: the median RGB of the mask's pixels → "white" if its chroma (max − min) is below 60 levels, else the
  palette colour of nearest hue (the synthetic shading changes brightness, not hue);
- shape: on the largest 4-connected part of the mask, in frames where it touches no border, the fill ratio of its
  bounding box (square 1.0, circle π/4 ≈ 0.79, upward triangle 0.5): ≥ 0.9 square, ≥ 0.65 circle, else triangle;
  the clip's shape is the majority over those frames;
- opacity: the largest alpha, and the share of interior pixels (the mask eroded by 2 px) at alpha ≥ 250;
- haze: mean alpha of the background (pixels 3 px or more away from the mask), in 0-255 levels.
"""

from __future__ import annotations

import colorsys
import re
from collections import Counter

import numpy as np

from wanalpha.data.synthetic import COLOURS, SHAPES

MASK_LEVEL = 128
OPAQUE_LEVEL = 250
WHITE_CHROMA = 60
SQUARE_FILL, CIRCLE_FILL = 0.9, 0.65
ERODE, MARGIN = 2, 3
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items() if name != "white"}


def named(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape a prompt in the synthetic captions' grammar names first ("a red circle …", "a
    semi-transparent blue square …"); None for what it does not name."""
    found = re.match(r"\s*an? (?:semi-transparent )?(\w+) (\w+)", prompt.lower())
    if not found:
        return None, None
    colour, shape = found.groups()
    return (colour if colour in COLOURS else None), (shape if shape in SHAPES else None)


def classify_colour(pixels: np.ndarray) -> str | None:
    """(N,3) uint8 RGB → the palette name it shows (None for no pixels)."""
    if len(pixels) == 0:
        return None
    r, g, b = np.median(pixels.reshape(-1, 3).astype(np.float32), axis=0)
    if max(r, g, b) - min(r, g, b) < WHITE_CHROMA:
        return "white"
    hue = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0]
    return min(_HUES, key=lambda name: min(abs(hue - _HUES[name]), 1 - abs(hue - _HUES[name])))


def _largest_part(mask: np.ndarray) -> np.ndarray:
    import cv2

    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def classify_shape_frame(mask: np.ndarray) -> str | None:
    """One frame's (H,W) bool mask → its shape, or None where there is no object or it touches the border."""
    part = _largest_part(mask)
    if part.sum() < 12:
        return None
    rows, cols = np.nonzero(part)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    if top == 0 or left == 0 or bottom == mask.shape[0] - 1 or right == mask.shape[1] - 1:
        return None
    fill = part.sum() / ((bottom - top + 1) * (right - left + 1))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= CIRCLE_FILL else "triangle"


def classify_shape(alpha: np.ndarray) -> str | None:
    """(T,H,W) uint8 alpha → the shape most frames show (None if no frame shows one)."""
    votes = Counter(s for s in (classify_shape_frame(a >= MASK_LEVEL) for a in alpha) if s is not None)
    return votes.most_common(1)[0][0] if votes else None


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, borderValue=0).astype(bool)


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def measure(rgb: np.ndarray, alpha: np.ndarray, colour: str | None = None, shape: str | None = None) -> dict:
    """A clip's measures (see the module's docstring); with the prompt's colour and shape, whether each came out."""
    if shape is not None and shape not in SHAPES or colour is not None and colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r} or shape {shape!r}")
    mask = alpha >= MASK_LEVEL
    interior = np.stack([_erode(m, ERODE) for m in mask])
    background = ~np.stack([_dilate(m, MARGIN) for m in mask])
    out = {
        "alpha_max": int(alpha.max()),
        "object_share": round(float(mask.mean()), 4),
        "interior_opaque": round(float((alpha[interior] >= OPAQUE_LEVEL).mean()), 4) if interior.any() else 0.0,
        "haze": round(float(alpha[background].mean()), 2) if background.any() else 0.0,
        "colour_seen": classify_colour(rgb[mask]),
        "shape_seen": classify_shape(alpha),
    }
    if colour is not None:
        out["colour_ok"] = out["colour_seen"] == colour
    if shape is not None:
        out["shape_ok"] = out["shape_seen"] == shape
    if colour is not None and shape is not None:
        out["follows"] = out["colour_ok"] and out["shape_ok"]
    return out


def summarise(rows: list[dict]) -> dict:
    """Means over clips' measures: the share that follow their prompt (colour and shape), and each part."""
    out = {"clips": len(rows)}
    for key in ("follows", "colour_ok", "shape_ok"):
        if rows and key in rows[0]:
            out[key] = round(float(np.mean([r[key] for r in rows])), 3)
    for key in ("alpha_max", "interior_opaque", "haze", "object_share"):
        out[key] = round(float(np.mean([r[key] for r in rows])), 3) if rows else 0.0
    return out
