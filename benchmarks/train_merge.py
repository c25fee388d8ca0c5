"""Stage-1 training step benchmark: one `merge_step` + backward + AdamW update of the full-size RGB-alpha VAE.

    python benchmarks/train_merge.py                          # bf16 autocast, several clip sizes, on the GPU
    python benchmarks/train_merge.py --device cpu --sizes 5x32x32

Synthetic weights (Wan2.1 layout; the work does not depend on the values) and random clips. Reports the median step
time over --repeat steps after one warm-up step, and the peak allocated memory; a size that does not fit is reported
as OOM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import timed  # noqa: E402
from wanalpha.checkpoints.vae import decoder_lora_pairs, merge_lora  # noqa: E402
from wanalpha.losses import LossWeights  # noqa: E402
from wanalpha.models.rgba import RGBAlphaVAE  # noqa: E402
from wanalpha.runtime import autocast  # noqa: E402
from wanalpha.train_merge import draw_colours, merge_step  # noqa: E402
from wanalpha.training import Draws  # noqa: E402


def build(device: torch.device) -> RGBAlphaVAE:
    torch.manual_seed(0)
    model = RGBAlphaVAE()
    # Give the decoders a LoRA merge as decoder.bin would (rank 128 deltas), so weights differ like the real ones.
    lora = {}
    for side in ("fgr", "pha"):
        for name, module in model.rgb_decoder.decoder.named_modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                key = f"vae_{side}.decoder.{name}" + (".conv3D" if isinstance(module, torch.nn.Conv3d) else "")
                extra = [1] * (module.weight.ndim - 2)
                lora[f"{key}.lora_A.default.weight"] = torch.randn(8, module.in_channels, *module.kernel_size) * 0.01
                lora[f"{key}.lora_B.default.weight"] = torch.randn(module.out_channels, 8, *extra) * 0.01
    pairs = decoder_lora_pairs(lora)
    for side, decoder in (("rgb", model.rgb_decoder), ("alpha", model.alpha_decoder)):
        decoder.load_state_dict(merge_lora(decoder.state_dict(), pairs[side], "synthetic"))
    return model.to(device)


def step_time(model, size, precision, repeat, device) -> dict:
    t, h, w = size
    optimizer = torch.optim.AdamW(model.merge.parameters(), lr=1e-4)
    batch = {
        "rgb": torch.randint(0, 256, (1, t, h, w, 3), dtype=torch.uint8),
        "alpha": torch.randint(0, 256, (1, t, h, w), dtype=torch.uint8),
        "index": torch.tensor([0]),
    }

    def step(i: int) -> None:
        with autocast(device, precision):
            loss, _ = merge_step(model, batch, draw_colours(Draws(0, 0, [i]), list(range(8))), LossWeights())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, peak = timed(step, device, repeat)
    return {"step_s": statistics.median(times), "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["17x480x832", "33x480x832", "81x480x832"])
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every decoder activation")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build(device)
    model.merge.train()
    model.rgb_decoder.gradient_checkpointing = model.alpha_decoder.gradient_checkpointing = not args.no_checkpointing
    report = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": args.precision,
        "gradient_checkpointing": not args.no_checkpointing,
        "results": {},
    }
    print(
        f"{report['device']}, precision {args.precision}, checkpointing {not args.no_checkpointing}, "
        f"torch {report['torch']}"
    )
    print(f"{'frames x H x W':18s}{'step s':>10s}{'peak GiB':>10s}")
    for size in args.sizes:
        dims = tuple(int(v) for v in size.split("x"))
        try:
            result = step_time(model, dims, args.precision, args.repeat, device)
            print(f"{size:18s}{result['step_s']:10.2f}{result['peak_gib']:10.1f}")
        except torch.OutOfMemoryError:
            result = {"oom": True}
            print(f"{size:18s}{'OOM':>10s}")
            torch.cuda.empty_cache()
        report["results"][size] = result
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
