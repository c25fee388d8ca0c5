"""The RGBA decode's convolutions: their throughput shape by shape, and the quality of FP8 convolutions.

    python benchmarks/vae_convs.py --out convs.json               # both parts at 81×480×832 on the GPU
    python benchmarks/vae_convs.py --device cpu --frames 5 --height 32 --width 32 --parts fp8

--parts shapes: every convolution call of one decoder's decode, collected on a meta-device decode (the decoder's own
modules and shapes: calls per decode by shape; the ×2 upsamplings' convolutions in the GPU decode's phase form unless
--upsampling upsampled), each shape timed alone (bf16 channels-last, no bias: the decode adds
it in its own pass; cuDNN's autotuning on; the median of --repeat calls, `common.timed`), with its TFLOP/s and its
share of the decoder's convolution time. Which shapes hold the decode's convolution time, and how far from the peak.

--parts fp8: whether FP8 convolutions could keep the decode's quality gate (PSNR ≥ 45 dB against fp32, issue #29),
emulated without an FP8 convolution kernel (PyTorch has none): each chosen convolution's input and weight rounded to
float8_e4m3fn with a scale, the convolution then computed in float32 on the dequantised values (an FP8 GEMM's
products are exact and its sums float32), its output in bf16 as the bf16 decode's. Weights per output channel;
activations per tensor, per input channel (the scales folded into the weight, which an implicit-GEMM kernel allows),
or per pixel (not foldable in a convolution, whose sums mix pixels: the best case). Layer sets: all, full resolution
only, the rest only. The model and latent are benchmarks/vae.py's (the reference's synthetic weights when found, a
random video encoded in fp32); PSNR of the clamped RGB and alpha against the fp32 decode.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vae as vae_bench  # noqa: E402
from common import PEAK_TFLOPS, environment, timed  # noqa: E402
from wanalpha import fp8  # noqa: E402
from wanalpha.models import vae as vae_module  # noqa: E402
from wanalpha.models.rgba import RGBAlphaVAE  # noqa: E402
from wanalpha.models.vae import VAEConfig  # noqa: E402

SCALINGS = ("tensor", "channel", "pixel")
LAYERS = ("all", "full", "rest")


def convolution_calls(frames: int, height: int, width: int, upsampling: str = "phases") -> Counter:
    """(kind, weight shape, input shape, stride, padding) → calls, for one decoder's decode at this size (meta
    tensors: no computation). upsampling "phases": each ×2 upsampling's 3 × 3 convolution as the GPU decode runs it
    (`vae.phase_convolved`: a 2 × 2 convolution with 4·Cout outputs of the frames before the upsampling, padding 1),
    which the meta device does not take; "upsampled": upstream's 3 × 3 convolution of the upsampled frames."""
    calls: Counter = Counter()
    original = vae_module._convolved

    def record(conv, x, residual=None):
        kind = "conv3d" if x.dim() == 5 else "conv2d"
        weight, shape, padding = tuple(conv.weight.shape), tuple(x.shape), tuple(conv.padding)
        if conv in phased:
            weight = (4 * weight[0], weight[1], 2, 2)
            shape, padding = (*shape[:2], shape[2] // 2, shape[3] // 2), (1, 1)
        calls[(kind, weight, shape, tuple(conv.stride), padding)] += 1
        return original(conv, x, residual)

    with torch.device("meta"):
        model = RGBAlphaVAE(VAEConfig(), with_encoder=False)
    phased = set(vae_module.upsampling_convolutions(model.rgb_decoder)) if upsampling == "phases" else set()
    z = torch.empty(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="meta")
    vae_module._convolved = record
    try:
        with torch.no_grad():
            model.rgb_decoder.decode(z)
    finally:
        vae_module._convolved = original
    return calls


def shapes(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each convolution shape of one decoder's decode timed alone; rows sorted by their share of the time."""
    torch.backends.cudnn.benchmark = True
    rows = []
    for (kind, weight_shape, input_shape, stride, padding), count in convolution_calls(
        args.frames, args.height, args.width, args.upsampling
    ).items():
        layout = torch.channels_last_3d if kind == "conv3d" else torch.channels_last
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = torch.randn(input_shape, device=device, dtype=dtype).contiguous(memory_format=layout)
        w = (torch.randn(weight_shape, device=device, dtype=dtype) * 0.02).contiguous(memory_format=layout)
        conv = F.conv3d if kind == "conv3d" else F.conv2d
        out = conv(x, w, None, stride, padding)
        flop = 2 * out.numel() * weight_shape[1] * torch.Size(weight_shape[2:]).numel()
        call = functools.partial(conv, x, w, None, stride, padding)
        times, _ = timed(lambda _, call=call: call(), device, args.repeat)
        seconds = statistics.median(times)
        rows.append(
            {
                "kind": kind,
                "weight": list(weight_shape),
                "input": list(input_shape),
                "calls": count,
                "ms": seconds * 1e3,
                "tflops": flop / seconds / 1e12,
                "mfu": flop / seconds / 1e12 / PEAK_TFLOPS,
                "ms_per_decode": seconds * 1e3 * count,
            }
        )
        del x, w, out, call
    total = sum(r["ms_per_decode"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_decode"] / total
    return sorted(rows, key=lambda r: -r["ms_per_decode"])


def _rows_quantised(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float8_e4m3fn with one scale per index of its dims other than 1 (FP8Linear's per-token
    quantisation, fp8.quantize_rows_eager: for an activation, per pixel over its channels), dequantised to float32."""
    q, scale = fp8.quantize_rows_eager(x)
    return q.float() * scale


def _weight_quantised(w: torch.Tensor) -> torch.Tensor:
    """A convolution's weight rounded per output channel as the FP8 DiT's (fp8.quantize_weight), dequantised."""
    q, scale = fp8.quantize_weight(w.flatten(1))
    return (q.float() * scale[:, None]).view_as(w)


def fp8_convolved(scaling: str, layers: str, width: int):
    """A vae._convolved that emulates an FP8 convolution for the chosen layers (`layers`: all, full — inputs
    `width` wide — or rest) with `scaling` for the activations (tensor, channel, pixel); the others as they are."""
    original = vae_module._convolved

    def convolved(conv, x, residual=None):
        full = x.shape[-1] == width
        if (layers == "full" and not full) or (layers == "rest" and full):
            return original(conv, x, residual)
        xs, w = x, conv.weight.float()
        channel_shape = (1, -1) + (1,) * (x.dim() - 2)
        if scaling == "channel":  # x / c and w · c per input channel, then per tensor / per output channel
            c = x.abs().amax(dim=(0, *range(2, x.dim()))).float().clamp_min(torch.finfo(torch.float32).tiny)
            xs = x.float() / c.view(channel_shape)
            w = w * c.view(channel_shape)
        xq = _rows_quantised(xs) if scaling == "pixel" else _rows_quantised(xs.reshape(1, -1)).view(x.shape)
        wq = _weight_quantised(w)
        bias = None if conv.bias is None else conv.bias.float()
        y = conv._conv_forward(xq, wq, bias).to(x.dtype)
        return y if residual is None else y + residual

    return convolved


def fp8_quality(args: argparse.Namespace, device: torch.device) -> dict:
    """PSNR against the fp32 decode: the bf16 decode, then each (scaling, layers) with FP8 convolutions emulated."""
    torch.backends.cuda.matmul.allow_tf32 = False  # the emulation's float32 convolutions: true float32
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    shape = (1, 3, args.frames, args.height, args.width)
    rgb = torch.rand(shape, generator=generator) * 2 - 1
    alpha = torch.rand((1, 1, *shape[2:]), generator=generator) * 2 - 1
    reference = vae_bench._model(args, device, torch.float32, {"cl"})
    with torch.no_grad():
        z = reference.encode(rgb.to(device), alpha.to(device))
        exact = [o.float().cpu() for o in reference.decode(z)]
    del reference
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = vae_bench._model(args, device, dtype, {"cl"})
    results = {}
    cases = [("none", "none")] + [(s, layers) for s in args.scalings for layers in args.layers]
    original = vae_module._convolved
    for scaling, layers in cases:
        if scaling != "none":
            vae_module._convolved = fp8_convolved(scaling, layers, args.width)
        try:
            with torch.no_grad():
                out = [o.float().cpu() for o in model.decode(z.to(dtype))]
        finally:
            vae_module._convolved = original
        psnr = {"rgb": vae_bench._psnr(out[0], exact[0]), "alpha": vae_bench._psnr(out[1], exact[1])}
        results[f"{scaling}/{layers}"] = psnr
        label = f"{dtype} convolutions".replace("torch.", "") if scaling == "none" else f"FP8 {scaling:7s} {layers:4s}"
        print(f"{label:24s} PSNR rgb {psnr['rgb']:6.2f} dB, alpha {psnr['alpha']:6.2f} dB", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    vae_bench.clip_arguments(parser)
    parser.add_argument("--repeat", type=int, default=20, help="timed calls per shape")
    parser.add_argument("--parts", nargs="+", choices=("shapes", "fp8"), default=["shapes", "fp8"])
    parser.add_argument("--scalings", nargs="+", choices=SCALINGS, default=list(SCALINGS))
    parser.add_argument("--layers", nargs="+", choices=LAYERS, default=list(LAYERS))
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the decode in bf16 (the default on a GPU; float32 elsewhere, where bf16 convolutions may be very slow)",
    )
    parser.add_argument(
        "--upsampling",
        choices=("phases", "upsampled"),
        default="phases",
        help="--parts shapes: the ×2 upsamplings' convolutions as the GPU decode runs them (phases: a 2 × 2 "
        "convolution of the frames before the upsampling, vae.phase_convolved) or as upstream (upsampled)",
    )
    vae_bench.autotuning_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    device = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = device.type == "cuda"
    report = {
        **environment(device),
        "size": f"{args.frames}x{args.height}x{args.width}",
        "cudnn_benchmark_limit": args.cudnn_benchmark_limit,
        "upsampling": args.upsampling,
    }
    if "shapes" in args.parts:
        rows = report["shapes"] = shapes(args, device)
        print(f"{report['device']}, {report['size']}: one decoder's convolutions, shape by shape")
        for r in rows:
            print(
                f"{r['kind']} w{r['weight']} x{r['input']}: {r['calls']:4d} calls x {r['ms']:.3f} ms = "
                f"{r['ms_per_decode']:7.1f} ms ({r['share']:.0%}), {r['tflops']:.0f} TFLOP/s ({r['mfu']:.0%})",
                flush=True,
            )
        print(f"one decoder's convolutions, timed alone: {sum(r['ms_per_decode'] for r in rows):.0f} ms")
    if "fp8" in args.parts:
        report["fp8_psnr_db"] = fp8_quality(args, device)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
