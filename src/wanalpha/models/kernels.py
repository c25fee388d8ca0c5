"""Hand-written GPU kernels (Triton) for inference hot spots the stock PyTorch kernels serve poorly.

Each entry point returns None when it does not apply (no CUDA tensor, no Triton), and the caller falls back to its
PyTorch form; the results are compared with those forms on the GPU (tests/test_gpu.py).
"""

from __future__ import annotations

import functools
import warnings

import torch

_failed = False  # set when a launch failed (e.g. a GPU or toolchain Triton cannot serve): the PyTorch forms take over


@functools.cache
def _rms_norm_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:  # CPU-only builds
        return None

    @triton.jit
    def rms_norm_rows(x_ptr, gamma_ptr, y_ptr, rows, scale, C: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_M: tl.constexpr, SILU: tl.constexpr):  # fmt: skip
        # BLOCK_M rows of C contiguous channels per program; 64-bit offsets (a decoder activation exceeds 2^31).
        row = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
        col = tl.arange(0, BLOCK_C)[None, :]
        mask = (row < rows) & (col < C)
        x = tl.load(x_ptr + row * C + col, mask=mask, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))[:, None]
        gamma = tl.load(gamma_ptr + col, mask=col < C, other=0.0).to(tl.float32)
        y = x / tl.maximum(norm, 1e-12) * scale * gamma  # F.normalize(x) · √C · gamma, in float32
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + row * C + col, y.to(y_ptr.dtype.element_ty), mask=mask)

    return rms_norm_rows


def rms_norm_channels_last(x: torch.Tensor, gamma: torch.Tensor, scale: float, silu: bool) -> torch.Tensor | None:
    """The VAE's RMS norm (x / max(‖x‖₂ over channels, 1e-12) · scale · gamma, then SiLU when `silu`) of a
    channels-last CUDA tensor in one pass: every position's channels are contiguous, so the input is read once as
    rows of C values and the output written once in the same layout, arithmetic in float32, the result in the
    promoted dtype of x and gamma (as the PyTorch form). None when Triton or CUDA is unavailable, x is not fp32, bf16 or
    fp16, or a launch has failed (then with one warning). No autograd."""
    global _failed
    kernel = _rms_norm_kernel()
    if _failed or kernel is None or not x.is_cuda or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    channels = x.shape[1]
    y = torch.empty_like(x, dtype=torch.promote_types(x.dtype, gamma.dtype))  # keeps the channels-last strides
    rows = x.numel() // channels
    if rows == 0:
        return y
    block_c = 1 << (channels - 1).bit_length()
    block_m = max(1, 8192 // block_c)
    grid = (-(-rows // block_m),)
    try:
        with torch.cuda.device(x.device):  # Triton launches on the current device
            kernel[grid](x, gamma.reshape(-1).contiguous(), y, rows, scale, C=channels, BLOCK_C=block_c,
                         BLOCK_M=block_m, SILU=silu, num_warps=8)  # fmt: skip
    except Exception as error:  # noqa: BLE001 - any compile or launch failure: fall back, once, with a warning
        _failed = True
        warnings.warn(f"Triton RMS norm unavailable ({type(error).__name__}: {error}); using PyTorch's", stacklevel=2)
        return None
    return y
