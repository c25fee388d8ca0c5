"""The fused adapter linear: wanalpha's forward (and backward) for a LoRA / DoRA linear over a frozen base, the same
function as peft's (the GPU-speed lever of DiT training; `adapters.inject_dora(fused=True)` injects linears that run
it).

LoRA is added by one extra GEMM into the base output, DoRA's magnitude folded into the weights, both GEMMs in custom
operators with their own backward (no activation-sized temporaries or copies, also in compiled blocks), and DoRA's
weight norms computed once per training step (`dora_norm_scope`). Over an FP8 base (`FP8Base`, `--dit-dtype fp8`)
the frozen weight stays in its float8 codes: dequantised and row-scaled in one pass where a GEMM needs it, and the
codes, not a dequantised copy, are what the backward keeps. With `FP8Base.gemm` (train-dit --fp8-gemm) the forward's
base GEMM runs in FP8 on Hopper (the activations quantised per token, the weight's codes with c ⊙ its scale), as
generate's FP8Linear; the backward stays in the compute dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from wanalpha.fp8 import dequantize, fp8_gemm, gemm_takes, quantize_rows
from wanalpha.models import kernels
from wanalpha.runtime import compute_dtype

# peft's LoRA linear casts its input to the adapters' float32, and its DoRA computes
#     y = base(x) + (m/n − 1)·(base(x) − bias) + (m/n)·s·B(A(x)),   n = ‖W + s·BA‖ per output row (detached),
# in float32 at activation size, forming W + s·BA again on every call (forward and checkpoint recomputation).
# The same function, with c = m/n (c = 1 for LoRA), is
#     y = x (diag(c) W)ᵀ + (x Aᵀ)(diag(s·c) B)ᵀ + bias:
# two GEMMs into one output, the row scale folded into the weight-sized operands (formed per call, rounded once to
# the compute dtype: the result is the exact function of the bf16 weights diag(c)·W, and its gradient errors against
# float32 equal peft's, tests/test_dit.py). Gradients, n held constant as peft does:
#     ∂x = ∂y W' + (∂y B') A,  ∂A = (∂y B')ᵀ x,  ∂B = diag(s·c) ∂yᵀ (x Aᵀ),  ∂m_j = Σ_t ∂y_tj (y_tj − bias_j) / m_j,
# so only x, x Aᵀ and (for DoRA) y are kept. Scaling the output instead (c ⊙ (x Wᵀ + …)) costs five more
# activation-sized passes per linear and step: measured 3 % slower at 14B for no measurable gain in accuracy.

# The norms of the current scope by id(module), or None. A plain global, not a context variable: on the GPU the
# backward pass (and the checkpoint recomputation in it) runs on autograd's own thread, which sees no context
# variables of the training thread.
_NORMS: dict[int, torch.Tensor] | None = None


class FP8Base(NamedTuple):
    """A frozen FP8 base weight (wanalpha.fp8.FP8Linear's buffers): W = dequantize(q, scale, dtype), the exact weight
    the layer's `weight` property gives, so the fused linear over it computes what it computes over that bf16 weight,
    bit for bit, without keeping a dequantised copy alive from the forward to the backward."""

    q: torch.Tensor  # float8_e4m3fn (out, in)
    scale: torch.Tensor  # float32 (out,)
    dtype: torch.dtype  # the dequantised weight's dtype (FP8Linear.compute_dtype)
    gemm: bool = False  # the forward's base GEMM in FP8 where it applies (_fp8_gemm_applies), not over W' in dtype

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.dtype)


@contextlib.contextmanager
def dora_norm_scope() -> Iterator[None]:
    """Within the scope the adapters do not change (one training micro-step: forward, checkpoint recomputation and
    backward), so each fused DoRA linear computes its weight norm once and reuses it. Outside, every call computes
    it (peft's behaviour). Scopes nest; one training loop at a time per process."""
    global _NORMS
    outer, _NORMS = _NORMS, {}
    try:
        yield
    finally:
        _NORMS = outer


def _dora_norm(module: nn.Module, weight: torch.Tensor | FP8Base, a: torch.Tensor, b: torch.Tensor, scaling: float):
    """‖W + s·BA‖ over each output row in float32, detached (DoRA §4.3, as peft)."""
    # Compiled blocks (torch.compile) compute the norm inside their graph instead of reading the cache.
    cache = None if torch.compiler.is_compiling() else _NORMS
    if cache is not None and (norm := cache.get(id(module))) is not None:
        return norm
    if isinstance(weight, FP8Base):  # float32 of the dequantised weight, in one pass where the kernel applies
        weight = _scaled_base(weight, None, None, torch.float32)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        merged = torch.addmm(weight.float(), b.float(), a.float(), alpha=scaling)
        norm = torch.linalg.vector_norm(merged, dim=1)
    if cache is not None:
        cache[id(module)] = norm
    return norm


def _column_dot(grad: torch.Tensor, y: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """Σ_t grad_tj · y_tj per column j, summed in float32, a block of rows at a time (bounded temporaries). The
    products round to y's dtype independently per element, so their errors average out in the sum."""
    total = torch.zeros(y.shape[1], dtype=torch.float32, device=y.device)
    for start in range(0, y.shape[0], rows):
        total += (grad[start : start + rows] * y[start : start + rows]).sum(0, dtype=torch.float32)
    return total


# The fused linear's two GEMMs run in custom operators (one for the forward, one for the backward): compiled blocks
# call them as they run eagerly, so the low-rank GEMM accumulates into the base GEMM's output in place. Traced into a
# graph, the in-place add became an out-of-place addmm that first copies the output (an activation-sized copy per
# linear in the forward, the recomputation and the backward: 2.7 % of the compiled 1.3B step), and an in-place add
# inside an autograd function lost its gradients when compiled on CUDA (torch 2.11, tests/test_gpu.py). The scaled
# weights are computed outside the operators, where inductor fuses the scaling into one kernel.
@torch.library.custom_op(
    "wanalpha::adapter_linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? weight_scale, ScalarType? weight_dtype, Tensor w_scaled, Tensor? bias, "
    "Tensor a, Tensor b, Tensor b_scaled, Tensor? magnitude, Tensor? norm, float scaling, bool fp8_forward) -> "
    "(Tensor, Tensor)",
)
def _adapter_linear(
    x, weight, weight_scale, weight_dtype, w_scaled, bias, a, b, b_scaled, magnitude, norm, scaling, fp8_forward
):
    """y = x W'ᵀ + (x Aᵀ) B'ᵀ + bias on 2-D x in its dtype, with W' = diag(c) W and B' = diag(s·c) B precomputed
    (`_scaled_operands`, detached) in x's dtype, c = m/n for DoRA, 1 for LoRA (magnitude None); W and the bias are
    frozen. W is `weight`, or, with a `weight_scale`, the FP8 base (weight, weight_scale, weight_dtype) (`FP8Base`):
    the backward forms W' again from what it keeps. With `fp8_forward` (an FP8 base; w_scaled is then not formed) x Wᵀ
    + bias is one FP8 GEMM: x quantised per token, the weight's codes with scale c ⊙ weight_scale (float32). Returns
    (y, x Aᵀ); the caller uses y. Its gradients are those of y as a function of x, A, B and m."""
    xa = F.linear(x, a.to(x.dtype))
    if fp8_forward:
        scale = weight_scale if magnitude is None else weight_scale * (magnitude.float() / norm)
        xq, x_scale = quantize_rows(x)
        y = fp8_gemm(xq, x_scale, weight, scale, bias, x.dtype)
    else:
        y = F.linear(x, w_scaled, None if bias is None else bias.to(x.dtype))
    y.addmm_(xa, b_scaled.t())  # in place: no second output-sized temporary
    return y, xa


@_adapter_linear.register_fake
def _(x, weight, weight_scale, weight_dtype, w_scaled, bias, a, b, b_scaled, magnitude, norm, scaling, fp8_forward):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a.shape[0])


@torch.library.custom_op(
    "wanalpha::adapter_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor xa, Tensor? y, Tensor w_scaled, Tensor? bias, Tensor a, Tensor b, "
    "Tensor b_scaled, Tensor? magnitude, Tensor? norm, float scaling, bool[] need) -> Tensor[]",
)
def _adapter_linear_backward(grad, x, xa, y, w_scaled, bias, a, b, b_scaled, magnitude, norm, scaling, need):
    """[∂x, ∂A, ∂B, ∂m] of `adapter_linear` (grad in x's dtype), each an empty tensor where `need` (four flags) says
    it is not needed."""
    grad_xa = grad @ b_scaled  # (N, r)
    grads = [grad.new_empty(0) for _ in range(4)]
    if need[0]:
        grads[0] = grad @ w_scaled
        grads[0].addmm_(grad_xa, a.to(x.dtype))
    if need[1]:
        grads[1] = (grad_xa.t() @ x).to(a.dtype)
    if need[2]:  # diag(s·c) ∂yᵀ (x Aᵀ): the same row scale as B'
        grads[2] = _scaled(grad.t() @ xa, magnitude, norm, b.dtype, scaling)
    if need[3]:  # ∂m_j = Σ_t ∂y_tj (y_tj − bias_j) / m_j (m_j = 0: not finite)
        dot = _column_dot(grad, y)
        if bias is not None:
            dot -= bias.float() * grad.sum(0, dtype=torch.float32)
        grads[3] = (dot / magnitude.float()).to(magnitude.dtype)
    return grads


@_adapter_linear_backward.register_fake
def _(grad, x, xa, y, w_scaled, bias, a, b, b_scaled, magnitude, norm, scaling, need):
    like = [x, a, b, magnitude]
    return [
        grad.new_empty(t.shape, dtype=t.dtype if i else grad.dtype) if flag else grad.new_empty(0)
        for i, (flag, t) in enumerate(zip(need, like, strict=True))
    ]


def _adapter_linear_setup(ctx, inputs, output):
    x, weight, weight_scale, weight_dtype, _, bias, a, b, _, magnitude, norm, scaling, _ = inputs
    y, xa = output
    ctx.mark_non_differentiable(xa)
    kept = (x, xa, None if magnitude is None else y, weight, weight_scale, bias, a, b, magnitude, norm)
    ctx.save_for_backward(*kept)
    ctx.scaling, ctx.weight_dtype = scaling, weight_dtype


def _adapter_linear_grad(ctx, grad, _grad_xa):
    x, xa, y, weight, weight_scale, bias, a, b, magnitude, norm = ctx.saved_tensors
    need, dtype = ctx.needs_input_grad, x.dtype
    flags = [need[0], need[6], need[7], magnitude is not None and need[9]]
    # Operands are cast to x's dtype explicitly, here and in forward, so no autocast(enabled=False) region is
    # needed as long as the backward runs under the forward's autocast state (TrainingLoop.accumulate wraps both
    # inside one autocast; an fp32 forward whose backward ran under bf16 autocast would mix dtypes here).
    base = weight if weight_scale is None else FP8Base(weight, weight_scale, ctx.weight_dtype)
    w_scaled, b_scaled = _scaled_operands(base, b, magnitude, norm, dtype, ctx.scaling)
    grads = _adapter_linear_backward(
        grad.to(dtype), x, xa, y, w_scaled, bias, a, b, b_scaled, magnitude, norm, ctx.scaling, flags
    )
    grad_x, grad_a, grad_b, grad_m = (g if flag else None for g, flag in zip(grads, flags, strict=True))
    return grad_x, None, None, None, None, None, grad_a, grad_b, None, grad_m, None, None, None


_adapter_linear.register_autograd(_adapter_linear_grad, setup_context=_adapter_linear_setup)


def _scaled(weight: torch.Tensor, magnitude, norm, dtype: torch.dtype, factor: float = 1.0) -> torch.Tensor:
    """diag(factor·m/n) · weight in `dtype` (factor · weight for LoRA), scaled in float32 and rounded once."""
    if magnitude is None:
        return weight.to(dtype) if factor == 1.0 else (weight.float() * factor).to(dtype)
    return (weight * (factor * magnitude.float() / norm)[:, None]).to(dtype)


def _scaled_base(weight: torch.Tensor | FP8Base, magnitude, norm, dtype: torch.dtype) -> torch.Tensor:
    """W' = diag(c) W in `dtype`; for an FP8 base, _scaled of its dequantised weight, in one pass where the Triton
    kernel applies (the same bits: kernels.fp8_dequantize_scaled)."""
    if not isinstance(weight, FP8Base):
        return _scaled(weight, magnitude, norm, dtype)
    factor = None if magnitude is None else magnitude.float() / norm
    fused = kernels.fp8_dequantize_scaled(weight.q, weight.scale, weight.dtype, factor, dtype)
    return _scaled(weight.dequantize(), magnitude, norm, dtype) if fused is None else fused


def _scaled_operands(
    weight: torch.Tensor | FP8Base, b, magnitude, norm, dtype: torch.dtype, scaling: float, base: bool = True
):
    """The fused linear's GEMM operands W' = diag(c) W and B' = diag(s·c) B in `dtype`, detached: the operators'
    own backward gives the gradients through the scaling (forward and backward compute them the same way). Without
    `base` (an FP8 GEMM's forward, which reads the codes) W' is an empty tensor."""
    with torch.no_grad():
        b_scaled = _scaled(b, magnitude, norm, dtype, scaling).detach()
        if not base:
            return b.new_empty(0, dtype=dtype), b_scaled
        return _scaled_base(weight, magnitude, norm, dtype).detach(), b_scaled


def _fp8_gemm_applies(weight: torch.Tensor | FP8Base, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fused linear's forward takes the FP8 GEMM: an FP8Base that asks for it, where the GEMM takes its
    shape, dtype and device (fp8.gemm_takes, as FP8Linear's forward)."""
    return isinstance(weight, FP8Base) and weight.gemm and gemm_takes(*weight.q.shape, dtype, x.device)


def fused_linear(
    module: nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor | FP8Base,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x Wᵀ + bias + the adapter's output for x (…, in) in the compute dtype: LoRA (magnitude None) or DoRA with
    magnitude m (c = m/n above); `module` keys its DoRA norm within a `dora_norm_scope`. `weight` is the frozen base
    weight or an FP8Base."""
    dtype = compute_dtype(x.device, x.dtype)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    norm = None
    if magnitude is not None:
        norm = _dora_norm(module, weight, a, b, scaling)
    gemm = _fp8_gemm_applies(weight, flat, dtype)
    w_scaled, b_scaled = _scaled_operands(weight, b, magnitude, norm, dtype, scaling, base=not gemm)
    q, weight_scale, weight_dtype = weight[:3] if isinstance(weight, FP8Base) else (weight, None, None)
    y, _ = _adapter_linear(
        flat, q, weight_scale, weight_dtype, w_scaled, bias, a, b, b_scaled, magnitude, norm, float(scaling), gemm
    )
    return y.view(*x.shape[:-1], y.shape[-1])
