"""Hand-written GPU kernels (Triton) for inference hot spots the stock PyTorch kernels serve poorly.

Each entry point returns None when it does not apply (no CUDA tensor, no Triton, gradients wanted, inside
torch.compile), and the caller falls back to its PyTorch form; the results are compared with those forms on the GPU
(tests/test_gpu.py) and, where Triton is installed, in Triton's interpreter on the CPU (tests/test_kernels.py).

- rms_norm_channels_last: the VAE's RMS norm (+ SiLU) of a channels-last activation in one pass.
- layer_norm, rms_norm_rope, gated_residual (with or without its gate): the DiT block's element-wise work between
  its matmuls and attention, one pass each instead of the 3-8 float32 round trips of the eager PyTorch forms
  (torch.compile fuses the same work, but compiling costs more than it saves over a few sampling steps;
  docs/benchmarks.md). They round where the PyTorch forms round (each intermediate cast to the dtype the eager code
  casts to), so they differ from those only by the order of the float32 sums of the norm statistics.
- add_row_bias_: a per-channel (or per-sample and channel) bias added in place to rows of channels at the
  bandwidth: the VAE's convolution biases (channels-last outputs), FP8 attention's values' mean.
- phase_rows: the decoder's ×2 upsampling convolutions, assembled with their bias from the four phases that
  vae.phase_convolved computes on the frames before the upsampling.
- fp8_quantize_rows: FP8Linear's per-token activation quantisation in one pass (wanalpha.fp8), bit for bit.
- fp8_dequantize_scaled: an FP8 base weight dequantised and row-scaled for the fused adapter linear (training over
  an FP8 base) in one pass, bit for bit.
- head_stats, head_quantize: the per-head statistics and float8 quantisation of attention's inputs for
  FlashAttention-3's FP8 forward (wanalpha.models.fa3), one read of the input each.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

_failed = False  # set when a launch failed (e.g. a GPU or toolchain Triton cannot serve): the PyTorch forms take over
# Tests only: CPU tensors go to the kernels when Triton's interpreter is on (TRITON_INTERPRET=1 before Triton's
# first import; tests/conftest.py sets it on machines without CUDA).
interpret_on_cpu = False
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    """Whether the kernels take CPU tensors: Triton's interpreter runs them (the tests' CPU check)."""
    return interpret_on_cpu and os.environ.get("TRITON_INTERPRET") == "1"


def _applies(*tensors: torch.Tensor) -> bool:
    """Whether a kernel may take these tensors: Triton has not failed here, they are float tensors of one CUDA device
    (or CPU ones under Triton's interpreter), no gradient is wanted and torch.compile is not tracing."""
    if _failed or torch.compiler.is_compiling() or not _plain(*tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    device = tensors[0].device
    if not (device.type == "cuda" or (device.type == "cpu" and _interpreting())):
        return False
    return all(t.device == device and t.dtype in _FLOATS for t in tensors)


def applies(*tensors: torch.Tensor, kernel: str | None = None) -> bool:
    """Whether the kernels may take these tensors (`_applies`) and Triton is installed, and `kernel` (a Triton
    source's name) has not been set aside for not fitting this GPU: for callers that must choose their own form
    before calling one (vae._convolved)."""
    return _ready(*tensors) is not None and kernel not in _failed_kernels


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether these are tensors with data (or parameters): not the fake or functional tensors of a graph being
    traced, which torch 2.11 hands a compiled block's backward without `is_compiling()` saying so (a launch on them
    fails, and would switch the kernels off for the process)."""
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _ready(*tensors: torch.Tensor):
    """The Triton sources when a kernel may take these tensors (Triton installed, `_applies`), else None. The checks
    come first: under torch.compile nothing is imported."""
    return _sources() if _applies(*tensors) else None


_failed_kernels: set[str] = set()  # kernels that asked for more than this GPU has (the others still run)
_failed_variants: set[tuple] = set()  # (kernel, its compile-time arguments) that failed where others had run
_launched = False  # whether a launch has succeeded here: Triton compiles and launches on this machine


def _launch(kernel, grid, device: torch.device, *args, **meta) -> bool:
    """Launch `kernel` on `device`; on a compile or launch failure, warn once and give False, and every later call of
    what failed falls back to PyTorch:
    - a kernel that asked for more registers or shared memory than this GPU has (Triton's OutOfResources: its tiles,
      not Triton): that kernel, in every variant;
    - any other failure after a launch has succeeded here (Triton works on this machine): that kernel in that variant
      (its compile-time arguments `meta`: e.g. the RMS norm with a residual to add), its other variants and the other
      kernels still run;
    - any other failure before one has (a Triton that cannot compile or launch here): every kernel."""
    global _failed, _launched
    name = getattr(kernel, "__name__", type(kernel).__name__)
    if name in _failed_kernels or (_failed_variants and _variant(name, meta) in _failed_variants):
        return False
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # on the current device
            kernel[grid](*args, **meta)
    except Exception as error:  # noqa: BLE001 - any compile or launch failure: fall back, once, with a warning
        if type(error).__name__ == "OutOfResources":  # triton.runtime.errors' (Triton may not be importable here)
            _failed_kernels.add(name)
            warnings.warn(f"Triton kernel {name} does not fit this GPU ({error}); using PyTorch's", stacklevel=3)
        elif _launched:
            variant = _variant(name, meta)
            _failed_variants.add(variant)
            settings = ", ".join(f"{k}={v}" for k, v in variant[1])
            warnings.warn(
                f"Triton kernel {name} failed with {settings} ({type(error).__name__}: {error}); using PyTorch's there",
                stacklevel=3,
            )
        else:
            _failed = True
            warnings.warn(
                f"Triton kernels unavailable ({type(error).__name__}: {error}); using PyTorch's", stacklevel=3
            )
        return False
    _launched = True
    return True


def _variant(name: str, meta: dict) -> tuple:
    """A compiled variant's key in `_failed_variants`: the kernel's name and its compile-time arguments. Made only where
    a launch failed or a variant has failed before: not on every launch."""
    return name, tuple(sorted(meta.items()))


def _pow2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def _warps(width: int) -> int:
    """Warps for a program that holds one row of `width` values: about 16 values per thread, 4 to 16 warps."""
    return min(16, max(4, _pow2(width) // 512))


@functools.cache
def _sources():
    """wanalpha.models.triton_kernels, or None where Triton is not installed (CPU-only builds)."""
    import importlib

    try:
        return importlib.import_module("wanalpha.models.triton_kernels")
    except ImportError:
        return None


@functools.cache
def _zeros(channels: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (channels,) zero bias (rms_norm_channels_last without a bias to add), one per size, dtype and device."""
    return torch.zeros(channels, dtype=dtype, device=device)


# rms_norm_rows's (rows a program, warps) by the channels' power-of-two block, where measured: the VAE's 96-, 192- and
# 384-channel activations at the decode's shapes on an H100 (`.fp8q/diag18.py`, docs/benchmarks.md "Twenty-third
# session": 2.67 → 2.85, 2.02 → 2.75 and 2.37 → 2.65 TB/s against a copy's 2.8–3.0); else 8,192 values and 8 warps.
# The sums' order follows the tile, so a norm's last bits may differ from another tile's.
_NORM_TILES = {128: (32, 8), 256: (64, 16), 512: (4, 2)}


def rms_norm_channels_last(
    x: torch.Tensor,
    gamma: torch.Tensor,
    scale: float,
    silu: bool,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tail: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The VAE's RMS norm (x / max(‖x‖₂ over channels, 1e-12) · scale · gamma, then SiLU when `silu`) of a
    channels-last CUDA tensor in one pass: every position's channels are contiguous, so the input is read once as
    rows of C values and the output written once in the same layout, arithmetic in float32, the result in the
    promoted dtype of x and gamma (as the PyTorch form); into `out` when given (x's shape, that dtype, its rows
    contiguous as x's: e.g. the frames of a buffer behind a causal convolution's cached ones). With `bias` ((C,), x's
    dtype), the norm of x + bias rounded to x's dtype: the bits of add_row_bias_ on x first, without its pass (a
    convolution's bias left to the norm after it). With `tail` (a channels-last (1, C, k, H, W) tensor of the result's
    dtype, x of one sample and at least k frames), the result's last k frames written into it too, in the same pass:
    a causal convolution's cached frames for the next chunk, without a copy of them. With `residual` (x's shape,
    dtype and strides), the norm of (x + bias, rounded) + residual, rounded: add_row_bias_'s bits with its residual,
    without its pass (a residual block's sum left to the norm after it), that sum also written into `total` when
    given (x's shape, dtype and strides: the block's output, for the next block's residual). None when Triton or CUDA
    is unavailable, x is not fp32, bf16 or fp16, `out`, `bias`, `tail`, `residual` or `total` does not fit, or a launch
    has failed (then with one warning). No autograd."""
    sources = _ready(x)  # a CUDA tensor (a CPU one under the tests' interpreter), no autograd
    if sources is None:
        return None
    channels = x.shape[1]
    if bias is not None and (
        bias.shape != (channels,) or bias.dtype != x.dtype or bias.device != x.device or not bias.is_contiguous()
    ):
        return None
    dtype = torch.promote_types(x.dtype, gamma.dtype)
    if out is not None and not (_rows_of(x) and _laid_out_as(out, x, dtype)):
        return None
    if tail is not None and (
        x.dim() != 5
        or x.shape[0] != 1
        or tail.dim() != 5
        or tail.shape[:2] != x.shape[:2]
        or tail.shape[3:] != x.shape[3:]
        or not 0 < tail.shape[2] <= x.shape[2]
        or tail.dtype != dtype
        or tail.device != x.device
        or not x.is_contiguous(memory_format=torch.channels_last_3d)
        or not tail.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return None
    if residual is not None and not (_rows_of(x) and _laid_out_as(residual, x, x.dtype)):
        return None
    if total is not None and (residual is None or not _laid_out_as(total, x, x.dtype)):
        return None
    y = torch.empty_like(x, dtype=dtype) if out is None else out  # keeps the channels-last strides
    rows = x.numel() // channels
    if rows == 0:
        return y
    tail_start = rows if tail is None else rows - tail.numel() // channels  # one sample: rows in (t, h, w) order
    block_c = _pow2(channels)
    block_m, warps = _NORM_TILES.get(block_c, (max(1, 8192 // block_c), 8))
    grid = (-(-rows // block_m),)
    ok = _launch(
        sources.rms_norm_rows,
        grid,
        x.device,
        x,
        gamma.reshape(-1).contiguous(),
        _zeros(channels, x.dtype, x.device) if bias is None else bias,
        y,
        y if tail is None else tail,
        x if residual is None else residual,  # not read without RESIDUAL
        x if total is None else total,  # not written without SUM
        rows,
        tail_start,
        scale,
        C=channels,
        BLOCK_C=block_c,
        BLOCK_M=block_m,
        SILU=silu,
        RESIDUAL=residual is not None,
        SUM=total is not None,
        num_warps=warps,
    )
    return y if ok else None


def _rows_of(x: torch.Tensor) -> bool:
    """Whether x's values lie in memory as rows of its channels, one position after another (channels-last and
    dense), as the row kernels index them."""
    layout = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return x.dim() in (4, 5) and x.is_contiguous(memory_format=layout)


def _laid_out_as(t: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether t has x's shape, device and strides (where a dimension has more than one entry), in `dtype`: a tensor a
    row kernel indexes as it indexes x."""
    return (
        t.shape == x.shape
        and t.dtype == dtype
        and t.device == x.device
        and all(a == b for a, b, n in zip(t.stride(), x.stride(), x.shape, strict=True) if n > 1)
    )


FEW_OUTPUTS = 16  # conv3_few_outputs: output channels up to this many (the weight's rows padded to it)


def few_outputs_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (Cout ≤ 16, Cin, 3, 3, 3) convolution weight as conv3_few_outputs takes it: (27, Cin, 16) rows, tap
    (kt · 3 + kh) · 3 + kw, the output channels zero-padded to 16, contiguous, in the weight's dtype."""
    cout, cin = weight.shape[:2]
    rows = torch.zeros((27, cin, FEW_OUTPUTS), dtype=weight.dtype, device=weight.device)
    rows[:, :, :cout] = weight.detach().permute(2, 3, 4, 1, 0).reshape(27, cin, cout)
    return rows


def conv3_few_outputs(
    x: torch.Tensor, rows: torch.Tensor, cout: int, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """A 3 × 3 × 3 convolution with at most 16 outputs (the decoder's 96 → 3 head), stride 1, spatial zero padding 1,
    over a channels-last (1, Cin, T + 2, H, W) bf16 or fp16 x whose first two frames are the causal ones in front
    (CausalConv3d's), with `rows` = few_outputs_weight(weight) (x's dtype) and `bias` ((cout,), x's dtype): the
    channels-last (1, cout, T, H, W) output, float32 sums of exact products (+ bias) rounded once to x's dtype. cuDNN
    runs this shape at a few per cent of the GPU's peak (1.2–1.3 ms a chunk at 480 × 832 on an H100, where its bytes
    need 0.15 ms: docs/benchmarks.md). None where it does not apply (float32, whose products cuDNN may round to TF32;
    another shape or layout)."""
    tensors = (x, rows) if bias is None else (x, rows, bias)
    sources = _ready(*tensors)
    if (
        sources is None
        or x.dim() != 5
        or x.shape[0] != 1
        or x.shape[2] < 3
        or x.dtype not in (torch.bfloat16, torch.float16)
        or not x.is_contiguous(memory_format=torch.channels_last_3d)
        or not 0 < cout <= FEW_OUTPUTS
        or rows.shape != (27, x.shape[1], FEW_OUTPUTS)
        or rows.dtype != x.dtype
        or not rows.is_contiguous()
        or (bias is not None and (bias.shape != (cout,) or bias.dtype != x.dtype or not bias.is_contiguous()))
    ):
        return None
    _, cin, frames, height, width = x.shape
    shape = (1, cout, frames - 2, height, width)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    if out.numel() == 0:
        return out
    block_w, block_rows = min(64, max(16, _pow2(width))), min(16, _pow2(height))  # a few frames' rows: smaller tiles
    block_k = 32 if cin % 32 == 0 else 16  # a dot needs 16 or more; masked past cin
    grid = (-(-width // block_w), (frames - 2) * -(-height // block_rows))
    if grid[1] > 65535:  # CUDA's limit on a grid's second dimension (a decode chunk is far below it)
        return None
    # Triton 3.6's software pipelining miscompiles the loop over (frame, shift, channel block) at some channel counts
    # (on an H100: 32 input channels in blocks of 16 or 32, 48 in blocks of 16, 64 in blocks of 32, wrong by up to 0.3
    # on values near 1; docs/benchmarks.md, "Twenty-fifth session"). Only the decoders' 96 channels, right at every
    # pipelining depth in blocks of 16 or 32, keep it; every other count runs unpipelined (num_stages 1: right at every
    # shape tried, 28 % slower at 96 channels).
    pipelining = {} if cin == 96 else {"num_stages": 1}
    ok = _launch(
        sources.conv3_few_outputs,
        grid,
        x.device,
        x,
        rows,
        rows if bias is None else bias,  # not read without BIAS
        out,
        height,
        width,
        CIN=cin,
        COUT=cout,
        N=FEW_OUTPUTS,
        BLOCK_W=block_w,
        BLOCK_K=block_k,
        ROWS=block_rows,
        BIAS=bias is not None,
        UPCAST=x.device.type == "cpu",  # Triton's interpreter (the tests): float32 operands, the same products
        num_warps=4,
        **pipelining,
    )
    return out if ok else None


# ----------------------------------------------------------------------------------------------- the DiT block
# Rounding codes (the dtype an eager intermediate is cast to): 0 float32 (no rounding), 1 bfloat16, 2 float16.
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _per_sample(t: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    """A (B, 1, C) or (B, C) modulation tensor as a contiguous float32 (B, C) one."""
    return t.reshape(batch, channels).float().contiguous()


def layer_norm(
    x: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor | None:
    """The DiT's float32 LayerNorm of the last dim of a contiguous (B, L, C) x, optionally affine (weight and bias
    both), cast to x's dtype, then optionally modulated (shift and scale both, (B, 1, C)) as
    `norm.float() · (1 + scale) + shift` in float32; the result in out_dtype (default x's dtype). None where it does
    not apply (see the module)."""
    if (weight is None) != (bias is None) or (shift is None) != (scale is None):
        return None
    sources = _ready(*(t for t in (x, weight, bias, shift, scale) if t is not None))
    if sources is None or x.dim() != 3 or not x.is_contiguous():
        return None
    b, length, channels = x.shape
    modulate = shift is not None
    if modulate and not (shift.numel() == scale.numel() == b * channels):  # one (shift, scale) per sample
        return None
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    if modulate:
        shift, scale = _per_sample(shift, b, channels), _per_sample(scale, b, channels)
    affine = weight is not None
    args = (x, weight if affine else x, bias if affine else x, shift if modulate else x, scale if modulate else x, y)
    ok = _launch(
        sources.layer_norm_rows,
        (b * length,),
        x.device,
        *args,
        length,
        eps,
        C=channels,
        BLOCK_C=_pow2(channels),
        AFFINE=affine,
        MODULATE=modulate,
        X_ROUND=_ROUND[x.dtype],
        num_warps=_warps(channels),
        enable_fp_fusion=False,
    )
    return y if ok else None


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, eps: float, rotations: torch.Tensor | None = None, head_dim: int = 0
) -> torch.Tensor | None:
    """The DiT's query/key RMSNorm of a contiguous (B, L, C) x over all C values (statistics in float32, the
    normalised value cast to x's dtype, then times weight), then, with `rotations`, the 3-D RoPE of each head_dim-wide
    head's adjacent pairs: rotations as layers.apply_rope takes them (complex (R, 1, head_dim/2), or real (cos, sin)
    pairs (R, 1, head_dim/2, 2); complex128 / float64 → float64 math, else float32), rows past R left unrotated, the
    rotated value float32. The result in x's dtype (the cast attention makes). None where it does not apply."""
    sources = _ready(x, weight)
    if sources is None or x.dim() != 3 or not x.is_contiguous() or x.shape[-1] % 2:
        return None
    rot = None
    if rotations is not None:
        rot = torch.view_as_real(rotations) if rotations.is_complex() else rotations
        if rot.dtype not in (torch.float32, torch.float64) or not head_dim or x.shape[-1] % head_dim:
            return None
        rot = rot.contiguous()
        if rot.shape[-2] * 2 != head_dim:
            return None
    if rot is not None and rot.device != x.device:
        return None
    b, length, channels = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    rope = rot is not None
    ok = _launch(
        sources.rms_norm_rope_rows,
        (b * length,),
        x.device,
        x,
        weight,
        rot if rope else x,
        y,
        length,
        rot.shape[0] if rope else 0,
        eps,
        C=channels,
        HALF_HEAD=head_dim // 2 if rope else 1,
        BLOCK_P=_pow2(channels // 2),
        ROPE=rope,
        ROPE_F64=rope and rot.dtype == torch.float64,
        X_ROUND=_ROUND[x.dtype],
        W_ROUND=_ROUND[torch.promote_types(x.dtype, weight.dtype)],
        num_warps=_warps(channels // 2),
        enable_fp_fusion=False,
    )
    return y if ok else None


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
    """`x + (y · gate).type_as(x)` for contiguous (B, L, C) x and y and a (B, 1, C) gate, the product in float32 (as
    the eager promotion to the float32 gate), in one pass; without a gate `x + y.type_as(x)` (the cross-attention's
    residual). None where it does not apply."""
    sources = _ready(x, y, *(() if gate is None else (gate,)))
    if sources is None or x.dim() != 3 or x.shape != y.shape or not (x.is_contiguous() and y.is_contiguous()):
        return None
    if gate is not None and gate.numel() != x.shape[0] * x.shape[2]:  # one gate per sample
        return None
    b, length, channels = x.shape
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    block = min(_pow2(channels), 1024)
    ok = _launch(
        sources.residual_rows,
        (b * length, -(-channels // block)),
        x.device,
        x,
        y,
        x if gate is None else _per_sample(gate, b, channels),
        out,
        length,
        C=channels,
        BLOCK=block,
        X_ROUND=_ROUND[x.dtype],
        GATE=gate is not None,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out if ok else None


def add_row_bias_(
    x: torch.Tensor, bias: torch.Tensor, tokens: int | None = None, residual: torch.Tensor | None = None
) -> bool:
    """In place, for a contiguous 2-D x (rows, C): x += bias, the sum in float32 rounded once to x's dtype (the bits of
    PyTorch's x.add_(b)), where bias is (C,) (every row) or (samples, C) with `tokens` rows a sample; with `residual`
    (contiguous, x's shape and dtype) then x += residual in the same pass (the bits of a second add). PyTorch's add of
    such a broadcast bias runs its strided, non-vectorised kernel: a convolution's bias onto a channels-last output
    (220 ms of an H200's 1.8 s decode) and FP8 attention's values' mean (32 ms a 14B forward); this runs at the
    bandwidth, and the residual block's sum costs no pass of its own. False (x untouched) where it does not apply."""
    sources = _ready(x, bias) if residual is None else _ready(x, bias, residual)
    if sources is None or x.dim() != 2 or not x.is_contiguous() or bias.dim() not in (1, 2) or not bias.is_contiguous():
        return False
    rows, channels = x.shape
    per_sample = bias.dim() == 2 and bias.shape[0] > 1
    if bias.shape[-1] != channels or (per_sample and (tokens is None or bias.shape[0] * tokens != rows)):
        return False
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous()
    ):
        return False
    if x.numel() == 0:
        return True
    block_c = min(_pow2(channels), 1024)
    block_r = max(1, 4096 // block_c)
    return _launch(
        sources.add_row_bias,
        (-(-rows // block_r), -(-channels // block_c)),
        x.device,
        x,
        bias,
        x if residual is None else residual,  # not read without RESIDUAL
        rows,
        tokens or rows,
        C=channels,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        PER_SAMPLE=per_sample,
        RESIDUAL=residual is not None,
        num_warps=4,
        enable_fp_fusion=False,
    )


def phase_rows(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The output of a ×2 nearest upsampling's 3×3 convolution from its four phases (vae.phase_convolved): y is the
    channels-last (N, 4C, H+1, W+1) output of the phase convolution; out (N, C, 2H, 2W), channels-last, has
    out[n, c, 2i+a, 2j+b] = y[n, (2a+b)·C + c, i+a, j+b] (+ bias[c], the sum in float32 rounded once to y's dtype: the
    bits of the bias pass, add_row_bias_) — one read of y and one write of out, in place of the upsampled input's
    write and read and the bias's pass. None where it does not apply."""
    tensors = (y,) if bias is None else (y, bias)
    sources = _ready(*tensors)
    if sources is None or y.dim() != 4 or y.shape[1] % 4 or not y.is_contiguous(memory_format=torch.channels_last):
        return None
    if bias is not None and (bias.dim() != 1 or bias.shape[0] * 4 != y.shape[1] or bias.dtype != y.dtype):
        return None
    n, c4, h1, w1 = y.shape
    channels, height, width = c4 // 4, h1 - 1, w1 - 1
    shape = (n, channels, 2 * height, 2 * width)  # allocated channels-last (a contiguous one converted is a copy)
    out = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    rows = out.numel() // max(channels, 1)
    if rows == 0 or channels == 0:
        return out
    block_c = min(_pow2(channels), 1024)
    block_r = max(1, 4096 // block_c)
    ok = _launch(
        sources.phase_rows,
        (-(-rows // block_r), -(-channels // block_c)),
        y.device,
        y,
        y if bias is None else bias.contiguous(),  # not read without BIAS
        out,
        rows,
        height,
        width,
        C=channels,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        BIAS=bias is not None,
        num_warps=4,
        enable_fp_fusion=False,
    )
    return out if ok else None


def fp8_quantize_rows(
    x: torch.Tensor, dtype: torch.dtype, fp8_max: float, reciprocal: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-row (per-token) float8 quantisation of a contiguous 2-D x in one kernel (the row read twice, the
    second time from L2), for FP8Linear's GEMM: scale = max(max|x_row| · reciprocal, float32 tiny) as (rows, 1)
    float32 (reciprocal rounded to float32) and q = clamp(x / scale, ±fp8_max) in `dtype`, bit for bit
    wanalpha.fp8.quantize_rows_eager, which writes four float32-sized intermediates. None where it does not apply."""
    sources = _ready(x)
    if sources is None or x.dim() != 2 or not x.is_contiguous():
        return None
    rows, channels = x.shape
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if q.numel() == 0:
        return q, scale
    ok = _launch(
        sources.fp8_quantize_rows,
        (rows,),
        x.device,
        x,
        q,
        scale,
        rows,
        fp8_max,
        reciprocal,
        torch.finfo(torch.float32).tiny,
        C=channels,
        BLOCK=min(_pow2(channels), 2048),
        num_warps=4,
    )
    return (q, scale) if ok else None


def fp8_dequantize_scaled(
    q: torch.Tensor,
    scale: torch.Tensor,
    weight_dtype: torch.dtype,
    factor: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """A contiguous (rows, C) float8 weight dequantised and row-scaled in one pass: w = (q · scale_row) rounded to
    `weight_dtype` (wanalpha.fp8.dequantize), then, with a float32 `factor` (rows,), w · factor_row in float32, rounded
    to `dtype` (the fused adapter's W' = diag(c)·W, wanalpha.fused_adapter._scaled), bit for bit; the eager forms write
    two or three float32-sized temporaries of the weight. None where it does not apply."""
    tensors = (scale,) if factor is None else (scale, factor)
    sources = _ready(*tensors)
    if (
        sources is None
        or not _plain(q)
        or q.dim() != 2
        or not q.is_contiguous()
        or q.device != scale.device
        or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)
        or any(t.dtype != torch.float32 or t.numel() != q.shape[0] for t in tensors)
        or weight_dtype not in _ROUND
        or dtype not in _ROUND
    ):
        return None
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    block = 4096
    ok = _launch(
        sources.fp8_dequantize_scaled,
        (-(-q.numel() // block),),
        q.device,
        q,
        scale.contiguous(),
        scale if factor is None else factor.contiguous(),
        out,
        q.numel(),
        C=q.shape[1],
        BLOCK=block,
        W_ROUND=_ROUND[weight_dtype],
        HAS_C=factor is not None,
        num_warps=8,
        enable_fp_fusion=False,
    )
    return out if ok else None


def _head_layout(x: torch.Tensor) -> bool:
    """Whether the per-head kernels take x: contiguous (B, L, H, D), D a power of two from 16 to 256."""
    return x.dim() == 4 and x.is_contiguous() and x.shape[-1] == _pow2(x.shape[-1]) and 16 <= x.shape[-1] <= 256


def head_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Per sample, head and channel of a contiguous (B, L, H, D) x: the float32 sum, minimum and maximum over the L
    tokens, each (B, H, D), in one read of x (partial results per chunk of tokens, then summed in a fixed order:
    deterministic). None where it does not apply (D a power of two up to 256)."""
    sources = _ready(x)
    if sources is None or not _head_layout(x) or x.shape[1] == 0:
        return None
    b, length, heads, d = x.shape
    # One tile of 64 tokens per program, as head_quantize: 512 chunks at 32,760 tokens, their partial results
    # (float32, 3 × 10 MB at the 14B's 40 heads of 128) summed by PyTorch after. Programs of 512 tokens, looping over
    # tiles of 32, read at a fifth of the bandwidth (H200: 1.9 ms a 14B block against head_quantize's 0.5 ms).
    rows = 64 * -(-length // (64 * 65535))  # 64 tokens a program, more past the grid's 65,535 chunks (4.2 M tokens)
    chunks = -(-length // rows)
    stats = [torch.empty(b, chunks, heads, d, dtype=torch.float32, device=x.device) for _ in range(3)]
    ok = _launch(
        sources.head_stats,
        (b, chunks, heads),
        x.device,
        x,
        *stats,
        length,
        H=heads,
        D=d,
        ROWS=rows,
        BLOCK_L=64,
        num_warps=4,
    )
    if not ok:
        return None
    total, low, high = stats
    return total.sum(1), low.amin(1), high.amax(1)


def head_quantize(
    x: torch.Tensor, mean: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype, fp8_max: float
) -> torch.Tensor | None:
    """A contiguous (B, L, H, D) x quantised per sample and head: clamp((x − mean) / scale, ±fp8_max) in `dtype`
    (float32 subtraction and correctly rounded division, round to nearest even), mean (B, H, D) or None, scale (B, H),
    both float32, bit for bit wanalpha.models.fa3.quantize_eager. None where it does not apply."""
    tensors = (x, scale) if mean is None else (x, mean, scale)
    sources = _ready(*tensors)
    if sources is None or not _head_layout(x):
        return None
    b, length, heads, d = x.shape
    if scale.dtype != torch.float32 or scale.shape != (b, heads):
        return None
    if mean is not None and (mean.dtype != torch.float32 or mean.shape != (b, heads, d)):
        return None
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    if q.numel() == 0:
        return q
    block = 64
    ok = _launch(
        sources.head_quantize,
        (b, -(-length // block), heads),
        x.device,
        x,
        scale if mean is None else mean.contiguous(),
        scale.contiguous(),
        q,
        length,
        fp8_max,
        H=heads,
        D=d,
        BLOCK_L=block,
        CENTER=mean is not None,
        num_warps=4,
    )
    return q if ok else None


def warm_up_dit(
    device: torch.device,
    dim: int,
    head_dim: int,
    weight_dtype: torch.dtype,
    compute_dtype: torch.dtype,
    rope_dtype: torch.dtype,
) -> None:
    """Compile (or load from Triton's on-disk cache) every fused-kernel variant a DiT forward of this width and these
    dtypes launches, by running each once on one-row inputs: generate runs this while a helper thread reads the
    weights, so the first sampling step does not pay Triton's compilation (seconds on a new machine).
    Sizes are not specialised, so the variants serve every video size. Does nothing where the kernels do not apply."""
    if device.type != "cuda" or _sources() is None:
        return
    with torch.no_grad():
        x = torch.zeros(1, 1, dim, device=device, dtype=weight_dtype)  # the residual stream
        y = torch.zeros(1, 1, dim, device=device, dtype=compute_dtype)  # a projection's output
        weight = torch.ones(dim, device=device, dtype=weight_dtype)
        modulation = torch.zeros(1, 1, dim, device=device)
        rotations = torch.zeros(1, 1, head_dim // 2, 2, device=device, dtype=rope_dtype)
        layer_norm(x, 1e-6, shift=modulation, scale=modulation, out_dtype=weight_dtype)  # norm1, norm2, head
        layer_norm(x, 1e-6, weight, weight)  # norm3
        rms_norm_rope(y, weight, 1e-6, rotations, head_dim)  # self-attention's q and k
        rms_norm_rope(y, weight, 1e-6)  # cross-attention's q and k
        gated_residual(x, y, modulation)
        gated_residual(x, y, None)  # the cross-attention's residual
        torch.cuda.synchronize(device)


def warm_up_rms_norms(
    device: torch.device,
    dtype: torch.dtype,
    variants: set[tuple[int, bool]],
    bias_channels: set[int] = frozenset(),
    phase_channels: set[int] = frozenset(),
    few_outputs: set[tuple[int, int, bool]] = frozenset(),
) -> None:
    """Compile (or load from Triton's cache) the VAE's fused RMS-norm kernel for each (channels, silu) variant in
    `dtype`, add_row_bias_ (with and without a residual: a residual block's last convolution adds its shortcut in the
    same pass) for each convolution's output channels (`bias_channels`), phase_rows for each upsampling
    convolution's (`phase_channels`), and conv3_few_outputs for each (input channels, output channels, biased) of
    `few_outputs` (the decoders' heads), as warm_up_dit does for the DiT (generate: on the same thread, before the
    decoders' first use)."""
    if device.type != "cuda" or _sources() is None:
        return
    with torch.no_grad():
        for channels, silu in sorted(variants):
            x = torch.zeros(1, channels, 1, 1, 1, device=device, dtype=dtype)
            rms_norm_channels_last(x, torch.ones(channels, device=device, dtype=dtype), channels**0.5, silu)
        for channels in sorted(bias_channels):
            row, bias = (torch.zeros(1, channels, device=device, dtype=dtype) for _ in range(2))
            add_row_bias_(row, bias[0])
            add_row_bias_(row, bias[0], residual=torch.zeros_like(row))
        for channels in sorted(phase_channels):
            y = torch.zeros(1, 4 * channels, 2, 2, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last
            )
            phase_rows(y, torch.zeros(channels, device=device, dtype=dtype))
        for cin, cout, biased in sorted(few_outputs):  # 16 rows of 64 columns: the tiles of any frame that large
            x = torch.zeros(1, cin, 3, 16, 64, device=device, dtype=dtype, memory_format=torch.channels_last_3d)
            rows = torch.zeros(27, cin, FEW_OUTPUTS, device=device, dtype=dtype)
            conv3_few_outputs(x, rows, cout, torch.zeros(cout, device=device, dtype=dtype) if biased else None)
        torch.cuda.synchronize(device)
