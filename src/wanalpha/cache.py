"""`wanalpha cache`: run the frozen Wan2.1 encoder once per clip and store what stage-1 training needs.

Per clip: the hard render of the RGB over each requested background colour through the encoder (the official
encoder input), the alpha through the same encoder, and the resized uint8 frames. Resumable: a shard whose metadata
matches the settings and the source files' hashes is skipped; anything else is (re)written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from wanalpha.checkpoints.provenance import file_sha256, write_provenance
from wanalpha.checkpoints.vae import load_wan_vae
from wanalpha.config import CacheConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, load_clip, to_model_space
from wanalpha.data.files import write_if_changed
from wanalpha.data.latent_cache import read_shard_metadata, shard_path, write_index, write_shard
from wanalpha.data.render import composite
from wanalpha.models.vae import WanVAE
from wanalpha.runtime import autocast, default_device, resolve_precision


def clip_spec(cfg) -> ClipSpec:
    return ClipSpec(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)


@torch.no_grad()
def encode_clip(
    encoder: WanVAE, rgb: torch.Tensor, alpha: torch.Tensor, colours: list[int], precision: str
) -> dict[str, torch.Tensor]:
    """Latents of one clip: rgb (1,3,T,H,W) and alpha (1,1,T,H,W) in [-1,1] → rgb_latents (n,16,…), alpha_latent."""
    with autocast(rgb.device, precision):
        alpha_latent = encoder.encode(alpha.expand(-1, 3, -1, -1, -1))
        rgb_latents = [encoder.encode(composite(rgb, alpha, k, hard=True)) for k in colours]
    return {
        "rgb_latents": torch.cat(rgb_latents).float().cpu(),
        "alpha_latent": alpha_latent[0].float().cpu(),
        "colours": torch.tensor(colours, dtype=torch.int64),
    }


def run(cfg: CacheConfig) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    device = default_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    out = Path(cfg.output_dir)
    spec = clip_spec(cfg)
    dataset = RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec)
    for name, reason in dataset.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    settings = {
        "height": cfg.height, "width": cfg.width, "num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride,
        "loop_short_clips": cfg.loop_short_clips, "colours": list(cfg.colours),
        "vae_sha256": file_sha256(cfg.base_vae_path), "dtype": "float32" if precision == "no" else precision,
    }  # fmt: skip
    encoder = None
    written = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("caching latents", total=len(dataset))
        for i, clip in enumerate(dataset.clips):
            path = shard_path(out, clip.name)
            expected = settings | {"name": clip.name, "rgb_sha256": file_sha256(clip.rgb),
                                   "alpha_sha256": file_sha256(clip.alpha)}  # fmt: skip
            if read_shard_metadata(path) == expected:
                progress.advance(task)
                continue
            if encoder is None:  # loaded only when something needs encoding
                encoder = load_wan_vae(cfg.base_vae_path, device=device, with_decoder=False)
            rgb_u8, alpha_u8 = load_clip(clip, spec, dataset.available[i])
            rgb_u8, alpha_u8 = torch.from_numpy(rgb_u8), torch.from_numpy(alpha_u8)
            rgb, alpha = to_model_space(rgb_u8[None].to(device), alpha_u8[None].to(device))
            tensors = encode_clip(encoder, rgb, alpha, list(cfg.colours), precision)
            write_shard(path, tensors | {"rgb_frames": rgb_u8, "alpha_frames": alpha_u8}, expected)
            written += 1
            progress.advance(task)
    write_index(out, settings, [c.name for c in dataset.clips])
    write_if_changed(out / "config.yaml", cfg.to_yaml())
    write_provenance(out, "cache", inputs={"base_vae": cfg.base_vae_path})
    Console(highlight=False).print(
        f"cache: {len(dataset)} clips in {out} ({written} encoded now, {len(dataset) - written} already cached, "
        f"{len(dataset.skipped)} skipped); train with: wanalpha train-merge --cache_dir {out} …"
    )
    return out
