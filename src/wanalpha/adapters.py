"""Adapters on the DiT: the only module that touches peft (DESIGN §2).

- `inject_dora`: trainable peft adapters (DoRA, or plain LoRA with use_dora=False) on the DiT's linears (default
  q, k, v, o, ffn.0, ffn.2 of every block, lora_alpha = rank, as the official Wan-Alpha training: NOTES §2).
- `dora_state_dict`: the adapter tensors, named exactly as the official Wan-Alpha DoRA file
  (`blocks.0.self_attn.q.lora_A.default.weight`, `…lora_B…`, `…lora_magnitude_vector.default.weight`).
- `merge_dora`: an official DoRA file → merged weights: V = W0 + scale·(B@A) (B@A in the file's dtype),
  W = m / clamp(‖V‖ per output row, 1e-8) · V; no alpha/r factor (training used alpha = r); biases unchanged.
- `inject_dora(fused=True)` (`FusedLoraLinear`) / `dora_norm_scope`: wanalpha's forward for the injected
  linears (the GPU-speed lever, same math as peft's: `wanalpha.fused_adapter`), and DoRA's weight norms computed
  once per training step.
- `merge_lora`: a lightx2v-style LoRA (`lora_up/lora_down`, `lora_A/lora_B`, `diff`, `diff_b`, `diff_m`, optional
  `diffusion_model.` prefix), tensors cast to the model dtype, no scaling; applied AFTER the DoRA, as upstream.
- `dora_updates` / `lora_updates`: the same merges as per-tensor `WeightUpdate`s, checked against a DiT that may live
  on the meta device, for the loader that merges each weight as it streams in (before FP8 quantisation).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from wanalpha.checkpoints.io import StateDictSource, read_state_dict
from wanalpha.checkpoints.wan_alpha import ADAPTER, dora_adapters
from wanalpha.errors import WanAlphaError
from wanalpha.fp8 import FP8Linear
from wanalpha.fused_adapter import FP8Base, fused_linear
from wanalpha.fused_adapter import dora_norm_scope as dora_norm_scope  # part of this module's API

log = logging.getLogger("wanalpha.adapters")

DEFAULT_TARGETS = ("q", "k", "v", "o", "ffn.0", "ffn.2")


def inject_dora(
    dit: nn.Module,
    rank: int = 32,
    targets: Sequence[str] = DEFAULT_TARGETS,
    use_dora: bool = True,
    alpha: float | None = None,
    fused: bool = False,
) -> nn.Module:
    """Add trainable DoRA (or LoRA, use_dora=False) adapters in place; everything else is frozen. fused: the
    injected linears are `FusedLoraLinear`s, which run wanalpha's forward instead of peft's."""
    from peft import LoraConfig, inject_adapter_in_model

    linears = {
        name.rsplit(".", 1)[-1] if "." in name else name for name, m in dit.named_modules() if isinstance(m, nn.Linear)
    }
    names = {name for name, m in dit.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        raise WanAlphaError(
            f"--lora-target-modules: {', '.join(unknown)} names no linear layer of the DiT; choose "
            f"from {', '.join(sorted(linears))} (and ffn.0, ffn.2)"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        use_dora=use_dora,
        target_modules=list(targets),
        lora_dropout=0.0,
    )
    inject_adapter_in_model(fused_config(config) if fused else config, dit, adapter_name=ADAPTER)
    for name, param in dit.named_parameters():
        param.requires_grad_(".lora_" in name)
    return dit


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Forward of a peft lora.Linear with one active, undropped, unmerged adapter over a frozen base linear;
    anything else goes to peft's own forward."""
    from peft.tuners.lora.variants import DoraLinearVariant

    active = self.active_adapters
    base = self.get_base_layer()
    name = active[0] if len(active) == 1 else None
    variant = self.lora_variant.get(name)
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or type(base) not in (nn.Linear, FP8Linear)
        or self.fan_in_fan_out  # quantised or transposed bases
        or any(p.requires_grad for p in base.parameters())  # a trained base weight or bias
        or self.lora_B[name].bias is not None  # peft's lora_bias
        or not isinstance(self.lora_dropout[name], nn.Identity)
        or (variant is not None and not isinstance(variant, DoraLinearVariant))
    ):
        return super(type(self), self).forward(x, *args, **kwargs)  # peft's own
    magnitude = self.lora_magnitude_vector[name].weight if variant is not None else None
    a, b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
    # An FP8 base goes in as its codes (FP8Base): dequantised and scaled in one pass, and not kept dequantised.
    if type(base) is FP8Linear:
        gemm = base.fp8_compute and base.adapter_fp8_gemm
        weight = FP8Base(base.weight_fp8, base.weight_scale, base.compute_dtype, gemm)
    else:
        weight = base.weight
    return fused_linear(self, x, weight, base.bias, a, b, scaling, magnitude)


@functools.cache
def _fused_lora_linear() -> type:
    """peft's lora.Linear with the fused forward: a subclass, defined once peft is imported (importing peft costs
    seconds, so not at this module's import); reachable as `wanalpha.adapters.FusedLoraLinear`, so fused models
    pickle (torch.save)."""
    from peft.tuners.lora import Linear as LoraLinear

    return type("FusedLoraLinear", (LoraLinear,), {"forward": _fused_forward, "__module__": __name__})


def __getattr__(name: str):
    if name == "FusedLoraLinear":
        return _fused_lora_linear()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fused_config(config):
    """A peft LoraConfig whose injected linears are `FusedLoraLinear`s: module surgery once, at injection, through
    peft's custom-module mapping; the parameters, their names and the saved files are peft's, unchanged."""
    config._register_custom_module({nn.Linear: _fused_lora_linear()})
    return config


def dora_state_dict(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under the official names (the peft names without any wrapper prefix)."""
    return {k: v.detach() for k, v in dit.state_dict().items() if ".lora_" in k}


def _weight_of(dit: nn.Module, module_path: str) -> nn.Parameter | None:
    """The base weight of a linear, also when peft has wrapped it (`….base_layer.weight`)."""
    try:
        module = dit.get_submodule(module_path)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None


class WeightUpdate(NamedTuple):
    """One change an adapter file makes to one tensor of the DiT: `apply(tensor)` changes the tensor stored under
    `key` (its plain state-dict name, `blocks.0.self_attn.q.weight`) in place, in the tensor's dtype and on its
    device. Planned against a DiT (which may live on the meta device) and applied to its parameters (`merge_dora`,
    `merge_lora`) or to each tensor as a checkpoint streams in (`checkpoints.wan.load_dit(updates=…)`: the FP8
    loader merges into the bf16 weights before it quantises them)."""

    key: str
    apply: Callable[[torch.Tensor], None]


def _plain_parameters(dit: nn.Module) -> dict[str, nn.Parameter]:
    """The DiT's parameters by name, each base weight of a peft-wrapped linear also under its plain state-dict name
    (`….base_layer.weight` as `….weight`)."""
    params = dict(dit.named_parameters())
    return params | {k.replace(".base_layer.", "."): v for k, v in params.items() if ".base_layer." in k}


def _apply_updates(dit: nn.Module, updates: Sequence[WeightUpdate]) -> None:
    params = _plain_parameters(dit)
    for update in updates:
        update.apply(params[update.key].data)


def _dora_update(g: dict[str, torch.Tensor], scale: float) -> Callable[[torch.Tensor], None]:
    def apply(weight: torch.Tensor) -> None:
        a, b = g["lora_A"].to(weight.device), g["lora_B"].to(weight.device)
        delta = (b @ a).to(weight.dtype)  # in the file's dtype, as upstream
        merged = weight.float() + scale * delta.float()
        norm = merged.norm(p=2, dim=1, keepdim=True).clamp(min=1e-8)
        magnitude = g["lora_magnitude_vector"].to(weight.device, torch.float32).view(-1, 1)
        weight.copy_((magnitude / norm * merged).to(weight.dtype))

    return apply


@torch.no_grad()
def dora_updates(dit: nn.Module, source: StateDictSource, scale: float = 1.0) -> list[WeightUpdate]:
    """An official Wan-Alpha DoRA file → the WeightUpdates that merge it, one per adapted linear, every adapter
    checked against `dit` (on any device, the meta one too) before any weight changes."""
    name = source if isinstance(source, str) else getattr(source, "name", "(state dict)")
    groups = dora_adapters(read_state_dict(source, "DoRA"), name)
    unmatched = sorted(p for p in groups if _weight_of(dit, p) is None)
    if unmatched:
        raise WanAlphaError(f"DoRA {name}: adapters for modules this DiT does not have: {', '.join(unmatched[:5])}")
    for path, g in groups.items():
        weight, a, b = _weight_of(dit, path), g["lora_A"], g["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise WanAlphaError(
                f"DoRA {name}: {path}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree "
                "on the rank; the file is damaged"
            )
        if (b.shape[0], a.shape[1]) != tuple(weight.shape) or g["lora_magnitude_vector"].numel() != weight.shape[0]:
            raise WanAlphaError(
                f"DoRA {name}: {path} does not fit the DiT (weight {tuple(weight.shape)}, "
                f"B@A {(b.shape[0], a.shape[1])}); is it for the other model size?"
            )
    return [WeightUpdate(f"{path}.weight", _dora_update(g, scale)) for path, g in groups.items()]


@torch.no_grad()
def merge_dora(dit: nn.Module, source: StateDictSource, scale: float = 1.0) -> int:
    """Merge an official Wan-Alpha DoRA file into the DiT's weights in place; returns the number of merged linears."""
    updates = dora_updates(dit, source, scale)
    _apply_updates(dit, updates)
    return len(updates)


class LoRAMatch(NamedTuple):
    """What a LoRA file did to the DiT: `applied` of its `entries` (a down/up pair counts once) changed a weight;
    `skipped` names the rest."""

    applied: int
    entries: int
    skipped: list[str]


IMAGE_LAYERS = ("k_img", "v_img", "norm_k_img", "img_emb")  # only an image-to-video DiT has these


def _pair_update(a: torch.Tensor, b: torch.Tensor, scale: float) -> Callable[[torch.Tensor], None]:
    def apply(weight: torch.Tensor) -> None:
        weight.add_(scale * (b.to(weight.device, weight.dtype) @ a.to(weight.device, weight.dtype)))

    return apply


def _diff_update(diff: torch.Tensor, scale: float) -> Callable[[torch.Tensor], None]:
    def apply(param: torch.Tensor) -> None:
        param.add_(scale * diff.to(param.device, param.dtype))

    return apply


@torch.no_grad()
def merge_lora(dit: nn.Module, source: StateDictSource, scale: float = 1.0, min_match: float = 0.5) -> LoRAMatch:
    """Apply a lightx2v-style LoRA in place (W += up@down, weight += diff, bias += diff_b, modulation += diff_m).
    Entries that fit no weight are skipped as upstream does, but a file meant for another model is refused before
    anything changes: one with image-to-video layers (k_img, v_img, img_emb), or one of whose entries fewer than
    `min_match` fit this DiT. Returns the LoRAMatch (how many of its tensors were applied)."""
    updates, match = lora_updates(dit, source, scale, min_match)
    _apply_updates(dit, updates)
    return match


@torch.no_grad()
def lora_updates(
    dit: nn.Module, source: StateDictSource, scale: float = 1.0, min_match: float = 0.5
) -> tuple[list[WeightUpdate], LoRAMatch]:
    """A lightx2v-style LoRA file → the WeightUpdates that `merge_lora` applies (in its order) and its LoRAMatch,
    checked against `dit` (on any device, the meta one too) as merge_lora checks it; nothing changes."""
    name = source if isinstance(source, str) else "(state dict)"
    sd = {k.removeprefix("diffusion_model."): v for k, v in read_state_dict(source, "LoRA").items()}
    params = _plain_parameters(dit)
    updates: list[WeightUpdate] = []
    skipped: list[str] = []
    pairs = {}
    for key, tensor in sd.items():
        for down, up in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
            if key.endswith(f".{down}.weight"):
                module = key[: -len(f".{down}.weight")]
                pairs[module] = (tensor, sd.get(f"{module}.{up}.weight"))
    for module, (a, b) in pairs.items():
        weight = params.get(f"{module}.weight")
        if b is not None and a.ndim == b.ndim == 2 and b.shape[1] != a.shape[0]:
            raise WanAlphaError(
                f"LoRA {name}: {module}'s down {tuple(a.shape)} and up {tuple(b.shape)} disagree on "
                "the rank; the file is damaged"
            )
        if (
            b is None
            or weight is None
            or weight.ndim != 2
            or a.ndim != 2
            or b.ndim != 2
            or weight.shape != (b.shape[0], a.shape[1])
        ):
            skipped.append(module)
            continue
        updates.append(WeightUpdate(f"{module}.weight", _pair_update(a, b, scale)))
    for suffix, target in ((".diff", ".weight"), (".diff_b", ".bias"), (".diff_m", ".modulation")):
        for key, tensor in sd.items():
            if not key.endswith(suffix):
                continue
            param = params.get(key[: -len(suffix)] + target)
            if param is None or param.shape != tensor.shape:
                skipped.append(key)
                continue
            updates.append(WeightUpdate(key[: -len(suffix)] + target, _diff_update(tensor, scale)))
    entries = len(updates) + len(skipped)
    image = sorted({part for key in sd for part in key.split(".") if part in IMAGE_LAYERS})
    if image:
        raise WanAlphaError(
            f"LoRA {name} is for an image-to-video DiT (it has {', '.join(image)} tensors); use a "
            "text-to-video LoRA, e.g. lightx2v_T2V_14B_cfg_step_distill_v2_lora_rank64_bf16"
            ".safetensors (`wanalpha download lightx2v`)"
        )
    if not updates:
        raise WanAlphaError(
            f"LoRA {name}: nothing in it fits this DiT (expected lightx2v-style keys such as "
            "blocks.0.self_attn.q.lora_up.weight / lora_down.weight or …diff)"
        )
    if len(updates) < min_match * entries:
        raise WanAlphaError(
            f"LoRA {name}: only {len(updates)} of its {entries} tensors fit this DiT (e.g. "
            f"{', '.join(skipped[:3])} do not); is it for another model (size, I2V)?"
        )
    if skipped:
        log.debug("LoRA %s: skipped %d entries that fit no weight: %s", name, len(skipped), skipped)
    return updates, LoRAMatch(len(updates), entries, skipped)
