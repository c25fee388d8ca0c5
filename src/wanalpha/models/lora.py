"""Trainable LoRA on the VAE decoders' convolutions, in the official decoder.bin parametrisation (NOTES §1, §10.3).

Each Conv2d/Conv3d of a decoder's `decoder` trunk gets W = W0 + (B·A)/r per kernel tap (peft `LoraConfig(r,
lora_alpha=1.0)`: scaling 1/r; lora_A kaiming-uniform as peft initialises it, lora_B zeros, so training starts at
W0). It is a `torch.nn.utils.parametrize` parametrisation, so the decoder code is unchanged; wrap a step in
`parametrize.cached()` to compute each patched weight once instead of once per latent frame.
The official decoder.bin keys of these tensors are `wanalpha.checkpoints.wan_alpha`'s (`decoder_lora_state_dict`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """(B·A)/r for every kernel tap, in the tensors' dtype (upstream `load_decoder_lora`); r = lora_b.shape[1]."""
    rank = lora_b.shape[1]
    b = lora_b.reshape(lora_b.shape[0], rank)  # (C_out, r)
    taps = lora_a.flatten(2) if lora_a.ndim > 2 else lora_a.unsqueeze(-1)  # (r, C_in, K)
    delta = torch.matmul(b, taps.permute(2, 0, 1)) / rank  # (K, C_out, C_in): one matmul per tap
    return delta.permute(1, 2, 0).reshape(lora_b.shape[0], *lora_a.shape[1:])


class ConvLoRA(nn.Module):
    """The parametrisation W0 ↦ W0 + lora_delta(A, B) of one convolution weight (C_out, C_in, *kernel)."""

    def __init__(
        self, weight: torch.Tensor, rank: int, generator: torch.Generator | None = None, init: str = "kaiming"
    ) -> None:
        super().__init__()
        out_ch, in_ch, *kernel = weight.shape
        fan_in = in_ch * math.prod(kernel)
        if init == "kaiming":  # kaiming_uniform_(a=√5), as peft initialises lora_A
            bound = 1 / math.sqrt(fan_in)
            a = torch.rand(rank, in_ch, *kernel, generator=generator) * (2 * bound) - bound
        elif init == "normal":  # N(0, 1/fan_in) (the demo base's decoders were trained from this)
            a = torch.randn(rank, in_ch, *kernel, generator=generator) / math.sqrt(fan_in)
        else:
            raise ValueError(f"init must be 'kaiming' or 'normal', not {init!r}")
        self.lora_A = nn.Parameter(a.to(device=weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_ch, rank, *([1] * len(kernel)), device=weight.device))

    def forward(self, w0: torch.Tensor) -> torch.Tensor:
        return w0 + lora_delta(self.lora_A, self.lora_B).to(w0.dtype)


def lora_targets(decoder: nn.Module) -> dict[str, nn.Module]:
    """The convolutions a decoder LoRA patches: every Conv2d/Conv3d under the WanVAE's `decoder` trunk."""
    return {name: m for name, m in decoder.decoder.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))}


def add_decoder_lora(
    decoder: nn.Module, rank: int, generator: torch.Generator | None = None, init: str = "kaiming"
) -> nn.ModuleDict:
    """Register a fresh ConvLoRA on every target of `decoder` (a WanVAE); returns them by path ('.' → '/')."""
    loras = nn.ModuleDict()
    for name, module in lora_targets(decoder).items():
        lora = ConvLoRA(module.weight.detach(), rank, generator, init)
        parametrize.register_parametrization(module, "weight", lora)
        loras[name.replace(".", "/")] = lora
    return loras
