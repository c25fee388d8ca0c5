"""VAE benchmark and low-precision parity: the RGB-alpha VAE's encode (RGB + alpha) and decode (both decoders).

    python benchmarks/vae.py --reference ../shared/reference                   # 81×480×832 on the GPU
    python benchmarks/vae.py --device cpu --frames 9 --height 64 --width 64   # a quick smoke run
    python benchmarks/vae.py --skip-parity --modes fp32 bf16 bf16+cl

Parity: the golden fixtures of reference/golden (fp32 official outputs) recomputed here in fp32, under bf16 autocast
and with bf16 weights; err = max|a-b| / max|golden| (reference NOTES §9). Timing: synthetic weights (values do not
change the work), one warm-up pass per mode, then the median of --repeat passes, CUDA-synchronised; peak memory is
torch.cuda.max_memory_allocated over a pass. Prints a table and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wanalpha.checkpoints.vae import load_rgba_vae  # noqa: E402
from wanalpha.models.rgba import RGBAlphaVAE  # noqa: E402
from wanalpha.models.vae import VAEConfig, channels_last  # noqa: E402

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
    mse = float((a.float() - b.float()).square().mean())
    return float("inf") if mse == 0 else 10 * math.log10(4 / mse)


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
        channels_last(model)
    if "fuse" in levers:
        fuse_elementwise(model)
    return model.eval()


def fuse_elementwise(model: torch.nn.Module) -> None:
    """Candidate lever (this script only, until measured): the element-wise work around the VAE's convolutions as
    compiled kernels (torch.compile, dynamic shapes): each RMSNorm with the SiLU after it in one kernel, and each
    causal convolution's input (cached frames, then the chunk, zero-padded) written in one pass instead of torch.cat
    followed by F.pad. Instance-level patches: the library's modules are unchanged."""
    import torch._dynamo
    import torch.nn.functional as F
    from torch import nn

    from wanalpha.models.vae import CausalConv3d, RMSNorm, _keep_last

    # One graph per padding pattern, cache state, layout and dtype: more than dynamo's default limit of 8. Reset per
    # mode: the helpers below share their code objects (and so their compiled entries) across calls.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.reset()

    @torch.compile(dynamic=True)
    def norm_silu(x, gamma):
        return F.silu(F.normalize(x, dim=1) * gamma)

    @torch.compile(dynamic=True)
    def pad_input(prev, x, pads: list[int]):
        return F.pad(x if prev is None else torch.cat([prev.to(x.dtype), x], dim=2), pads)

    def conv_forward(self, x, cache=None):
        pads, prev = list(self.pads), None
        if cache is not None and pads[4] > 0:
            prev = cache.get(self)
            cache.set(self, _keep_last(prev, x))
            if prev is not None:
                pads[4] -= prev.shape[2]
        return nn.Conv3d.forward(self, pad_input(prev, x, pads))

    for module in list(model.modules()):
        if isinstance(module, CausalConv3d):
            module.forward = conv_forward.__get__(module)
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if isinstance(module[i], RMSNorm) and isinstance(module[i + 1], nn.SiLU):
                    norm = module[i]
                    norm.forward = lambda x, norm=norm: norm_silu(x, norm.gamma * norm.scale)
                    module[i + 1] = nn.Identity()


def timing(args: argparse.Namespace, device: torch.device) -> dict:
    """Each mode: a warm-up encode + decode, then the median of --repeat. Every mode decodes the same latent (the
    first mode's encode), and its clamped RGB and alpha are compared with the first mode's (PSNR)."""
    results = {}
    shape = (1, 3, args.frames, args.height, args.width)
    generator = torch.Generator().manual_seed(0)
    rgb_in = torch.rand(shape, generator=generator) * 2 - 1
    alpha_in = torch.rand((1, 1, *shape[2:]), generator=generator) * 2 - 1
    z_ref = ref_out = None
    for mode in args.modes:
        base_mode, *lever_list = mode.split("+")
        weight_dtype, amp = MODES[base_mode]
        model = _model(args, device, weight_dtype, set(lever_list))
        rgb, alpha = rgb_in.to(device, weight_dtype), alpha_in.to(device, weight_dtype)
        times = {"encode": [], "decode": []}
        peaks = {"encode": 0, "decode": 0}
        for i in range(args.repeat + 1):  # pass 0 warms up (cuDNN autotuning, allocator)
            for stage in ("encode", "decode"):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                _sync(device)
                start = time.perf_counter()
                with torch.no_grad(), _autocast(device, amp):
                    if stage == "encode":
                        z = model.encode(rgb, alpha)  # both encodes (RGB and alpha) + merge block
                    else:
                        out = model.decode((z if z_ref is None else z_ref).to(device, weight_dtype))  # both decoders
                _sync(device)
                if i > 0:
                    times[stage].append(time.perf_counter() - start)
                    if device.type == "cuda":
                        peaks[stage] = max(peaks[stage], torch.cuda.max_memory_allocated(device))
        out = tuple(o.float().cpu() for o in out)
        if z_ref is None:
            z_ref, ref_out, ref_mode = z.float().cpu(), out, mode
        results[mode] = {
            "encode_s": statistics.median(times["encode"]),
            "decode_s": statistics.median(times["decode"]),
            "encode_peak_gib": peaks["encode"] / 2**30,
            "decode_peak_gib": peaks["decode"] / 2**30,
            "encode_rel_err": _rel(z, z_ref),
            f"decode_psnr_db_vs_{ref_mode}": {"rgb": _psnr(out[0], ref_out[0]), "alpha": _psnr(out[1], ref_out[1])},
            "latent_shape": list(z.shape),
            "output_shape": list(out[0].shape),
        }
        del model, rgb, alpha, z, out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=Path(__file__).resolve().parents[2] / "shared/reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=list(MODES),
                        help="MODE[+cl][+fuse]: MODE one of fp32, bf16-autocast, bf16; +fuse: compiled norm+SiLU "
                        "and causal padding kernels (fuse_elementwise); +cl: channels-last 3-D "
                        "convolutions. The first mode is the PSNR column's reference (put fp32 first).")  # fmt: skip
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    report = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": f"{args.frames}x{args.height}x{args.width}",
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
    report["timing"] = timing(args, device)
    print(f"\n{report['device']}, {report['size']} (frames x height x width), torch {report['torch']}")
    print(f"{'mode':28s}{'encode rgb+alpha s':>20s}{'peak GiB':>10s}{'decode both s':>16s}{'peak GiB':>10s}"
          f"{'PSNR rgb/alpha dB':>20s}")  # fmt: skip
    for mode, r in report["timing"].items():
        psnr = next(v for k, v in r.items() if k.startswith("decode_psnr"))
        print(f"{mode:28s}{r['encode_s']:20.2f}{r['encode_peak_gib']:10.1f}{r['decode_s']:16.2f}"
              f"{r['decode_peak_gib']:10.1f}{psnr['rgb']:10.1f}{psnr['alpha']:10.1f}", flush=True)  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
