"""Compositing RGB + alpha over a background: pure tensor functions, shared by the losses and the outputs.

Conventions (reference NOTES §10.4 `pad_rgb`, §7): videos are (B,C,T,H,W) in [-1,1]; alpha in [-1,1] maps to
coverage a = (alpha+1)/2; the hard version is a > 0 (anything above fully transparent counts as opaque);
out = rgb·a + background·(1-a), per channel, no clamp. Alpha may have 1 channel or 3 (the alpha decoder's output).
"""

from __future__ import annotations

import torch

from wanalpha.data.checker import CHECKER_DARK, CHECKER_LIGHT, CHECKER_SQUARE, checker_grey

# The 8 corners of the RGB cube in [-1,1], blue bit fastest: index k = 4·r + 2·g + b (paper §3.1; official order).
BACKGROUND_COLOURS = torch.tensor(
    [[1.0 if k & 4 else -1.0, 1.0 if k & 2 else -1.0, 1.0 if k & 1 else -1.0] for k in range(8)]
)
COLOUR_NAMES = ("black", "blue", "green", "cyan", "red", "magenta", "yellow", "white")


def coverage(alpha: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """Alpha in [-1,1] → coverage in [0,1]; hard: 1 wherever alpha > -1, else 0."""
    a = (alpha + 1) * 0.5
    return (a > 0).to(alpha.dtype) if hard else a


def colour_background(index: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Cube-corner colour(s) shaped to broadcast over a (B,3,T,H,W) video: an int for all samples, or a (B,) tensor
    of indices, one per sample."""
    colours = BACKGROUND_COLOURS.to(device=like.device, dtype=like.dtype)
    if isinstance(index, int):
        if not 0 <= index < 8:
            raise ValueError(f"background colour index must be 0-7, got {index}")
        return colours[index].view(1, 3, 1, 1, 1)
    return colours[index.to(like.device).long()].view(-1, 3, 1, 1, 1)


def composite(
    rgb: torch.Tensor, alpha: torch.Tensor, background: int | torch.Tensor, hard: bool = False
) -> torch.Tensor:
    """rgb·a + background·(1-a). `background`: a colour index (int or (B,) tensor of ints), or any tensor that
    broadcasts to rgb (a colour (1,3,1,1,1), a checkerboard (3,H,W) → (1,3,1,H,W), a video)."""
    if isinstance(background, int) or (
        isinstance(background, torch.Tensor) and background.ndim == 1 and not background.is_floating_point()
    ):
        background = colour_background(background, rgb)
    elif background.ndim == 3:  # an image (3,H,W)
        background = background.to(rgb).unsqueeze(0).unsqueeze(2)
    a = coverage(alpha, hard)
    return rgb * a + background.to(rgb) * (1 - a)


def checkerboard(
    height: int,
    width: int,
    square: int = CHECKER_SQUARE,
    light: int = CHECKER_LIGHT,
    dark: int = CHECKER_DARK,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The official preview's grey checkerboard (3,H,W) in [-1,1] (data.checker), light square at the top-left."""
    grey = torch.from_numpy(checker_grey(height, width, square, light, dark)).to(device)
    return grey.expand(3, height, width)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1,1] → uint8 the way the official renderer does it: clamp, (x+1)/2·255, then TRUNCATE (NOTES §7, §8.18)."""
    return ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


def from_uint8(frames: torch.Tensor) -> torch.Tensor:
    """uint8 → [-1,1] float32 as the official data pipeline (ToTensor, then Normalize(0.5, 0.5))."""
    return (frames.float() / 255 - 0.5) / 0.5
