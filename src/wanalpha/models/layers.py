"""Layers the Wan DiT (and the text encoder) share: RMSNorm, float32 LayerNorm, the sinusoidal time embedding,
the 3-D RoPE and attention. Numerics follow upstream `wan/modules/model.py` (reference NOTES §2, §8)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from wanalpha.models import fa3, fa4


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, statistics in float32 (upstream `WanRMSNorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (upstream `WanLayerNorm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[cos, sin] (cos first) of position ⊗ 10000^(-i/half), computed in float64 (upstream
    `sinusoidal_embedding_1d`); returns float64 (B, dim)."""
    half = dim // 2
    position = position.to(torch.float64)
    angles = torch.outer(
        position, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device) / half)
    )
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_frequencies(head_dim: int, max_positions: int = 1024, theta: float = 10000.0) -> torch.Tensor:
    """The (max_positions, head_dim/2) complex128 table: frame, height and width parts side by side with
    n_t = d − 4⌊d/6⌋ and n_h = n_w = 2⌊d/6⌋ frequencies (upstream `rope_params`, 3-way split)."""

    def params(n: int) -> torch.Tensor:
        freqs = 1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64) / n)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), freqs)
        return torch.polar(torch.ones_like(angles), angles)

    d = head_dim
    return torch.cat([params(d - 4 * (d // 6)), params(2 * (d // 6)), params(2 * (d // 6))], dim=1)


def rope_grid(freqs: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Per-token rotations for an (f, h, w) token grid in (f, h, w) row-major order: (f·h·w, 1, head_dim/2)."""
    c = freqs.shape[1]
    ft, fh, fw = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    grid = torch.cat(
        [
            ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
            fw[:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return grid.reshape(f * h * w, 1, -1)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of (B, L, heads, head_dim) by `rotations`: complex (L, 1, d/2), or
    real (cos, sin) pairs (L, 1, d/2, 2); positions past len(rotations) (padding) are left as they are. complex128
    rotations: math in float64 (upstream); complex64 or float32 pairs: in float32 (a quarter of the memory traffic on
    the GPU; the pairs are what torch.compile can fuse, it generates no complex code). The result is float32."""
    seq = rotations.shape[0]
    real = torch.float64 if rotations.dtype in (torch.complex128, torch.float64) else torch.float32
    head = x[:, :seq].to(real).reshape(x.shape[0], seq, x.shape[2], -1, 2)
    if rotations.is_complex():  # upstream's complex multiply
        rotated = torch.view_as_real(torch.view_as_complex(head.contiguous()) * rotations).flatten(3)
    else:  # (cos, sin) pairs: the same product in real arithmetic
        cos, sin = rotations[..., 0], rotations[..., 1]
        even, odd = head[..., 0], head[..., 1]
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(3)
    if seq < x.shape[1]:
        rotated = torch.cat([rotated, x[:, seq:].to(real)], dim=1)
    return rotated.float()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_lens: torch.Tensor | None = None, kernel: str = "sdpa"
) -> torch.Tensor:
    """Softmax attention of (B, L, heads, d) tensors with scale 1/√d; k_lens limits each sample's keys. Runs on
    PyTorch SDPA (cuDNN / flash / memory-efficient kernels on the GPU), or on FlashAttention-4 when `kernel` is
    "fa4", FlashAttention-3 when "fa3", its FP8 forward when "fa3-fp8" (wanalpha.models.fa4.kernel decides; without a
    key mask)."""
    if k_lens is None and kernel != "sdpa":
        return {"fa4": fa4.attention, "fa3": fa3.attention, "fa3-fp8": fa3.attention_fp8}[kernel](q, k, v)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    mask = None
    if k_lens is not None and bool((k_lens < k.shape[2]).any()):
        keys = torch.arange(k.shape[2], device=k.device)
        mask = (keys[None, :] < k_lens.to(k.device)[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    if q.dtype != v.dtype or k.dtype != v.dtype:
        q, k = q.to(v.dtype), k.to(v.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(q.shape[-1]))
    return out.transpose(1, 2)
