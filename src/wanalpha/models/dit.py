"""The Wan2.1 text-to-video DiT (upstream `wan/modules/model.py::WanModel`), state-dict compatible with the released
`diffusion_pytorch_model*.safetensors` (original Wan layout).

    x (B,16,F,H,W) latents, t (B,) timesteps in [0,1000], context (B,L≤text_len,text_dim) ─▶ velocity (B,16,F,H,W)

Numerics (reference NOTES §2): float64 sinusoidal time embedding ([cos, sin]); context zero-padded to text_len and
embedded (padding rows take part in unmasked cross-attention); qk-RMSNorm over the full dim, eps 1e-6; 3-D RoPE on
adjacent pairs in float64; modulation (shift, scale, gate) from the projected time embedding; the head uses the
un-projected one; unpatchify order (p, q, r, c).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from wanalpha.models import fa4, kernels
from wanalpha.models.layers import LayerNorm, RMSNorm, apply_rope, attention, rope_frequencies, rope_grid
from wanalpha.models.layers import sinusoidal_embedding as sinusoidal


@dataclass(frozen=True)
class DiTConfig:
    """Upstream field names. Defaults: everything but the size (dim, ffn_dim, num_heads, num_layers)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    text_dim: int = 4096
    freq_dim: int = 256
    text_len: int = 512
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


DIT_VARIANTS = {
    "1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "tiny": DiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2, text_dim=64, text_len=16),
}


def weight_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a block linear computes in, read without forming its weight: a linear that stores its weight
    quantised (wanalpha.fp8.FP8Linear, also inside a peft adapter) names it `compute_dtype`, and its `weight` would
    dequantise the whole matrix just to be asked its dtype; a plain linear's is its weight's."""
    base = linear.get_base_layer() if hasattr(linear, "get_base_layer") else linear
    dtype = getattr(base, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else base.weight.dtype


def _projections(x: torch.Tensor, layers: tuple[nn.Module, ...]) -> list[torch.Tensor]:
    """[layer(x) for layer in layers]; linears of one kind that can share a single quantisation of x (FP8 linears:
    wanalpha.fp8.FP8Linear.shared_input, the same outputs) share it."""
    shared = getattr(type(layers[0]), "shared_input", None)  # it checks that every layer can share
    out = None if shared is None else shared(layers, x)
    return [layer(x) for layer in layers] if out is None else out


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.parallel = None  # a wanalpha.parallel.SequenceParallel: x is then this process's chunk of the tokens
        self.kernel = "sdpa"  # self-attention's kernel, "sdpa" or "fa4" (wanalpha.runtime.set_attention_kernel)
        self.fused = True  # fused element-wise kernels where they apply (wanalpha.runtime.set_fused_kernels)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # (B, L, heads, head_dim)

    def _normed(self, x: torch.Tensor, norm: nn.Module, rotations: torch.Tensor | None) -> torch.Tensor:
        """A projection's (B, L, dim) output → normed (and, with rotations, RoPE-rotated) heads (B, L, heads, d):
        one fused kernel where it applies (wanalpha.models.kernels; its result is the dtype attention casts to),
        else the PyTorch forms."""
        if self.fused and isinstance(norm, RMSNorm):
            y = kernels.rms_norm_rope(x, norm.weight, norm.eps, rotations, x.shape[-1] // self.num_heads)
            if y is not None:
                return self._heads(y)
        y = self._heads(norm(x))
        return apply_rope(y, rotations) if rotations is not None else y

    def forward(self, x: torch.Tensor, rotations: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        x = x.to(weight_dtype(self.q))
        q, k, v = _projections(x, (self.q, self.k, self.v))
        q = self._normed(q, self.norm_q, rotations)
        k = self._normed(k, self.norm_k, rotations)
        v = self._heads(v)
        if self.parallel is not None:  # seq_lens: the whole sequence's length (an int)
            return self.o(self.parallel.attention(q, k, v, seq_lens, kernel=self.kernel).flatten(2))
        return self.o(attention(q, k, v, k_lens=seq_lens, kernel=self.kernel).flatten(2))


class CrossAttention(SelfAttention):
    """Queries from the video tokens, keys/values from the embedded text; no RoPE, no mask (upstream t2v). Always on
    SDPA: onto 512 text rows cuDNN's forward beats FlashAttention-4's (docs/benchmarks.md)."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = weight_dtype(self.q)
        x, context = x.to(dtype), context.to(dtype)
        q = self._normed(self.q(x), self.norm_q, None)
        k = self._normed(self.k(context), self.norm_k, None)
        v = self._heads(self.v(context))
        return self.o(attention(q, k, v).flatten(2))


def _modulated(norm: LayerNorm, x: torch.Tensor, shift, scale, dtype: torch.dtype, fused: bool) -> torch.Tensor:
    """norm(x).float() · (1 + scale) + shift, cast to dtype: one fused kernel where it applies, else PyTorch."""
    if fused and norm.weight is None:  # the DiT's modulated norms have no affine part of their own
        y = kernels.layer_norm(x, norm.eps, shift=shift, scale=scale, out_dtype=dtype)
        if y is not None:
            return y
    return (norm(x).float() * (1 + scale) + shift).to(dtype)


def _normed(norm: nn.Module, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """norm(x) for the affine LayerNorm before cross-attention (or its Identity): one fused kernel where it applies,
    else PyTorch."""
    if fused and isinstance(norm, LayerNorm) and norm.weight is not None:
        y = kernels.layer_norm(x, norm.eps, norm.weight, norm.bias)
        if y is not None:
            return y
    return norm(x)


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, fused: bool) -> torch.Tensor:
    """x + (y · gate).type_as(x), or x + y.type_as(x) without a gate: one fused kernel where it applies, else
    PyTorch."""
    if fused:
        out = kernels.gated_residual(x, y, gate)
        if out is not None:
            return out
    return x + (y if gate is None else y * gate).type_as(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(cfg.dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, cfg.dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.fused = True  # as SelfAttention.fused

    def forward(
        self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rotations: torch.Tensor, seq_lens
    ) -> torch.Tensor:
        # m0…m5 = shift, scale, gate for self-attention, then for the FFN; float32 like upstream.
        # The residual stream x keeps its dtype: float32 for float32 weights (upstream under autocast), bf16 for
        # bf16 weights (DiffSynth's training).
        m = (self.modulation.float() + e0.float()).chunk(6, dim=1)  # each (B, 1, dim)
        fused = self.fused
        y = self.self_attn(
            _modulated(self.norm1, x, m[0], m[1], weight_dtype(self.self_attn.q), fused), rotations, seq_lens
        )
        x = _gated(x, y, m[2], fused)
        x = _gated(x, self.cross_attn(_normed(self.norm3, x, fused), context), None, fused)
        ffn_in = _modulated(self.norm2, x, m[3], m[4], weight_dtype(self.ffn[0]), fused)
        return _gated(x, self.ffn(ffn_in), m[5], fused)


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)
        self.fused = True  # as SelfAttention.fused

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e.float().unsqueeze(1)).chunk(2, dim=1)
        return self.head(_modulated(self.norm, x, shift, scale, self.head.weight.dtype, self.fused))


class WanDiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.patch_embedding = nn.Conv3d(cfg.in_dim, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, cfg.dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.dim, cfg.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, cfg.dim * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # Training: recompute each block in the backward pass; optionally keep what is saved on the CPU.
        self.gradient_checkpointing = False
        self.checkpoint_offload = False
        # Selective checkpointing: keep each block's self-attention output (the costliest op to recompute; about
        # L·dim·2 bytes per block in bf16) instead of recomputing it in the backward pass; only in the first
        # checkpoint_attention_blocks blocks when that is set (memory and time in between).
        self.checkpoint_attention = False
        self.checkpoint_attention_blocks: int | None = None
        self._rope: dict[tuple, torch.Tensor] = {}  # not in the state dict, as upstream's `freqs`
        # "float64" rotates q and k as upstream; "float32" is the faster GPU lever (docs/benchmarks.md).
        self.rope_precision = "float64"
        self.rope_as_real = False  # rotations as real (cos, sin) pairs: compiled blocks (inductor has no complex code)
        self.parallel = None  # sequence parallelism for sampling (wanalpha.runtime.set_sequence_parallel)
        # How the blocks run (the self-attention kernel, the fused element-wise kernels of wanalpha.models.kernels, on
        # by default where they apply: CUDA without gradients) is set once from outside: wanalpha.runtime.DiTRuntime.

    def rope_table(self, device: torch.device) -> torch.Tensor:
        """The RoPE table on `device`: complex128 (upstream's float64 rotation) unless `rope_precision` is
        "float32" (the table is still computed in float64, then rounded once to complex64)."""
        key = (device, self.rope_precision)
        if key not in self._rope:
            table = rope_frequencies(self.config.head_dim)
            self._rope[key] = (table if self.rope_precision == "float64" else table.to(torch.complex64)).to(device)
        return self._rope[key]

    def embed_text(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Each prompt's (L, text_dim) T5 output, zero-padded to text_len rows, through text_embedding."""
        rows = self.config.text_len
        padded = []
        for u in context:
            if u.shape[0] > rows:
                raise ValueError(f"context has {u.shape[0]} rows; this DiT takes at most text_len={rows}")
            padded.append(torch.cat([u, u.new_zeros(rows - u.shape[0], u.shape[1])]))
        weight = self.text_embedding[0].weight
        return self.text_embedding(torch.stack(padded).to(weight.dtype))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        b = x.shape[0]
        # Patchify: (B,16,F,H,W) → tokens (B, f·h·w, dim) in (f, h, w) row-major order.
        tokens = self.patch_embedding(x.to(self.patch_embedding.weight.dtype))
        f, h, w = tokens.shape[2:]
        # Contiguous: inductor's backward of a compiled block is wrong for a transposed-view input (torch 2.13, CPU).
        tokens = tokens.flatten(2).transpose(1, 2).contiguous().to(self.patch_embedding.weight.dtype)
        rotations = rope_grid(self.rope_table(x.device), f, h, w)
        if self.rope_as_real:  # real (cos, sin) pairs: inductor generates no complex code
            rotations = torch.view_as_real(rotations)
        # Time: float64 sinusoid → float32 → embedding e (B, dim) and per-block modulation e0 (B, 6, dim).
        t = t.reshape(-1).expand(b) if t.numel() in (1, b) else t
        e = self.time_embedding(sinusoidal(cfg.freq_dim, t).float().to(self.time_embedding[0].weight.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        ctx = self.embed_text(context)
        length = tokens.shape[1]
        seq_lens = None
        if self.parallel is not None:  # this process's chunk of the tokens (and of their rotations)
            tokens, rotations = self.parallel.split(tokens, 1), self.parallel.split(rotations, 0)
            seq_lens = length
        kept = len(self.blocks) if self.checkpoint_attention_blocks is None else self.checkpoint_attention_blocks
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                offload = contextlib.nullcontext()
                if self.checkpoint_offload:  # the block inputs that checkpointing keeps go to (pinned) CPU memory
                    offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
                context_fn = _keep_self_attention if self.checkpoint_attention and i < kept else _no_context
                with offload:
                    tokens = checkpoint(
                        block, tokens, e0, ctx, rotations, seq_lens, use_reentrant=False, context_fn=context_fn
                    )
            else:
                tokens = block(tokens, e0, ctx, rotations, seq_lens)
        out = self.head(tokens, e)  # (B, f·h·w, p·q·r·c)
        if self.parallel is not None:
            out = self.parallel.gather(out, length)
        # Unpatchify: token (p, q, r, c) with c fastest → (B, c, f·p, h·q, w·r).
        p, q, r = cfg.patch_size
        out = out.view(b, f, h, w, p, q, r, cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, cfg.out_dim, f * p, h * q, w * r)


_SDPA_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
)


def _no_context():
    from torch.utils.checkpoint import noop_context_fn

    return noop_context_fn()


def _keep_self_attention():
    """Checkpoint contexts that save the outputs of self-attention kernels (query and key of the same length) and
    recompute everything else; cross-attention (512 context rows) is cheap to recompute."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        if op in _SDPA_OPS and args[0].shape[-2] == args[1].shape[-2]:  # (B, heads, L, d)
            return CheckpointPolicy.MUST_SAVE
        if op is fa4.FORWARD_OP and args[0].shape[1] == args[1].shape[1]:  # (B, L, heads, d)
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
