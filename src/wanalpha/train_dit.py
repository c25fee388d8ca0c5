"""`wanalpha train-dit` (stage 2, seed guide Step 4): DoRA on the Wan DiT over merged RGBA latents.

One step (reference NOTES §4): x0 = the clip's merged latent (frozen encoder + trained merge block over a hard render
on a background colour: the clip's one colour, as the official data prep fixes it, or with --colour-draw step one
drawn per step; or read from `cache --stage dit`); noise ~ N(0, I); id ~ U{0…999}, t = timesteps[id]
in bf16, σ and the loss weight from the schedule entry nearest t; x_t = (1−σ)x0 + σ·noise; the DiT (frozen, with
trainable DoRA adapters on q, k, v, o, ffn.0, ffn.2) predicts the velocity noise − x0; loss = MSE · weight.
Saves the adapters under the official Wan-Alpha DoRA names: epoch-{E}.safetensors after each epoch and
epoch-{E}-{step}.safetensors every --save_steps. Loop, logging and exact resume: `wanalpha.training`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from rich.console import Console

from wanalpha import adapters, flow
from wanalpha.checkpoints.provenance import write_provenance
from wanalpha.checkpoints.wan_alpha import save_dora
from wanalpha.config import TrainDiTConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, clip_colour, to_model_space
from wanalpha.data.files import write_if_changed
from wanalpha.data.latent_cache import CachedClipDataset, cached_settings, expectations
from wanalpha.data.render import composite
from wanalpha.errors import WanAlphaError
from wanalpha.models import fa4
from wanalpha.progress import status
from wanalpha.runtime import DiTRuntime, apply_dit_runtime, dit_weights_dtype, precision_dtype
from wanalpha.training import (
    OFFICIAL_START_FACTOR,
    Draws,
    TrainingLoop,
    adamw_with_warmup,
    load_trainable_state,
    make_accelerator,
    official_start_updates,
    sharded,
    trainable_state,
)


class Repeated(torch.utils.data.Dataset):
    """`--dataset_repeat`: the dataset n times per epoch."""

    def __init__(self, dataset: torch.utils.data.Dataset, times: int) -> None:
        self.dataset, self.times = dataset, times

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index % len(self.dataset)]


class PromptedClips(torch.utils.data.Dataset):
    """Videos of a prepared dataset with their prompts' UMT5 states (computed once, before training) and, with
    --colour-draw clip, each clip's one background colour."""

    def __init__(self, clips: RGBAClipDataset, contexts: list[torch.Tensor], colours: list[int] | None = None) -> None:
        self.clips, self.contexts, self.colours = clips, contexts, colours

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        item = self.clips[index] | {"context": self.contexts[index]}
        if self.colours is not None:
            item["colour"] = torch.tensor(self.colours[index])
        return item


def collate(items: list[dict]) -> dict:
    """Stack tensors of equal shape; contexts (one length per prompt) stay a list."""
    batch = {"context": [item["context"] for item in items]}
    for key in items[0]:
        if key != "context":
            batch[key] = torch.utils.data.default_collate([item[key] for item in items])
    return batch


def dit_step(
    dit: torch.nn.Module,
    batch: dict,
    draws: Draws,
    schedule: flow.TrainingSchedule,
    colours: list[int],
    rgba=None,
    alpha_shift: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One flow-matching objective evaluation (DESIGN §7.6): (loss, metrics). alpha_shift (v2): the noise is
    shifted by α outside each clip's Gaussian mask, and noising and target are computed in bf16, as upstream."""
    device = next(p for p in dit.parameters()).device
    b = len(batch["index"])
    # The background colour of each sample: a draw among the latents a shard holds (one per colour, or the clip's
    # one), or among `colours`; a clip's fixed colour (batch["colour"]) still takes its draw of 1, as from a cache.
    if "latents" in batch:  # cached merged latents: (B, n, 16, T, h, w)
        slot = draws.randint(batch["latents"].shape[1])
        x0 = batch["latents"][torch.arange(b), slot].to(device, torch.float32)
    else:
        rgb, alpha = to_model_space(batch["rgb"].to(device), batch["alpha"].to(device))
        slot = draws.randint(1 if "colour" in batch else len(colours))
        k = (batch["colour"] if "colour" in batch else torch.tensor(colours)[slot]).to(device)
        with torch.no_grad():
            x0 = rgba.encode(composite(rgb, alpha, k, hard=True), alpha).float()
    noise = draws.randn(x0.shape[1:]).to(device)
    model_dtype = _weights_dtype(dit)
    t, sigma, weight = schedule.at(draws.randint(len(schedule.timesteps)), model_dtype=model_dtype)
    if alpha_shift is None:
        x_t, target = flow.add_noise(x0, noise, sigma), flow.velocity_target(x0, noise)
    else:  # v2 (NOTES §10.5)
        from wanalpha import masks

        mask = batch.get("gauss_mask")
        if mask is None:  # from videos: each clip's mask from its alpha, as the T2V data prep makes it
            mask = torch.stack([masks.training_mask(a) for a in batch["alpha"]])
        noise = masks.shift_training_noise(noise, mask.to(device), alpha_shift)
        x0 = x0.to(torch.bfloat16)
        x_t, target = flow.add_noise_bf16(x0, noise, sigma), noise - x0
    text_len = _config(dit).text_len
    context = [c[:text_len].to(device) for c in batch["context"]]
    pred = dit(x_t.to(model_dtype), t.to(device), context)
    loss = flow.flow_loss(pred, target, weight)
    return loss, {"loss": float(loss.detach())}


@torch.no_grad()
def write_preview(
    dit, vae, context: torch.Tensor, shape: tuple[int, ...], steps: int, path: Path, seed: int
) -> dict[str, float] | None:
    """A short clip sampled with the adapters as they are (UniPC, no guidance), decoded by both decoders and written
    as a checkerboard composite mp4; returns its no-reference quality scores (`wanalpha.quality.clip_quality`: haze,
    flicker, edges; what `wanalpha eval` reports), so a run's epochs can be compared by numbers. Under FSDP every
    rank samples (the forward is a collective); the rank with `vae` None stops there and returns None."""
    from wanalpha.data.render import to_uint8
    from wanalpha.data.video import write_h264
    from wanalpha.metrics import checkerboard_composite
    from wanalpha.quality import clip_quality

    device = next(dit.parameters()).device
    dtype = _weights_dtype(dit)
    dit.eval()
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        latent = flow.sample(lambda x, t: dit(x.to(dtype), t, [context.to(device)]).float(), noise, steps)
    if vae is None:
        return None
    rgb, alpha = vae.decode(latent)
    rgb = to_uint8(rgb.float())[0].permute(1, 2, 3, 0).cpu()
    alpha = to_uint8(alpha.float())[0, 0].cpu()
    frames = checkerboard_composite(rgb, alpha).numpy().astype("uint8")
    write_h264(path, frames, 16.0)
    return clip_quality(rgb.numpy(), alpha.numpy())


def _weights_dtype(dit: torch.nn.Module) -> torch.dtype:
    """The frozen DiT weights' dtype (what inputs are cast to), also behind DDP / peft wrappers."""
    return getattr(dit, "module", dit).patch_embedding.weight.dtype


def _config(dit: torch.nn.Module):
    return getattr(dit, "module", dit).config


def _variant(dit_config) -> str:
    from wanalpha.models.dit import DIT_VARIANTS

    return next((name for name, c in DIT_VARIANTS.items() if c == dit_config), f"dim{dit_config.dim}")


def _text_contexts(files: dict, prompts: list[str], text_len: int, device) -> list[torch.Tensor]:
    """Every distinct prompt through UMT5 once (bf16, as upstream), kept on the CPU; the encoder is freed."""
    from wanalpha.checkpoints.wan import load_text_encoder

    text = load_text_encoder(files["t5"], files["tokenizer"], text_len, device)
    unique = sorted(set(prompts))
    states = {}
    for i in range(0, len(unique), 8):
        chunk = unique[i : i + 8]
        states |= dict(zip(chunk, (c.cpu() for c in text(chunk)), strict=True))
    del text
    return [states[p] for p in prompts]


def run(cfg: TrainDiTConfig) -> Path:
    from wanalpha.checkpoints.wan import load_dit, wan_model_files

    fp8 = cfg.dit_dtype == "fp8"
    # FP8 weights are buffers, identical on every process (read from the same files): DDP need not broadcast them
    # before every forward (the bf16 DiT has no buffers at all).
    accelerator = make_accelerator(cfg.mixed_precision, broadcast_buffers=not fp8)
    console = Console(stderr=True, highlight=False)
    main = accelerator.is_main_process
    device = accelerator.device
    out = Path(cfg.output_path)
    files = wan_model_files(need=("dit",) if cfg.cache_dir else ("dit", "t5"), **cfg.wan_files())
    dtype = dit_weights_dtype(cfg.dit_dtype)
    # --attention fa4 where it cannot run: fail before loading. The blocks compute in autocast's dtype, else dtype.
    compute = precision_dtype(accelerator.mixed_precision, dtype)
    fa4.kernel(cfg.attention, device, compute, backward=True)
    if fp8:  # likewise a device without float8, and FSDP (it would gather and shard the FP8 buffers as parameters)
        from wanalpha.fp8 import check_device

        check_device(device)
        if sharded(accelerator):
            raise WanAlphaError("train-dit --dit-dtype fp8 is not supported under FSDP; use DDP or --dit-dtype bf16")
    # Under FSDP each rank loads the DiT into host memory and keeps only its shard on the GPU (prepare moves it).
    # FP8: the frozen base's block linears quantised as they are read; DoRA trains through the dequantised weights.
    dit = load_dit(files["dit"], device="cpu" if sharded(accelerator) else device, dtype=dtype, fp8=fp8)
    if cfg.fp8_gemm:
        from wanalpha.fp8 import use_adapter_fp8_gemm

        use_adapter_fp8_gemm(dit)
    text_len = dit.config.text_len

    rgba = None
    if cfg.cache_dir is not None:
        expect = expectations(cfg.given())  # flags the user gave must agree with the cache
        data = CachedClipDataset(cfg.cache_dir, expect, stage="dit")
        colours = list(data.colours)
        cached_draw = data.index.get("colour_draw", "step")  # caches from before the option kept every colour
        if "colour_draw" in cfg.model_fields_set and cfg.colour_draw != cached_draw:
            raise WanAlphaError(
                f"cache {cfg.cache_dir} was made with --colour-draw {cached_draw}, but this run asks "
                f"for {cfg.colour_draw}; drop the flag or rebuild the cache"
            )
        # What the run uses, as config.yaml records it (a default of 480 rows for 64-row latents made the saved
        # config refuse its own cache on a rerun).
        cfg = cfg.model_copy(update=cached_settings(data.index) | {"colours": colours, "colour_draw": cached_draw})
        if cfg.variant == "v2" and data.index.get("variant") != "v2":
            raise WanAlphaError(
                f"train-dit --variant v2 needs the clips' Gaussian masks: cache {cfg.cache_dir} "
                "has none; rebuild it with `wanalpha cache --stage dit --variant v2`"
            )
    else:
        from wanalpha.checkpoints.vae import load_rgba_vae

        spec = ClipSpec(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)
        clips = RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec)
        if main:
            for name, reason in clips.skipped:
                console.print(f"[yellow]skipped[/] {name}: {reason}")
        with status(console, "encoding prompts with UMT5"):
            contexts = _text_contexts(files, [c.prompt for c in clips.clips], text_len, device)
        rgba = load_rgba_vae(
            cfg.base_vae_path,
            None,
            merge=cfg.feature_merge_checkpoint,
            device=device,
            with_decoders=False,
            variant=cfg.variant,
        )
        rgba.requires_grad_(False)
        colours = list(cfg.colours)
        fixed = [clip_colour(cfg.seed, c.name, colours) for c in clips.clips] if cfg.colour_draw == "clip" else None
        data = PromptedClips(clips, contexts, fixed)
    latent_size = _check_latent_size(dit, cfg, data)

    torch.manual_seed(cfg.seed)  # the adapters' initialisation
    targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
    adapters.inject_dora(dit, rank=cfg.dora_rank, targets=targets, use_dora=cfg.use_dora, fused=cfg.fused_adapters)
    if cfg.compile and sharded(accelerator):
        raise WanAlphaError("train-dit --compile is not supported under FSDP; use DDP or drop --compile")
    runtime = DiTRuntime(
        attention=cfg.attention,
        rope_precision=cfg.rope_precision,
        gradient_checkpointing=cfg.use_gradient_checkpointing,
        checkpoint_offload=cfg.use_gradient_checkpointing_offload,
        checkpoint_attention=cfg.checkpoint_attention,
        checkpoint_attention_blocks=cfg.checkpoint_attention_blocks,
        compile=cfg.compile,
        compile_memory_budget=cfg.compile_memory_budget,
    )
    attention_kernel = apply_dit_runtime(dit, runtime, device, compute, backward=True)
    trainable = [p for p in dit.parameters() if p.requires_grad]
    start = official_start_updates(accelerator.num_processes) if cfg.official_lr_start else 0
    optimizer, scheduler = adamw_with_warmup(
        trainable, cfg.learning_rate, cfg.weight_decay, cfg.lr_warmup_steps, OFFICIAL_START_FACTOR, start
    )
    model, optimizer = accelerator.prepare(dit, optimizer)
    schedule = flow.TrainingSchedule.create(shift=cfg.shift)
    alpha_shift = cfg.alpha_shift_mean if cfg.variant == "v2" else None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_if_changed(out / "config.yaml", cfg.to_yaml())
        extra = {
            "latent_size": latent_size,
            "trainable_parameters": sum(p.numel() for p in trainable),
            "self_attention_kernel": attention_kernel,
        }
        inputs = {"dit_shard_0": Path(files["dit"][0])}
        if cfg.cache_dir is None:  # from videos: the encoder, the merge block and the text encoder too
            inputs |= {"base_vae": cfg.base_vae_path, "feature_merge": cfg.feature_merge_checkpoint, "t5": files["t5"]}
        write_provenance(out, "train-dit", inputs=inputs, extra=extra)

    def load_trainable(tensors: dict[str, torch.Tensor]) -> None:
        current = adapters.dora_state_dict(accelerator.unwrap_model(model))  # global shapes, also under FSDP
        wrong = [k for k, v in tensors.items() if k not in current or current[k].shape != v.shape]
        if wrong or set(current) != set(tensors):
            raise WanAlphaError(
                f"the training state in {out / 'checkpoints'} holds adapters of another rank or "
                f"targets ({(wrong or sorted(set(current) ^ set(tensors)))[0]}); resume with the "
                "same --dora-rank and --lora-target-modules"
            )
        load_trainable_state(accelerator, model, tensors)

    def save_adapters(tensors, path: Path, epoch: int, step: int) -> None:  # the official DoRA names, with metadata
        save_dora(
            tensors,
            path,
            use_dora=cfg.use_dora,
            rank=cfg.dora_rank,
            target_modules=cfg.lora_target_modules,
            base_model=_variant(dit.config),
            epoch=epoch,
            step=step,
        )

    preview_vae = {}

    def preview(update: int) -> dict[str, float] | None:
        if "vae" not in preview_vae and main:  # the decoders arrive with the first preview
            from wanalpha.checkpoints.vae import load_rgba_vae

            preview_vae["vae"] = load_rgba_vae(cfg.base_vae_path, cfg.vae_lora_path, device=device, with_encoder=False)
        # Half the training latents' size (even, for the 2×2 patches), the first clip's prompt, a fixed seed: the
        # previews stay comparable over the run.
        h, w = (max(2, size // 4 * 2) for size in latent_size[2:])
        shape = (1, 16, (cfg.preview_frames - 1) // 4 + 1, h, w)
        context = data[0]["context"][:text_len]
        path = out / "previews" / f"step-{update}.mp4"
        return write_preview(
            accelerator.unwrap_model(model),
            preview_vae.get("vae"),
            context,
            shape,
            cfg.preview_sampling_steps,
            path,
            cfg.seed,
        )

    settings = cfg.loop_settings("train-dit", cfg.num_epochs, cfg.seed, cfg.save_steps)
    scope = adapters.dora_norm_scope if cfg.fused_adapters else contextlib.nullcontext
    previews = main or sharded(accelerator)  # under FSDP the model's forward is a collective: every rank samples
    with TrainingLoop(
        accelerator, settings, out, model, optimizer, scheduler, trainable=lambda: trainable_state(accelerator, model)
    ) as loop:
        if loop.resumed is not None:
            load_trainable(loop.resumed)
        for epoch in loop.epochs(Repeated(data, cfg.dataset_repeat), collate):
            for batch, draws in epoch:
                with loop.accumulate(), scope():
                    loss, metrics = dit_step(model, batch, draws, schedule, colours, rgba, alpha_shift)
                    loop.backward(loss)
                update = loop.update(metrics)
                if update is None:
                    continue
                if update.saved is not None and main:
                    save_adapters(
                        update.saved,
                        out / f"epoch-{epoch.number}-{update.pos.update}.safetensors",
                        epoch.number,
                        update.pos.update,
                    )
                if cfg.preview_steps is not None and update.pos.update % cfg.preview_steps == 0 and previews:
                    scores = preview(update.pos.update)
                    if scores is not None:
                        loop.log_scores(scores)  # loss_log.csv preview_* columns, TensorBoard preview/*
            if (tensors := epoch.end()) is not None and main:
                save_adapters(tensors, out / f"epoch-{epoch.number}.safetensors", epoch.number, loop.pos.update)
    return out


def _check_latent_size(dit, cfg: TrainDiTConfig, data) -> list[int]:
    """Latents must fit the DiT's patch grid (2×2): a clear error before training starts."""
    sample = data[0]
    shape = (
        list(sample["latents"].shape[-4:])
        if "latents" in sample
        else [16, 1 + (cfg.num_frames - 1) // 4, cfg.height // 8, cfg.width // 8]
    )
    if shape[0] != dit.config.in_dim or shape[2] % 2 or shape[3] % 2:
        raise WanAlphaError(
            f"latents of shape {shape} do not fit this DiT (in_dim {dit.config.in_dim}, 2×2 patches); "
            "check --height/--width or the cache"
        )
    return shape
