"""VAE benchmark and low-precision parity: the RGB-alpha VAE's encode (RGB + alpha) and decode (both decoders).

    python benchmarks/vae.py --reference ../shared/reference                   # 81×480×832 on the GPU
    python benchmarks/vae.py --device cpu --frames 9 --height 64 --width 64   # a quick smoke run
    python benchmarks/vae.py --skip-parity --profile --modes fp32 bf16+cl+previous bf16+cl
    python benchmarks/vae.py --skip-parity --decode-only --modes fp32 bf16+cl bf16+cl+dual   # separate vs dual
    python benchmarks/vae.py --skip-parity --decode-only --profile --modes fp32 bf16+cl+pytorch bf16+cl  # the bias pass
    python benchmarks/vae.py --skip-parity --decode-only --modes fp32 bf16+cl+serial bf16+cl   # one stream or two
    python benchmarks/vae.py --skip-parity --decode-only --profile --modes fp32 bf16+cl+upsampled bf16+cl  # phases
    python benchmarks/vae.py --skip-parity --decode-only --profile --modes fp32 bf16+cl bf16+cl+fewhead  # heads

Parity: the golden fixtures of reference/golden (fp32 official outputs) recomputed here in fp32, under bf16 autocast
and with bf16 weights; err = max|a-b| / max|golden| (reference NOTES §9). Timing: synthetic weights (values do not
change the work), one warm-up pass per mode, then the median of --repeat passes, CUDA-synchronised; peak memory is
torch.cuda.max_memory_allocated over a pass; TFLOP/s and MFU from the FLOP model in `flops` (convolutions and
attention matmuls, counted on a meta-device model) against common.PEAK_TFLOPS; --profile adds the CUDA kernel time
by kind of one more encode and decode (common.kernel_profile). Prints a row per mode as it finishes and writes
JSON to --out.

Decode runs the decoders as `RGBAlphaVAE.decode` does by default (on a GPU side by side on two CUDA streams); the
`+serial` lever runs them one after the other on one stream, the `+dual` lever as one batch of two (`decode(dual=True)`,
vae.DecoderPair), so `--modes fp32 bf16+cl+serial bf16+cl bf16+cl+dual` gives the three rows with their PSNR against
fp32 and their peak memory (`--decode-only` skips timing the encodes).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PEAK_TFLOPS, environment, kernel_profile  # noqa: E402
from wanalpha import metrics  # noqa: E402
from wanalpha.checkpoints.vae import load_rgba_vae  # noqa: E402
from wanalpha.models import kernels  # noqa: E402
from wanalpha.models.rgba import RGBAlphaVAE  # noqa: E402
from wanalpha.models.vae import CausalConv3d, ResidualBlock, VAEConfig  # noqa: E402
from wanalpha.runtime import set_channels_last  # noqa: E402

MODES = {  # name: (weight dtype, autocast dtype or None)
    "fp32": (torch.float32, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, None),
}


def _weights_module(reference: Path):
    spec = importlib.util.spec_from_file_location("reference_weights", reference / "weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float()).abs().max() / b.float().abs().max())


def parity(reference: Path, device: torch.device) -> dict:
    """Golden encode / decode / dual decode in every mode."""
    from safetensors.torch import load_file

    w = _weights_module(reference)
    base = w.make_state_dict(w.load_shapes_json(reference / "keys_wan21_vae.json"), 1234)
    vae_gold = load_file(reference / "golden/vae.safetensors")
    dual_gold = load_file(reference / "golden/vae_dual_decode.safetensors")
    results = {}
    for mode, (weight_dtype, amp) in MODES.items():
        model = load_rgba_vae(base, reference / "golden/decoder_synthetic.bin", device=device, dtype=weight_dtype)
        with torch.no_grad(), _autocast(device, amp):
            video = vae_gold["video"].to(device, weight_dtype)
            latent = vae_gold["latent_in"].to(device, weight_dtype)
            z = model.encoder.encode(video)
            rgb3, alpha3 = model.decode(latent, raw=True)
            rgb, alpha = model.decode(latent)
        results[mode] = {
            "encode_latent": _rel(z, vae_gold["latent_mean_normalized"]),
            "decode_rgb_unclamped": _rel(rgb3, dual_gold["fgr_unclamped"]),
            "decode_alpha_unclamped": _rel(alpha3, dual_gold["pha_unclamped"]),
            "decode_rgb": _rel(rgb[0], dual_gold["fgr"]),
            "decode_alpha": _rel(alpha[0], dual_gold["pha"].mean(0, keepdim=True)),
        }
        del model
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two clamped videos in [-1, 1] (peak-to-peak 2)."""
    return metrics._psnr(float((a.float() - b.float()).square().mean()), peak=2.0)


def _model(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype, levers: set[str]):
    """The full-size RGB-alpha VAE: the reference's synthetic weights when --reference has them (so outputs are
    image-like and the PSNR means something), else random ones; with the mode's levers switched on."""
    torch.manual_seed(0)
    decoder = args.reference / "golden/decoder_synthetic.bin"
    if decoder.is_file():
        w = _weights_module(args.reference)
        base = w.make_state_dict(w.load_shapes_json(args.reference / "keys_wan21_vae.json"), 1234)
        model = load_rgba_vae(base, decoder, device=device, dtype=weight_dtype)
    else:
        model = RGBAlphaVAE(VAEConfig()).to(device=device, dtype=weight_dtype)
    if "cl" in levers:
        set_channels_last(model)
    if "previous" in levers:
        previous_forms(model)
    if "pytorch" in levers:
        pytorch_forms(model)
    if "upsampled" in levers:
        upsampled_forms(model)
    if "fewhead" in levers or "nofewhead" in levers:  # the decoders' heads by kernels.conv3_few_outputs (the
        for decoder in (model.rgb_decoder, model.alpha_decoder):  # default) or cuDNN; not the merge block's head
            for conv in decoder.modules():
                if isinstance(conv, CausalConv3d) and conv.has_few_outputs_shape():
                    conv.few_outputs_kernel = "fewhead" in levers
    if "sum" in levers or "nosum" in levers:  # residual blocks' sums left to the norm after them, or not
        for block in model.modules():  # (vae.ResidualBlock.sum_in_norm)
            if isinstance(block, ResidualBlock):
                block.sum_in_norm = "sum" in levers
    if "rooms" in levers or "norooms" in levers:  # the causal frames' rooms for every layer, or none (default: auto)
        model.rgb_decoder.decode_rooms = model.alpha_decoder.decode_rooms = 0 if "norooms" in levers else 1 << 62
    for lever in levers:
        if lever.startswith("chunk"):  # +chunkN: N latent frames a decode chunk after the first (WanVAE.decode_chunk)
            model.rgb_decoder.decode_chunk = model.alpha_decoder.decode_chunk = int(lever[5:])
    return model.eval()


# the levers a mode may name (and chunkN)
LEVERS = (
    "cl",
    "previous",
    "pytorch",
    "upsampled",
    "dual",
    "serial",
    "fewhead",
    "nofewhead",
    "rooms",
    "norooms",
    "sum",
    "nosum",
)


def mode_problem(mode: str) -> str | None:
    """What is wrong with a --modes entry (MODE[+LEVER]...), or None."""
    base, *levers = mode.split("+")
    if base not in MODES:
        return f"unknown mode {base!r}: choose one of {', '.join(MODES)}"
    for lever in levers:
        chunk = lever.removeprefix("chunk")
        if lever not in LEVERS and not (chunk != lever and chunk.isdigit() and int(chunk) >= 1):
            return f"unknown lever {lever!r}: choose from {', '.join(LEVERS)}, or chunkN with N ≥ 1"
    for lever in ("fewhead", "rooms", "sum"):
        if lever in levers and "no" + lever in levers:
            return f"+{lever} and +no{lever} together: choose one"
    return None


def dual_decoders(levers: set[str]) -> bool:
    """The `+dual` lever: decode(dual=True), both decoders as one batch of two (never with `+previous`)."""
    return "dual" in levers and "previous" not in levers


def previous_forms(model: torch.nn.Module) -> None:
    """The `+previous` lever, for before/after rows in one run: each causal convolution pads all three dimensions with
    F.pad (a copy of its whole input, as upstream) instead of letting cuDNN pad H and W, and each RMS norm is
    F.normalize × √C × gamma, then its own SiLU kernel, whatever the layout (no fused kernel for channels-last
    activations), and the temporal upsampling stacks its frames into a contiguous tensor; the decoders run one after
    the other. Instance patches."""
    import torch.nn.functional as F

    from wanalpha.models.vae import CausalConv3d, Resample, RMSNorm, _keep_last

    def conv_forward(self, x, cache=None, residual=None):
        pads = [self.padding[2], self.padding[2], self.padding[1], self.padding[1], self.front, 0]
        if cache is not None and self.front > 0:
            prev = cache.get(self)
            cache.set(self, _keep_last(prev, x))
            if prev is not None:
                x = torch.cat([prev.to(x.dtype), x], dim=2)
                pads[4] -= prev.shape[2]
        y = F.conv3d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return y if residual is None else y + residual

    def norm_forward(self, x):
        y = F.normalize(x, dim=1) * self.scale * self.gamma
        return F.silu(y) if self.silu else y  # a separate SiLU kernel, as before channels_last fused it

    def interleave(y):  # the stacked form: a contiguous result whatever the input's layout
        b, c2, t, h, w = y.shape
        y = y.reshape(b, 2, c2 // 2, t, h, w)
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c2 // 2, t * 2, h, w)

    for module in model.modules():
        if isinstance(module, Resample):
            module._interleave = interleave
        if isinstance(module, CausalConv3d):
            module.forward = conv_forward.__get__(module)
        elif isinstance(module, RMSNorm):
            module.forward = norm_forward.__get__(module)


def pytorch_forms(model: torch.nn.Module) -> None:
    """The `+pytorch` lever, for before/after rows of the fifteenth and sixteenth sessions' decode levers in one run:
    every convolution adds its bias inside PyTorch's operator (after cuDNN's convolution, by PyTorch's strided
    broadcast add) instead of vae._convolved's pass, a residual block's sum is PyTorch's add after it, a causal
    convolution's cached frames are concatenated in front of its input (no norm writes behind them: vae._run leaves
    instance-patched layers as they are), and the nearest-exact upsampling goes through float32 and back (upstream's
    casts). The same values either way. Instance patches."""
    from wanalpha.models.vae import CausalConv3d, Conv2d, Upsample, _causal_frames

    def conv3d_forward(self, x, cache=None, residual=None):
        y = self._conv_forward(_causal_frames(self, self.front, x, cache), self.weight, self.bias)
        return y if residual is None else y + residual

    def conv2d_forward(self, x):
        return self._conv_forward(x, self.weight, self.bias)

    def upsample_forward(self, x):
        return torch.nn.Upsample.forward(self, x.float()).type_as(x)

    for module in model.modules():
        if isinstance(module, CausalConv3d):
            module.forward = conv3d_forward.__get__(module)
        elif isinstance(module, Conv2d):
            module.forward = conv2d_forward.__get__(module)
        elif isinstance(module, Upsample):
            module.forward = upsample_forward.__get__(module)


def upsampled_forms(model: torch.nn.Module) -> None:
    """The `+upsampled` lever, for before/after rows of the twentieth session's decode lever in one run: each of the
    decoder's ×2 upsamplings writes the upsampled frames and convolves them with the 3×3 kernel (its bias added by the
    bias pass), instead of vae.phase_convolved's four phases of the frames themselves. Instance patches: Resample
    takes the phase form only for convolutions called plainly."""
    from wanalpha.models.vae import Conv2d, upsampling_convolutions

    for conv in upsampling_convolutions(model):
        conv.forward = Conv2d.forward.__get__(conv)


def flops(args: argparse.Namespace) -> dict[str, float]:
    """The FLOP model: every convolution and attention matmul of one encode (RGB + alpha + merge block) and one decode
    (both decoders) at this size, counted by torch.utils.flop_counter on a meta-device model (no computation;
    norms and element-wise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = RGBAlphaVAE(VAEConfig())
    rgb = torch.empty(1, 3, args.frames, args.height, args.width, device="meta")
    counts = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            z = model.encode(rgb, rgb[:, :1])
        counts["encode"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.decode(z, dual=False)  # the same convolutions as the batch of two; meta tensors have no values
        counts["decode"] = counter.get_total_flops()
    return counts


def timing(args: argparse.Namespace, device: torch.device, report: dict) -> None:
    """Each mode (`measure`) in turn. Every mode decodes the same latent (the first mode's encode), and its clamped
    RGB and alpha are compared with the first mode's (PSNR). Prints each mode's row when it is done and rewrites
    --out after it."""
    results = report["timing"] = {}
    work = report["flops"] = flops(args)
    shape = (1, 3, args.frames, args.height, args.width)
    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.rand(shape, generator=generator) * 2 - 1,
        torch.rand((1, 1, *shape[2:]), generator=generator) * 2 - 1,
    )
    z_ref = ref_out = None
    print(
        f"{report['device']}, {report['size']} (frames x height x width), torch {report['torch']}; "
        f"TFLOP/s from {work['encode'] / 1e12:.0f} TFLOP per encode, {work['decode'] / 1e12:.0f} per decode"
    )
    print(
        f"{'mode':24s}{'encode s':>9s}{'TFLOP/s':>8s}{'MFU':>7s}{'GiB':>6s}{'decode s':>9s}{'TFLOP/s':>8s}"
        f"{'MFU':>7s}{'GiB':>6s}{'PSNR rgb/alpha dB':>20s}"
    )
    for mode in args.modes:
        result, z, out = measure(args, device, mode, inputs, z_ref, work)
        if z_ref is None:
            z_ref, ref_out, ref_mode = z, out, mode
        result["encode_rel_err"] = _rel(z, z_ref)
        psnr = result[f"decode_psnr_db_vs_{ref_mode}"] = {
            "rgb": _psnr(out[0], ref_out[0]),
            "alpha": _psnr(out[1], ref_out[1]),
        }
        results[mode] = result
        print(
            f"{mode:24s}"
            + "".join(
                f"{result[f'{s}_s']:9.2f}{result[f'{s}_tflops']:8.0f}{result[f'{s}_mfu']:7.1%}{result[f'{s}_peak_gib']:6.1f}"
                if f"{s}_s" in result
                else f"{'-':>9s}{'-':>8s}{'-':>7s}{'-':>6s}"
                for s in ("encode", "decode")
            )
            + f"{psnr['rgb']:10.1f}{psnr['alpha']:10.1f}",
            flush=True,
        )
        for stage, profile in result.get("profile", {}).items():
            kinds = ", ".join(f"{k} {v['ms']:.0f} ms ({v['share']:.0%})" for k, v in profile["by_kind"].items())
            print(
                f"  {stage} kernels {profile['kernel_ms']:.0f} ms, the GPU busy {profile['busy_ms']:.0f} of "
                f"{profile['span_ms']:.0f} ms: {kinds}",
                flush=True,
            )
        for stage in ("encode", "decode"):
            if f"{stage}_s" in result:
                print(f"  {stage}: the call returned after {result[f'{stage}_launch_s']:.2f} s", flush=True)
        if "head_kernel" in result:  # +fewhead: whether the kernel ran (a GPU, bf16/fp16, channels-last), or cuDNN
            heads = result["head_kernel"]
            print(f"  heads: kernels.conv3_few_outputs ran {heads['kernel']} of {heads['calls']} calls", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))


def measure(args, device: torch.device, mode: str, inputs, z_ref, work: dict) -> tuple[dict, torch.Tensor, tuple]:
    """One mode: a warm-up encode + decode, then the median of --repeat passes of each (and with --profile one
    more of each, profiled); with --decode-only only the decode is timed (the first mode encodes once, untimed).
    Decodes z_ref when given, else its own encode. Returns the timings, the latent and the clamped (RGB, alpha), on
    the CPU in float32."""
    base_mode, *lever_list = mode.split("+")
    weight_dtype, amp = MODES[base_mode]
    model = _model(args, device, weight_dtype, set(lever_list))
    dual = dual_decoders(set(lever_list))
    side_stream = "serial" not in lever_list
    stages = ("decode",) if args.decode_only else ("encode", "decode")
    rgb, alpha = (x.to(device, weight_dtype) for x in inputs)
    state = {}

    def run(stage: str) -> None:
        with torch.no_grad(), _autocast(device, amp):
            if stage == "encode":
                state["z"] = model.encode(rgb, alpha)  # both encodes (RGB and alpha) + merge block
            else:
                latent = state["z"] if z_ref is None else z_ref
                latent = latent.to(device, weight_dtype)
                state["out"] = model.decode(latent, dual=dual, side_stream=side_stream)  # both decoders

    if z_ref is None and "encode" not in stages:
        run("encode")  # the latent every mode decodes
    times: dict[str, list[float]] = {stage: [] for stage in stages}
    launches: dict[str, list[float]] = {stage: [] for stage in stages}  # until the call returns, before the sync
    peaks = dict.fromkeys(stages, 0.0)
    heads = {"calls": 0, "kernel": 0}  # the heads' calls of kernels.conv3_few_outputs, and those it ran
    real_few = kernels.conv3_few_outputs

    def counted_few(*args):
        y = real_few(*args)
        heads["calls"] += 1
        heads["kernel"] += y is not None
        return y

    kernels.conv3_few_outputs = counted_few
    try:
        _timed_passes(args, device, stages, run, times, launches, peaks)
    finally:
        kernels.conv3_few_outputs = real_few
    with torch.no_grad():  # as the decodes ran
        streams = not dual and model.side_stream_applies(side_stream, rgb[:, :1])
    result = {"decoders": "dual" if dual else "separate", "side_stream": streams}  # side_stream: on two CUDA streams
    if "nofewhead" not in lever_list:  # the heads take the kernel where it applies (the default)
        result["head_kernel"] = heads
    for stage in stages:
        seconds = statistics.median(times[stage])
        tflops = work[stage] / seconds / 1e12
        result |= {
            f"{stage}_s": seconds,
            f"{stage}_times_s": times[stage],
            f"{stage}_launch_s": statistics.median(launches[stage]),
            f"{stage}_peak_gib": peaks[stage],
            f"{stage}_tflops": tflops,
            f"{stage}_mfu": tflops / PEAK_TFLOPS,
        }
    if args.profile:
        result["profile"] = {stage: kernel_profile(lambda s=stage: run(s), device)[0] for stage in stages}
    z, out = state.get("z", z_ref).float().cpu(), tuple(o.float().cpu() for o in state["out"])
    result |= {"latent_shape": list(z.shape), "output_shape": list(out[0].shape)}
    return result, z, out


def _timed_passes(args, device: torch.device, stages, run, times: dict, launches: dict, peaks: dict) -> None:
    """A warm-up pass of each stage (cuDNN autotuning, allocator, compilation), then --repeat timed ones: each one's
    seconds, when its call returned (before the sync) and its peak memory, into `times`, `launches` and `peaks`."""
    for i in range(args.repeat + 1):
        for stage in stages:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            start = time.perf_counter()
            run(stage)
            launched = time.perf_counter()
            _sync(device)
            if i > 0:
                times[stage].append(time.perf_counter() - start)
                launches[stage].append(launched - start)
                if device.type == "cuda":
                    peaks[stage] = max(peaks[stage], torch.cuda.max_memory_allocated(device) / 2**30)


def autotuning_arguments(parser: argparse.ArgumentParser) -> None:
    """--cudnn-benchmark-limit, shared with vae_convs.py."""
    parser.add_argument(
        "--cudnn-benchmark-limit",
        type=int,
        default=0,
        help="cuDNN algorithms its autotuning times for each shape (torch.backends.cudnn.benchmark_limit; 0, the "
        "default: all it has, as the library's vae.autotuned_convolutions; PyTorch's default: the heuristics' first "
        "10)",
    )


def clip_arguments(parser: argparse.ArgumentParser) -> None:
    """--reference (the golden fixtures and synthetic weights), --device and the clip's size: this script's and
    vae_convs.py's."""
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared/reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    clip_arguments(parser)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        help="MODE[+LEVER]...: MODE "
        "one of fp32, bf16-autocast, bf16; +previous: the padding and norm forms before the fused ones "
        "(previous_forms); "
        "+pytorch: the convolutions' bias and the nearest upsampling as PyTorch and upstream compute them "
        "(pytorch_forms); +upsampled: the upsampling convolutions on the upsampled frames, not in phases "
        "(upsampled_forms); +chunkN: N latent frames a decode chunk after the first (WanVAE.decode_chunk; default 1, "
        "as upstream); +cl: channels-last 3-D convolutions; +dual: both decoders as one batch of two; +serial: one "
        "decoder after the other on one CUDA stream (without it, side by side on two: RGBAlphaVAE.decode's "
        "side_stream); +fewhead: the decoders' 96 → 3 heads by kernels.conv3_few_outputs (the default), +nofewhead: by "
        "cuDNN; +rooms: each causal "
        "convolution's cached frames written into the front of its next chunk's input buffer, for every layer "
        "(WanVAE.decode_rooms; by default as many as a quarter of the free GPU memory holds), +norooms for none; "
        "+sum: each residual block's sum added by "
        "the norm after it (ResidualBlock.sum_in_norm, the default), +nosum: by the bias pass before it. "
        "The first mode is the PSNR column's reference (put fp32 first).",
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="time only the decode (the first mode encodes once, untimed)"
    )
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuDNN autotunes each convolution shape in the warm-up pass (on: the recorded figures, "
        "and cache's setting); generate and validate leave PyTorch's default (off: heuristic "
        "choices)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one encode and one decode per mode "
        "(CUDA kernel time by kind: convolution, attention, GEMM, other)",
    )
    autotuning_arguments(parser)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for mode in args.modes:
        if (problem := mode_problem(mode)) is not None:
            parser.error(f"--modes {mode}: {problem}")
    torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    report = {
        **environment(device),
        "size": f"{args.frames}x{args.height}x{args.width}",
        "cudnn_benchmark": args.cudnn_benchmark,
        "cudnn_benchmark_limit": args.cudnn_benchmark_limit,
    }
    if not args.skip_parity:
        # fp32 parity needs true fp32 convolutions and matmuls (no TF32).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        report["parity"] = parity(args.reference, device)
        print(f"{'parity (max rel err)':24s}" + "".join(f"{m:>16s}" for m in MODES))
        for key in next(iter(report["parity"].values())):
            print(f"{key:24s}" + "".join(f"{report['parity'][m][key]:16.2e}" for m in MODES))
    torch.backends.cuda.matmul.allow_tf32 = True  # the speed runs use what users get by default on Ampere+
    torch.backends.cudnn.allow_tf32 = True
    timing(args, device, report)


if __name__ == "__main__":
    main()
