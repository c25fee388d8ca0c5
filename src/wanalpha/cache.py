"""`wanalpha cache`: run the frozen encoders once per clip and store what training needs.

--stage merge (train-merge): per clip, the hard render of the RGB over each requested background colour through
the Wan2.1 encoder (the official encoder input), the alpha through the same encoder, and the resized uint8 frames.
--stage dit (train-dit): per clip, the merged latent (encoder + trained merge block) and the prompt's UMT5 states, so
that DiT training holds only the DiT; with --variant v2 the merge is the v2 EncoderFeatureMerge and each shard also
holds the clip's Gaussian mask (the T2V training variant of the fit, NOTES §10.5). --colour-draw clip (official) keeps
one latent per clip, over the clip's one colour (`clip_colour`, recorded in the shard); step keeps one per colour.
Resumable: a shard whose metadata matches the settings and the inputs' hashes is skipped; anything else is
(re)written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from wanalpha.checkpoints.provenance import file_sha256, write_provenance
from wanalpha.config import CacheConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, clip_colour, load_clip, to_model_space
from wanalpha.data.files import write_if_changed
from wanalpha.data.latent_cache import read_shard_metadata, shard_path, write_index, write_shard
from wanalpha.data.render import composite
from wanalpha.models.vae import WanVAE, autotuned_convolutions
from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime, autocast, default_device, resolve_precision


@torch.no_grad()
def encode_clip(
    encoder: WanVAE, rgb: torch.Tensor, alpha: torch.Tensor, colours: list[int], precision: str
) -> dict[str, torch.Tensor]:
    """Stage-1 latents of one clip: rgb (1,3,T,H,W) and alpha (1,1,T,H,W) in [-1,1] → rgb_latents (n,16,…),
    alpha_latent (16,…)."""
    with autocast(rgb.device, precision):
        alpha_latent = encoder.encode(alpha.expand(-1, 3, -1, -1, -1))
        rgb_latents = [encoder.encode(composite(rgb, alpha, k, hard=True)) for k in colours]
    return {
        "rgb_latents": torch.cat(rgb_latents).float().cpu(),
        "alpha_latent": alpha_latent[0].float().cpu(),
        "colours": torch.tensor(colours, dtype=torch.int64),
    }


@torch.no_grad()
def encode_merged(rgba, rgb: torch.Tensor, alpha: torch.Tensor, colours: list[int], precision: str) -> torch.Tensor:
    """Merged latents of one clip, one per colour: (n, 16, T_lat, h, w) float32."""
    with autocast(rgb.device, precision):
        if rgba.variant == "v2":  # the encoder's features of both videos through EncoderFeatureMerge, normalised
            merged = [rgba.encode(composite(rgb, alpha, k, hard=True), alpha) for k in colours]
        else:
            z_alpha = rgba.encoder.encode(alpha.expand(-1, 3, -1, -1, -1))
            merged = [rgba.merge(rgba.encoder.encode(composite(rgb, alpha, k, hard=True)), z_alpha) for k in colours]
    return torch.cat(merged).float().cpu()


def run(cfg: CacheConfig, hint: bool = True) -> Path:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True, highlight=False)
    device = default_device()
    precision = resolve_precision(cfg.mixed_precision, device)
    out = Path(cfg.output_dir)
    spec = ClipSpec(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)
    dataset = RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec)
    for name, reason in dataset.skipped:
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    settings = {
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "frame_stride": cfg.frame_stride,
        "loop_short_clips": cfg.loop_short_clips,
        "colours": list(cfg.colours),
        "vae_sha256": file_sha256(cfg.base_vae_path),
        "dtype": "float32" if precision == "no" else precision,
    }
    inputs = {"base_vae": cfg.base_vae_path}
    if cfg.stage == "dit":
        from wanalpha.checkpoints.wan import wan_model_files

        files = wan_model_files(need=("t5",), **cfg.wan_files())
        settings |= {
            "merge_sha256": file_sha256(cfg.feature_merge_checkpoint),
            "t5_sha256": file_sha256(files["t5"]),
            "variant": cfg.variant,
            "colour_draw": cfg.colour_draw,
        }
        if cfg.colour_draw == "clip":
            settings["seed"] = cfg.seed
        inputs |= {"feature_merge": cfg.feature_merge_checkpoint, "t5": files["t5"]}
    models: dict = {}

    def colours_of(clip) -> list[int]:
        """The colours a clip's shard holds: its one drawn colour (--colour-draw clip, stage dit) or all of them."""
        if cfg.stage == "dit" and cfg.colour_draw == "clip":
            return [clip_colour(cfg.seed, clip.name, list(cfg.colours))]
        return list(cfg.colours)

    def encode(clip, index: int) -> dict[str, torch.Tensor]:
        rgb_u8, alpha_u8 = (torch.from_numpy(a) for a in load_clip(clip, spec, dataset.available[index]))
        rgb, alpha = to_model_space(rgb_u8[None].to(device), alpha_u8[None].to(device))
        if cfg.stage == "merge":
            if "encoder" not in models:  # loaded only when something needs encoding
                from wanalpha.checkpoints.vae import load_wan_vae

                encoder = load_wan_vae(cfg.base_vae_path, device=device, with_decoder=False)
                models["encoder"] = apply_vae_runtime(encoder, GPU_LAYOUT)
            tensors = encode_clip(models["encoder"], rgb, alpha, list(cfg.colours), precision)
            return tensors | {"rgb_frames": rgb_u8, "alpha_frames": alpha_u8}
        if "rgba" not in models:
            from wanalpha.checkpoints.vae import load_rgba_vae
            from wanalpha.checkpoints.wan import load_text_encoder

            rgba = load_rgba_vae(
                cfg.base_vae_path,
                None,
                merge=cfg.feature_merge_checkpoint,
                device=device,
                with_decoders=False,
                variant=cfg.variant,
            )
            models["rgba"] = apply_vae_runtime(rgba, GPU_LAYOUT)
            models["text"] = load_text_encoder(files["t5"], files["tokenizer"], device=device)  # bf16, text_len 512
        context = models["text"]([clip.prompt])[0].cpu()
        colours = colours_of(clip)
        merged = encode_merged(models["rgba"], rgb, alpha, colours, precision)
        tensors = {"merged_latents": merged, "colours": torch.tensor(colours), "context": context}
        if cfg.variant == "v2":
            from wanalpha.masks import training_mask

            tensors["gauss_mask"] = training_mask(alpha_u8)
        return tensors

    written = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress, autotuned_convolutions(device):
        task = progress.add_task(f"caching ({cfg.stage})", total=len(dataset))
        for i, clip in enumerate(dataset.clips):
            path = shard_path(out, clip.name)
            expected = settings | {
                "name": clip.name,
                "rgb_sha256": file_sha256(clip.rgb),
                "alpha_sha256": file_sha256(clip.alpha),
            }
            if cfg.stage == "dit":
                expected["prompt"] = clip.prompt
                if cfg.colour_draw == "clip":
                    expected["colour"] = colours_of(clip)[0]
            if read_shard_metadata(path, cfg.stage) != expected:
                write_shard(path, encode(clip, i), expected, cfg.stage)
                written += 1
            progress.advance(task)
    write_index(out, settings, [c.name for c in dataset.clips], cfg.stage)
    write_if_changed(out / "config.yaml", cfg.to_yaml())
    write_provenance(out, f"cache --stage {cfg.stage}", inputs=inputs)
    command = "train-merge" if cfg.stage == "merge" else "train-dit"
    Console(highlight=False).print(
        f"cache ({cfg.stage}): {len(dataset)} clips in {out} ({written} encoded now, {len(dataset) - written} already "
        f"cached, {len(dataset.skipped)} skipped)"
        + (f"; train with: wanalpha {command} --cache_dir {out} …" if hint else "")
    )
    return out
