"""Official VAE files ↔ our modules: `Wan2.1_VAE.pth` (strict) and Wan-Alpha's `decoder.bin` LoRAs.

decoder.bin (reference NOTES §1, DESIGN §4): a flat dict whose keys `vae_fgr.decoder.<path>[.conv3D].lora_{A|B}
.default.weight` patch the RGB decoder (`vae_pha.` the alpha decoder), merged as W + (B·A)/r per kernel tap with
r = lora_B.shape[1] (lora_alpha 1.0). As the official loader: only keys with the prefix, containing `decoder` and a
lora_A/lora_B segment are used; every other key (base-layer copies, encoder, `middle.*`, …) is ignored.
Unlike it, incomplete pairs and pairs that match no decoder weight are errors, not silent skips.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from wanalpha.checkpoints.io import StateDictSource, check_keys, read_state_dict
from wanalpha.errors import WanAlphaError
from wanalpha.models.lora import lora_delta
from wanalpha.models.rgba import EncoderFeatureMerge, FeatureMergeBlock, RGBAlphaVAE
from wanalpha.models.vae import VAEConfig, WanVAE

log = logging.getLogger("wanalpha.checkpoints")

DECODER_PREFIXES = {"vae_fgr.": "rgb", "vae_pha.": "alpha"}  # legacy names (fgr/pha) live only here
LoRAPairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target weight key → (lora_A, lora_B)


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


def decoder_lora_pairs(lora: Mapping[str, torch.Tensor], source: str = "decoder LoRA") -> dict[str, LoRAPairs]:
    """Split a decoder.bin dict into {"rgb": pairs, "alpha": pairs}, keyed by the decoder weight they patch
    (e.g. `decoder.upsamples.3.time_conv.weight`). Raises on incomplete pairs; ignores non-LoRA keys."""
    halves: dict[str, dict[str, dict[str, torch.Tensor]]] = {"rgb": {}, "alpha": {}}
    ignored = []
    for key, tensor in lora.items():
        side = next((s for p, s in DECODER_PREFIXES.items() if key.startswith(p)), None)
        stripped = key[len("vae_fgr.") :]
        if side is None or "decoder" not in stripped:
            ignored.append(key)
            continue
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in stripped:
                module_path, _, leaf = stripped.partition(marker)  # leaf: "default.weight" or "weight"
                if leaf.rsplit(".", 1)[-1] != "weight":
                    ignored.append(key)
                    break
                target = module_path.replace(".conv3D", "") + ".weight"
                halves[side].setdefault(target, {})[part] = tensor
                break
        else:
            ignored.append(key)
    if ignored:
        log.debug("%s: ignored %d keys that are not decoder LoRA pairs: %s", source, len(ignored), ignored)
    incomplete = [f"{side}:{t} (lora_{'B' if 'A' in p else 'A'} missing)"
                  for side, targets in halves.items() for t, p in targets.items() if len(p) != 2]  # fmt: skip
    if incomplete:
        raise WanAlphaError(f"{source}: incomplete LoRA pairs: {', '.join(sorted(incomplete))}")
    pairs = {side: {t: (p["A"], p["B"]) for t, p in targets.items()} for side, targets in halves.items()}
    empty = [side for side, p in pairs.items() if not p]
    if empty:
        raise WanAlphaError(
            f"{source}: no usable LoRA pair for the {' and '.join(empty)} decoder; expected keys like "
            "vae_fgr.decoder.conv1.conv3D.lora_A.default.weight (and vae_pha.…) as in Wan-Alpha's decoder.bin"
        )
    return pairs


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


def save_merge_block(block: FeatureMergeBlock, path: Path, **metadata: object) -> None:
    """Our merge checkpoint: safetensors with the block's weights and metadata that explains the file."""
    from safetensors.torch import save_file

    from wanalpha.data.files import atomic_path

    info = {"format": MERGE_FORMAT, "format_version": "1", "architecture": "FeatureMergeBlock"}
    info |= {k: str(v) for k, v in block.sizes.items()} | {k: str(v) for k, v in metadata.items()}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in block.state_dict().items()}
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
        model = RGBAlphaVAE(config, merge=nn.Identity(), with_encoder=with_encoder, with_decoders=with_decoders,
                            variant=variant)  # fmt: skip
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


V2_FORMAT = "wanalpha.rgba_vae_v2"


def rgba_vae_v2_state_dict(merge: nn.Module, lora_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Wan-Alpha v2 release layout (NOTES §10.3): a flat dict of `middle.block.*` (EncoderFeatureMerge) and the
    decoder LoRAs under decoder.bin's keys, float32 on the CPU."""
    out = {f"middle.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in merge.state_dict().items()}
    return out | {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_tensors.items()}


def save_rgba_vae_v2(tensors: Mapping[str, torch.Tensor], path: Path, **metadata: object) -> list[Path]:
    """Write a v2 state dict twice, atomically: `path` (.safetensors, with metadata) and beside it the `.bin`
    (`torch.save` of the flat dict) that the official inference (`--vae_lora_checkpoint`) and T2V prep
    (`--new_vae_path`) load. Returns both paths."""
    from safetensors.torch import save_file

    from wanalpha.data.files import atomic_path

    path = Path(path)
    info = {"format": V2_FORMAT, "format_version": "1"} | {k: str(v) for k, v in metadata.items()}
    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=info)
    bin_path = path.with_suffix(".bin")
    with atomic_path(bin_path) as tmp:
        torch.save(dict(tensors), tmp)
    return [path, bin_path]
