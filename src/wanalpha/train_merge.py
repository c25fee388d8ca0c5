"""`wanalpha train-merge` (stage 1): v1 trains the FeatureMergeBlock (the encoder and both LoRA'd decoders frozen);
v2 trains the official EncoderFeatureMerge and fresh decoder LoRAs (NOTES §10.3-10.4).

One step (official recipe, reference NOTES §10.4; paper eq. 10–12): draw three background colours (encoder input,
hard composite, soft composite) among the 8 RGB-cube corners; hard-render the straight RGB over the first as the
encoder input; encode RGB and alpha (or read both latents from the cache); merge; decode with both decoders; the
stage-1 losses. Runs plainly or under `accelerate launch` (DDP over the merge block; bf16 autocast by default on GPUs).
The loop, logging and exact resume are `wanalpha.training`'s.

v2 step: the same three colours; the frozen encoder's pre-head features of the render and of the alpha video → the
merge → the RAW latent m → both decoders (their LoRAs trainable) without de-normalisation; the same reconstruction
losses, plus diffusion_weight × the transparency-aware diffusion loss: m noised at a drawn timestep through the
frozen DiT with the empty prompt, the per-element squared velocity error × the ±1/0 latent mask × w(t), clamped to
[0, 1] (`losses.masked_diffusion_loss`); its gradient flows into m. Files: rgba_vae_v2_epoch_{E}.safetensors and
.bin (the release layout: `middle.block.*` + decoder.bin LoRA keys).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from rich.console import Console
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from wanalpha import flow
from wanalpha.checkpoints.provenance import file_sha256, write_provenance
from wanalpha.checkpoints.vae import load_merge_block, load_rgba_vae, save_merge_block
from wanalpha.checkpoints.wan_alpha import (
    decoder_lora_state_dict,
    load_decoder_lora_state_dict,
    rgba_vae_v2_state_dict,
    save_rgba_vae_v2,
)
from wanalpha.chunked import ChunkLoss, decoded_loss
from wanalpha.config import TrainMergeConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, to_model_space
from wanalpha.data.files import write_if_changed
from wanalpha.data.latent_cache import CachedClipDataset, cached_settings, expectations
from wanalpha.data.render import composite
from wanalpha.errors import WanAlphaError
from wanalpha.losses import (
    LossWeights,
    VGG16Features,
    latent_alpha_mask,
    masked_diffusion_loss,
    rgba_reconstruction_loss,
)
from wanalpha.models.lora import add_decoder_lora
from wanalpha.models.rgba import RGBAlphaVAE
from wanalpha.runtime import VAERuntime, apply_vae_runtime
from wanalpha.training import Draws, TrainingLoop, adamw_with_warmup, make_accelerator, sharded

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
    loss_fn = _chunk_loss(rgb, alpha, k_hard, k_soft, weights, vgg)
    if model.rgb_decoder.gradient_checkpointing:  # exact gradients at memory flat in the clip (wanalpha.chunked)
        return decoded_loss(model.rgb_decoder, model.alpha_decoder, z, loss_fn, normalised=True)
    rgb_pred, alpha_pred = model.decode(z, raw=True)
    return loss_fn(rgb_pred, alpha_pred, slice(None))


def _chunk_loss(rgb, alpha, k_hard, k_soft, weights: LossWeights, vgg: VGG16Features | None) -> ChunkLoss:
    """The stage-1 loss of the predictions for the clip's frames `frames` (every term a mean over frames)."""

    def loss_fn(rgb_pred: torch.Tensor, alpha_pred: torch.Tensor, frames: slice):
        return rgba_reconstruction_loss(
            rgb[:, :, frames], alpha[:, :, frames], rgb_pred, alpha_pred, k_hard, k_soft, weights, vgg
        )

    return loss_fn


class V2Trainable(nn.Module):
    """What v2 trains, in one module (one forward, as DDP wants): the merge block and both decoders' LoRAs. The
    decoders (frozen base weights) are parametrised in place: W = W0 + (B·A)/r."""

    def __init__(self, model: RGBAlphaVAE, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.merge, self.rgb_decoder, self.alpha_decoder = model.merge, model.rgb_decoder, model.alpha_decoder
        self.loras = nn.ModuleDict(
            {side: add_decoder_lora(decoder, rank, generator) for side, decoder in self.decoders().items()}
        )

    def decoders(self) -> dict[str, nn.Module]:
        return {"rgb": self.rgb_decoder, "alpha": self.alpha_decoder}

    def forward(self, features: torch.Tensor, loss_fn: ChunkLoss | None = None) -> tuple:
        """Encoder features of (render, alpha) → (raw latent m, rgb, alpha): the decoders' unclamped outputs; with
        `loss_fn` (see `chunked.decoded_loss`) → (m, reconstruction loss, metrics), chunk by chunk when the decoders
        checkpoint (exact gradients, LoRAs included, at memory flat in the clip)."""
        if loss_fn is not None and self.rgb_decoder.gradient_checkpointing:
            m = (
                checkpoint(self.merge, features, use_reentrant=False)
                if torch.is_grad_enabled()
                else self.merge(features)
            )
            params = tuple(list(self.loras[side].parameters()) for side in ("rgb", "alpha"))
            return m, *decoded_loss(self.rgb_decoder, self.alpha_decoder, m, loss_fn, normalised=False, params=params)
        m = self.merge(features)
        if loss_fn is not None:
            with parametrize.cached():
                return m, *loss_fn(self.rgb_decoder.decode_raw(m), self.alpha_decoder.decode_raw(m), slice(None))
        # Each patched weight once per forward instead of once per latent frame; not with checkpointing, whose
        # recomputation in the backward runs outside this context and must see the same operations.
        checkpointing = self.rgb_decoder.gradient_checkpointing and torch.is_grad_enabled()
        with contextlib.nullcontext() if checkpointing else parametrize.cached():
            return m, self.rgb_decoder.decode_raw(m), self.alpha_decoder.decode_raw(m)

    def state(self) -> dict[str, torch.Tensor]:
        """The v2 release layout (`middle.*` + decoder LoRA keys)."""
        return rgba_vae_v2_state_dict(self.merge, decoder_lora_state_dict(self.decoders(), self.loras))

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        load_merge_block(tensors, self.merge)
        load_decoder_lora_state_dict(self.decoders(), self.loras, tensors)


class DiffusionTerm:
    """The v2 transparency-aware diffusion loss through a frozen DiT with the empty prompt's embedding."""

    def __init__(self, dit: nn.Module, context: torch.Tensor) -> None:
        self.dit, self.context = dit.requires_grad_(False), context
        self.schedule = flow.TrainingSchedule.create()
        self.dtype = dit.patch_embedding.weight.dtype

    def __call__(self, m: torch.Tensor, alpha: torch.Tensor, draws: Draws) -> torch.Tensor:
        noise = draws.randn(m.shape[1:]).to(m.device)
        return self.loss(m, alpha, noise, draws.randint(len(self.schedule.timesteps)))

    def loss(self, m: torch.Tensor, alpha: torch.Tensor, noise: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """m raw (B,16,T,h,w), alpha (B,C,T,H,W) in [-1,1], noise like m, ids: schedule indices (B,)."""
        t, sigma, weight = self.schedule.at(ids, model_dtype=self.dtype)
        x_t = flow.add_noise(m.float(), noise, sigma)
        pred = self.dit(x_t.to(self.dtype), t.to(m.device), [self.context] * m.shape[0])
        mask = latent_alpha_mask(alpha)
        return masked_diffusion_loss(pred, flow.velocity_target(m.float(), noise), mask, weight)


def v2_step(
    trainable: nn.Module,
    encoder: nn.Module,
    batch: dict,
    draws: Draws,
    weights: LossWeights,
    vgg: VGG16Features | None = None,
    diffusion: DiffusionTerm | None = None,
    diffusion_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One v2 objective evaluation: (loss, metrics); `trainable` is the (possibly DDP-wrapped) V2Trainable."""
    device = encoder.conv1.weight.device
    rgb, alpha = to_model_space(batch["rgb"].to(device), batch["alpha"].to(device))
    k_enc, k_hard, k_soft = (k.to(device) for k in draw_colours(draws, list(range(NUM_COLOURS))))
    with torch.no_grad():
        render = composite(rgb, alpha, k_enc, hard=True)
        features = torch.cat(
            [encoder.encode_features(render), encoder.encode_features(alpha.expand(-1, 3, -1, -1, -1))], dim=1
        )
    m, loss, metrics = trainable(features, _chunk_loss(rgb, alpha, k_hard, k_soft, weights, vgg))
    if diffusion is not None and diffusion_weight > 0:
        t2v = diffusion(m, alpha, draws)
        loss = loss + diffusion_weight * t2v
        metrics |= {"loss": float(loss.detach()), "t2v": float(t2v.detach())}
    return loss, metrics


def load_vgg(path: Path) -> VGG16Features:
    """VGG16's first 9 layers (conv1_1 … relu2_2) from torchvision's ImageNet file (vgg16-397923af.pth) or timm's
    copy of it (vgg16.tv_in1k model.safetensors): both name the trunk `features.N.*`, our module `model.N.*`."""
    from wanalpha.checkpoints.io import read_state_dict

    vgg = VGG16Features()
    wanted = {f"features.{k.removeprefix('model.')}": k for k in vgg.state_dict()}
    if Path(path).suffix == ".safetensors" and Path(path).is_file():  # only the trunk's tensors (timm's file: 553 MB)
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                sd = {k: handle.get_tensor(k) for k in wanted if k in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise WanAlphaError(f"VGG16 weights {path} are not a readable safetensors file: {exc}") from None
    else:
        sd = read_state_dict(path, "VGG16 weights")
    missing = sorted(k for k in wanted if k not in sd)
    if missing:
        raise WanAlphaError(
            f"VGG16 weights {path}: missing {missing}; expected torchvision's vgg16 file or timm's "
            "vgg16.tv_in1k (or set --perceptual-weight 0)"
        )
    shapes = {k: tuple(v.shape) for k, v in vgg.state_dict().items()}
    wrong = [k for k, ours in wanted.items() if tuple(sd[k].shape) != shapes[ours]]
    if wrong:
        key = wrong[0]
        raise WanAlphaError(
            f"VGG16 weights {path}: {key} has shape {tuple(sd[key].shape)}, VGG16's is "
            f"{shapes[wanted[key]]}; give VGG16's ImageNet weights (not VGG19 or _bn)"
        )
    vgg.load_state_dict({ours: sd[theirs].float() for theirs, ours in wanted.items()})
    return vgg


def _dataset(cfg: TrainMergeConfig):
    if cfg.cache_dir is not None:
        expect = expectations(cfg.given())  # flags the user gave must agree with the cache
        expect["vae_sha256"] = file_sha256(cfg.base_vae_path)
        dataset = CachedClipDataset(cfg.cache_dir, expect)
        return dataset, dataset.colours, []
    dataset = _clips(cfg)
    return dataset, list(range(NUM_COLOURS)), dataset.skipped


def _clips(cfg: TrainMergeConfig) -> RGBAClipDataset:
    """The videos (and still images) of the dataset, cut as --augment says: the official v2 augmentation draws
    from (seed, epoch, clip) (the training loop sets the epoch), so resume and process count leave it unchanged."""
    spec = ClipSpec(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)
    return RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec, cfg.clip_augment(), cfg.seed)


def _accelerator(cfg: TrainMergeConfig):
    accelerator = make_accelerator(cfg.mixed_precision)
    if sharded(accelerator):
        raise WanAlphaError(
            "train-merge trains small modules: launch it with DDP (accelerate launch --multi_gpu), not FSDP"
        )
    return accelerator


def _report_skipped(accelerator, skipped: list) -> None:
    if accelerator.is_main_process:
        console = Console(stderr=True, highlight=False)
        for name, reason in skipped:
            console.print(f"[yellow]skipped[/] {name}: {reason}")


def _vgg_file(cfg: TrainMergeConfig) -> Path | None:
    """The VGG16 weights the perceptual term (the official weight 1) needs, found before any long work: --vgg-path,
    else the models folder's copy (fetched from the hub the first time: wanalpha.download.vgg16_weights)."""
    from wanalpha.download import vgg16_weights

    return None if cfg.perceptual_weight == 0 else vgg16_weights(cfg.vgg_path, cfg.models_dir)


def _loss_setup(cfg: TrainMergeConfig, device, vgg_file: Path | None) -> tuple[LossWeights, VGG16Features | None]:
    """The loss weights and the VGG16 trunk of the perceptual term (None when its weight is 0)."""
    weights = LossWeights(
        cfg.alpha_weight, cfg.rgb_soft_weight, cfg.rgb_hard_weight, cfg.sobel_weight, cfg.perceptual_weight
    )
    return weights, (load_vgg(vgg_file).to(device) if vgg_file is not None else None)


def _write_run_files(accelerator, cfg: TrainMergeConfig, inputs: dict) -> Path:
    out = Path(cfg.output_path)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_if_changed(out / "config.yaml", cfg.to_yaml())
        write_provenance(out, "train-merge", inputs=inputs)
    return out


def run(cfg: TrainMergeConfig) -> Path:
    if cfg.variant == "v2":
        return run_v2(cfg)
    vgg_file = _vgg_file(cfg)
    accelerator = _accelerator(cfg)
    dataset, choices, skipped = _dataset(cfg)
    if isinstance(dataset, CachedClipDataset):  # config.yaml records the cache's clip settings, which the run used
        cfg = cfg.model_copy(update=cached_settings(dataset.index))
    _report_skipped(accelerator, skipped)
    torch.manual_seed(cfg.seed)  # the merge block's initialisation
    model = load_rgba_vae(
        cfg.base_vae_path,
        cfg.vae_lora_path,
        device=accelerator.device,
        with_encoder=cfg.cache_dir is None,
        trainable_merge=True,
    )
    if cfg.merge_from is not None:
        load_merge_block(cfg.merge_from, model.merge)  # a missing or foreign file: one line naming it
    elif cfg.merge_init == "identity":
        model.merge.init_identity()
    apply_vae_runtime(model, VAERuntime(gradient_checkpointing=cfg.gradient_checkpointing))
    weights, vgg = _loss_setup(cfg, accelerator.device, vgg_file)
    optimizer, scheduler = adamw_with_warmup(
        model.merge.parameters(), cfg.learning_rate, cfg.weight_decay, cfg.lr_warmup_steps
    )
    merge, optimizer = accelerator.prepare(model.merge, optimizer)
    model.merge = merge
    out = _write_run_files(
        accelerator,
        cfg,
        {"base_vae": cfg.base_vae_path, "decoder_lora": cfg.vae_lora_path}
        | ({"vgg16": vgg_file} if vgg_file is not None else {}),
    )

    unwrapped = accelerator.unwrap_model(merge)
    settings = cfg.loop_settings("train-merge", cfg.num_epochs, cfg.seed, cfg.save_steps)
    with TrainingLoop(
        accelerator, settings, out, merge, optimizer, scheduler, trainable=unwrapped.state_dict, describe=_describe
    ) as loop:
        if loop.resumed is not None:
            unwrapped.load_state_dict(loop.resumed)
        for epoch in loop.epochs(dataset):
            for batch, draws in epoch:
                with loop.accumulate():
                    loss, metrics = merge_step(model, batch, draw_colours(draws, choices), weights, vgg, choices)
                    loop.backward(loss)
                loop.update(metrics)
            if epoch.end() is not None and loop.main:
                save_merge_block(
                    unwrapped,
                    out / f"feature_merge_epoch_{epoch.number}.safetensors",
                    epoch=epoch.number,
                    step=loop.pos.update,
                )
    return out


def _describe(pos, metrics: dict[str, float]) -> str:
    """The progress line: epoch, total loss and the three L1 terms (paper eq. 10-12)."""
    labels = {"l1_alpha": "α", "l1_rgb_soft": "rgb_s", "l1_rgb_hard": "rgb_h", "t2v": "t2v"}
    terms = " ".join(f"{label} {metrics[key]:.3f}" for key, label in labels.items() if key in metrics)
    return f"epoch {pos.epoch} loss {metrics['loss']:.4f} ({terms})"


def _empty_prompt(files: dict, text_len: int, device) -> torch.Tensor:
    """The empty prompt's UMT5 states (what the official run loads from its cache), padded to text_len."""
    from wanalpha.checkpoints.wan import load_text_encoder

    (states,) = load_text_encoder(files["t5"], files["tokenizer"], text_len, device)([""])
    return states


def run_v2(cfg: TrainMergeConfig) -> Path:
    from wanalpha.checkpoints.io import read_state_dict
    from wanalpha.checkpoints.wan import load_dit, wan_model_files

    vgg_file = _vgg_file(cfg)
    accelerator = _accelerator(cfg)
    device = accelerator.device
    dataset = _clips(cfg)
    _report_skipped(accelerator, dataset.skipped)
    torch.manual_seed(cfg.seed)  # the merge block's and the LoRAs' initialisation
    model = _v2_model(cfg, device)
    rank = cfg.lora_rank
    start = read_state_dict(cfg.vae_lora_path, "v2 VAE file") if cfg.vae_lora_path is not None else None
    if start is not None:  # continue from a release file: its rank wins
        rank = next((v.shape[1] for k, v in start.items() if ".lora_B." in k), None)
        if rank is None:
            raise WanAlphaError(
                f"--vae-lora-path {cfg.vae_lora_path}: no decoder LoRA keys (vae_fgr.decoder.… "
                "lora_B); give a v2 VAE file or decoder.bin, or omit it to start fresh"
            )
    trainable = V2Trainable(model, rank, torch.Generator().manual_seed(cfg.seed)).to(device)
    if start is not None:
        try:
            load_decoder_lora_state_dict(trainable.decoders(), trainable.loras, start)
        except ValueError as exc:
            raise WanAlphaError(
                f"--vae-lora-path {cfg.vae_lora_path}: not a decoder LoRA file for this VAE ({exc})"
            ) from None
        if any(k.startswith("middle.") for k in start):
            load_merge_block(start, trainable.merge)
    for decoder in trainable.decoders().values():
        apply_vae_runtime(decoder, VAERuntime(gradient_checkpointing=cfg.gradient_checkpointing))
    diffusion = None
    if cfg.diffusion_weight > 0:
        files = wan_model_files(need=("dit", "t5"), **cfg.wan_files())
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dit = load_dit(files["dit"], device=device, dtype=dtype)
        diffusion = DiffusionTerm(dit, _empty_prompt(files, dit.config.text_len, device).to(dtype))
    weights, vgg = _loss_setup(cfg, device, vgg_file)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer, scheduler = adamw_with_warmup(params, cfg.learning_rate, cfg.weight_decay, cfg.lr_warmup_steps)
    wrapped, optimizer = accelerator.prepare(trainable, optimizer)
    out = _write_run_files(
        accelerator,
        cfg,
        {"base_vae": cfg.base_vae_path, "start": cfg.vae_lora_path}
        | ({"vgg16": vgg_file} if vgg_file is not None else {}),
    )

    settings = cfg.loop_settings("train-merge", cfg.num_epochs, cfg.seed, cfg.save_steps)
    with TrainingLoop(
        accelerator, settings, out, wrapped, optimizer, scheduler, trainable=trainable.state, describe=_describe
    ) as loop:
        if loop.resumed is not None:
            trainable.load_state(loop.resumed)
        for epoch in loop.epochs(dataset):
            for batch, draws in epoch:
                with loop.accumulate():
                    loss, metrics = v2_step(
                        wrapped, model.encoder, batch, draws, weights, vgg, diffusion, cfg.diffusion_weight
                    )
                    loop.backward(loss)
                loop.update(metrics)
            if (tensors := epoch.end()) is not None and loop.main:
                save_rgba_vae_v2(
                    tensors,
                    out / f"rgba_vae_v2_epoch_{epoch.number}.safetensors",
                    epoch=epoch.number,
                    step=loop.pos.update,
                    rank=rank,
                    lora_alpha=1.0,
                )
    return out


def _v2_model(cfg: TrainMergeConfig, device) -> RGBAlphaVAE:
    """The encoder and both decoders with the base weights (no LoRA merged) and a fresh EncoderFeatureMerge."""
    from wanalpha.checkpoints.io import read_state_dict
    from wanalpha.checkpoints.vae import load_wan_vae

    # Read once; the three modules are built from it (their frozen tensors may share storage: never written).
    base = read_state_dict(cfg.base_vae_path, "base VAE")
    encoder = load_wan_vae(base, device=device, with_decoder=False)
    model = RGBAlphaVAE(encoder.config, variant="v2", with_encoder=False, with_decoders=False).to(device)
    model.encoder = encoder
    model.rgb_decoder = load_wan_vae(base, device=device, with_encoder=False)
    model.alpha_decoder = load_wan_vae(base, device=device, with_encoder=False)
    return model
