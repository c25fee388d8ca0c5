"""FlashAttention-4 (the `flash-attn-4` package's CuTe-DSL kernels) as the DiT's self-attention kernel.

On an H200 at 81×480×832 (32,760 tokens, bf16, head_dim 128) its self-attention runs 12–17 % faster than cuDNN's,
the kernel PyTorch's SDPA picks, forward and backward (docs/benchmarks.md, `benchmarks/attention.py`); onto the 512
text rows cuDNN's forward is faster, so cross-attention stays on SDPA. `kernel()` decides per device and dtype:

- "sdpa": PyTorch's scaled_dot_product_attention, always;
- "auto" (the default): FlashAttention-4 where it is installed, its forward (and for training its backward) ran
  once on the GPU (a tiny probe, so a broken installation falls back instead of failing mid-run) and the GPU is a
  Hopper or Blackwell one (compute capability 9.x or 10.x) running bf16 or fp16, for the Wan DiTs' head size (128);
  SDPA everywhere else (the CPU, float32, other GPUs, other head sizes);
- "fa4": FlashAttention-4, or a clear error saying what is missing.

The kernels run as two custom operators (`wanalpha::fa4_attention` and its backward) with an autograd formula, so
torch.compile treats them as opaque calls and selective checkpointing can keep their outputs, as it keeps SDPA's.
They call the package's `_flash_attn_fwd` / `_flash_attn_bwd`, the entry points PyTorch's own FA4 registration
(torch.nn.attention) uses; the backward is deterministic when torch.use_deterministic_algorithms is on.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

from wanalpha.errors import ConfigError

KERNELS = ("auto", "sdpa", "fa4", "fa3", "fa3-fp8")
INSTALL = "pip install --pre flash-attn-4, with [cu13] for a CUDA 13 PyTorch"

_module: ModuleType | None = None
_missing: str | None = None  # why the package cannot be used; None until the first look


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def optional_module(name: str, needs: tuple[str, ...], label: str) -> tuple[ModuleType | None, str | None]:
    """An optional kernel package's module, imported: (module, None), or (None, why it cannot be used) when it is
    missing, fails to import (e.g. its CUDA libraries do not load) or lacks the entry points `needs`."""
    try:
        module = importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 — not installed, or its CUDA libraries fail to load
        return None, f"{label} cannot be imported ({_first_line(error)})"
    if not all(hasattr(module, entry) for entry in needs):
        return None, f"the installed {name} lacks {'/'.join(needs)} (too old or too new)"
    return module, None


def load() -> ModuleType | None:
    """flash_attn.cute.interface, imported once; None (and the reason in `_missing`) when it cannot be used."""
    global _module, _missing
    if _module is None and _missing is None:
        _module, _missing = optional_module(
            "flash_attn.cute.interface", ("_flash_attn_fwd", "_flash_attn_bwd"), "flash-attn-4"
        )
    return _module


_probed: dict[tuple[int, bool], str | None] = {}  # per (GPU, backward too): why a first run failed there, or None


def _probe(index: int, backward: bool) -> str | None:
    """Run the package's forward (and backward) once on a tiny input on GPU `index`: None, or why it failed."""
    try:
        with torch.no_grad():
            q = torch.zeros(1, 128, 1, 128, device=torch.device("cuda", index), dtype=torch.bfloat16)
            out, lse = _module._flash_attn_fwd(q, q, q, softmax_scale=1.0, return_lse=True)[:2]
            if backward:
                _module._flash_attn_bwd(q, q, q, out, torch.zeros_like(out), lse, softmax_scale=1.0)
        return None
    except Exception as error:  # noqa: BLE001 — e.g. libraries built for another CUDA than PyTorch's
        return f"its {'backward' if backward else 'forward'} kernel fails on this GPU ({_first_line(error)})"


def gpu_gate(device: torch.device, dtype: torch.dtype, head_dim: int, max_head_dim: int) -> str | None:
    """The checks every FlashAttention kernel shares, before its own (GPU generation, package, first run): an NVIDIA
    CUDA device PyTorch sees, bf16 or fp16 tensors, a head size of 8 to `max_head_dim` in steps of 8. Why not, or
    None."""
    if device.type != "cuda" or torch.version.hip is not None:
        return f"it runs on NVIDIA CUDA GPUs, not on {device.type if device.type != 'cuda' else 'ROCm'}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"it runs bf16 or fp16, not {str(dtype).removeprefix('torch.')}"
    if head_dim % 8 or not 8 <= head_dim <= max_head_dim:
        return f"wanalpha runs it at head sizes 8 to {max_head_dim} in steps of 8, not {head_dim}"
    if not torch.cuda.is_available():
        return "it runs on NVIDIA CUDA GPUs, and this PyTorch sees none"
    return None


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int = 128, backward: bool = False) -> str | None:
    """Why FlashAttention-4 cannot run self-attention for tensors of this device, dtype and head size; None when it
    can. The first call per GPU imports the package and runs its forward (and, with `backward`, for training, its
    backward) once on a tiny input, so an installation whose kernels cannot build or launch here is refused, not met
    mid-run."""
    if (reason := gpu_gate(device, dtype, head_dim, 128)) is not None:
        return reason
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return f"wanalpha uses it on Hopper and Blackwell GPUs (compute capability 9.x, 10.x), not {major}.{minor}"
    if load() is None:
        return _missing
    index = device.index if device.index is not None else torch.cuda.current_device()
    for part in (False, True) if backward else (False,):
        if (index, part) not in _probed:
            _probed[index, part] = _probe(index, part)
        if _probed[index, part] is not None:
            return _probed[index, part]
    return None


def kernel(choice: str, device: torch.device, dtype: torch.dtype, head_dim: int = 128, backward: bool = False) -> str:
    """The self-attention kernel ("fa4", "fa3", "fa3-fp8" or "sdpa") for a `choice` of KERNELS and tensors of this
    device, dtype and head size ("auto" takes FlashAttention-4 for the head size of the Wan DiTs, 128, where it was
    measured faster; "fa4" for any it accepts; "fa3" / "fa3-fp8": FlashAttention-3 in bf16 / its FP8 forward,
    inference only, wanalpha.models.fa3); `backward`: gradients will flow through it. Call it outside compiled code
    (it may import a package and run its kernels once)."""
    if choice not in KERNELS:
        raise ConfigError(f"attention kernel {choice!r}: choose one of {', '.join(KERNELS)}")
    if choice in ("fa3", "fa3-fp8"):
        from wanalpha.models import fa3

        reason = fa3.unsupported(device, dtype, head_dim, backward, fp8=choice == "fa3-fp8")
        if reason is None:
            return choice
        fix = f"{fa3.INSTALL}" if fa3._missing is not None and reason == fa3._missing else "use --attention auto"
        raise ConfigError(
            f"attention {choice!r} (--attention {choice}): FlashAttention-3 cannot run here: {reason}; {fix}"
        )
    if choice == "sdpa" or (choice == "auto" and head_dim != 128):
        return "sdpa"
    reason = unsupported(device, dtype, head_dim, backward)
    if reason is None:
        return "fa4"
    if choice == "fa4":
        fix = "use --attention auto or sdpa"
        if _missing is not None and reason == _missing:
            fix = f"install it ({INSTALL})"
        raise ConfigError(f"attention 'fa4' (--attention fa4): FlashAttention-4 cannot run here: {reason}; {fix}")
    return "sdpa"


@torch.library.custom_op("wanalpha::fa4_attention", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _module._flash_attn_fwd(q, k, v, softmax_scale=scale, return_lse=True)[:2]  # then MLA-only extras
    return out.contiguous(), lse.contiguous()


@_forward.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(
        (q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32
    )


@torch.library.custom_op("wanalpha::fa4_attention_backward", mutates_args=())
def _backward(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    deterministic = torch.are_deterministic_algorithms_enabled()
    dq, dk, dv = _module._flash_attn_bwd(q, k, v, out, grad, lse, softmax_scale=scale, deterministic=deterministic)[:3]
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_backward.register_fake
def _(grad, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is for the backward only
    ctx.scale = scale


def _grad(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return *_backward(grad_out, q, k, v, out, lse, ctx.scale), None


_forward.register_autograd(_grad, setup_context=_setup)

FORWARD_OP = torch.ops.wanalpha.fa4_attention.default


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of (B, L, heads, d) tensors with scale 1/√d through FlashAttention-4 (its native layout)."""
    if load() is None:
        raise ConfigError(f"FlashAttention-4 cannot run: {_missing}; install it ({INSTALL})")
    q, k, v = (t.to(v.dtype).contiguous() for t in (q, k, v))  # the kernels' layout; q, k: float32 after RoPE
    return _forward(q, k, v, 1 / math.sqrt(q.shape[-1]))[0]
