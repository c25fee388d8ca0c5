"""Where the GPU time of one DiT training step (or forward) goes: CUDA kernel time by kind, from torch.profiler.

    python benchmarks/profile_step.py --variant 1.3b                    # a DoRA train step at 81×480×832
    python benchmarks/profile_step.py --variant 14b --forward            # one forward (no grad)
    python benchmarks/profile_step.py --variant 14b --forward --dit-dtype fp8 --attention fa3-fp8
    python benchmarks/profile_step.py --variant tiny --frames 5 --height 64 --width 64 --device cpu

Kinds by kernel name (`common.kernel_kind`): attention forward / backward (cuDNN, flash, memory-efficient SDPA
kernels), GEMM (cuBLAS / CUTLASS / nvjet matmuls), and everything else (norms, RoPE, modulation, adapters'
element-wise work, copies; inductor's generated kernels count here even when named after the attention they feed).
The step is train-dit's (fused DoRA rank 32 unless --peft, per-block checkpointing, --keep-attention for
selective, --compile for compiled blocks); one warm-up step, then one profiled. Prints JSON: milliseconds per
kind, their share and kernel count (kernel launches; attention forward: two per block per forward, self and cross,
plus those recomputed in the backward), the top kernels. RoPE in float64 (upstream's) unless --rope-precision float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, kernel_profile  # noqa: E402
from dit import build  # noqa: E402
from train_dit import make_train_step  # noqa: E402
from wanalpha import adapters, flow  # noqa: E402
from wanalpha.runtime import compile_blocks, set_attention_kernel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="1.3b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--forward", action="store_true", help="profile one forward instead of a train step")
    parser.add_argument("--peft", action="store_true", help="peft's own adapter forward instead of the fused one")
    parser.add_argument("--keep-attention", action="store_true", help="selective checkpointing")
    parser.add_argument("--rope-precision", default="float64", choices=["float64", "float32"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the blocks (--compile)")
    parser.add_argument("--dit-dtype", default="bf16", choices=["bf16", "fp8"], help="fp8: block linears quantised")
    parser.add_argument("--attention", default="sdpa", help="self-attention kernel (runtime.set_attention_kernel)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--ops", action="store_true", help="also print the top operators with their input shapes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    latent = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    dit = build(args.variant, device, torch.bfloat16, fp8=args.dit_dtype == "fp8")
    set_attention_kernel(dit, args.attention, device, torch.bfloat16, backward=not args.forward)
    schedule = flow.TrainingSchedule.create()
    dit.rope_precision = args.rope_precision
    if args.compile:
        compile_blocks(dit)
    if args.forward:
        x = torch.randn(1, *latent, device=device, dtype=torch.bfloat16)
        t = torch.tensor([500.0], device=device)
        context = torch.randn(1, dit.config.text_len, dit.config.text_dim, device=device, dtype=torch.bfloat16)

        def run(i: int) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                dit(x, t, context)
    else:
        adapters.inject_dora(dit, rank=32, fused=not args.peft)
        dit.gradient_checkpointing, dit.checkpoint_attention = True, args.keep_attention
        run = make_train_step(dit, latent, schedule, device, fused=not args.peft)

    run(0)
    profile, prof = kernel_profile(lambda: run(1), device, args.top, shapes=args.ops)
    report = {
        "variant": args.variant,
        "what": "forward" if args.forward else "train step",
        "adapters": None if args.forward else ("peft" if args.peft else "fused"),
        "keep_attention": args.keep_attention,
        "compiled": args.compile,
        "rope_precision": args.rope_precision,
        "dit_dtype": args.dit_dtype,
        "attention": args.attention,
        **environment(device),
        **profile,
    }
    print(json.dumps(report, indent=2))
    if args.ops:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40, max_name_column_width=50))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
