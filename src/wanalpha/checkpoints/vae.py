"""Official VAE files ↔ our modules: `Wan2.1_VAE.pth` (strict), the RGB-alpha VAE from it and Wan-Alpha's decoder
LoRAs (read by `wanalpha.checkpoints.wan_alpha`), and our merge checkpoints.

decoder.bin's LoRA pairs are merged as W + (B·A)/r per kernel tap (reference NOTES §1, DESIGN §4); pairs that match
no decoder weight, or whose shape does not fit it, are errors, not silent skips.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wanalpha.checkpoints.io import StateDictSource, check_keys, read_state_dict
from wanalpha.checkpoints.wan_alpha import LoRAPairs, decoder_lora_pairs
from wanalpha.errors import WanAlphaError
from wanalpha.models.lora import lora_delta
from wanalpha.models.rgba import EncoderFeatureMerge, FeatureMergeBlock, RGBAlphaVAE
from wanalpha.models.vae import VAEConfig, WanVAE


def expected_shapes(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


def load_wan_vae(
    source: StateDictSource,
    config: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_encoder: bool = True,
    with_decoder: bool = True,
) -> WanVAE:
    """`Wan2.1_VAE.pth` (or a state dict) → WanVAE (frozen, eval), strict, built on the meta device and assigned
    (no extra copy). with_encoder / with_decoder=False keep only the other half (the file is still checked whole)."""
    sd = read_state_dict(source, "base VAE")
    config = config or infer_vae_config(sd)
    with torch.device("meta"):
        full = WanVAE(config)
        vae = WanVAE(config, with_encoder=with_encoder, with_decoder=with_decoder)
    check_keys(expected_shapes(full), sd, f"base VAE {_name(source)}")
    wanted = expected_shapes(vae)
    vae.load_state_dict({k: v for k, v in sd.items() if k in wanted}, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _name(source: StateDictSource) -> str:
    return str(source) if isinstance(source, (str, Path)) else "(state dict)"


def merge_lora(weights: Mapping[str, torch.Tensor], pairs: LoRAPairs, source: str) -> dict[str, torch.Tensor]:
    """A new state dict: `weights` with every paired weight replaced by W + (B·A)/r (out of place)."""
    unmatched = [t for t in pairs if t not in weights]
    if unmatched:
        raise WanAlphaError(f"{source}: LoRA pairs that match no decoder weight: {', '.join(sorted(unmatched))}")
    merged = dict(weights)
    bad = []
    for target, (lora_a, lora_b) in pairs.items():
        delta = lora_delta(lora_a, lora_b)
        if delta.shape != weights[target].shape:
            bad.append(f"{target} (LoRA gives {tuple(delta.shape)}, weight is {tuple(weights[target].shape)})")
            continue
        merged[target] = weights[target] + delta.to(weights[target].dtype)
    if bad:
        raise WanAlphaError(f"{source}: LoRA pairs whose shape does not fit the decoder: {', '.join(bad)}")
    return merged


MERGE_FORMAT = "wanalpha.feature_merge"


def save_merge_block(
    block: FeatureMergeBlock, path: Path, dtype: torch.dtype = torch.float32, **metadata: object
) -> None:
    """Our merge checkpoint: safetensors with the block's weights (float32 unless `dtype` says otherwise) and metadata
    that explains the file."""
    from safetensors.torch import save_file

    from wanalpha.data.files import atomic_path

    info = {"format": MERGE_FORMAT, "format_version": "1", "architecture": "FeatureMergeBlock"}
    info |= {k: str(v) for k, v in block.sizes.items()} | {k: str(v) for k, v in metadata.items()}
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in block.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=info)


def load_merge_block(source: StateDictSource, merge: nn.Module) -> nn.Module:
    """Our merge checkpoint, or (v2) the official release file: its `middle.*` entries without the prefix, strictly,
    everything else in the file (decoder LoRAs, frozen copies) ignored — as the official T2V data prep loads it."""
    sd = read_state_dict(source, "feature merge checkpoint")
    for prefix in ("merge.", "middle."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    check_keys(expected_shapes(merge), sd, f"feature merge checkpoint {_name(source)}")
    merge.load_state_dict(sd, strict=True)
    return merge


def infer_vae_config(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """The VAEConfig a Wan-layout state dict was built with: the official one, or a narrower test model."""
    if "conv2.weight" not in sd or "decoder.head.2.weight" not in sd:
        return VAEConfig()  # check_keys will name what is missing
    z_dim = sd["conv2.weight"].shape[0]
    if z_dim != 16:
        raise WanAlphaError(f"base VAE has a {z_dim}-channel latent; wanalpha supports the Wan2.1 VAE (16 channels)")
    return VAEConfig(dim=sd["decoder.head.2.weight"].shape[1])


def load_rgba_vae(
    base_vae: StateDictSource,
    decoder_lora: StateDictSource | None,
    merge: StateDictSource | None = None,
    variant: str = "v1",
    config: VAEConfig | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_encoder: bool = True,
    with_decoders: bool = True,
    trainable_merge: bool = False,
) -> RGBAlphaVAE:
    """The RGB-alpha VAE from the official files: base VAE (strict) + decoder LoRAs + our merge checkpoint.

    `merge=None` gives a freshly initialised merge block (stage-1 training starts there; v2 inference needs none, it
    only decodes). variant "v1" (seed FeatureMergeBlock, our checkpoints) or "v2" (the official EncoderFeatureMerge,
    read from the release file's `middle.*` entries; the decoder LoRAs come from the same file). `config=None` reads
    the VAE's width from the file. `with_encoder=False` skips the encoder (training from cached latents),
    `with_decoders=False` the decoders (only encoding; then decoder_lora may be None). The model is frozen and in
    eval mode; `trainable_merge=True` leaves the merge block's parameters trainable (stage-1 training).
    """
    if variant not in ("v1", "v2"):
        raise WanAlphaError(f"RGB-alpha VAE variant {variant!r} does not exist; use 'v1' (seed) or 'v2' (official)")
    base = read_state_dict(base_vae, "base VAE")
    lora_name = _name(decoder_lora)
    if with_decoders:
        if decoder_lora is None:
            raise WanAlphaError("the RGB and alpha decoders need the decoder LoRA file (decoder.bin)")
        pairs = decoder_lora_pairs(read_state_dict(decoder_lora, "decoder LoRA"), f"decoder LoRA {lora_name}")
    config = config or infer_vae_config(base)
    if variant == "v1":
        block: nn.Module = FeatureMergeBlock(in_dim=2 * config.z_dim, out_dim=config.z_dim)
    else:
        block = EncoderFeatureMerge(in_dim=8 * config.dim, out_dim=config.z_dim, mid_dim=4 * config.dim)
    if merge is not None:
        load_merge_block(merge, block)
    with torch.device("meta"):
        model = RGBAlphaVAE(
            config, merge=nn.Identity(), with_encoder=with_encoder, with_decoders=with_decoders, variant=variant
        )
        full = WanVAE(config)
    check_keys(expected_shapes(full), base, f"base VAE {_name(base_vae)}")
    decoder_sd = {k: v for k, v in base.items() if k.startswith(("decoder.", "conv2."))}
    if with_encoder:
        encoder_sd = {k: v for k, v in base.items() if k.startswith(("encoder.", "conv1."))}
        model.encoder.load_state_dict(encoder_sd, strict=True, assign=True)
    for side, decoder in (("rgb", model.rgb_decoder), ("alpha", model.alpha_decoder)):
        if decoder is not None:
            merged = merge_lora(decoder_sd, pairs[side], f"decoder LoRA {lora_name} ({side})")
            decoder.load_state_dict(merged, strict=True, assign=True)
    model.merge = block
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    model.merge.requires_grad_(trainable_merge)
    return model
