"""Adapters on the DiT: the only module that touches peft (DESIGN §2).

- `inject_dora` / `inject_lora`: trainable peft adapters on the DiT's linears (default q, k, v, o, ffn.0, ffn.2 of
  every block, lora_alpha = rank, as the official Wan-Alpha training: reference NOTES §2).
- `dora_state_dict`: the adapter tensors, named exactly as the official Wan-Alpha DoRA file
  (`blocks.0.self_attn.q.lora_A.default.weight`, `…lora_B…`, `…lora_magnitude_vector.default.weight`).
- `merge_dora`: an official DoRA file → merged weights: V = W0 + scale·(B@A) (B@A in the file's dtype),
  W = m / clamp(‖V‖ per output row, 1e-8) · V; no alpha/r factor (training used alpha = r); biases unchanged.
- `merge_lora`: a lightx2v-style LoRA (`lora_up/lora_down`, `lora_A/lora_B`, `diff`, `diff_b`, `diff_m`, optional
  `diffusion_model.` prefix), tensors cast to the model dtype, no scaling; applied AFTER the DoRA, as upstream.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from wanalpha.checkpoints.io import StateDictSource, read_state_dict
from wanalpha.errors import WanAlphaError

log = logging.getLogger("wanalpha.adapters")

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")
ADAPTER = "default"


def inject_dora(
    dit: nn.Module, rank: int = 32, targets: Sequence[str] = DEFAULT_TARGETS, use_dora: bool = True,
    alpha: float | None = None,
) -> nn.Module:  # fmt: skip
    """Add trainable DoRA (or LoRA, use_dora=False) adapters in place; everything else is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, use_dora=use_dora,
                        target_modules=list(targets), lora_dropout=0.0)  # fmt: skip
    inject_adapter_in_model(config, dit, adapter_name=ADAPTER)
    for name, param in dit.named_parameters():
        param.requires_grad_(".lora_" in name)
    return dit


def inject_lora(dit: nn.Module, rank: int = 32, targets: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    return inject_dora(dit, rank, targets, use_dora=False)


def dora_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the official names (the peft names without any wrapper prefix)."""
    return {k: v.detach() for k, v in dit.state_dict().items() if ".lora_" in k}


def _normalise_key(key: str) -> str:
    """Drop a leading `diffusion_model.` and the adapter name: `X.lora_A.default.weight` → `X.lora_A.weight`."""
    key = key.removeprefix("diffusion_model.")
    return key.replace(f".{ADAPTER}.weight", ".weight")


def _weight_of(dit: nn.Module, module_path: str) -> nn.Parameter | None:
    """The base weight of a linear, also when peft has wrapped it (`….base_layer.weight`)."""
    try:
        module = dit.get_submodule(module_path)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


def _group(sd: Mapping[str, torch.Tensor], parts: Sequence[str]) -> tuple[dict[str, dict[str, torch.Tensor]], list]:
    """{module path: {part: tensor}} for keys `<path>.<part>.weight`; the rest is returned as ignored."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    ignored = []
    for key, tensor in sd.items():
        norm = _normalise_key(key)
        for part in parts:
            marker = f".{part}.weight"
            if norm.endswith(marker):
                groups.setdefault(norm[: -len(marker)], {})[part] = tensor
                break
        else:
            ignored.append(key)
    return groups, ignored


@torch.no_grad()
def merge_dora(dit: nn.Module, source: StateDictSource, scale: float = 1.0) -> int:
    """Merge an official Wan-Alpha DoRA file into the DiT's weights in place; returns the number of merged linears."""
    name = source if isinstance(source, str) else getattr(source, "name", "(state dict)")
    sd = read_state_dict(source, "DoRA")
    groups, ignored = _group(sd, ("lora_A", "lora_B", "lora_magnitude_vector"))
    if ignored:
        log.debug("DoRA %s: ignored %d keys: %s", name, len(ignored), ignored)
    incomplete = sorted(p for p, g in groups.items() if len(g) != 3)
    if incomplete:
        raise WanAlphaError(f"DoRA {name}: incomplete adapters (need lora_A, lora_B and lora_magnitude_vector): "
                            f"{', '.join(incomplete[:5])}")  # fmt: skip
    if not groups:
        raise WanAlphaError(f"DoRA {name}: no DoRA tensors (keys like blocks.0.self_attn.q.lora_A.default.weight)")
    unmatched = sorted(p for p in groups if _weight_of(dit, p) is None)
    if unmatched:
        raise WanAlphaError(f"DoRA {name}: adapters for modules this DiT does not have: {', '.join(unmatched[:5])}")
    for path, g in groups.items():
        weight = _weight_of(dit, path)
        delta = (g["lora_B"] @ g["lora_A"]).to(weight.dtype)  # in the file's dtype, as upstream
        if delta.shape != weight.shape or g["lora_magnitude_vector"].numel() != weight.shape[0]:
            raise WanAlphaError(f"DoRA {name}: {path} does not fit the DiT (weight {tuple(weight.shape)}, "
                                f"B@A {tuple(delta.shape)}); is it for the other model size?")  # fmt: skip
        merged = weight.float() + scale * delta.float()
        norm = merged.norm(p=2, dim=1, keepdim=True).clamp(min=1e-8)
        magnitude = g["lora_magnitude_vector"].to(torch.float32).view(-1, 1)
        weight.copy_((magnitude / norm * merged).to(weight.dtype))
    return len(groups)


@torch.no_grad()
def merge_lora(dit: nn.Module, source: StateDictSource, scale: float = 1.0) -> int:
    """Apply a lightx2v-style LoRA in place (W += up@down, weight += diff, bias += diff_b, modulation += diff_m);
    returns the number of tensors changed. Entries that fit nothing are skipped as upstream does (logged)."""
    name = source if isinstance(source, str) else "(state dict)"
    sd = {k.removeprefix("diffusion_model."): v for k, v in read_state_dict(source, "LoRA").items()}
    params = dict(dit.named_parameters())
    params |= {k.replace(".base_layer.", "."): v for k, v in params.items() if ".base_layer." in k}
    applied, skipped = 0, []
    pairs = {}
    for key, tensor in sd.items():
        for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
            if key.endswith(f".{down}.weight"):
                module = key[: -len(f".{down}.weight")]
                pairs[module] = (tensor, sd.get(f"{module}.{up}.weight"))
    for module, (a, b) in pairs.items():
        weight = params.get(f"{module}.weight")
        if b is None or weight is None or weight.ndim != 2 or weight.shape != (b.shape[0], a.shape[1]):
            skipped.append(module)
            continue
        weight.add_(scale * (b.to(weight.dtype) @ a.to(weight.dtype)))
        applied += 1
    for suffix, target in ((".diff", ".weight"), (".diff_b", ".bias"), (".diff_m", ".modulation")):
        for key, tensor in sd.items():
            if not key.endswith(suffix):
                continue
            param = params.get(key[: -len(suffix)] + target)
            if param is None or param.shape != tensor.shape:
                skipped.append(key)
                continue
            param.add_(scale * tensor.to(param.dtype))
            applied += 1
    if skipped:
        log.debug("LoRA %s: skipped %d entries that fit no weight: %s", name, len(skipped), skipped)
    if not applied:
        raise WanAlphaError(f"LoRA {name}: nothing in it fits this DiT (expected lightx2v-style keys such as "
                            "blocks.0.self_attn.q.lora_up.weight / lora_down.weight or …diff)")  # fmt: skip
    return applied
