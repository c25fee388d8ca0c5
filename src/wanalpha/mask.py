"""`wanalpha mask`: write a Wan-Alpha v2 Gaussian mask (the official file format) and a PNG preview of it over the
first frame, so a person sees where the object will be before generating with `--gauss_mask`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console

from wanalpha import masks
from wanalpha.config import MaskConfig
from wanalpha.data.video import write_image


def run(cfg: MaskConfig) -> Path:
    from wanalpha.data.video import read_video

    background = None
    height, width, num_frames = cfg.height, cfg.width, cfg.num_frames
    if cfg.mask_alpha_video is not None:
        frames, _ = read_video(cfg.mask_alpha_video)
        num_frames, height, width = frames.shape[:3]
        background = frames[0]
    mask, source = masks.make_mask(
        num_frames,
        height,
        width,
        alpha_video=cfg.mask_alpha_video,
        shift=cfg.mask_shift,
        ellipse=cfg.mask_ellipse,
        ellipse_end=cfg.mask_ellipse_end,
    )
    masks.save_mask(mask, cfg.output)
    png = Path(f"{cfg.output}.png")
    write_image(png, masks.preview(mask, background, height, width))
    coverage = float(np.mean(mask.numpy() > 0.5))
    Console(highlight=False).print(
        f"mask from {source}: {tuple(mask.shape)} (latent frames × h × w), {coverage:.0%} of cells above 0.5 → "
        f"{cfg.output} (preview {png}); use: wanalpha generate --gauss_mask {cfg.output} --alpha_shift_mean 0.05"
    )
    return Path(cfg.output)
