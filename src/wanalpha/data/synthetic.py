"""Synthetic RGBA clips: moving, scaling shapes with hard edges, feathered edges and semi-transparent regions.

As in real matting data (and the official Wan-Alpha `fgr` videos) the RGB video holds the *straight*
foreground colour, extended beyond the objects so that no edge mixes with a background; the alpha video is
grey. Each clip comes with a caption that says what is in it. Needs no network; deterministic in the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 200),
    "cyan": (40, 200, 220),
    "magenta": (220, 50, 180),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
EDGES = ("hard", "soft", "semi-transparent")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class SyntheticClip:
    rgb: np.ndarray  # (T, H, W, 3) uint8, straight foreground colour everywhere
    alpha: np.ndarray  # (T, H, W) uint8, 255 = opaque
    caption: str


def _signed_distance(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape of 'radius' r centred at (cx, cy)."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        qx, qy = np.abs(dx) - r, np.abs(dy) - r
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
        return outside + np.minimum(np.maximum(qx, qy), 0)
    # Equilateral triangle pointing up (polygon distance by its three edge half-planes; exact inside,
    # a close bound outside, which is all a feathered edge needs).
    normals = [(0.0, -1.0), (np.sqrt(3) / 2, 0.5), (-np.sqrt(3) / 2, 0.5)]
    return np.max([nx * dx + ny * dy - r * 0.5 for nx, ny in normals], axis=0)


def make_clip(rng: np.random.Generator, num_frames: int = 17, width: int = 128, height: int = 128) -> SyntheticClip:
    """One clip: a main shape that moves and scales, sometimes a second semi-transparent one behind it."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    size = min(width, height)
    layers = []
    n_layers = 1 + int(rng.random() < 0.5)
    for i in range(n_layers):
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        edge = str(rng.choice(EDGES)) if i == 0 else "semi-transparent"
        direction = str(rng.choice(list(DIRECTIONS)))
        growing = bool(rng.random() < 0.5)
        layers.append(
            dict(
                colour=colour,
                shape=shape,
                edge=edge,
                direction=direction,
                growing=growing,
                start=(rng.uniform(0.35, 0.65) * width, rng.uniform(0.35, 0.65) * height),
                speed=rng.uniform(0.15, 0.3) * size,
                radius=rng.uniform(0.14, 0.22) * size,
                opacity=rng.uniform(0.35, 0.7) if edge == "semi-transparent" else 1.0,
                feather=rng.uniform(0.04, 0.1) * size if edge != "hard" else 0.0,
            )
        )

    rgb = np.empty((num_frames, height, width, 3), np.uint8)
    alpha = np.empty((num_frames, height, width), np.uint8)
    # A gentle shading gradient so the RGB field is not flat colour.
    shade = 0.85 + 0.15 * (xs / max(width - 1, 1) + ys / max(height - 1, 1)) / 2
    for t in range(num_frames):
        p = t / max(num_frames - 1, 1)  # progress 0 → 1
        covered = np.zeros((height, width), np.float32)  # 1 - prod(1 - a): "over" accumulated front to back
        colour_sum = np.zeros((height, width, 3), np.float32)
        weight_sum = np.zeros((height, width), np.float32)
        for layer in layers:  # front to back
            dx, dy = DIRECTIONS[layer["direction"]]
            cx = layer["start"][0] + dx * layer["speed"] * (p - 0.5)
            cy = layer["start"][1] + dy * layer["speed"] * (p - 0.5)
            scale = 0.75 + 0.5 * p if layer["growing"] else 1.25 - 0.5 * p
            d = _signed_distance(layer["shape"], xs, ys, cx, cy, layer["radius"] * scale)
            if layer["feather"] > 0:
                a = np.clip(0.5 - d / layer["feather"], 0.0, 1.0)
            else:
                a = (d <= 0).astype(np.float32)
            a = a * layer["opacity"]
            # Visible share of this layer, plus a tiny distance-based weight that extends the straight
            # colour beyond all objects (nearest object wins where nothing covers the pixel).
            w = a * (1 - covered) + 1e-4 * np.exp(-np.maximum(d, 0) / (0.1 * size))
            colour_sum += w[..., None] * np.asarray(COLOURS[layer["colour"]], np.float32)
            weight_sum += w
            covered = covered + a * (1 - covered)
        straight = colour_sum / weight_sum[..., None] * shade[..., None]
        rgb[t] = np.clip(straight + 0.5, 0, 255).astype(np.uint8)
        alpha[t] = np.clip(covered * 255 + 0.5, 0, 255).astype(np.uint8)
    return SyntheticClip(rgb, alpha, _caption(layers))


def _caption(layers: list[dict]) -> str:
    parts = []
    for layer in layers:
        edge = {"hard": "with sharp edges", "soft": "with soft edges", "semi-transparent": ""}[layer["edge"]]
        noun = f"{layer['colour']} {layer['shape']}"
        if layer["edge"] == "semi-transparent":
            noun = "semi-transparent " + noun
        article = "an" if noun[0] in "aeiou" else "a"
        size = "growing" if layer["growing"] else "shrinking"
        words = [f"{article} {noun}", edge, f"moving {layer['direction']}", f"and {size}"]
        parts.append(" ".join(w for w in words if w))
    main = parts[0]
    if len(parts) > 1:
        main += ", in front of " + parts[1]
    return main + ", transparent background"


def write_synthetic_source(
    out_dir: Path,
    n: int,
    num_frames: int = 17,
    width: int = 128,
    height: int = 128,
    fps: float = 16.0,
    seed: int = 0,
    keep_existing: bool = False,
) -> list[str]:
    """Write N clips in the raw source layout (NNN.mp4, NNN_seg.mp4, NNN.txt); returns their base names.

    Clip i depends only on (seed, i), so a larger N extends a smaller one. With keep_existing (the caller knows
    the folder was made with the same settings) clips whose three files exist are left untouched.
    """
    from wanalpha.data.files import atomic_write_text
    from wanalpha.data.video import write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    digits = max(3, len(str(n)))
    names = []
    for i in range(n):
        name = f"{i + 1:0{digits}d}"
        names.append(name)
        files = [out_dir / f"{name}{suffix}" for suffix in (".mp4", "_seg.mp4", ".txt")]
        if keep_existing and all(f.is_file() for f in files):
            continue
        clip = make_clip(np.random.default_rng([seed, i]), num_frames, width, height)
        write_video(files[0], clip.rgb, fps)
        write_video(files[1], clip.alpha, fps)
        atomic_write_text(files[2], clip.caption + "\n")
    return names
