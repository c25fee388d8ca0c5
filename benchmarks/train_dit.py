"""DoRA training-step benchmark: `dit_step` (flow loss) + backward + AdamW on the adapters, bf16 DiT weights (or, with
--dit-dtype fp8, the frozen base's block linears in FP8; --fp8-gemm: their forward GEMMs in FP8 too).

    python benchmarks/train_dit.py                            # 1.3B and 14B at 81×480×832 on the GPU
    python benchmarks/train_dit.py --variants tiny --frames 5 --height 64 --width 64 --device cpu
    python benchmarks/train_dit.py --modes peft-dora:recompute:float64 dora:recompute:float64 lora:recompute:float64

A mode is ADAPTER:ATTENTION:ROPE[:compile] (compile: torch.compile of the blocks, train-dit --compile).
ADAPTER: dora or lora with train-dit's fused adapter forward
(`adapters.inject_dora(fused=True)`, weight norms once per step), or peft-dora / peft-lora with peft's own forward
(--no-fused-adapters). ATTENTION: recompute (full per-block checkpointing) or keep (selective checkpointing: each
block's self-attention output is saved, `WanDiT.checkpoint_attention`) or keepN (saved in the first N blocks only,
--checkpoint_attention_blocks N). ROPE: float64 or float32. TFLOP/s and MFU
count 3 forwards per step (forward + backward; recomputation not counted) with the FLOP model of benchmarks/common.py.

Random weights (values do not change the work), rank 32 on q, k, v, o, ffn.0, ffn.2, bf16 DiT weights, bf16
autocast. Median of --repeat steps after a warm-up step (its time, compilation included, is
reported as warm_up_s); peak = allocated.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PEAK_TFLOPS, environment, forward_flops, fresh_compile, memory_at_peak, timed  # noqa: E402
from dit import BACKENDS, backend, build  # noqa: E402
from wanalpha import adapters, flow  # noqa: E402
from wanalpha.fp8 import scaled_mm_supported, use_adapter_fp8_gemm  # noqa: E402
from wanalpha.models.dit import DIT_VARIANTS  # noqa: E402
from wanalpha.runtime import DiTRuntime, apply_dit_runtime  # noqa: E402
from wanalpha.train_dit import dit_step  # noqa: E402
from wanalpha.training import Draws  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["1.3b", "14b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--offload", action="store_true", help="also offload checkpointed activations to CPU")
    parser.add_argument(
        "--sdpa",
        default="default",
        choices=["default", *BACKENDS],
        help="attention kernels for every mode (their backward follows the forward's choice)",
    )
    parser.add_argument(
        "--attention",
        choices=["auto", "sdpa", "fa4"],
        default="auto",
        help="train-dit --attention: the self-attention kernel (auto: FlashAttention-4 where "
        "installed on a Hopper/Blackwell GPU; --sdpa then forces only cross-attention's)",
    )
    parser.add_argument("--modes", nargs="+", default=["dora:recompute:float64"], help="see above")
    parser.add_argument(
        "--dit-dtype",
        default="bf16",
        choices=["bf16", "fp8"],
        help="train-dit --dit-dtype: fp8 = the frozen base's block linears quantised before the adapters",
    )
    parser.add_argument(
        "--fp8-gemm",
        action="store_true",
        help="train-dit --fp8-gemm (with --dit-dtype fp8): the forward's base GEMMs in FP8, activations per token",
    )
    parser.add_argument("--seconds", type=float, default=None, help="skip the modes left after this much time")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="after timing, record the CUDA allocator over one more step: what is live at its peak, and where from",
    )
    parser.add_argument(
        "--compile-memory-budget",
        type=float,
        default=None,
        help="compiled modes: train-dit's --compile-memory-budget (the partitioner's activation memory budget; 1 = "
        "the default partitioner, lower recomputes more inside each compiled block's backward to keep less)",
    )
    parser.add_argument(
        "--gradients",
        type=int,
        default=None,
        metavar="BLOCKS",
        help="instead of timing: FP8's quality gate for training (each variant cut to its first BLOCKS blocks; one "
        "step's loss and adapter gradients over an FP8 base, weight-only and with the FP8 GEMM, against the bf16 base)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.fp8_gemm and args.dit_dtype != "fp8":
        parser.error("--fp8-gemm needs --dit-dtype fp8")
    device = torch.device(args.device)
    latent = (16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    report = {
        **environment(device),
        "latent": list(latent),
        "rank": args.rank,
        "offload": args.offload,
        "sdpa": args.sdpa,
        "attention": args.attention,
        "compile_memory_budget": args.compile_memory_budget,
        "dit_dtype": args.dit_dtype,
        "fp8_gemm": args.fp8_gemm,
        "results": {},
    }
    print(
        f"{report['device']}, latent {latent}, DoRA rank {args.rank}, offload {args.offload}, SDPA {args.sdpa}, "
        f"attention {args.attention}"
    )
    schedule = flow.TrainingSchedule.create()
    tokens = latent[1] * latent[2] * latent[3] // 4
    if args.gradients is not None:
        report["gradients"] = {v: gradient_gate(args, v, latent, schedule, device) for v in args.variants}
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return
    print(
        f"{'variant':8s}{'mode':30s}{'step s':>8s}{'TFLOP/s':>9s}{'MFU':>7s}{'peak GiB':>10s}{'adapter M':>10s}"
        f"{'warm-up s':>10s}"
    )
    start = time.monotonic()
    for variant in args.variants:
        for mode in args.modes:
            if args.seconds is not None and time.monotonic() - start > args.seconds:
                report["results"][f"{variant} {mode}"] = {"skipped": "out of time"}
                continue
            report["results"][f"{variant} {mode}"] = run_mode(args, variant, mode, latent, tokens, schedule, device)
            gc.collect()  # the mode's model and optimizer are gone with run_mode's frame
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.out:  # after every mode: a run cut short keeps what it measured
                args.out.write_text(json.dumps(report, indent=2))


def gradient_gate(args, variant: str, latent, schedule, device: torch.device) -> dict:
    """--gradients BLOCKS: one train-dit micro-step (same latent, noise, timestep and context) on the variant cut to
    its first BLOCKS blocks, three times from the same random bf16 weights: the bf16 base, the base's block linears
    in FP8 (--dit-dtype fp8: the adapters differentiate through the dequantised weight) and the same with the
    forward's base GEMMs in FP8 (--fp8-gemm, Hopper). Each base gets its own adapters as train-dit would (DoRA's
    magnitudes from its own weights), then the same seeded perturbation (B and the magnitudes away from their
    initial values, so every adapter tensor has a gradient). Reports each FP8 run's loss difference and its
    gradients' errors ‖g − g_bf16‖ / ‖g_bf16‖, all adapter gradients as one vector, and per tensor (median; worst,
    with its share of the gradient's norm: random weights leave some tensors' gradients tiny, and their error large);
    the gate: the FP8 GEMM's error within twice the weight-only path's, all gradients together."""
    config = DIT_VARIANTS[variant]
    batch = {
        "latents": torch.randn(1, 1, *latent, generator=torch.Generator().manual_seed(0)),
        "context": [
            torch.randn(config.text_len, config.text_dim, generator=torch.Generator().manual_seed(1)).bfloat16()
        ],
        "index": torch.tensor([0]),
    }
    runs = {}
    for name in ("bf16", "fp8", "fp8-gemm"):
        torch.manual_seed(0)  # the same random bf16 weights, before quantising
        dit = build(variant, device, torch.bfloat16, fp8=name != "bf16", layers=args.gradients)
        gemm = use_adapter_fp8_gemm(dit) if name == "fp8-gemm" else 0
        torch.manual_seed(2)
        adapters.inject_dora(dit, rank=args.rank, use_dora=True, fused=True)
        torch.manual_seed(3)
        with torch.no_grad():
            for param_name, param in dit.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.02)
                if "lora_magnitude_vector" in param_name:
                    param.mul_(1 + 0.1 * torch.randn_like(param))
        runtime = DiTRuntime(attention=args.attention, rope_precision="float32", gradient_checkpointing=True)
        apply_dit_runtime(dit, runtime, device, torch.bfloat16, backward=True)
        with backend(args.sdpa), torch.autocast(device.type, dtype=torch.bfloat16), adapters.dora_norm_scope():
            loss, _ = dit_step(dit, batch, Draws(0, 0, [0]), schedule, [0])
            loss.backward()
        loss = loss.detach()
        grads = {n: p.grad.float().cpu() for n, p in dit.named_parameters() if p.requires_grad}
        runs[name] = {"loss": loss.item(), "grads": grads, "gemm_linears": gemm}
        del dit, loss
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference = runs["bf16"]
    result = {
        "blocks": args.gradients,
        "loss_bf16": reference["loss"],
        "scaled_mm": scaled_mm_supported(device),  # else --fp8-gemm falls back to the weight-only path
    }
    total = sum(float(g.square().sum()) for g in reference["grads"].values()) ** 0.5
    for name in ("fp8", "fp8-gemm"):
        grads = runs[name]["grads"]
        diffs = {n: float((grads[n] - g).norm()) for n, g in reference["grads"].items()}
        errors = {n: d / max(float(reference["grads"][n].norm()), 1e-30) for n, d in diffs.items()}
        worst = max(errors, key=errors.get)
        result[name] = {
            "loss": runs[name]["loss"],
            "loss_rel_diff": abs(runs[name]["loss"] - reference["loss"]) / abs(reference["loss"]),
            "grad_rel_err": sum(d * d for d in diffs.values()) ** 0.5 / total,  # all adapter gradients as one vector
            "grad_rel_err_median": statistics.median(errors.values()),
            "grad_rel_err_worst": errors[worst],
            "worst_tensor": worst,
            "worst_tensor_norm_share": float(reference["grads"][worst].norm()) / total,
            "adapter_tensors": len(errors),
            "fp8_gemm_linears": runs[name]["gemm_linears"],
        }
        r = result[name]
        print(
            f"{variant:8s}{name:10s} loss {r['loss']:.6f} (bf16 {reference['loss']:.6f}, {r['loss_rel_diff']:.2e}); "
            f"adapter gradients against bf16: {r['grad_rel_err']:.4f} all together, "
            f"median {r['grad_rel_err_median']:.4f} over {len(errors)} tensors, "
            f"worst {r['grad_rel_err_worst']:.4f} ({worst}, "
            f"{r['worst_tensor_norm_share']:.1e} of the gradient's norm)",
            flush=True,
        )
    result["gate"] = result["fp8-gemm"]["grad_rel_err"] <= 2 * result["fp8"]["grad_rel_err"]
    verdict = "holds" if result["gate"] else "FAILS"
    fallback = "" if result["scaled_mm"] else " (no FP8 GEMM on this device: --fp8-gemm ran weight-only)"
    print(
        f"{variant:8s}gate (FP8 GEMM's error ≤ 2 × weight-only's, all gradients together): {verdict}{fallback}",
        flush=True,
    )
    return result


def make_train_step(dit, latent, schedule, device: torch.device, fused: bool) -> Callable[[int], None]:
    """train-dit's micro-step on one random cached latent (random context rows): dit_step under bf16 autocast, the
    backward (inside `adapters.dora_norm_scope` for fused adapters, as `training.train` does) and AdamW on the
    adapters. Call it with the step index."""
    optimizer = torch.optim.AdamW([p for p in dit.parameters() if p.requires_grad], lr=1e-4)
    scope = adapters.dora_norm_scope if fused else contextlib.nullcontext
    dit_config = dit.config
    batch = {
        "latents": torch.randn(1, 1, *latent),
        "context": [torch.randn(dit_config.text_len, dit_config.text_dim, dtype=torch.bfloat16)],
        "index": torch.tensor([0]),
    }

    def train_step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16), scope():
            loss, _ = dit_step(dit, batch, Draws(0, i, [0]), schedule, [0])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def run_mode(args, variant: str, mode: str, latent, tokens: int, schedule, device) -> dict:
    adapter, attention, rope, *compiled = mode.split(":")
    if adapter not in ("dora", "lora", "peft-dora", "peft-lora"):
        raise SystemExit(f"mode {mode}: ADAPTER is dora, lora, peft-dora or peft-lora")
    keep, blocks = attention.startswith("keep"), attention.removeprefix("keep")
    if attention != "recompute" and not (keep and (blocks == "" or (blocks.isdigit() and int(blocks) > 0))):
        raise SystemExit(f"mode {mode}: ATTENTION is recompute, keep or keepN with N ≥ 1")
    fresh_compile(args.sdpa)
    fused = not adapter.startswith("peft-")
    dit = build(variant, device, torch.bfloat16, fp8=args.dit_dtype == "fp8")  # as train-dit: adapters over FP8
    if args.fp8_gemm:
        use_adapter_fp8_gemm(dit)
    adapters.inject_dora(dit, rank=args.rank, use_dora=adapter.removeprefix("peft-") == "dora", fused=fused)
    runtime = DiTRuntime(
        attention=args.attention,
        rope_precision=rope,
        gradient_checkpointing=True,
        checkpoint_offload=args.offload,
        checkpoint_attention=keep,
        checkpoint_attention_blocks=int(blocks) if keep and blocks else None,
        compile=compiled,
        compile_memory_budget=args.compile_memory_budget,
    )  # as train-dit: the blocks compute in bf16 (weights and autocast)
    apply_dit_runtime(dit, runtime, device, torch.bfloat16, backward=True)
    trainable = [p for p in dit.parameters() if p.requires_grad]
    inner = make_train_step(dit, latent, schedule, device, fused)

    def train_step(i: int) -> None:
        with backend(args.sdpa):
            inner(i)

    dit_config = dit.config
    try:
        start = time.perf_counter()
        times, peak = timed(train_step, device, args.repeat)
        warm_up = time.perf_counter() - start - sum(times)  # the first step: compilation included
        step = statistics.median(times)
        tflops = 3 * forward_flops(dit_config, tokens, dit_config.text_len) / step / 1e12
        result = {
            "step_s": step,
            "times_s": times,
            "tflops": tflops,
            "mfu": tflops / PEAK_TFLOPS,
            "peak_gib": peak,
            "adapter_params_m": sum(p.numel() for p in trainable) / 1e6,
            "warm_up_s": warm_up,
            "self_attention_kernel": dit.blocks[0].self_attn.kernel,
        }
        print(
            f"{variant:8s}{mode:30s}{step:8.2f}{tflops:9.0f}{tflops / PEAK_TFLOPS:7.1%}{peak:10.1f}"
            f"{result['adapter_params_m']:10.1f}{warm_up:10.1f}",
            flush=True,
        )
        if args.memory and device.type == "cuda":
            result["memory"] = memory = memory_at_peak(lambda: train_step(args.repeat + 1), device, top=60)
            print(
                f"  one more step: peak {memory['peak_gib']:.2f} GiB, {memory['before_gib']:.2f} GiB before it; "
                "live at the peak:"
            )
            for row in memory["at_peak"][:30]:
                print(f"  {row['gib']:8.3f} GiB {row['count']:6d}  {row['where']}")
    except torch.OutOfMemoryError:
        result = {"oom": True}
        print(f"{variant:8s}{mode:30s}{'OOM':>8s}", flush=True)
    return result


if __name__ == "__main__":
    main()
