"""Attention kernels alone at the DiT's shapes: self-attention over all video tokens and cross-attention onto the
512 text rows, per block of a variant (batch 1, bf16, head_dim 128), forward and forward + backward.

Backends: PyTorch SDPA's cuDNN kernel (`cudnn`, what PyTorch picks on Hopper), SDPA's FlashAttention-2 (`flash`),
its unfused reference (`math`: the only one on the CPU), FlashAttention-3 (`fa3`, and its FP8 forward with
wanalpha's per-head quantisation, `fa3-fp8`: wanalpha.models.fa3, forward only; `fa3-fp8-kernel`: the same on
inputs quantised beforehand, so the difference is the quantisation's time), FlashAttention-4's CuTe-DSL kernels
(`fa4`: the `flash-attn-4` package through wanalpha.models.fa4's operators, as the DiT runs them, when it is
installed; it JIT-compiles its kernels on first use, which the warm-up absorbs), and SageAttention (`sage`: the
`sageattention` package, quantised attention, forward only; its 1.x wheel is Triton and installs anywhere, its 2.x
Hopper kernels need a CUDA build).

    python benchmarks/attention.py --variants 1.3b 14b --backends cudnn fa4

Prints one JSON object: per variant, attention kind and backend, the median time of `--repeat` calls after a
warm-up (CUDA-synchronised), TFLOP/s by the FLOP model below and the error against float32 attention on a sample
of query rows (max |out − exact| over max |exact|). FLOP model: forward 4·L·Lk·H·d (scores and values), backward
2.5× that (five matmuls of the same size against two), as FlashAttention's benchmarks count."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import PEAK_TFLOPS, environment, timed  # noqa: E402
from wanalpha.models.dit import DIT_VARIANTS  # noqa: E402

SAMPLE_ROWS = 2048  # query rows compared against float32 attention


def sdpa(name: str) -> Callable:
    """(B, L, H, d) attention through SDPA with one backend forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[name]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(kind):
            out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2)

    return run


def fa4() -> Callable:
    """FlashAttention-4 through wanalpha's operators (what the DiT runs); a clear error where it cannot run."""
    from wanalpha.models import fa4

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        fa4.kernel("fa4", q.device, q.dtype)
        return fa4.attention(q, k, v)

    return run


def fa3(fp8: bool) -> Callable:
    """FlashAttention-3 (the `flash_attn_3` package, module flash_attn_interface) through wanalpha.models.fa3, as
    the DiT runs it: bf16, or (`fp8`) its FP8 forward with wanalpha's per-head quantisation (the quantisation's
    passes are timed with it). Forward only."""
    from wanalpha.models import fa3

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _fa3_can_run(q, fp8)
        return fa3.attention_fp8(q, k, v) if fp8 else fa3.attention(q, k, v)

    return run


def _fa3_can_run(q: torch.Tensor, fp8: bool) -> None:
    """Skip a backward (forward only), and say why FlashAttention-3 cannot run these inputs."""
    from wanalpha.models import fa3

    if torch.is_grad_enabled() and q.requires_grad:
        raise NotImplementedError("wanalpha runs FlashAttention-3 forward only")
    reason = fa3.unsupported(q.device, q.dtype, q.shape[-1], fp8=fp8)
    if reason is not None:
        raise RuntimeError(reason)


def fa3_fp8_kernel() -> Callable:
    """fa3-fp8 less its quantisation: q, k and v quantised once per input (outside the timing), then what
    attention_fp8 does after it (fa3.attend_quantized); its time against fa3-fp8's is the quantisation's."""
    from wanalpha.models import fa3

    quantized: dict[tuple, tuple] = {}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        _fa3_can_run(q, fp8=True)
        key = tuple((t.data_ptr(), t.shape) for t in (q, k, v))
        if key not in quantized:
            quantized.clear()
            quantized[key] = fa3._quantized(q, k, v)
        return fa3.attend_quantized(quantized[key], v.dtype)

    return run


def sage() -> Callable:
    """SageAttention (the `sageattention` package: 1.x is Triton, INT8 QKᵀ with smoothed K and FP16 PV; forward only),
    in its NHD layout, which is the DiT's (B, L, H, d)."""
    from sageattention import sageattn

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and q.requires_grad:
            raise NotImplementedError("SageAttention has no backward")
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)

    return run


BACKENDS = {
    "cudnn": lambda: sdpa("cudnn"),
    "flash": lambda: sdpa("flash"),
    "math": lambda: sdpa("math"),
    "fa4": fa4,
    "fa3": lambda: fa3(False),
    "fa3-fp8": lambda: fa3(True),
    "fa3-fp8-kernel": fa3_fp8_kernel,
    "sage": sage,
}


def package_versions() -> dict[str, str | None]:
    """The installed FlashAttention-4 stack (None where missing)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    packages = (
        "flash-attn-4",
        "nvidia-cutlass-dsl",
        "nvidia-cutlass-dsl-libs-cu13",
        "quack-kernels",
        "sageattention",
        "flash_attn_3",
    )
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float32 attention of the first SAMPLE_ROWS queries, head by head."""
    q, k, v = (t[0].float().transpose(0, 1) for t in (q[:, :SAMPLE_ROWS], k, v))  # (H, L, d)
    rows = []
    for h in range(q.shape[0]):
        scores = (q[h] @ k[h].T) / math.sqrt(q.shape[-1])
        rows.append(scores.softmax(-1) @ v[h])
    return torch.stack(rows, 1)[None]  # (1, rows, H, d)


def measure(run: Callable, q, k, v, repeat: int, device: torch.device) -> dict:
    grads = [torch.randn_like(q)]

    def forward(_: int) -> None:
        with torch.no_grad():
            run(q, k, v)

    def backward(_: int) -> None:
        out = run(*(t.detach().requires_grad_() for t in (q, k, v)))
        out.backward(grads[0])

    fwd, peak = timed(forward, device, repeat)
    try:
        both, peak = timed(backward, device, repeat)
    except NotImplementedError:  # a forward-only kernel (sage, fa3)
        both = None
    with torch.no_grad():
        out = run(q, k, v)[:, :SAMPLE_ROWS].float()
        ref = exact(q, k, v)
        error = ((out - ref).abs().max() / ref.abs().max()).item()
    return {
        "forward_s": statistics.median(fwd),
        "forward_backward_s": None if both is None else statistics.median(both),
        "peak_gib": peak,
        "error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["1.3b", "14b"], choices=list(DIT_VARIANTS))
    parser.add_argument("--backends", nargs="+", default=["cudnn", "fa4"], choices=list(BACKENDS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = ((args.frames - 1) // 4 + 1) * (args.height // 16) * (args.width // 16)
    report = {
        **environment(device),
        "packages": package_versions(),
        "tokens": tokens,
        "results": {},
    }
    print(
        f"{report['device']}, {tokens} tokens, {str(dtype)[6:]}, torch {report['torch']}, cuDNN {report['cudnn']}",
        flush=True,
    )
    torch.manual_seed(0)
    for variant in args.variants:
        cfg = DIT_VARIANTS[variant]
        heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
        q = torch.randn(1, tokens, heads, head_dim, device=device, dtype=dtype)
        for kind, keys in (("self", tokens), ("cross", cfg.text_len)):
            k, v = (torch.randn(1, keys, heads, head_dim, device=device, dtype=dtype) for _ in range(2))
            flops = 4 * tokens * keys * heads * head_dim
            for name in args.backends:
                try:
                    result = measure(BACKENDS[name](), q, k, v, args.repeat, device)
                except Exception as error:  # noqa: BLE001 — a backend that is missing or refuses the shape
                    result = {"failed": f"{type(error).__name__}: {error}"[:300]}
                    print(f"{variant:6s} {kind:6s} {name:6s} failed: {result['failed']}", flush=True)
                    report["results"][f"{variant} {kind} {name}"] = result
                    continue
                fwd_tflops = flops / result["forward_s"] / 1e12
                both = result["forward_backward_s"]
                bwd_s = None if both is None else both - result["forward_s"]
                bwd_tflops = None if bwd_s is None else 2.5 * flops / bwd_s / 1e12
                result |= {
                    "variant": variant,
                    "kind": kind,
                    "backend": name,
                    "keys": keys,
                    "heads": heads,
                    "forward_tflops": fwd_tflops,
                    "backward_s": bwd_s,
                    "backward_tflops": bwd_tflops,
                    "forward_mfu": fwd_tflops / PEAK_TFLOPS,
                }
                report["results"][f"{variant} {kind} {name}"] = result
                fwd_ms = result["forward_s"] * 1e3
                line = f"fwd {fwd_ms:8.2f} ms {fwd_tflops:5.0f} TFLOP/s  " + (
                    "no backward" if bwd_s is None else f"bwd {bwd_s * 1e3:8.2f} ms {bwd_tflops:5.0f} TFLOP/s"
                )
                print(f"{variant:6s} {kind:6s} {name:6s} {line}  err {result['error']:.2e}", flush=True)
            del k, v
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    else:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
