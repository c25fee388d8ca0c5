"""Several GPUs of one host, under torchrun: the DoRA train step as train-dit runs it (accelerate DDP or FSDP2) and
sequence-parallel sampling steps as generate runs them.

    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py train --engine fsdp    # 14B, 81×480×832, 1 clip per GPU
    torchrun --nproc_per_node 2 benchmarks/multi_gpu.py sample                 # 14B, CFG, Ulysses over 2 GPUs
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 benchmarks/multi_gpu.py train --variant tiny --frames 5 \\
        --height 64 --width 64                                                 # a CPU dry run (gloo)

Random weights (values do not change the work). train: DoRA r32 on q, k, v, o, ffn.0, ffn.2, per-block activation
checkpointing, bf16 autocast, AdamW; every process trains on its own clip (global batch = processes), so scaling
efficiency = one process's step time / this step time. sample: the conditional and negative prompt as one batched
forward per step (generate's CFG), the tokens split over the processes. Median of --repeat after a warm-up; peak =
the largest per-GPU allocated peak. FLOP model (forward of one clip, per block): 2·L·D²·4 (self-attention
projections) + 4·L²·D (scores and values) + 2·L·D²·2 + 2·Lc·D²·2 + 4·L·Lc·D (cross-attention) + 4·L·D·F (FFN); a
train step counts 3 forwards (the usual convention; frozen weights need no weight gradients, so it overstates the
work a little), a CFG sampling step 2. MFU against 790 TFLOP/s per GPU (dense bf16 measured on an H100/H200).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PEAK_TFLOPS, environment, forward_flops  # noqa: E402
from dit import build  # noqa: E402
from wanalpha import adapters, flow  # noqa: E402
from wanalpha.runtime import set_sequence_parallel  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _peak(device: torch.device) -> float:
    """The largest allocated peak over the processes, GiB."""
    value = torch.tensor(
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0, device=device
    )
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def train(args, latent: tuple[int, ...]) -> dict:
    from wanalpha.train_dit import dit_step
    from wanalpha.training import Draws, make_accelerator, sharded

    if args.engine == "fsdp":  # what `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets
        os.environ.update(
            ACCELERATE_USE_FSDP="true",
            FSDP_VERSION="2",
            FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
            FSDP_TRANSFORMER_CLS_TO_WRAP="DiTBlock",
            FSDP_RESHARD_AFTER_FORWARD="true",
        )
    accelerator = make_accelerator("bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    dit = build(args.variant, device, torch.bfloat16)
    adapters.inject_dora(dit, rank=args.rank)
    dit.gradient_checkpointing = True
    trainable = [p for p in dit.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model, optimizer = accelerator.prepare(dit, optimizer)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dit_config = dit.config
    batch = {
        "latents": torch.randn(1, 1, *latent),
        "index": torch.tensor([0]),
        "context": [torch.randn(dit_config.text_len, dit_config.text_dim, dtype=torch.bfloat16)],
    }
    schedule = flow.TrainingSchedule.create()
    times = []
    for i in range(args.repeat + 1):
        _sync(device)
        start = time.perf_counter()
        with accelerator.autocast():
            loss, _ = dit_step(model, batch, Draws(0, i, [accelerator.process_index]), schedule, [0])
            accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    world = accelerator.num_processes
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    flops = 3 * forward_flops(dit_config, tokens, dit_config.text_len) * world
    return {
        "engine": args.engine,
        "processes": world,
        "step_s": step,
        "clips_per_s": world / step,
        "tokens_per_s": world * tokens / step,
        "tflops_per_gpu": flops / step / world / 1e12,
        "mfu": flops / step / world / 1e12 / PEAK_TFLOPS,
        "peak_gib_per_gpu": _peak(device),
        "sharded": sharded(accelerator),
        "model": type(model).__name__,
    }


def sample(args, latent: tuple[int, ...]) -> dict:
    from rich.console import Console

    from wanalpha.config import GenerateConfig
    from wanalpha.generate import sample_latents
    from wanalpha.parallel import from_environment

    parallel = from_environment()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dit = build(args.variant, device, torch.bfloat16)
    if parallel is not None:
        set_sequence_parallel(dit, parallel)
    world = parallel.world if parallel is not None else 1
    rows, width = dit.config.text_len, dit.config.text_dim
    g = torch.Generator().manual_seed(0)
    context, negative = (torch.randn(n, width, generator=g).to(device, torch.bfloat16) for n in (min(60, rows), rows))
    config = GenerateConfig(
        prompt="x", height=args.height, width=args.width, num_frames=args.frames, steps=1, cfg_scale=5.0
    )
    console = Console(stderr=True, quiet=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.repeat + 1):
        _sync(device)
        start = time.perf_counter()
        sample_latents(dit, [context], negative, config, [i], device, console)
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    flops = 2 * forward_flops(dit.config, tokens, rows)  # CFG: two forwards of one clip
    return {
        "processes": world,
        "step_s": step,
        "tflops_per_gpu": flops / step / world / 1e12,
        "mfu": flops / step / world / 1e12 / PEAK_TFLOPS,
        "peak_gib_per_gpu": _peak(device),
        "generate_50_steps_s": 50 * step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["train", "sample"])
    parser.add_argument("--engine", choices=["ddp", "fsdp"], default="ddp", help="train: accelerate's DDP or FSDP2")
    parser.add_argument("--variant", default="14b", choices=["1.3b", "14b", "tiny"])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    latent = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    result = train(args, latent) if args.mode == "train" else sample(args, latent)
    report = {
        **environment(),
        "mode": args.mode,
        "variant": args.variant,
        "size": f"{args.frames}x{args.height}x{args.width}",
    } | result
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(report))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
