"""Train the demo's tiny pretrained base: what Wan2.1 + Wan-Alpha's decoder.bin are to real users, small enough to
ship inside the package and to run on a laptop CPU (`wanalpha demo`).

    python scripts/train_demo_base.py --out src/wanalpha/demo_base             # on a GPU: about 7 minutes
    python scripts/train_demo_base.py --out /tmp/base --scale 0.02 --device cpu  # a smoke run
    # on a device whose calls last at most 10 minutes: time-bound stages, decoders and DiT in parallel, combined
    python scripts/train_demo_base.py --out B/vae --temporal-size 64 --stop-after-vae --vae-from OLD_VAE \
        --temporal-lr 1e-3 --steps vae_temporal=20000 --seconds vae_temporal=215
    python scripts/train_demo_base.py --out B/dec --temporal-size 64 --vae-from B/vae/Wan2.1-T2V-demo/Wan2.1_VAE.pth \
        --skip-vae-temporal --skip-dit --decoder-merge identity --steps decoders=20000 --seconds decoders=200 &
    python scripts/train_demo_base.py --out B/dit --temporal-size 64 --vae-from B/vae/Wan2.1-T2V-demo/Wan2.1_VAE.pth \
        --skip-vae-temporal --skip-decoders --steps dit=20000 --seconds dit=245
    python scripts/train_demo_base.py --out B/final --combine B/dec B/dit

The shipped base (2026-11-30) was made that way on one H200 (all with --pool 1024), from the previous base's VAE;
its training.json nests every run's record, back to the first.

    # issue #26 (opaque objects, colours that follow the prompt): the decoders with a merge block trained along and
    # shipped, then the shipped DiT continued on that block's RGBA latents; one device call each, in this order
    python scripts/train_demo_base.py --out B/dec --pool 1024 --temporal-size 64 --vae-from OLD_VAE \
        --skip-vae-temporal --skip-dit --decoder-merge joint --anchor-weight 1 --steps decoders=20000 \
        --seconds decoders=480
    python scripts/train_demo_base.py --out B/dit --pool 1024 --temporal-size 64 --vae-from OLD_VAE \
        --skip-vae-temporal --skip-decoders --dit-from src/wanalpha/demo_base \
        --dit-merge B/dec/Wan-Alpha/vae/feature_merge.safetensors --steps dit=20000 --seconds dit=480
    python scripts/train_demo_base.py --out B/final --combine B/dec B/dit
    python scripts/demo_quality.py vae --base B/final --merge B/final/Wan-Alpha/vae/feature_merge.safetensors

Everything is trained here from the synthetic clip generator (`wanalpha.data.synthetic`, seeds disjoint from the
demo's dataset), deterministically (fixed seeds, deterministic kernels), in four stages:

1. VAE: a Wan2.1-architecture VAE (dim 8: 12× narrower) trained as an autoencoder on 64×64×5 crops (hard
   composites over the 8 colours, soft composites over random colours, alpha videos), L1 reconstruction (object pixels
   weighted 5×) of latents
   perturbed with noise, plus a term that keeps the normalised latents near zero mean and unit variance per channel
   (the DiT's noise scale).
2. decoder LoRAs: the Wan-Alpha stage 1 (`train_merge.merge_step`: L1 + Sobel on alpha and on hard/soft composites)
   with LoRA (rank 16) on every decoder convolution of an RGB and an alpha decoder. `--decoder-merge trained`: a
   FeatureMergeBlock trains along, its output kept near the RGB latent so that the DiT's latent space carries
   over, and is thrown away; `identity` (the shipped base): the decoders decode the RGB latent itself, which is
   where a user's fresh merge block starts (`train-merge --merge-init identity`) before it learns to add alpha;
   `joint`: a merge block starts at the identity, trains along (a tenth of the LoRAs' rate, anchored to the RGB
   latent) and ships as Wan-Alpha/vae/feature_merge.safetensors, where the demo's train-merge starts
   (`--merge_from`): with `identity` the decoders only ever see the hard composite's latent, where opaque and
   semi-transparent objects look alike, so their alpha settles at the data's median (about 137 of 255) and no
   merge block trained against them afterwards gets it opaque (docs/demo.md, issue #26).
   The LoRAs are saved as `decoder.bin` (official keys).
3. text encoder + DiT: a UMT5-architecture encoder (2 layers, a word-level tokenizer over the captions' words) and
   a Wan DiT (dim 128, 6 layers) trained together as text-to-video on RGB latents of the clips over plain
   backgrounds ("…, on a plain blue background"), flow matching exactly as train-dit (10 % empty prompts for
   classifier-free guidance). `--dit-from` continues a base's DiT and text encoder; `--dit-merge` trains on a
   joint merge block's RGBA latents instead of the RGB latents.
4. files, in the Wan2.1 layout: Wan2.1-T2V-demo/{diffusion_pytorch_model.safetensors, config.json,
   models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/tokenizer.json}, Wan-Alpha/vae/decoder.bin and
   training.json (settings, losses, times, hardware). They are then loaded back through the public API.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanalpha import flow  # noqa: E402
from wanalpha.checkpoints.wan_alpha import decoder_lora_state_dict  # noqa: E402
from wanalpha.data.dataset import to_model_space  # noqa: E402
from wanalpha.data.render import COLOUR_NAMES, composite  # noqa: E402
from wanalpha.data.synthetic import COLOURS, DIRECTIONS, SHAPES, make_clip  # noqa: E402
from wanalpha.losses import LossWeights, rgba_reconstruction_loss  # noqa: E402
from wanalpha.models.dit import DiTConfig, WanDiT  # noqa: E402
from wanalpha.models.lora import add_decoder_lora  # noqa: E402
from wanalpha.models.rgba import FeatureMergeBlock, RGBAlphaVAE  # noqa: E402
from wanalpha.models.t5 import T5Config, UMT5Encoder  # noqa: E402
from wanalpha.models.vae import VAEConfig, WanVAE  # noqa: E402
from wanalpha.train_merge import draw_colours  # noqa: E402
from wanalpha.training import Draws  # noqa: E402

FRAMES, HEIGHT, WIDTH = 17, 64, 64
VAE_DIM = 8
LORA_RANK = 16
DIT = dict(dim=128, ffn_dim=512, num_heads=2, num_layers=6, text_len=48)
T5 = dict(dim=128, dim_attn=128, dim_ffn=256, num_heads=4, num_layers=2)
SEED = 20261129
OBJECT_WEIGHT = 4.0  # VAE loss weight 1 + OBJECT_WEIGHT·alpha


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- data
def clip_pool(n: int, seed: int, size: int = HEIGHT) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """n synthetic clips (uint8 rgb (n,T,H,W,3), alpha (n,T,H,W)) and captions; clip i from rng([seed, i])."""
    rgb = np.empty((n, FRAMES, size, size, 3), np.uint8)
    alpha = np.empty((n, FRAMES, size, size), np.uint8)
    captions = []
    for i in range(n):
        clip = make_clip(np.random.default_rng([seed, i]), FRAMES, size, size)
        rgb[i], alpha[i] = clip.rgb, clip.alpha
        captions.append(clip.caption)
    return torch.from_numpy(rgb), torch.from_numpy(alpha), captions


def plain_caption(caption: str, k: int) -> str:
    """The RGB clip's caption: the object over a plain background of corner colour k."""
    return caption.replace("transparent background", f"on a plain {COLOUR_NAMES[k]} background")


def vocabulary() -> list[str]:
    """Every word piece the synthetic captions (and their plain-background variants) use, as the Whitespace
    pre-tokenizer splits them."""
    from tokenizers import pre_tokenizers

    words = {
        "a",
        "an",
        "the",
        "with",
        "sharp",
        "soft",
        "edges",
        "semi-transparent",
        "moving",
        "and",
        "growing",
        "shrinking",
        ",",
        "in",
        "front",
        "of",
        "transparent",
        "background",
        "on",
        "plain",
        "object",
    }
    words |= set(COLOURS) | set(SHAPES) | set(DIRECTIONS) | set(COLOUR_NAMES)
    split = pre_tokenizers.Whitespace()
    pieces = sorted({piece for w in words for piece, _ in split.pre_tokenize_str(w)})
    return ["<pad>", "</s>", "<unk>", *pieces]


def build_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))


# ---------------------------------------------------------------------------------------------------- helpers
class Budget:
    """A stage's length: `steps` updates, or, with `seconds`, until that much wall time has passed if sooner.
    progress() runs 0 → 1 on whichever ends first (the cosine schedule follows it, so a time-bound run still
    anneals). A time-bound run is not bit-reproducible; training.json records it and the steps it ran."""

    def __init__(self, steps: int, seconds: float | None = None) -> None:
        self.steps, self.seconds, self.start = steps, seconds, time.perf_counter()

    def progress(self, step: int) -> float:
        by_time = (time.perf_counter() - self.start) / self.seconds if self.seconds else 0.0
        return max(step / self.steps, by_time)

    def __iter__(self):
        step = 0
        while self.progress(step) < 1:
            yield step
            step += 1
        self.ran = step

    def record(self) -> dict:
        out = {"steps": self.ran}
        if self.seconds is not None:
            out |= {"seconds_budget": self.seconds, "time_bound": self.ran < self.steps, "steps_asked": self.steps}
        return out


def cosine_lr(optimizer, base: float, step: int, progress: float, warmup: int = 100) -> None:
    lr = base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def batch_of(pool, index: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    rgb, alpha = to_model_space(pool[0][index].to(device), pool[1][index].to(device))
    return rgb, alpha


def encode(vae: WanVAE, x: torch.Tensor) -> torch.Tensor:
    """vae.encode in its whole-sequence form (the same function, one pass instead of chunks: faster to train)."""
    mu = vae.conv1(vae.encoder(x))[:, : vae.config.z_dim]
    mean, inv_std = vae._stats(mu)
    return (mu - mean) * inv_std


def decode(vae: WanVAE, z: torch.Tensor) -> torch.Tensor:
    """vae.decode in its whole-sequence form."""
    return vae.decoder(vae.conv2(vae.denormalise(z)))


def latent_stats_penalty(z: torch.Tensor) -> torch.Tensor:
    """Per-channel (mean² + (std − 1)²) of normalised latents over batch, time and space."""
    flat = z.transpose(0, 1).flatten(1)
    return (flat.mean(1).pow(2) + (flat.std(1) - 1).pow(2)).mean()


def lora_file(loras: dict[str, nn.ModuleDict], model: RGBAlphaVAE) -> dict[str, torch.Tensor]:
    """The official decoder.bin dict: vae_fgr.* (RGB) and vae_pha.* (alpha), `.conv3D` for 3-D convolutions."""
    return decoder_lora_state_dict({"rgb": model.rgb_decoder, "alpha": model.alpha_decoder}, loras)


# ---------------------------------------------------------------------------------------------------- stages
def vae_step(vae: WanVAE, opt, rgb: torch.Tensor, alpha: torch.Tensor, g: torch.Generator, device) -> float:
    """One autoencoder update on a batch split in halves: hard composites over corner colours, then a quarter soft
    composites over random colours, then a quarter alpha videos; latents perturbed by noise before decoding."""
    b = rgb.shape[0]
    k = torch.randint(0, 8, (b,), generator=g).to(device)
    soft_bg = (torch.rand(b, 3, 1, 1, 1, generator=g) * 2 - 1).to(device)
    h, s = b // 2, 3 * b // 4
    hard = composite(rgb[:h], alpha[:h], k[:h], hard=True)
    soft = composite(rgb[h:s], alpha[h:s], soft_bg[h:s])
    x = torch.cat([hard, soft, alpha[s:].expand(-1, 3, -1, -1, -1)])
    z = encode(vae, x)
    recon = decode(vae, z + torch.randn(z.shape, generator=g).to(device) * 0.1)
    weight = 1 + OBJECT_WEIGHT * (alpha + 1) / 2  # the object's pixels count more than the flat background
    loss = ((recon - x).abs() * weight).mean() / weight.mean() + 0.05 * latent_stats_penalty(z)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def train_vae(
    pool,
    steps: int,
    device,
    g: torch.Generator,
    dim: int = VAE_DIM,
    crop: int = 5,
    batch: int = 32,
    seconds: float | None = None,
) -> tuple[WanVAE, dict]:
    """Stage 1a: crops of `crop` frames (5: the first frame alone + one chunk of four; 17: whole clips)."""
    torch.manual_seed(SEED)
    vae = WanVAE(VAEConfig(dim=dim)).to(device)
    n = pool[0].shape[0]

    def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, n, (batch,), generator=gen)
        first = int(torch.randint(0, FRAMES - crop + 1, (1,), generator=gen))
        return batch_of((pool[0][:, first : first + crop], pool[1][:, first : first + crop]), index, device)

    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    budget = Budget(steps, seconds)
    for step in budget:
        cosine_lr(opt, 2e-3, step, budget.progress(step))
        losses.append(vae_step(vae, opt, *make_batch(g), g, device))
        if step % 200 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {np.mean(losses[-200:]):.4f}")
    info = {
        "dim": dim,
        "crop_frames": crop,
        "batch": batch,
        "object_weight": OBJECT_WEIGHT,
        **budget.record(),
        "final_loss": float(np.mean(losses[-100:])),
    }
    return vae.eval().requires_grad_(False), info


def train_vae_temporal(
    vae: WanVAE, pool, steps: int, device, g: torch.Generator, seconds: float | None = None, lr: float = 5e-4
) -> tuple[WanVAE, dict]:
    """Stage 1b: whole 17-frame clips, so that the causal layers also learn the later chunks: 5-frame crops in
    stage 1a only ever show the first frame and one chunk of four."""
    n = pool[0].shape[0]

    def make_batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_of(pool, torch.randint(0, n, (8,), generator=gen), device)

    vae = vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    budget = Budget(steps, seconds)
    for step in budget:
        cosine_lr(opt, lr, step, budget.progress(step), warmup=20)
        losses.append(vae_step(vae, opt, *make_batch(g), g, device))
        if step % 50 == 0 or step == steps - 1:
            log(f"vae (17 frames) {step}/{steps} loss {np.mean(losses[-50:]):.4f}")
    info = {"lr": lr, "object_weight": OBJECT_WEIGHT, **budget.record(), "final_loss": float(np.mean(losses[-50:]))}
    return vae.eval().requires_grad_(False), info


@functools.cache
def _heldout_pool() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return clip_pool(16, seed=3000)


def heldout_batch(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 16 held-out clips (seed 3000, disjoint from training and from the demo), made once per run."""
    return batch_of(_heldout_pool(), torch.arange(16), device)


def object_mae(pred: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor, dims=None) -> torch.Tensor:
    """Mean absolute error in 0-255 levels weighted by the alpha (where the object is), over `dims` (all)."""
    a = (alpha + 1) / 2
    err = (pred - target).abs() * a
    if dims is None:
        return err.sum() / (3 * a.sum()) * 127.5
    return err.sum(dims) / (3 * a.sum(dims)) * 127.5


def alpha_mae(pred: torch.Tensor, alpha: torch.Tensor) -> float:
    return float((pred - alpha).abs().mean() * 127.5)


def vae_heldout(vae: WanVAE, device) -> dict:
    """The VAE alone on 16 held-out clips (hard composites over corner colour 0, and the alpha videos): MAE in
    0-255 levels where the object is (RGB) and everywhere (alpha), and the RGB MAE of the worst frame."""
    rgb, alpha = heldout_batch(device)
    x = composite(rgb, alpha, 0, hard=True)
    with torch.no_grad():
        rgb_pred = decode(vae, encode(vae, x)).clamp(-1, 1)
        alpha_pred = decode(vae, encode(vae, alpha.expand(-1, 3, -1, -1, -1))).clamp(-1, 1).mean(1, keepdim=True)
    per_frame = object_mae(rgb_pred, x, alpha, dims=(0, 1, 3, 4))
    mae_rgb, mae_alpha = float(object_mae(rgb_pred, x, alpha)), alpha_mae(alpha_pred, alpha)
    log(f"vae: held-out MAE rgb {mae_rgb:.2f} (worst frame {float(per_frame.max()):.2f}) alpha {mae_alpha:.2f}")
    return {
        "heldout_mae_rgb": round(mae_rgb, 2),
        "heldout_mae_rgb_worst_frame": round(float(per_frame.max()), 2),
        "heldout_mae_alpha": round(mae_alpha, 2),
    }


def train_decoders(
    pool,
    vae: WanVAE,
    steps: int,
    device,
    g: torch.Generator,
    seconds: float | None = None,
    merge: str = "identity",
    anchor_weight: float = 0.1,
) -> tuple[dict, dict, FeatureMergeBlock | None]:
    torch.manual_seed(SEED + 1)
    model = RGBAlphaVAE(vae.config).to(device)
    base = {k: v for k, v in vae.state_dict().items()}
    model.encoder.load_state_dict({k: v for k, v in base.items() if k in model.encoder.state_dict()})
    for decoder in (model.rgb_decoder, model.alpha_decoder):
        decoder.load_state_dict({k: v for k, v in base.items() if k in decoder.state_dict()})
    model.requires_grad_(False)
    loras = {
        side: add_decoder_lora(dec, LORA_RANK, g, init="normal")
        for side, dec in (("rgb", model.rgb_decoder), ("alpha", model.alpha_decoder))
    }
    params = [p for side in loras.values() for lo in side.values() for p in lo.parameters()]
    groups = [{"params": params}]
    if merge in ("identity", "joint"):  # decode the RGB latent: a user's fresh merge block starts there (--merge-init)
        model.merge.init_identity()
    if merge in ("trained", "joint"):  # a merge block trained along (joint: from the identity, and kept)
        model.merge.requires_grad_(True)
        # joint: a tenth of the LoRAs' rate, so that the block stays near the identity the DiT's latents start from
        groups.append({"params": list(model.merge.parameters()), "lr_scale": 0.1 if merge == "joint" else 1.0})
        params = params + groups[-1]["params"]
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
    n = pool[0].shape[0]
    losses = []
    budget = Budget(steps, seconds)
    for step in budget:
        cosine_lr(opt, 1e-3, step, budget.progress(step))
        index = torch.randint(0, n, (8,), generator=g)
        rgb, alpha = batch_of(pool, index, device)
        k_enc, k_hard, k_soft = (k.to(device) for k in draw_colours(Draws(SEED, step, index.tolist()), list(range(8))))
        with torch.no_grad():  # the frozen encoder, whole-sequence
            z_rgb = encode(model.encoder, composite(rgb, alpha, k_enc, hard=True))
            z_alpha = encode(model.encoder, alpha.expand(-1, 3, -1, -1, -1))
        with parametrize.cached():  # each LoRA weight computed once per step
            z = model.merge(z_rgb, z_alpha)
            rgb_pred, alpha_pred = decode(model.rgb_decoder, z), decode(model.alpha_decoder, z)
            loss, _ = rgba_reconstruction_loss(rgb, alpha, rgb_pred, alpha_pred, k_hard, k_soft, LossWeights())
            # Keep the merged latent near the RGB latent of the encoder's input: the DiT's space carries over.
            anchor = F.mse_loss(z, z_rgb)
            total = loss + anchor_weight * anchor
            opt.zero_grad(set_to_none=True)
            total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 200 == 0 or step == steps - 1:
            log(f"decoders {step}/{steps} loss {np.mean(losses[-200:]):.4f} anchor {float(anchor.detach()):.4f}")
    # Held-out clips through the whole RGB-alpha VAE (this merge block): mean absolute error in 0-255 levels.
    rgb, alpha = heldout_batch(device)
    with torch.no_grad(), parametrize.cached():
        z = model.merge(
            encode(model.encoder, composite(rgb, alpha, 0, hard=True)),
            encode(model.encoder, alpha.expand(-1, 3, -1, -1, -1)),
        )
        rgb_pred = decode(model.rgb_decoder, z).clamp(-1, 1)
        alpha_pred = decode(model.alpha_decoder, z).clamp(-1, 1).mean(1, keepdim=True)
    mae_rgb, mae_alpha = float(object_mae(rgb_pred, rgb, alpha)), alpha_mae(alpha_pred, alpha)
    log(f"decoders: held-out MAE rgb {mae_rgb:.2f} alpha {mae_alpha:.2f} (0-255)")
    info = {
        "merge": merge,
        "anchor_weight": anchor_weight,
        "final_anchor": round(float(anchor.detach()), 4),
        **budget.record(),
        "final_loss": float(np.mean(losses[-100:])),
        "heldout_mae_rgb": round(mae_rgb, 2),
        "heldout_mae_alpha": round(mae_alpha, 2),
    }
    return lora_file(loras, model), info, model.merge if merge == "joint" else None


def train_dit(
    pool,
    vae: WanVAE,
    tokenizer_path: Path,
    steps: int,
    device,
    g: torch.Generator,
    seconds: float | None = None,
    start_from: Path | None = None,
    lr: float = 1e-3,
    merge: FeatureMergeBlock | None = None,
    batch: int = 64,
) -> tuple:
    from wanalpha.models.t5 import T5Tokenizer

    n = pool[0].shape[0]
    # RGB latents of every clip over every corner colour (what the DiT learns to generate), computed once.
    # Two background colours per clip, drawn once.
    colours = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)])
    latents = torch.empty(n, 2, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    with torch.no_grad():
        for start in range(0, n, 16):
            index = torch.arange(start, min(start + 16, n))
            rgb, alpha = batch_of(pool, index, device)
            z_alpha = encode(vae, alpha.expand(-1, 3, -1, -1, -1)) if merge is not None else None
            for j in range(2):
                z = encode(vae, composite(rgb, alpha, colours[index, j].to(device), hard=True))
                latents[index, j] = (z if merge is None else merge(z, z_alpha)).cpu()  # merge: the RGBA latent
    log(f"dit: latents {tuple(latents.shape)} mean {latents.mean():.3f} std {latents.std():.3f}")
    tokenizer = T5Tokenizer(tokenizer_path, text_len=DIT["text_len"])
    torch.manual_seed(SEED + 2)
    t5 = UMT5Encoder(T5Config(vocab_size=len(vocabulary()), **T5)).to(device)
    dit = WanDiT(DiTConfig(text_dim=T5["dim"], **DIT)).to(device)
    if start_from is not None:  # continue a base's DiT and text encoder (same sizes, same vocabulary)
        from wanalpha.checkpoints.wan import load_dit, load_t5

        dit.load_state_dict(load_dit(start_from / FOLDER, dtype=torch.float32).state_dict())
        t5.load_state_dict(
            load_t5(start_from / FOLDER / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32).state_dict()
        )
    t5.train().requires_grad_(True)
    dit.train().requires_grad_(True)
    params = list(t5.parameters()) + list(dit.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = flow.TrainingSchedule.create()
    captions = pool[2]
    losses = []
    budget = Budget(steps, seconds)
    for step in budget:
        cosine_lr(opt, lr, step, budget.progress(step), warmup=200)
        index = torch.randint(0, n, (batch,), generator=g)
        j = torch.randint(0, 2, (batch,), generator=g)
        k = colours[index, j]
        drop = torch.rand(batch, generator=g) < 0.1
        texts = ["" if d else plain_caption(captions[i], int(c)) for i, c, d in zip(index, k, drop, strict=True)]
        x0 = latents[index, j].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t, sigma, weight = schedule.sample(batch, g, model_dtype=torch.float32)
        ids, mask = tokenizer(texts)
        ids, mask = ids.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            states = t5(ids, mask) * mask[..., None]  # zero past each prompt's end, as trim + zero-pad
            pred = dit(flow.add_noise(x0, noise, sigma), t.to(device), list(states.float()))
        loss = flow.flow_loss(pred.float(), flow.velocity_target(x0, noise), weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % 250 == 0 or step == steps - 1:
            log(f"dit {step}/{steps} loss {np.mean(losses[-250:]):.4f}")
    info = {**budget.record(), "batch": batch, "lr": lr, "final_loss": float(np.mean(losses[-200:]))}
    if merge is not None:
        info["latents"] = "merged (the stage-2 merge block's RGBA latent of each RGB render and its alpha)"
    if start_from is not None:
        info["from"] = str(start_from)
        if (start_from / "training.json").exists():  # the run that trained it
            info["from_run"] = json.loads((start_from / "training.json").read_text())
    return t5.eval(), dit.eval(), info


# ---------------------------------------------------------------------------------------------------- main
def parse_stages(text: str, what: str, parser, cast) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        stage, _, value = item.partition("=")
        try:
            out[stage] = cast(value)
        except ValueError:
            stage = ""
        if stage not in STAGES:
            parser.error(f"--{what}: {item!r} is not STAGE=N with STAGE one of {', '.join(STAGES)}")
    return out


STAGES = ("vae", "vae_temporal", "decoders", "dit")
FOLDER = "Wan2.1-T2V-demo"
PARTS = {  # training.json section → the files it owns
    "vae": [f"{FOLDER}/Wan2.1_VAE.pth"],
    "decoder_lora": ["Wan-Alpha/vae/decoder.bin", "Wan-Alpha/vae/feature_merge.safetensors"],  # the 2nd: joint
    "dit": [f"{FOLDER}/diffusion_pytorch_model.safetensors", f"{FOLDER}/config.json"],
    "text_encoder": [f"{FOLDER}/models_t5_umt5-xxl-enc-bf16.pth", f"{FOLDER}/google/umt5-xxl/tokenizer.json"],
}


def check_base(out: Path) -> None:
    """Load a complete base back through the public API, as the demo and users load it."""
    from wanalpha.checkpoints.vae import load_rgba_vae
    from wanalpha.checkpoints.wan import load_dit, load_t5

    load_dit(out / FOLDER, dtype=torch.float32)
    load_t5(out / FOLDER / "models_t5_umt5-xxl-enc-bf16.pth")
    load_rgba_vae(out / FOLDER / "Wan2.1_VAE.pth", out / "Wan-Alpha" / "vae" / "decoder.bin")


def combine(out: Path, sources: list[Path]) -> None:
    """One base from runs that trained different parts (e.g. the decoders and the DiT in parallel from one VAE):
    each part's files and training.json section come from the first source that trained it."""
    import shutil

    records = [json.loads((src / "training.json").read_text()) for src in sources]
    merged = {"date": dt.date.today().isoformat(), "combined_from": []}
    for src, record in zip(sources, records, strict=True):
        took = [part for part in PARTS if part in record and part not in merged]
        for part in took:
            merged[part] = record[part]
            for name in (name for name in PARTS[part] if (src / name).exists()):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, out / name)
        merged["combined_from"].append({"parts": took} | {k: v for k, v in record.items() if k not in PARTS})
    merged["clip"] = next(record["clip"] for record in records if "clip" in record)  # the same in every run
    missing = [part for part in PARTS if part not in merged]
    if missing:
        sys.exit(f"--combine: no source trained {', '.join(missing)}")
    check_base(out)
    (out / "training.json").write_text(json.dumps(merged, indent=2) + "\n")
    log(f"combined {len(sources)} runs into {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every stage's steps (smoke runs)")
    parser.add_argument("--pool", type=int, default=384, help="synthetic clips the DiT trains on")
    parser.add_argument("--steps", default="", help="per-stage step counts, e.g. vae_temporal=120,decoders=150")
    parser.add_argument(
        "--seconds", default="", help="per-stage time budgets: fewer steps when they would not fit, e.g. vae=400"
    )
    parser.add_argument("--vae-dim", type=int, default=VAE_DIM, help="the VAE's base width (Wan2.1: 96)")
    parser.add_argument("--vae-crop", type=int, default=5, help="frames per crop in stage 1a (5 or 17)")
    parser.add_argument("--vae-batch", type=int, default=32, help="clips per step in stage 1a")
    parser.add_argument("--vae-from", type=Path, default=None, help="a stage-1a VAE (Wan2.1_VAE.pth) to continue from")
    parser.add_argument("--temporal-lr", type=float, default=5e-4, help="stage 1b's learning rate")
    parser.add_argument("--skip-vae-temporal", action="store_true", help="no stage 1b")
    parser.add_argument("--skip-decoders", action="store_true", help="no stage 2 (then --combine)")
    parser.add_argument("--skip-dit", action="store_true", help="no stage 3 (then --combine)")
    parser.add_argument(
        "--decoder-merge",
        choices=["trained", "identity", "joint"],
        default="identity",
        help="stage 2: train a merge block along (joint: from the identity, shipped in the base), "
        "or decode the RGB latent (identity)",
    )
    parser.add_argument(
        "--anchor-weight",
        type=float,
        default=0.1,
        help="stage 2 (trained, joint): weight of the MSE keeping the merged latent near the RGB "
        "latent, the DiT's space (0.1 let a CPU joint run drift to an MSE of 1.06)",
    )
    parser.add_argument(
        "--dit-from", type=Path, default=None, help="stage 3: continue this base folder's DiT and text encoder"
    )
    parser.add_argument("--dit-lr", type=float, default=1e-3, help="stage 3's peak learning rate")
    parser.add_argument("--dit-batch", type=int, default=64, help="stage 3's clips per step")
    parser.add_argument(
        "--dit-merge",
        type=Path,
        default=None,
        help="stage 3: train on this merge block's RGBA latents (a --decoder-merge joint run's "
        "Wan-Alpha/vae/feature_merge.safetensors) instead of the RGB latents",
    )
    parser.add_argument("--temporal-size", type=int, default=32, help="clip size of stages 1b and 2 (32 or 64)")
    parser.add_argument(
        "--stop-after-vae", action="store_true", help="write the VAE after stage 1b and stop (continue with --vae-from)"
    )
    parser.add_argument(
        "--combine",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="assemble --out from runs that trained different parts",
    )
    args = parser.parse_args()
    if args.combine:
        return combine(args.out, args.combine)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    budget = {"vae": 2000, "vae_temporal": 300, "decoders": 300, "dit": 800}
    budget |= parse_stages(args.steps, "steps", parser, int)
    seconds = parse_stages(args.seconds, "seconds", parser, float)
    steps = {k: max(2, int(v * args.scale)) for k, v in budget.items()}
    times = {}
    g = torch.Generator().manual_seed(SEED)

    start = time.perf_counter()
    pool = clip_pool(args.pool, seed=1000)  # the demo's own clips use seed 0
    times["data_s"] = time.perf_counter() - start
    log(f"{args.pool} clips in {times['data_s']:.0f} s")

    folder = args.out / FOLDER
    tokenizer_path = folder / "google" / "umt5-xxl" / "tokenizer.json"
    build_tokenizer(tokenizer_path)

    start = time.perf_counter()
    if args.vae_from is None:
        vae, vae_info = train_vae(
            pool, steps["vae"], device, g, args.vae_dim, args.vae_crop, args.vae_batch, seconds.get("vae")
        )
    else:  # stage 1a done earlier (its training.json tells how); continue from its VAE
        from wanalpha.checkpoints.vae import load_wan_vae

        vae = load_wan_vae(args.vae_from, device=device)
        vae_info = {"dim": vae.config.dim, "from": str(args.vae_from)}
        if (args.vae_from.parents[1] / "training.json").exists():  # the run that trained it
            vae_info["from_run"] = json.loads((args.vae_from.parents[1] / "training.json").read_text())
    times["vae_s"] = time.perf_counter() - start
    start = time.perf_counter()
    small = clip_pool(256, seed=2000, size=args.temporal_size)
    if not args.skip_vae_temporal:
        vae, vae_info["temporal"] = train_vae_temporal(
            vae, small, steps["vae_temporal"], device, g, seconds.get("vae_temporal"), args.temporal_lr
        )
    times["vae_temporal_s"] = time.perf_counter() - start
    vae_info["heldout"] = vae_heldout(vae, device)
    decoder_bin = t5 = dit = merge_block = None
    if not (args.stop_after_vae or args.skip_decoders):
        start = time.perf_counter()
        decoder_bin, dec_info, merge_block = train_decoders(
            small, vae, steps["decoders"], device, g, seconds.get("decoders"), args.decoder_merge, args.anchor_weight
        )
        times["decoders_s"] = time.perf_counter() - start
    if not (args.stop_after_vae or args.skip_dit):
        start = time.perf_counter()
        dit_merge = None
        if args.dit_merge is not None:
            from wanalpha.checkpoints.vae import load_merge_block

            block = FeatureMergeBlock(2 * vae.config.z_dim, out_dim=vae.config.z_dim)
            dit_merge = load_merge_block(args.dit_merge, block).to(device).eval().requires_grad_(False)
        t5, dit, dit_info = train_dit(
            pool,
            vae,
            tokenizer_path,
            steps["dit"],
            device,
            g,
            seconds.get("dit"),
            args.dit_from,
            args.dit_lr,
            dit_merge,
            args.dit_batch,
        )
        if args.dit_merge is not None:
            dit_info["merge"] = str(args.dit_merge)
        times["dit_s"] = time.perf_counter() - start

    from safetensors.torch import save_file

    record = {
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "seed": SEED,
        "clip": dict(
            frames=FRAMES, height=HEIGHT, width=WIDTH, pool=args.pool, pool_seed=1000, temporal_size=args.temporal_size
        ),
        "vae": vae_info,
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().cpu() for k, v in vae.state_dict().items()}, folder / "Wan2.1_VAE.pth")
    if decoder_bin is not None:
        (args.out / "Wan-Alpha" / "vae").mkdir(parents=True, exist_ok=True)
        torch.save(decoder_bin, args.out / "Wan-Alpha" / "vae" / "decoder.bin")
        record["decoder_lora"] = {"rank": LORA_RANK} | dec_info
        if merge_block is not None:  # the demo's train-merge starts from it (wanalpha.demo)
            from wanalpha.checkpoints.vae import save_merge_block

            # bf16 halves the shipped file (13 of 27 MB); the DiT stage (--dit-merge) and the demo read this file
            save_merge_block(
                merge_block,
                args.out / "Wan-Alpha" / "vae" / "feature_merge.safetensors",
                dtype=torch.bfloat16,
                trained_with="scripts/train_demo_base.py stage 2 (--decoder-merge joint)",
            )
            record["decoder_lora"]["feature_merge"] = "Wan-Alpha/vae/feature_merge.safetensors"
    if dit is not None:
        torch.save(
            {k: v.to(torch.bfloat16).cpu() for k, v in t5.state_dict().items()},
            folder / "models_t5_umt5-xxl-enc-bf16.pth",
        )
        save_file(
            {k: v.to(torch.bfloat16).cpu().contiguous() for k, v in dit.state_dict().items()},
            str(folder / "diffusion_pytorch_model.safetensors"),
        )
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "_class_name": "WanModel",
                    "model_type": "t2v",
                    **DIT,
                    "in_dim": 16,
                    "out_dim": 16,
                    "freq_dim": 256,
                    "eps": 1e-6,
                },
                indent=2,
            )
            + "\n"
        )
        record["dit"] = DIT | {"text_dim": T5["dim"]} | dit_info
        record["text_encoder"] = T5 | {"vocab": len(vocabulary())}
    record["times_s"] = {k: round(v, 1) for k, v in times.items()}
    if decoder_bin is not None and dit is not None:
        check_base(args.out)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"done: {json.dumps(record['times_s'])}")


if __name__ == "__main__":
    main()
