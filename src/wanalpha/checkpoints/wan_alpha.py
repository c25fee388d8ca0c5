"""Wan-Alpha's own files ↔ our modules: every official Wan-Alpha key map, reader and writer (DESIGN §4). The legacy
names (`fgr`, `pha`) live only here.

decoder.bin (reference NOTES §1): a flat dict whose keys `vae_fgr.decoder.<path>[.conv3D].lora_{A|B}.default.weight`
patch the RGB decoder (`vae_pha.` the alpha decoder), merged as W + (B·A)/r per kernel tap with r = lora_B.shape[1]
(lora_alpha 1.0). As the official loader: only keys with the prefix, containing `decoder` and a lora_A/lora_B segment
are used; every other key (base-layer copies, encoder, `middle.*`, …) is ignored. Unlike it, incomplete pairs are
errors, not silent skips. `decoder_lora_state_dict` / `load_decoder_lora_state_dict` write and read the same keys for
trainable ConvLoRAs (`wanalpha.models.lora`).

The v2 VAE release file (NOTES §10.3): `middle.block.*` (EncoderFeatureMerge) + decoder.bin's LoRA keys.

The DiT DoRA file (`epoch-13-1500.safetensors`): peft names without the `pipe.dit.` prefix
(`blocks.0.self_attn.q.lora_A.default.weight`, `…lora_B…`, `…lora_magnitude_vector.default.weight`); our train-dit
files use exactly these names, with metadata that explains the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from wanalpha.errors import WanAlphaError
from wanalpha.models.lora import lora_targets

log = logging.getLogger("wanalpha.checkpoints")

# --------------------------------------------------------------------------------------- decoder.bin

SIDES = {"rgb": "vae_fgr", "alpha": "vae_pha"}  # our decoder names → the official key prefixes
LoRAPairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # target weight key → (lora_A, lora_B)


def decoder_lora_pairs(lora: Mapping[str, torch.Tensor], source: str = "decoder LoRA") -> dict[str, LoRAPairs]:
    """Split a decoder.bin dict into {"rgb": pairs, "alpha": pairs}, keyed by the decoder weight they patch
    (e.g. `decoder.upsamples.3.time_conv.weight`). Raises on incomplete pairs; ignores non-LoRA keys."""
    halves: dict[str, dict[str, dict[str, torch.Tensor]]] = {"rgb": {}, "alpha": {}}
    ignored = []
    for key, tensor in lora.items():
        side = next((s for s, p in SIDES.items() if key.startswith(f"{p}.")), None)
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
    incomplete = [
        f"{side}:{t} (lora_{'B' if 'A' in p else 'A'} missing)"
        for side, targets in halves.items()
        for t, p in targets.items()
        if len(p) != 2
    ]
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


def _official_params(decoders: dict[str, nn.Module], loras: dict[str, nn.ModuleDict]) -> Iterator:
    """(official key, parameter) for every lora_A / lora_B: `vae_fgr.decoder.<path>[.conv3D].lora_A.default.weight`."""
    for side, decoder in decoders.items():
        targets = lora_targets(decoder)
        for path, lora in loras[side].items():
            name = path.replace("/", ".")
            conv3d = ".conv3D" if isinstance(targets[name], nn.Conv3d) else ""
            for part in ("A", "B"):
                yield f"{SIDES[side]}.decoder.{name}{conv3d}.lora_{part}.default.weight", getattr(lora, f"lora_{part}")


def decoder_lora_state_dict(decoders: dict[str, nn.Module], loras: dict[str, nn.ModuleDict]) -> dict[str, torch.Tensor]:
    """{"rgb": WanVAE, "alpha": WanVAE} and their ConvLoRAs (`add_decoder_lora`) → the official decoder.bin dict
    (float32, CPU)."""
    return {key: p.detach().to("cpu", torch.float32).contiguous() for key, p in _official_params(decoders, loras)}


def load_decoder_lora_state_dict(
    decoders: dict[str, nn.Module], loras: dict[str, nn.ModuleDict], sd: Mapping[str, torch.Tensor]
) -> None:
    """The inverse of decoder_lora_state_dict (resume, or a v2 file to start from): copy the official-key tensors
    into the ConvLoRAs. Raises ValueError naming the first missing or misshaped key (before copying anything)."""
    params = list(_official_params(decoders, loras))
    for key, param in params:
        if key not in sd or sd[key].shape != param.shape:
            found = "missing" if key not in sd else f"shape {tuple(sd[key].shape)}"
            raise ValueError(f"{key}: {found}, expected shape {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in params:
            param.copy_(sd[key])


# --------------------------------------------------------------------------------------- the v2 VAE file

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


# --------------------------------------------------------------------------------------- the DiT DoRA file

DORA_FORMAT = "wanalpha.dora"
ADAPTER = "default"  # peft's adapter name, part of every official key (`….lora_A.default.weight`)
DORA_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _normalise_key(key: str) -> str:
    """Drop a leading `diffusion_model.` and the adapter name: `X.lora_A.default.weight` → `X.lora_A.weight`."""
    key = key.removeprefix("diffusion_model.")
    return key.replace(f".{ADAPTER}.weight", ".weight")


def dora_adapters(sd: Mapping[str, torch.Tensor], source: str = "(state dict)") -> dict[str, dict[str, torch.Tensor]]:
    """An official DoRA dict → {module path (`blocks.0.self_attn.q`): {"lora_A", "lora_B", "lora_magnitude_vector"}}.
    Keys may carry a `diffusion_model.` prefix and may omit the adapter name; other keys are ignored (listed at debug
    level). Raises on incomplete adapters and on a dict with none."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, tensor in sd.items():
        norm = _normalise_key(key)
        for part in DORA_PARTS:
            marker = f".{part}.weight"
            if norm.endswith(marker):
                groups.setdefault(norm[: -len(marker)], {})[part] = tensor
                break
        else:
            ignored.append(key)
    if ignored:
        log.debug("DoRA %s: ignored %d keys: %s", source, len(ignored), ignored)
    incomplete = sorted(p for p, g in groups.items() if len(g) != 3)
    if incomplete:
        raise WanAlphaError(
            f"DoRA {source}: incomplete adapters (need lora_A, lora_B and lora_magnitude_vector): "
            f"{', '.join(incomplete[:5])}"
        )
    if not groups:
        raise WanAlphaError(f"DoRA {source}: no DoRA tensors (keys like blocks.0.self_attn.q.lora_A.default.weight)")
    return groups


def save_dora(
    tensors: Mapping[str, torch.Tensor],
    path: Path,
    *,
    use_dora: bool,
    rank: int,
    target_modules: str,
    base_model: str,
    **extra: object,
) -> None:
    """The adapter tensors (full, e.g. from `training.trainable_state`; entries without `.lora_` are left out) under
    the official DoRA names, float32, atomically, with metadata that explains the file (lora_alpha = rank, as the
    official training)."""
    from safetensors.torch import save_file

    from wanalpha.data.files import atomic_path

    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items() if ".lora_" in k}
    meta = {
        "format": DORA_FORMAT,
        "format_version": "1",
        "use_dora": str(use_dora),
        "rank": str(rank),
        "lora_alpha": str(rank),
        "target_modules": target_modules,
        "base_model": base_model,
    } | {k: str(v) for k, v in extra.items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
