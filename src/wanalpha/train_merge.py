"""`wanalpha train-merge` (stage 1): train the FeatureMergeBlock; the encoder and both LoRA'd decoders are frozen.

One step (official recipe, reference NOTES §10.4; paper eq. 10–12): draw three background colours (encoder input,
hard composite, soft composite) among the 8 RGB-cube corners; hard-render the straight RGB over the first as the
encoder input; encode RGB and alpha (or read both latents from the cache); merge; decode with both decoders; the
stage-1 losses. Runs plainly or under `accelerate launch` (DDP over the merge block; bf16 autocast by default on GPUs).
The loop, logging and exact resume are `wanalpha.training`'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from wanalpha.checkpoints.provenance import file_sha256, write_provenance
from wanalpha.checkpoints.vae import load_rgba_vae, save_merge_block
from wanalpha.config import TrainMergeConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, to_model_space
from wanalpha.data.files import write_if_changed
from wanalpha.data.latent_cache import CachedClipDataset, expectations
from wanalpha.data.render import composite
from wanalpha.errors import WanAlphaError
from wanalpha.losses import LossWeights, VGG16Features, rgba_reconstruction_loss
from wanalpha.models.rgba import RGBAlphaVAE
from wanalpha.training import Draws, make_accelerator, sharded, train

NUM_COLOURS = 8


def draw_colours(draws: Draws, choices: list[int]) -> tuple[torch.Tensor, ...]:
    """(k_enc, k_hard, k_soft), one per sample, in the official order; k_enc among the cached colours."""
    k_enc = torch.tensor(choices)[draws.randint(len(choices))]
    return k_enc, draws.randint(NUM_COLOURS), draws.randint(NUM_COLOURS)


def merge_step(
    model: RGBAlphaVAE,
    batch: dict,
    colours: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: LossWeights,
    vgg: VGG16Features | None = None,
    cached_colours: list[int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One stage-1 objective evaluation (DESIGN §7.6): (loss, metrics)."""
    device = next(model.merge.parameters()).device
    rgb, alpha = to_model_space(batch["rgb"].to(device), batch["alpha"].to(device))
    k_enc, k_hard, k_soft = (k.to(device) for k in colours)
    if "rgb_latents" in batch:  # cached: pick each sample's latent for its drawn encoder colour
        slot = torch.tensor([cached_colours.index(int(k)) for k in k_enc], device=device)
        z_rgb = batch["rgb_latents"].to(device)[torch.arange(len(slot), device=device), slot]
        z_alpha = batch["alpha_latent"].to(device)
    else:
        with torch.no_grad():
            z_rgb, z_alpha = model.encode_latents(composite(rgb, alpha, k_enc, hard=True), alpha)
    z = model.merge(z_rgb, z_alpha)
    rgb_pred, alpha_pred = model.decode(z, raw=True)
    return rgba_reconstruction_loss(rgb, alpha, rgb_pred, alpha_pred, k_hard, k_soft, weights, vgg)


def load_vgg(path: Path) -> VGG16Features:
    from wanalpha.checkpoints.io import read_state_dict

    sd = read_state_dict(path, "VGG16 weights")
    # torchvision's file names the trunk `features.N.*`; keep the first 9 layers (conv1_1 … relu2_2).
    trunk = {f"model.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v for k, v in sd.items()
             if k.startswith("features.") and int(k.split(".")[1]) < 9}  # fmt: skip
    vgg = VGG16Features()
    missing = set(vgg.state_dict()) - set(trunk)
    if missing:
        raise WanAlphaError(f"VGG16 weights {path}: missing {sorted(missing)}; expected torchvision's vgg16 file")
    vgg.load_state_dict(trunk)
    return vgg


def _dataset(cfg: TrainMergeConfig):
    if cfg.cache_dir is not None:
        expect = expectations(cfg)  # flags the user gave must agree with the cache
        expect["vae_sha256"] = file_sha256(cfg.base_vae_path)
        dataset = CachedClipDataset(cfg.cache_dir, expect)
        return dataset, dataset.colours, []
    spec = ClipSpec.from_config(cfg)
    dataset = RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec)
    return dataset, list(range(NUM_COLOURS)), dataset.skipped


def run(cfg: TrainMergeConfig) -> Path:
    accelerator = make_accelerator(cfg.mixed_precision)
    if sharded(accelerator):
        raise WanAlphaError("train-merge trains one small block: launch it with DDP (accelerate launch --multi_gpu), "
                            "not FSDP")  # fmt: skip
    console = Console(stderr=True, highlight=False)
    main = accelerator.is_main_process
    out = Path(cfg.output_path)
    dataset, choices, skipped = _dataset(cfg)
    if main:
        for name, reason in skipped:
            console.print(f"[yellow]skipped[/] {name}: {reason}")
    torch.manual_seed(cfg.seed)  # the merge block's initialisation
    model = load_rgba_vae(cfg.base_vae_path, cfg.vae_lora_path, device=accelerator.device,
                          with_encoder=cfg.cache_dir is None)  # fmt: skip
    model.rgb_decoder.gradient_checkpointing = model.alpha_decoder.gradient_checkpointing = cfg.gradient_checkpointing
    vgg = load_vgg(cfg.vgg_path).to(accelerator.device) if cfg.perceptual_weight > 0 else None
    weights = LossWeights(cfg.alpha_weight, cfg.rgb_soft_weight, cfg.rgb_hard_weight, cfg.sobel_weight,
                          cfg.perceptual_weight)  # fmt: skip
    optimizer = torch.optim.AdamW(model.merge.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / (warmup + 1)))
    merge, optimizer = accelerator.prepare(model.merge, optimizer)
    model.merge = merge
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_if_changed(out / "config.yaml", cfg.to_yaml())
        write_provenance(out, "train-merge", inputs={"base_vae": cfg.base_vae_path, "decoder_lora": cfg.vae_lora_path})

    def step(batch: dict, draws: Draws):
        colours = draw_colours(draws, choices)
        return merge_step(model, batch, colours, weights, vgg, choices)

    def save_epoch(pos, tensors) -> None:
        path = out / f"feature_merge_epoch_{pos.epoch}.safetensors"
        save_merge_block(accelerator.unwrap_model(merge), path, epoch=pos.epoch, step=pos.update)

    settings = cfg.loop_settings("train-merge")
    train(
        accelerator, settings, out, dataset, merge, optimizer, scheduler, step,
        trainable=lambda: accelerator.unwrap_model(merge).state_dict(),
        load_trainable=lambda tensors: accelerator.unwrap_model(merge).load_state_dict(tensors),
        on_epoch_end=save_epoch, describe=_describe,
    )  # fmt: skip
    return out


def _describe(pos, metrics: dict[str, float]) -> str:
    """The progress line: epoch, total loss and the three L1 terms (paper eq. 10-12)."""
    labels = {"l1_alpha": "α", "l1_rgb_soft": "rgb_s", "l1_rgb_hard": "rgb_h"}
    terms = " ".join(f"{label} {metrics[key]:.3f}" for key, label in labels.items() if key in metrics)
    return f"epoch {pos.epoch} loss {metrics['loss']:.4f} ({terms})"
