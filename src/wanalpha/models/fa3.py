"""FlashAttention-3 (the `flash_attn_3` package built from flash-attention's hopper/ folder; its module
`flash_attn_interface`, the one the official Wan2.1 code imports) as the DiT's self-attention kernel for inference,
in bf16 ("fa3") or with FP8 inputs ("fa3-fp8", its Hopper FP8 forward).

The FP8 form quantises the queries, keys and values to float8_e4m3fn with one scale per sample and head (the
descales FlashAttention-3 takes), after moving the keys' and values' means over the tokens out of them:

- keys: q·(k_j − m) = q·k_j − q·m shifts every score of a query's row by the same amount, so softmax ignores it;
- values: Σ_j p_j (v_j − m) + m = Σ_j p_j v_j, since a softmax row sums to 1, so m is added back to the output.

Both are exact in exact arithmetic and leave the rounding to the part that varies (keys and values can carry an offset
common to every token, which per-head scales would otherwise spend their range on; SageAttention smooths its keys the
same way). The statistics and the quantisation are
one read of each input each (wanalpha.models.kernels.head_stats / head_quantize on the GPU; `quantize_eager` is the
PyTorch form). FP8 attention is an approximation: generate takes it only when asked (`--attention fa3-fp8`);
docs/benchmarks.md gives its error (and its speed, once measured on a GPU) next to the bf16 kernels'.

Forward only: training keeps FlashAttention-4 or SDPA (wanalpha.models.fa4.kernel refuses "fa3" with gradients).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch

from wanalpha.errors import ConfigError
from wanalpha.models import fa4, kernels

INSTALL = "build flash-attention's hopper/ package (flash_attn_3), e.g. with wanalpha's scripts/build_fa3.sh"
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)

_module: ModuleType | None = None
_missing: str | None = None  # why the package cannot be used; None until the first look


def load() -> ModuleType | None:
    """flash_attn_interface, imported once; None (and the reason in `_missing`) when it cannot be used."""
    global _module, _missing
    if _module is None and _missing is None:
        _module, _missing = fa4.optional_module("flash_attn_interface", ("flash_attn_func",), "FlashAttention-3")
    return _module


def _call(q, k, v, **descales) -> torch.Tensor:
    out = _module.flash_attn_func(q, k, v, softmax_scale=1 / math.sqrt(q.shape[-1]), causal=False, **descales)
    return out[0] if isinstance(out, tuple) else out  # releases before 2025 returned (out, lse)


_probed: dict[tuple[int, bool, int], str | None] = {}  # per (GPU, FP8, head size): why a first run failed, or None


def _probe(index: int, fp8: bool, head_dim: int) -> str | None:
    """Run the package's forward once on a tiny input on GPU `index` (a build holds kernels for some head sizes
    only): None, or why it failed."""
    try:
        with torch.no_grad():
            q = torch.zeros(1, 128, 1, head_dim, device=torch.device("cuda", index), dtype=torch.bfloat16)
            attention_fp8(q, q, q) if fp8 else _call(q, q, q)
        return None
    except Exception as error:  # noqa: BLE001 — e.g. built without FP8, or for another GPU
        return f"its {'FP8 ' if fp8 else ''}forward fails on this GPU ({fa4._first_line(error)})"


def unsupported(
    device: torch.device, dtype: torch.dtype, head_dim: int = 128, backward: bool = False, fp8: bool = False
) -> str | None:
    """Why FlashAttention-3 (its FP8 forward with `fp8`) cannot run self-attention for tensors of this device, dtype
    and head size; None when it can. The first call per GPU imports the package and runs its forward once on a tiny
    input, so an installation that cannot run here is refused, not met mid-run."""
    if backward:
        return "wanalpha runs it for inference only (training keeps FlashAttention-4 or SDPA)"
    if (reason := fa4.gpu_gate(device, dtype, head_dim, 256)) is not None:
        return reason
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"its kernels are Hopper's (compute capability 9.x), not {major}.{minor}"
    if load() is None:
        return _missing
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (index, fp8, head_dim) not in _probed:
        _probed[index, fp8, head_dim] = _probe(index, fp8, head_dim)
    return _probed[index, fp8, head_dim]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, L, heads, d) tensors with scale 1/√d through FlashAttention-3 in v's dtype."""
    if load() is None:
        raise ConfigError(f"FlashAttention-3 cannot run: {_missing}; {INSTALL}")
    q, k, v = (t.to(v.dtype).contiguous() for t in (q, k, v))  # q, k: float32 after RoPE
    return _call(q, k, v)


def statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample, head and channel of a (B, L, H, D) x: float32 sum, minimum and maximum over the tokens, (B, H, D)
    each (one fused read on the GPU)."""
    stats = kernels.head_stats(x)
    if stats is not None:
        return stats
    xf = x.float()
    return xf.sum(1), xf.amin(1), xf.amax(1)


def scales(x: torch.Tensor, center: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The quantisation of a (B, L, H, D) x: its mean over the tokens (B, H, D) when `center`, else None, and one
    scale per sample and head (B, H), float32, that maps the largest |x − mean| to float8's largest value (the
    largest |x − mean| is max(max − mean, mean − min), each channel's extremes being the extremes of x − mean:
    rounding is monotone)."""
    total, low, high = statistics(x)
    mean = None
    if center:
        mean = total / x.shape[1]
        low, high = low - mean, high - mean
    amax = torch.maximum(high, -low).amax(-1)
    return mean, torch.clamp(amax / FP8_MAX, min=torch.finfo(torch.float32).tiny)


def quantize_eager(x: torch.Tensor, mean: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """clamp((x − mean) / scale, ±448) as float8_e4m3fn, per sample and head of a (B, L, H, D) x: the PyTorch form
    of wanalpha.models.kernels.head_quantize."""
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, None]
    return (xf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize(x: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x (B, L, H, D) → (float8 codes (B, L, H, D), scale (B, H), mean (B, H, D) or None): x ≈ codes · scale + mean."""
    x = x.contiguous()
    mean, scale = scales(x, center)
    codes = kernels.head_quantize(x, mean, scale, FP8, FP8_MAX)
    return (quantize_eager(x, mean, scale) if codes is None else codes), scale, mean


def _quantized(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """attention_fp8's inputs to the kernel: (codes, scale) of q, k − mean, v − mean, and v's mean."""
    q8, q_scale, _ = quantize(q, center=False)
    k8, k_scale, _ = quantize(k, center=True)
    v8, v_scale, v_mean = quantize(v, center=True)
    return (q8, q_scale), (k8, k_scale), (v8, v_scale), v_mean


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax attention of (B, L, heads, d) tensors with scale 1/√d through FlashAttention-3's FP8 forward: q as
    it is, k and v less their means over the tokens (the module's docstring), each quantised per sample and head;
    the result in `dtype`, v's by default (the kernel's bf16 output plus v's mean, added in float32; float32 gives
    that sum before its rounding, which dominates the error where v's mean is large: bf16 keeps 8 bits of it)."""
    if load() is None:
        raise ConfigError(f"FlashAttention-3 cannot run: {_missing}; {INSTALL}")
    return attend_quantized(_quantized(q, k, v), dtype or v.dtype)


def attend_quantized(quantized: tuple, dtype: torch.dtype) -> torch.Tensor:
    """attention_fp8 after its quantisation (`_quantized`'s result): the FP8 kernel, then v's mean added back to its
    bf16 output, the float32 sum rounded once to `dtype`."""
    (q8, q_scale), (k8, k_scale), (v8, v_scale), v_mean = quantized
    out = _call(q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale)
    if out.dtype == dtype:  # in place: the same single rounding, without a float32 copy of out
        b, length, heads, d = out.shape  # PyTorch's broadcast add is its strided kernel: 32 ms a 14B forward
        rows = out.view(b * length, heads * d) if out.is_contiguous() else None
        if rows is not None and kernels.add_row_bias_(rows, v_mean.reshape(b, heads * d), tokens=length):
            return out
        return out.add_(v_mean[:, None])
    return (out.float() + v_mean[:, None]).to(dtype)


def attention_fp8_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int = 1024, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """What attention_fp8 computes, in PyTorch (any device, any head size; `rows` queries at a time), for measuring
    its error where the kernel is not at hand: the same quantised inputs, then FlashAttention-3's FP8 arithmetic
    (its hopper/softmax.h and FP8 mainloop): float32 scores of the codes times the descales and 1/√d,
    P = 2^((s − max)·log₂e + 8) (its Max_offset 8 puts P in (0, 256], more of float8's range than (0, 1]), the row
    sums from the float32 P, P rounded to float8_e4m3 for the P·V product, the output normalised and rounded to
    bf16, then v's mean added. It takes each row's final maximum where the kernel takes the maximum so far (its
    online softmax): the rounding of P is relative to a larger value here, so it errs, if anything, a little more.
    The result in `dtype` as attention_fp8's."""
    (q8, q_scale), (k8, k_scale), (v8, v_scale), v_mean = _quantized(q, k, v)
    scale = (q_scale * k_scale / math.sqrt(q.shape[-1]))[:, :, None, None]  # (B, H, 1, 1)
    keys = k8.float().transpose(1, 2)  # (B, H, L, d)
    values = v8.float().transpose(1, 2) * v_scale[:, :, None, None]
    pieces = []
    for start in range(0, q.shape[1], rows):
        scores = q8[:, start : start + rows].float().transpose(1, 2) @ keys.transpose(-1, -2) * scale
        p = torch.exp2((scores - scores.amax(-1, keepdim=True)) * math.log2(math.e) + 8)
        out = (p.to(FP8).float() @ values) / p.sum(-1, keepdim=True)
        pieces.append(out.to(torch.bfloat16).float().transpose(1, 2))
    return (torch.cat(pieces, 1) + v_mean[:, None]).to(dtype or v.dtype)
