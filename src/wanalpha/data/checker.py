"""The grey checkerboard of the official preview (reference NOTES §7) in NumPy, and uint8 frames composited over it.

Torch-free, so that the writer process (wanalpha.outputs) composites without loading torch. `render.checkerboard`
is this board as a tensor, and `checker_composite` equals `metrics.checkerboard_composite(...).astype(uint8)`
exactly: the same float32 operations in the same order (tests/test_outputs.py checks every rgb × alpha pair).
"""

from __future__ import annotations

import functools

import numpy as np

# 30 px squares of grey 140 and 113 (uint8), light at the top-left.
CHECKER_SQUARE, CHECKER_LIGHT, CHECKER_DARK = 30, 140, 113

_ONE = np.float32(1)


def checker_grey(
    height: int, width: int, square: int = CHECKER_SQUARE, light: int = CHECKER_LIGHT, dark: int = CHECKER_DARK
) -> np.ndarray:
    """The checkerboard (H,W) float32 in [-1,1]."""
    ys = np.arange(height) // square
    xs = np.arange(width) // square
    light_cell = ((ys[:, None] + xs[None, :]) % 2 == 0).astype(np.float32)
    return (light_cell * np.float32(light) + (_ONE - light_cell) * np.float32(dark)) / np.float32(127.5) - _ONE


@functools.lru_cache(maxsize=4)
def _board(height: int, width: int) -> np.ndarray:
    board = ((checker_grey(height, width) + _ONE) * np.float32(127.5))[..., None]  # (H,W,1) in [0,255]
    board.setflags(write=False)
    return board


def checker_composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 rgb (..., H,W,3) over the checkerboard with uint8 alpha (..., H,W) → uint8 (..., H,W,3), truncated."""
    a = alpha.astype(np.float32)[..., None] / np.float32(255)
    return (rgb.astype(np.float32) * a + _board(*rgb.shape[-3:-1]) * (_ONE - a)).astype(np.uint8)
