"""generate, end to end in memory with random weights: UMT5-XXL → 14B (or 1.3B) DiT with CFG → both decoders.

    python benchmarks/generate.py --variant 14b --steps 2     # 81×480×832 on one GPU
    python benchmarks/generate.py --variant tiny --t5 tiny --height 64 --width 64 --frames 5 --device cpu

The stages of `wanalpha generate` (its own functions) with the same memory discipline (building the models with
random weights is not timed: "times exclude model loading"; nor is generate's kernel_preparation, which generate runs
on its sampling thread while a helper thread reads the weights: here on the same thread, before sampling): T5 runs
and leaves the GPU, the DiT (bf16, or --dit-dtype fp8: its block linears quantised after building) samples and
leaves, the decoders (fp32, or --vae-dtype bf16) decode, and every output file generate writes by default (mp4s,
RGBA PNGs, WebM, MOV) is written to a temporary folder while the chunks decode (the write stage is what the writers
take after the last chunk). Reports time and peak allocated memory per stage; a full 50-step run costs about
50/steps times the sampling time. With --compile the compilation is a stage of its own (a warm-up sampling of one
step: generate compiles on its first step) and counts in the
end-to-end and projected times (conservatively: one step too many).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rich.console import Console  # noqa: E402

from common import environment, files_done, random_decoders  # noqa: E402
from dit import build  # noqa: E402
from wanalpha.config import GenerateConfig  # noqa: E402
from wanalpha.generate import decode_and_write, kernel_preparation, sample_latents, writer_ahead  # noqa: E402
from wanalpha.models.fa4 import KERNELS  # noqa: E402
from wanalpha.models.t5 import T5Config, UMT5Encoder  # noqa: E402
from wanalpha.offload import BlockStreamer  # noqa: E402
from wanalpha.runtime import compile_blocks, prepare_text_encoder, set_attention_kernel  # noqa: E402


def _peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _Stamped(threading.Event):
    """An Event that keeps the time of its first set()."""

    at = 0.0

    def set(self) -> None:
        if not self.is_set():
            self.at = time.perf_counter()
        super().set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="14b", choices=["1.3b", "14b", "tiny"])
    parser.add_argument("--t5", default="xxl", choices=["xxl", "tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--offload", action="store_true", help="generate --offload: T5 on CPU, DiT blocks streamed")
    parser.add_argument("--vae-dtype", default="fp32", choices=["fp32", "bf16"], help="generate --vae_dtype")
    parser.add_argument(
        "--dit-dtype", default="bf16", choices=["bf16", "fp8"], help="fp8: the block linears quantised (wanalpha.fp8)"
    )
    parser.add_argument(
        "--rope-precision", default="float64", choices=["float64", "float32"], help="generate --rope_precision"
    )
    parser.add_argument("--attention", choices=list(KERNELS), default="auto", help="generate --attention")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="generate --compile; compilation (a warm-up 1-step sampling) is timed as its own stage",
    )
    parser.add_argument(
        "--compile-in-sampling",
        action="store_true",
        help="with --compile: compile inside the timed sampling, as generate does (a measured end to "
        "end run of --steps steps rather than a projection)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.compile and args.offload:
        parser.error("--compile does not combine with --offload (generate refuses it too)")
    device = torch.device(args.device)
    console = Console(stderr=True)
    cfg = GenerateConfig(
        prompt="x",
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        vae_dtype=args.vae_dtype,
        rope_precision=args.rope_precision,
        attention=args.attention,
        offload=args.offload,
        dit_dtype=args.dit_dtype,  # the preparation's FP8 GEMMs and quantisation kernel, as generate's
    )
    report = {
        **environment(device),
        "variant": args.variant,
        "steps": args.steps,
        "offload": args.offload,
        "compile": args.compile,
        "vae_dtype": args.vae_dtype,
        "dit_dtype": args.dit_dtype,
        "rope_precision": args.rope_precision,
        "attention": args.attention,
        "size": f"{args.frames}x{args.height}x{args.width}",
        "cfg_scale": args.cfg_scale,
        "stages": {},
    }

    _reset(device)
    t5_config = (
        T5Config()
        if args.t5 == "xxl"
        else T5Config(vocab_size=512, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2)
    )
    batch = 1 if args.cfg_scale == 1 else 2  # generate encodes the negative prompt only for guidance
    # generate prepares UMT5's first call on its own thread while a helper thread reads the checkpoint (11 GB: longer
    # than this warm-up) and then encodes; here the same two threads' roles swapped: the preparation on a helper
    # thread while the encoder is built, the encode timed after it on this one (loading is not timed)
    text_warm_up = threading.Thread(target=prepare_text_encoder, args=(t5_config, batch, 512, device))
    text_warm_up.start()
    with torch.device("meta"):
        t5 = UMT5Encoder(t5_config)
    t5 = t5.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():
        for p in t5.parameters():  # random values, drawn on the GPU (fast) before any offloading
            p.normal_(0, 0.02)
    text_warm_up.join()
    streamer = BlockStreamer(t5, device) if args.offload else contextlib.nullcontext()
    with streamer, torch.no_grad():
        _reset(device)
        start = time.perf_counter()  # model building and loading are not timed (the definition)
        ids = torch.randint(2, min(1000, t5_config.vocab_size), (batch, 512), device=device)
        states = t5(ids, torch.ones_like(ids))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    contexts, negative = [states[0, :60]], states[1, :120] if batch == 2 else None
    del t5
    report["stages"]["text_encoder"] = {"s": time.perf_counter() - start, "peak_gib": _peak(device)}

    _reset(device)
    dit = build(args.variant, device, torch.bfloat16, fp8=args.dit_dtype == "fp8")  # untimed, as loading
    dit.rope_precision = args.rope_precision
    start = time.perf_counter()  # importing FlashAttention-4 and its probe run: generate pays it before loading
    kernel = set_attention_kernel(dit, args.attention, device, torch.bfloat16, backward=False)  # sampling: forward
    report["self_attention_kernel"] = kernel
    report["attention_setup_s"] = time.perf_counter() - start
    prepare = kernel_preparation(dit.config, kernel, cfg, device)  # generate: while its weights are read (untimed)
    if prepare is not None:  # not in the totals: generate runs it while the weights are read
        alone = _Stamped()  # set when the decoders' timed plans are done: UMT5's file read has to outlast them
        start = time.perf_counter()
        prepare(None, alone)
        report["preparation_s"] = time.perf_counter() - start
        report["decoder_plans_s"] = alone.at - start
    rows, width = dit.config.text_len, dit.config.text_dim  # the tiny DiT takes ≤16 rows of 64
    contexts = [contexts[0][:rows, :width]]
    negative = negative[:rows, :width] if negative is not None else None
    if args.compile:  # as generate: compiled on the first step, which generate pays on every run
        compile_blocks(dit)
    if args.compile and not args.compile_in_sampling:
        _reset(device)
        start = time.perf_counter()
        sample_latents(
            dit,
            contexts,
            negative if args.cfg_scale != 1 else None,
            cfg.model_copy(update={"steps": 1}),
            [0] * len(contexts),
            device,
            console,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        report["stages"]["compile"] = {
            "s": time.perf_counter() - start,
            "peak_gib": _peak(device),
            "note": "compilation plus one sampling step",
        }
    ahead = writer_ahead(device)  # as generate: the first clip's writer process starts as sampling does
    with ahead or contextlib.nullcontext():  # ended here if sampling fails before the decode takes it
        streamer = BlockStreamer(dit, device) if args.offload else contextlib.nullcontext()
        with streamer:
            _reset(device)  # with --offload the blocks now sit in CPU memory
            start = time.perf_counter()
            latents = sample_latents(
                dit, contexts, negative if args.cfg_scale != 1 else None, cfg, [0] * len(contexts), device, console
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sampling = time.perf_counter() - start
        report["stages"]["sampling"] = {"s": sampling, "s_per_step": sampling / args.steps, "peak_gib": _peak(device)}
        del dit

        vae = random_decoders(device, torch.bfloat16 if args.vae_dtype == "bf16" else torch.float32)  # as generate's
        _reset(device)
        with tempfile.TemporaryDirectory() as folder:  # decode_s: the last chunk decoded; write_s: the writers after it
            begun = time.time()
            files, timings = decode_and_write(
                vae, latents, [Path(folder) / "output"], cfg.fps, list(cfg.formats), ahead=ahead
            )
            report["files_done_s"] = files_done(files, "output", begun)  # from the decode's start: which writer ends it
            report["output_frames"] = len(list((Path(folder) / "output_rgba_frames").glob("*.png")))
    report["stages"]["decode"] = {
        "s": timings["decode_s"],
        "peak_gib": _peak(device),
        "note": "the files are written while the chunks decode",
    }
    report["stages"]["write"] = {
        "s": timings["write_s"],
        "peak_gib": 0.0,
        "files": len(files),
        "note": "the writers' time after the last chunk decoded",
    }
    report["end_to_end_s"] = sum(r["s"] for r in report["stages"].values())
    fixed = report["end_to_end_s"] - sampling
    report["projected_end_to_end_s"] = {n: fixed + n * sampling / args.steps for n in (4, 50)}

    print(
        f"{report['device']}, DiT {args.variant}, {report['size']}, cfg {args.cfg_scale}, {args.steps} steps, "
        f"offload {args.offload}"
    )
    for stage, r in report["stages"].items():
        extra = f"  ({r['s_per_step']:.2f} s/step)" if "s_per_step" in r else ""
        print(f"{stage:14s}{r['s']:9.2f} s{r['peak_gib']:8.1f} GiB peak{extra}")
    print(
        "files done at (s, from the decode's start): "
        + ", ".join(f"{k} {v:.2f}" for k, v in report["files_done_s"].items())
    )
    print(
        "end to end, projected: "
        + ", ".join(f"{n} steps {s:.1f} s" for n, s in report["projected_end_to_end_s"].items())
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
