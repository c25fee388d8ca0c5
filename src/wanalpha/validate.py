"""`wanalpha validate` (seed guide Step 3): reconstruct clips through the RGB-alpha VAE and measure the error.

For one clip (`--test_rgb_video/--test_alpha_video`) or a dataset (`--dataset_base_path`): the RGB is hard-rendered
over `--background` (the encoder input of training), encoded with its alpha, merged, decoded by both decoders and
compared with the input. Writes {prefix}_gt_rgb.mp4, {prefix}_gt_alpha.mp4, {prefix}_pred_rgb.mp4,
{prefix}_pred_alpha.mp4, {prefix}_contact_sheet.png, {prefix}_metrics.json and {prefix}_config.yaml (with a dataset
the clip's name follows the prefix).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from wanalpha.checkpoints.vae import load_rgba_vae
from wanalpha.config import ValidateConfig
from wanalpha.data.dataset import ClipFiles, ClipSpec, count_frames, load_clip, read_metadata, to_model_space
from wanalpha.data.files import atomic_write_text
from wanalpha.data.render import composite, to_uint8
from wanalpha.data.video import probe_video, write_image, write_video
from wanalpha.errors import WanAlphaError
from wanalpha.metrics import checkerboard_composite, rgba_metrics
from wanalpha.models.rgba import RGBAlphaVAE
from wanalpha.progress import status
from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime, autocast, default_device, resolve_precision

GOOD_MAE = 20.0
GUIDE_QUOTE = "reconstruction error should be < 20 MAE"  # the seed guide's words, its only threshold
# The guide's threshold applies to every MAE we report; the verdict is "good" only when each is below it.
VERDICT_MAES = ("alpha_mae", "rgb_weighted_mae", "composite_mae")
SHOWN = (
    "alpha_mae",
    "alpha_psnr",
    "alpha_ssim",
    "composite_mae",
    "composite_psnr",
    "composite_ssim",
    "rgb_weighted_mae",
    "rgb_weighted_psnr",
    "alpha_sad",
    "alpha_mse",
    "alpha_grad",
    "alpha_conn",
    "alpha_dtssd",
)


def clip_spec_for(
    clip: ClipFiles, height: int | None = None, width: int | None = None, num_frames: int | None = None
) -> tuple[ClipSpec, int, float]:
    """(spec, frames available, fps). The size and frame count when given; otherwise the clip's own size (rounded
    down to 16) and its longest 4n+1 prefix. The RGB video is probed (decoded) once here and never again."""
    info = probe_video(clip.rgb)
    available = min(info.num_frames, count_frames(clip.alpha))
    height = height or info.height // 16 * 16
    width = width or info.width // 16 * 16
    frames = num_frames or 1 + (available - 1) // 4 * 4
    if min(height, width) < 16:
        raise WanAlphaError(f"{clip.rgb}: {info.width}x{info.height} is too small for the VAE (needs 16x16)")
    return ClipSpec(height, width, frames), available, info.fps or 16.0


@torch.no_grad()
def reconstruct(
    model: RGBAlphaVAE, rgb_u8: np.ndarray, alpha_u8: np.ndarray, background: int, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 clip → its uint8 reconstruction (rgb (T,H,W,3), alpha (T,H,W)), truncated like the official renderer."""
    device = next(model.merge.parameters()).device
    rgb_u8, alpha_u8 = torch.from_numpy(rgb_u8)[None].to(device), torch.from_numpy(alpha_u8)[None].to(device)
    rgb, alpha = to_model_space(rgb_u8, alpha_u8)
    with autocast(device, precision):
        z = model.encode(composite(rgb, alpha, background, hard=True), alpha)
        pred_rgb, pred_alpha = model.decode(z)
    pred_rgb = to_uint8(pred_rgb.float())[0].permute(1, 2, 3, 0).cpu().numpy()
    pred_alpha = to_uint8(pred_alpha.float())[0, 0].cpu().numpy()
    return pred_rgb, pred_alpha


def contact_sheet(gt_rgb, gt_alpha, pred_rgb, pred_alpha, max_width: int = 2400) -> np.ndarray:
    """Rows = first, middle and last frame; columns = gt RGB, pred RGB, gt alpha, pred alpha, gt composite,
    pred composite, error heat-map (|composite difference|, 0 → blue, ≥64 → red)."""
    frames = sorted({0, len(gt_rgb) // 2, len(gt_rgb) - 1})
    gc = checkerboard_composite(torch.from_numpy(gt_rgb), torch.from_numpy(gt_alpha)).numpy()
    pc = checkerboard_composite(torch.from_numpy(pred_rgb), torch.from_numpy(pred_alpha)).numpy()
    labels = ("gt rgb", "pred rgb", "gt alpha", "pred alpha", "gt composite", "pred composite", "error")
    rows = []
    for t in frames:
        err = np.clip(np.abs(pc[t] - gc[t]).mean(-1) * 4, 0, 255).astype(np.uint8)
        heat = cv2.cvtColor(cv2.applyColorMap(err, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        grey = [np.repeat(a[t][..., None], 3, -1) for a in (gt_alpha, pred_alpha)]
        tiles = [gt_rgb[t], pred_rgb[t], *grey, gc[t].astype(np.uint8), pc[t].astype(np.uint8), heat]
        rows.append(np.concatenate(tiles, axis=1))
    sheet = np.concatenate(rows, axis=0)
    tile_w = gt_rgb.shape[2]
    if tile_w < 160:  # small clips: enlarge (nearest) so the labels fit and pixels stay visible
        factor = -(-160 // tile_w)
        sheet = cv2.resize(sheet, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
        tile_w *= factor
    header = np.full((28, sheet.shape[1], 3), 255, np.uint8)
    for i, label in enumerate(labels):
        cv2.putText(header, label, (i * tile_w + 4, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    sheet = np.concatenate([header, sheet], axis=0)
    if sheet.shape[1] > max_width:
        scale = max_width / sheet.shape[1]
        sheet = cv2.resize(sheet, (max_width, round(sheet.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return sheet


def failing(m: dict[str, float]) -> list[str]:
    """The verdict's MAEs that are not below the guide's threshold."""
    return [key for key in VERDICT_MAES if not m[key] < GOOD_MAE]


def verdict(m: dict[str, float]) -> str:
    """'good' when alpha, RGB and composite MAE are each below 20, else which are not."""
    bad = failing(m)
    return "good" if not bad else "high error: " + ", ".join(k.removesuffix("_mae").replace("_", " ") for k in bad)


def _verdict(m: dict[str, float]) -> str:
    text = verdict(m)
    return f"[green]{text}[/]" if text == "good" else f"[red]{text}[/]"


def _cell(key: str, value: float) -> str:
    """A metric's value; a verdict MAE also against the threshold."""
    if key not in VERDICT_MAES:
        return _fmt(value)
    return f"{_fmt(value)} [green]✓[/]" if value < GOOD_MAE else f"{_fmt(value)} [red]✗[/]"


def metrics_table(results: dict[str, dict[str, float]], mean: dict[str, float]) -> Table:
    """A few clips: one column per clip, one row per metric. Many clips: one row per clip, the key metrics."""
    title = (
        f'validate: MAE on the 0-255 scale; the seed guide: "{GUIDE_QUOTE}" — checked (✓/✗) for the alpha, '
        "RGB and composite MAE; the verdict is good when all three pass"
    )
    columns = dict(results) | ({"mean": mean} if len(results) > 1 else {})
    if len(results) <= 4:
        table = Table(title=title)
        table.add_column("metric")
        for name in columns:
            table.add_column(name, justify="right")
        for key in SHOWN:
            table.add_row(key.replace("_", " "), *(_cell(key, m[key]) for m in columns.values()))
        table.add_row("verdict", *(_verdict(m) for m in columns.values()))
        return table
    keys = ("alpha_mae", "rgb_weighted_mae", "composite_mae", "composite_psnr")
    table = Table(title=title)
    table.add_column("clip")
    for key in keys:
        table.add_column(key.replace("_", " "), justify="right")
    table.add_column("verdict")
    for name, m in columns.items():
        table.add_row(name, *(_cell(k, m[k]) for k in keys), _verdict(m))
    return table


def _clips(cfg: ValidateConfig) -> list[ClipFiles]:
    if cfg.test_rgb_video is not None:
        for path in (cfg.test_rgb_video, cfg.test_alpha_video):
            if not Path(path).is_file():
                raise WanAlphaError(f"video {path} does not exist")
        name = Path(cfg.test_rgb_video).stem.removesuffix("_rgb")
        return [ClipFiles(name, Path(cfg.test_rgb_video), Path(cfg.test_alpha_video))]
    clips = read_metadata(cfg.dataset_base_path, cfg.dataset_metadata_path)
    return clips[: cfg.max_clips] if cfg.max_clips else clips


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def run(cfg: ValidateConfig) -> dict:
    console = Console(stderr=True, highlight=False)
    device = default_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    clips = _clips(cfg)
    model = load_rgba_vae(
        cfg.base_vae_path, cfg.vae_lora_path, merge=cfg.feature_merge_checkpoint, variant=cfg.variant, device=device
    )
    apply_vae_runtime(model, GPU_LAYOUT)
    prefix = cfg.output_prefix
    single = cfg.test_rgb_video is not None
    results: dict[str, dict[str, float]] = {}
    for clip in clips:
        spec, available, fps = clip_spec_for(clip, cfg.height, cfg.width, cfg.num_frames)
        gt_rgb, gt_alpha = load_clip(clip, spec, available)
        with status(console, f"reconstructing {clip.name} ({spec.num_frames}x{spec.height}x{spec.width})"):
            pred_rgb, pred_alpha = reconstruct(model, gt_rgb, gt_alpha, cfg.background, precision)
        results[clip.name] = rgba_metrics(*(torch.from_numpy(x) for x in (gt_rgb, gt_alpha, pred_rgb, pred_alpha)))
        stem = prefix if single else f"{prefix}_{clip.name.replace('/', '_')}"
        for kind, frames in (
            ("gt_rgb", gt_rgb),
            ("gt_alpha", gt_alpha),
            ("pred_rgb", pred_rgb),
            ("pred_alpha", pred_alpha),
        ):
            write_video(Path(f"{stem}_{kind}.mp4"), frames, fps)
        write_image(Path(f"{stem}_contact_sheet.png"), contact_sheet(gt_rgb, gt_alpha, pred_rgb, pred_alpha))
    mean = {k: sum(r[k] for r in results.values()) / len(results) for k in next(iter(results.values()))}
    report = {
        "clips": results,
        "mean": mean,
        "thresholds": {"good_mae": GOOD_MAE, "seed_guide": GUIDE_QUOTE, "verdict_uses": list(VERDICT_MAES)},
        "verdict": {name: verdict(m) for name, m in (results | {"mean": mean}).items()},
    }
    atomic_write_text(Path(f"{prefix}_metrics.json"), json.dumps(report, indent=2) + "\n")
    atomic_write_text(Path(f"{prefix}_config.yaml"), cfg.to_yaml())
    from wanalpha.checkpoints.provenance import write_provenance

    inputs = {"base_vae": cfg.base_vae_path, "decoder_lora": cfg.vae_lora_path, "merge": cfg.feature_merge_checkpoint}
    write_provenance(Path(prefix).parent, "validate", inputs, name=f"{Path(prefix).name}_provenance.json")

    Console(highlight=False).print(metrics_table(results, mean))
    if cfg.max_mae is not None and (worst := max(VERDICT_MAES, key=lambda k: mean[k])) and mean[worst] > cfg.max_mae:
        raise WanAlphaError(
            f"{worst.replace('_', ' ')} {mean[worst]:.2f} is above --max-mae {cfg.max_mae:g} (the "
            "mean alpha, RGB and composite MAE must each be at most it)"
        )
    return report
