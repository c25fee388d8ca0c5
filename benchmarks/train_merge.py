"""Stage-1 training step benchmark: one step + backward + AdamW update of the full-size RGB-alpha VAE.

    python benchmarks/train_merge.py                          # bf16 autocast: v1/v2, cached/uncached, 17/33/81 frames
    python benchmarks/train_merge.py --device cpu --sizes 5x32x32 --variants v1 --modes uncached --no-inference

Steps: v1 = `merge_step` (uncached: hard render + both encodes in the step; cached: the latents given, as `--cache_dir`
trains, no encoder in memory); v2 = `v2_step` through `V2Trainable` (EncoderFeatureMerge + rank-128 decoder LoRAs;
the diffusion term, which needs the 14B DiT, left out). Checkpointing on (train-merge's default): the decoders' chunked
backward (`wanalpha.chunked`); --no-checkpointing: plain autograd. Sizes `FxHxW` or `FxHxW:B` (batch B). Synthetic
weights (Wan2.1 layout; the work does not depend on the values) and random clips. Reports the median step time over
--repeat steps after one warm-up step, the peak allocated memory (weights included), and where the saved cache
states lived (device / host GiB); a size that does not fit is reported as OOM. Then (unless --no-inference) the
inference commands at the same sizes: validate's reconstruction and cache's encoding of one clip (8 colours).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, timed  # noqa: E402
from wanalpha import chunked  # noqa: E402
from wanalpha.checkpoints.vae import merge_lora  # noqa: E402
from wanalpha.checkpoints.wan_alpha import decoder_lora_pairs  # noqa: E402
from wanalpha.losses import LossWeights, VGG16Features  # noqa: E402
from wanalpha.models.rgba import RGBAlphaVAE  # noqa: E402
from wanalpha.runtime import GPU_LAYOUT, apply_vae_runtime, autocast  # noqa: E402
from wanalpha.train_merge import V2Trainable, draw_colours, merge_step, v2_step  # noqa: E402
from wanalpha.training import Draws  # noqa: E402


def build(device: torch.device, variant: str = "v1") -> RGBAlphaVAE:
    torch.manual_seed(0)
    model = RGBAlphaVAE(variant=variant)
    if variant == "v1":
        # Give the decoders a LoRA merge as decoder.bin would (rank 8 deltas), so weights differ like the real ones.
        lora = {}
        for side in ("fgr", "pha"):
            for name, module in model.rgb_decoder.decoder.named_modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                    key = f"vae_{side}.decoder.{name}" + (".conv3D" if isinstance(module, torch.nn.Conv3d) else "")
                    extra = [1] * (module.weight.ndim - 2)
                    lora[f"{key}.lora_A.default.weight"] = (
                        torch.randn(8, module.in_channels, *module.kernel_size) * 0.01
                    )
                    lora[f"{key}.lora_B.default.weight"] = torch.randn(module.out_channels, 8, *extra) * 0.01
        pairs = decoder_lora_pairs(lora)
        for side, decoder in (("rgb", model.rgb_decoder), ("alpha", model.alpha_decoder)):
            decoder.load_state_dict(merge_lora(decoder.state_dict(), pairs[side], "synthetic"))
    return model.to(device)


def _clip(t: int, h: int, w: int, b: int) -> dict:
    return {
        "rgb": torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8),
        "alpha": torch.randint(0, 256, (b, t, h, w), dtype=torch.uint8),
    }


def _state_bytes(loss: torch.Tensor) -> dict[str, float]:
    """Where the chunked decode keeps its saved cache states (GiB), found in the loss's graph."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        run = getattr(node, "run", None)
        if run is not None:
            return {k.replace("_bytes", "_gib"): v / 2**30 for k, v in run.stats.items()}
        todo.extend(n for n, _ in node.next_functions)
    return {}


def v1_step_time(model, size, precision, repeat, device, cached: bool, weights, vgg) -> dict:
    t, h, w, b = size
    optimizer = torch.optim.AdamW(model.merge.parameters(), lr=1e-4)
    batch = _clip(t, h, w, b)
    encoder = model.encoder
    if cached:  # the cache's tensors: 8 colours' RGB latents and the alpha latent (train-merge --cache_dir)
        lat = (b, 16, (t - 1) // 4 + 1, h // 8, w // 8)
        batch |= {"rgb_latents": torch.randn(b, 8, *lat[1:]), "alpha_latent": torch.randn(lat)}
        model.encoder = None
    stats: dict = {}

    def step(i: int) -> None:
        with autocast(device, precision):
            loss, _ = merge_step(
                model, batch, draw_colours(Draws(0, 0, list(range(b))), list(range(8))), weights, vgg, list(range(8))
            )
            stats.update(_state_bytes(loss))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        times, peak = timed(step, device, repeat)
    finally:
        model.encoder = encoder
    return {"step_s": statistics.median(times), "peak_gib": peak} | stats


def v2_step_time(trainable, encoder, size, precision, repeat, device, weights, vgg) -> dict:
    t, h, w, b = size
    optimizer = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-4)
    batch = _clip(t, h, w, b)
    stats: dict = {}

    def step(i: int) -> None:
        with autocast(device, precision):
            loss, _ = v2_step(trainable, encoder, batch, Draws(0, 0, list(range(b))), weights, vgg)
            stats.update(_state_bytes(loss))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, peak = timed(step, device, repeat)
    return {"step_s": statistics.median(times), "peak_gib": peak} | stats


def inference(model, size, precision, device) -> dict:
    """validate's reconstruction and cache's encoding (8 colours) of one clip: seconds and peak GiB each."""
    from wanalpha.cache import encode_clip
    from wanalpha.data.dataset import to_model_space
    from wanalpha.validate import reconstruct

    t, h, w, _ = size
    clip = _clip(t, h, w, 1)
    rgb_u8, alpha_u8 = clip["rgb"][0].numpy(), clip["alpha"][0].numpy()
    result = {}
    with torch.no_grad():
        times, peak = timed(lambda i: reconstruct(model, rgb_u8, alpha_u8, 0, precision), device, 1)
        result["validate"] = {"s": times[0], "peak_gib": peak}
        rgb, alpha = to_model_space(
            torch.from_numpy(rgb_u8)[None].to(device), torch.from_numpy(alpha_u8)[None].to(device)
        )
        times, peak = timed(lambda i: encode_clip(model.encoder, rgb, alpha, list(range(8)), precision), device, 1)
        result["cache"] = {"s": times[0], "peak_gib": peak}
    return result


def parse_size(text: str) -> tuple[int, int, int, int]:
    dims, _, batch = text.partition(":")
    t, h, w = (int(v) for v in dims.split("x"))
    return t, h, w, int(batch or 1)


def _run(name, fn, report, device) -> None:
    try:
        result = fn()
        extra = f"{result.get('state_device_gib', 0):8.1f}{result.get('state_host_gib', 0):8.1f}"
        print(f"{name:36s}{result['step_s']:9.2f}{result['peak_gib']:10.2f}{extra}", flush=True)
    except torch.OutOfMemoryError:
        result = {"oom": True}
        print(f"{name:36s}{'OOM':>9s}", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report["results"][name] = result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["17x272x272:2", "17x480x832", "33x480x832", "81x480x832"])
    parser.add_argument("--variants", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--modes", nargs="+", default=["uncached", "cached"], choices=["uncached", "cached"])
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--no-checkpointing", action="store_true", help="plain autograd through the decoders")
    parser.add_argument("--state-budget-gib", type=float, default=None, help="device GiB for saved cache states")
    parser.add_argument("--perceptual", type=float, default=1.0, help="VGG16 term weight (train-merge's default 1)")
    parser.add_argument("--no-checkpoint-blocks", action="store_true", help="chunked.CHECKPOINT_BLOCKS off")
    parser.add_argument("--no-inference", action="store_true", help="skip validate's and cache's passes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    if args.state_budget_gib is not None:
        chunked.DEFAULT_STATE_BUDGET = int(args.state_budget_gib * 2**30)
    checkpointing = not args.no_checkpointing
    chunked.CHECKPOINT_BLOCKS = False if args.no_checkpoint_blocks else "gpu"
    weights = LossWeights(perceptual=args.perceptual)
    vgg = VGG16Features().to(device) if args.perceptual > 0 else None  # random weights: the same work
    sizes = [(s, parse_size(s)) for s in args.sizes]
    report = {
        **environment(device),
        "precision": args.precision,
        "checkpointing": checkpointing,
        "perceptual": args.perceptual,
        "state_budget_gib": chunked.DEFAULT_STATE_BUDGET / 2**30
        if chunked.DEFAULT_STATE_BUDGET is not None
        else (0.0 if device.type == "cuda" else None),  # None: no limit (the CPU)
        "checkpoint_blocks": chunked.CHECKPOINT_BLOCKS and device.type == "cuda",
        "results": {},
    }
    print(
        f"{report['device']}, precision {args.precision}, checkpointing {checkpointing}, state budget "
        f"{report['state_budget_gib']} GiB, torch {report['torch']}"
    )
    print(f"{'step':36s}{'step s':>9s}{'peak GiB':>10s}{'st dev':>8s}{'st host':>8s}")
    if "v1" in args.variants:
        model = build(device)
        model.merge.train()
        model.rgb_decoder.gradient_checkpointing = model.alpha_decoder.gradient_checkpointing = checkpointing
        model.merge.gradient_checkpointing = checkpointing
        for text, size in sizes:
            for mode in args.modes:
                cached = mode == "cached"
                _run(
                    f"v1 {mode} {text}",
                    lambda s=size, c=cached: v1_step_time(
                        model, s, args.precision, args.repeat, device, c, weights, vgg
                    ),
                    report,
                    device,
                )
        if not args.no_inference:
            apply_vae_runtime(model.eval(), GPU_LAYOUT)  # as validate and cache run it
            for text, size in sizes:
                if size[3] == 1:
                    result = inference(model, size, args.precision, device)
                    report["results"][f"inference {text}"] = result
                    v, c = result["validate"], result["cache"]
                    print(
                        f"inference {text}: validate {v['s']:.2f} s / {v['peak_gib']:.2f} GiB, cache (8 colours) "
                        f"{c['s']:.2f} s / {c['peak_gib']:.2f} GiB",
                        flush=True,
                    )
        del model
    if "v2" in args.variants:
        model = build(device, "v2")
        trainable = V2Trainable(model, 128, torch.Generator().manual_seed(0)).to(device)
        for decoder in trainable.decoders().values():
            decoder.gradient_checkpointing = checkpointing
        for text, size in sizes:
            _run(
                f"v2 uncached {text}",
                lambda s=size, e=model.encoder: v2_step_time(
                    trainable, e, s, args.precision, args.repeat, device, weights, vgg
                ),
                report,
                device,
            )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
