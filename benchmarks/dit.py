"""DiT forward benchmark: the 1.3B and 14B Wan2.1 DiTs in bf16 with random weights, one forward at 81×480×832.

    python benchmarks/dit.py                                  # both variants on the GPU
    python benchmarks/dit.py --variants tiny --frames 5 --height 64 --width 64 --device cpu
    python benchmarks/dit.py --modes float64:default float32:default float32:cudnn   # the lever table

A mode is ROPE:ATTENTION[:compile][:unfused]: RoPE math in float64 (upstream) or float32 (WanDiT.rope_precision), the
attention kernels (default = SDPA, PyTorch's choice; cudnn, flash, efficient force one; fa4 = FlashAttention-4, fa3 =
FlashAttention-3, fa3-fp8 = its FP8 forward, each for self-attention through runtime.set_attention_kernel,
cross-attention on SDPA's choice), and optionally torch.compile
of the blocks (runtime.compile_blocks, generate --compile; put such modes last: the DiT stays compiled); unfused = the
eager element-wise work in PyTorch's kernels rather than the fused Triton ones (runtime.set_fused_kernels). The
compile time is reported separately (the warm-up forward's time minus a timed forward). TFLOP/s and MFU use the FLOP
model of benchmarks/common.py (matmuls and attention) against 790 TFLOP/s dense bf16. `error` is each mode's output
against the first mode's (‖y − y₀‖ / ‖y₀‖, same inputs and weights): list the reference mode first.

Latent (1,16,21,60,104) → 32,760 tokens; context 512 rows. Median of --repeat forwards after one warm-up,
CUDA-synchronised; peak = torch.cuda.max_memory_allocated (weights included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import PEAK_TFLOPS, environment, forward_flops, fresh_compile, timed  # noqa: E402
from wanalpha.models import fa4  # noqa: E402
from wanalpha.models.dit import DIT_VARIANTS, WanDiT  # noqa: E402
from wanalpha.runtime import compile_blocks, set_attention_kernel, set_fused_kernels  # noqa: E402

BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}
# Self-attention kernels of runtime.set_attention_kernel other than SDPA's (cross-attention: SDPA's choice).
KERNELS = tuple(k for k in fa4.KERNELS if k not in ("auto", "sdpa"))


def backend(name: str):
    """SDPA's kernel forced for `name` in BACKENDS; "default" (and "fa4", whose self-attention is not SDPA's):
    PyTorch's own choice."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, BACKENDS[name])) if name in BACKENDS else contextlib.nullcontext()


def build(
    variant: str, device: torch.device, dtype: torch.dtype, fp8: bool = False, layers: int | None = None
) -> WanDiT:
    """A DiT with random weights; `fp8`: its block linears then quantised in place (`--dit-dtype fp8`); `layers`:
    only that many blocks (the variant's shapes, fewer of them)."""
    config = DIT_VARIANTS[variant]
    with torch.device("meta"):
        dit = WanDiT(config if layers is None else dataclasses.replace(config, num_layers=layers))
    dit = dit.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for param in dit.parameters():  # random weights of a sensible scale (values do not change the work)
            param.normal_(0, 0.02 if param.ndim > 1 else 0.01)
    if fp8:
        from wanalpha.fp8 import quantize_dit_

        quantize_dit_(dit)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the bf16 weights' blocks
    return dit.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["1.3b", "14b"], choices=list(DIT_VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["float64:default"], help="ROPE:ATTENTION pairs (see above)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    report = {
        **environment(device),
        "latent": list(shape),
        "tokens": shape[2] * shape[3] * shape[4] // 4,
        "results": {},
    }
    print(f"{report['device']}, latent {shape} = {report['tokens']} tokens, bf16, torch {report['torch']}")
    print(
        f"{'variant':10s}{'mode':26s}{'params (B)':>11s}{'forward s':>11s}{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>9s}"
        f"{'warm-up s':>10s}{'error':>10s}"
    )
    for variant in args.variants:
        report["results"] |= measure(variant, args, shape, report["tokens"], device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def measure(variant: str, args, shape: tuple[int, ...], tokens: int, device: torch.device, dtype) -> dict:
    """Every mode of one variant: {"VARIANT MODE": result}."""
    dit = build(variant, device, dtype)
    dit_config = dit.config
    x = torch.randn(shape, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, dit_config.text_len, dit_config.text_dim, device=device, dtype=dtype)
    flops = forward_flops(dit_config, tokens, dit_config.text_len)
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    results = {}
    is_compiled = False
    first = None
    for mode in args.modes:
        rope, attention, *flags = mode.split(":")
        if attention not in ("default", *KERNELS, *BACKENDS):
            raise SystemExit(f"mode {mode}: ATTENTION is default, {', '.join(KERNELS)} or one of {', '.join(BACKENDS)}")
        if set(flags) - {"compile", "unfused"}:
            raise SystemExit(f"mode {mode}: the flags after ATTENTION are compile and unfused")
        compiled = "compile" in flags
        fused = "unfused" not in flags
        set_fused_kernels(dit, fused)
        dit.rope_precision = rope
        set_attention_kernel(dit, attention if attention in KERNELS else "sdpa", device, torch.bfloat16, backward=False)
        if is_compiled and not compiled:  # compiled blocks stay compiled
            raise SystemExit(f"mode {mode}: list the :compile modes after the eager ones")
        if compiled and not is_compiled:
            compile_blocks(dit)
            is_compiled = True
        if is_compiled:  # a graph compiled under one attention backend must not serve another mode
            fresh_compile(attention)

        def forward(_: int, attention: str = attention) -> None:
            with torch.no_grad(), backend(attention):
                dit(x, t, context)

        start = time.perf_counter()
        times, peak = timed(forward, device, args.repeat)
        median = statistics.median(times)
        warm_up = time.perf_counter() - start - sum(times)
        tflops = flops / median / 1e12
        with torch.no_grad(), backend(attention):
            y = dit(x, t, context).float()
        first = y if first is None else first
        error = ((y - first).norm() / first.norm()).item()
        results[f"{variant} {mode}"] = {
            "variant": variant,
            "rope": rope,
            "attention": attention,
            "params_b": params,
            "forward_s": median,
            "times_s": times,
            "tflops": tflops,
            "mfu": tflops / PEAK_TFLOPS,
            "peak_gib": peak,
            "compiled": is_compiled,
            "fused_kernels": fused,
            "warm_up_s": warm_up,
            "error": error,
        }
        print(
            f"{variant:10s}{mode:26s}{params:11.2f}{median:11.3f}{tflops:9.0f}{tflops / PEAK_TFLOPS:7.1%}"
            f"{peak:9.1f}{warm_up:10.1f}{error:10.2e}",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
