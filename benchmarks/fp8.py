"""FP8 block linears (wanalpha.fp8, issue #29): one linear at the 14B DiT's shapes, then whole DiT forwards, bf16
against FP8 weights, with the errors beside the times.

    python benchmarks/fp8.py                                   # linears at 81×480×832's 32,760 tokens, 1.3B and 14B
    python benchmarks/fp8.py --variants 14b --skip-linears     # the DiT forwards only
    python benchmarks/fp8.py --variants tiny --tokens 64 --frames 5 --height 64 --width 64 --device cpu   # smoke

Linears (random bf16 weights N(0, 0.02), inputs N(0, 1), error = ‖y − y_fp32‖ / ‖y_fp32‖ against the float32 product
of the same bf16 values): bf16 F.linear; FP8 with the per-token activation quantisation fused (one Triton pass,
wanalpha.models.kernels.fp8_quantize_rows, the FP8Linear default on Hopper); FP8 with that quantisation in eager
PyTorch (the first GPU look's form); FP8 weight-only (dequantise, then the bf16 GEMM: the path off Hopper and under
autograd); and the FP8 GEMM's other settings (wanalpha.fp8.GEMM; the default adds the bias in the GEMM's epilogue
and takes Hopper's fast accumulation): the bias added by a second pass with full accumulation (the first form), and
the bias in the epilogue with full accumulation. The fused quantisation is also compared with the eager one bit for bit.

DiT forwards (random weights as benchmarks/dit.py, SDPA's choice of attention, fused Triton kernels, float32 RoPE):
bf16, then the same model with its block linears quantised in place (wanalpha.fp8.quantize_dit_): the forward time
(median of --repeat after one warm-up), the weights' GiB, the peak GiB of a forward, and the FP8 output's relative
error against the bf16 output (random weights: a pessimistic case; the real weights' quality gate is the demo's);
with --gemm-settings also the FP8 model under each GEMM setting; with --shared-inputs also the FP8 model with every
linear quantising its own input (before a self-attention's q, k and v shared one quantisation of it:
FP8Linear.shared_input). --attention picks the self-attention kernel (default: SDPA's choice):

    python benchmarks/fp8.py --variants 14b --skip-linears --shared-inputs --attention fa3-fp8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import environment, timed  # noqa: E402
from dit import build  # noqa: E402
from wanalpha import fp8  # noqa: E402
from wanalpha.models.dit import DIT_VARIANTS  # noqa: E402
from wanalpha.runtime import set_attention_kernel, set_fused_kernels  # noqa: E402

SHAPES_14B = {"q, k, v, o": (5120, 5120), "ffn.0": (13824, 5120), "ffn.2": (5120, 13824)}


# FP8Linear's GEMM settings (fp8.GEMM), tried beside its default (the last one)
GEMM_SETTINGS = {
    "separate bias": {"bias_in_gemm": False, "fast_accum": False},
    "bias in GEMM": {"bias_in_gemm": True, "fast_accum": False},
}


@contextlib.contextmanager
def gemm_setting(setting: dict):
    """fp8.GEMM set to `setting` inside the block, restored after it."""
    saved = dict(fp8.GEMM)
    fp8.GEMM.update(setting)
    try:
        yield
    finally:
        fp8.GEMM.update(saved)


@contextlib.contextmanager
def per_layer_inputs():
    """Every FP8 linear quantises its own input inside the block (the forms before the shared ones)."""
    saved = fp8.FP8Linear.shared_input
    fp8.FP8Linear.shared_input = staticmethod(lambda layers, x: None)
    try:
        yield
    finally:
        fp8.FP8Linear.shared_input = staticmethod(saved)


def with_gemm(setting: dict, layer, x: torch.Tensor) -> torch.Tensor:
    with gemm_setting(setting):
        return layer(x)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def one_linear(name: str, out_features: int, in_features: int, args, device, gen: torch.Generator) -> dict:
    linear = torch.nn.Linear(in_features, out_features, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=gen)
        linear.bias.normal_(0, 0.01, generator=gen)
    x = torch.randn(args.tokens, in_features, device=device, dtype=torch.bfloat16, generator=gen)
    ref = x.float() @ linear.weight.float().t() + linear.bias.float()
    layer = fp8.FP8Linear.from_linear(linear)
    weight_only = fp8.FP8Linear.from_linear(linear)
    weight_only.fp8_compute = False
    modes = {"bf16": lambda: F.linear(x, linear.weight, linear.bias), "fp8 weight-only": lambda: weight_only(x)}
    row = {"out": out_features, "in": in_features, "tokens": args.tokens}
    hopper = fp8.scaled_mm_supported(device)
    if hopper:
        modes["fp8 default"] = lambda: layer(x)
        modes["fp8 eager quantisation"] = lambda: fp8._scaled_mm_linear(
            x, layer.weight_fp8, layer.weight_scale, layer.bias, torch.bfloat16, quantize=fp8.quantize_rows_eager
        )
        for label, setting in GEMM_SETTINGS.items():
            modes[f"fp8 {label}"] = lambda setting=setting: with_gemm(setting, layer, x)
        q_fused, s_fused = fp8.quantize_rows(x)
        q_eager, scale = fp8.quantize_rows_eager(x)
        row["quantisation_bits_equal"] = bool(
            torch.equal(q_fused.view(torch.uint8), q_eager.view(torch.uint8)) and torch.equal(s_fused, scale)
        )
    for mode, run in modes.items():
        with torch.no_grad():
            times, _ = timed(lambda _, run=run: run(), device, args.repeat)
            err = rel_err(run(), ref)
        ms = statistics.median(times) * 1e3
        row[mode] = {"ms": ms, "error": err}
        print(f"{name:12s}{mode:26s}{ms:9.3f}{err:11.2e}", flush=True)
    if hopper:
        print(f"{name:12s}fused quantisation equals the eager one bit for bit: {row['quantisation_bits_equal']}")
    return row


def linears(args, device: torch.device, shapes: dict[str, tuple[int, int]]) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    print(f"{'linear':12s}{'mode':26s}{'ms':>9s}{'error':>11s}", flush=True)
    return {name: one_linear(name, *shape, args, device, gen) for name, shape in shapes.items()}


def one_variant(variant: str, args, device: torch.device) -> dict:
    latent = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    torch.manual_seed(0)
    dit = build(variant, device, torch.bfloat16)
    set_fused_kernels(dit, True)
    dit.rope_precision = "float32"
    set_attention_kernel(dit, args.attention, device, torch.bfloat16, backward=False)
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(latent, device=device, dtype=torch.bfloat16, generator=gen)
    t = torch.tensor([500], device=device)
    context = torch.randn(1, dit.config.text_len, dit.config.text_dim, device=device, dtype=torch.bfloat16)

    def forward(_: int) -> torch.Tensor:
        with torch.no_grad():
            return dit(x, t, context)

    results, reference = {}, None
    default = dict(fp8.GEMM)
    settings = {"fp8": default} | ({f"fp8 {k}": v for k, v in GEMM_SETTINGS.items()} if args.gemm_settings else {})
    if args.shared_inputs:
        settings["fp8 per-layer quantisation"] = default
    for weights in ("bf16", *settings):
        extra = {}
        if weights == "fp8":
            extra["linears_quantised"] = fp8.quantize_dit_(dit)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        weights_gib = sum(t.numel() * t.element_size() for t in [*dit.parameters(), *dit.buffers()]) / 2**30
        forms = per_layer_inputs() if weights == "fp8 per-layer quantisation" else contextlib.nullcontext()
        with gemm_setting(settings.get(weights, default)), forms:
            times, peak = timed(forward, device, args.repeat)
            y = forward(0).float()
            gemm = dict(fp8.GEMM) if weights != "bf16" else None
        err = 0.0 if reference is None else rel_err(y, reference)
        reference = y if reference is None else reference
        median = statistics.median(times)
        results[f"{variant} {weights}"] = {
            "variant": variant,
            "weights": weights,
            "gemm": gemm,
            "attention": args.attention,
            "forward_s": median,
            "times_s": times,
            "weights_gib": weights_gib,
            "peak_gib": peak,
            "error_vs_bf16": err,
            **extra,
        }
        print(f"{variant:10s}{weights:32s}{median:11.3f}{weights_gib:13.2f}{peak:10.2f}{err:11.2e}", flush=True)
    return results


def forwards(args, device: torch.device) -> dict:
    print(f"{'variant':10s}{'weights':32s}{'forward s':>11s}{'weights GiB':>13s}{'peak GiB':>10s}{'error':>11s}")
    results = {}
    for variant in args.variants:
        results |= one_variant(variant, args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["1.3b", "14b"], choices=list(DIT_VARIANTS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32760, help="linears: rows of the input (81×480×832: 32,760)")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-linears", action="store_true")
    parser.add_argument("--skip-forwards", action="store_true")
    parser.add_argument(
        "--gemm-settings", action="store_true", help="forwards: also the FP8 GEMM's other settings (GEMM_SETTINGS)"
    )
    parser.add_argument(
        "--shared-inputs", action="store_true", help="forwards: also the FP8 model with per-layer input quantisation"
    )
    parser.add_argument("--attention", default="sdpa", help="forwards' self-attention kernel (runtime's choices)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = environment(device)
    print(f"{where['device']}, torch {where['torch']}, {where['date']}", flush=True)
    shapes = SHAPES_14B
    if args.variants == ["tiny"]:  # a smoke run: the tiny DiT's own widths
        config = DIT_VARIANTS["tiny"]
        shapes = {"q, k, v, o": (config.dim, config.dim), "ffn.0": (config.ffn_dim, config.dim)}
    record = {**where, "args": vars(args)}
    if not args.skip_linears:
        record["linears"] = linears(args, device, shapes)
    if not args.skip_forwards:
        record["forwards"] = forwards(args, device)
    if args.out is not None:
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
