"""generate's decode stage: how much of it is the decoders and how much the writers running beside them.

    python benchmarks/decode_writers.py                     # 81×480×832, bf16 decoders, generate's GPU layout
    python benchmarks/decode_writers.py --device cpu --frames 5 --height 32 --width 32 --dtype fp32   # smoke

`wanalpha generate` decodes one latent chunk at a time and hands each chunk's frames to the writers (H.264 mp4s,
RGBA PNGs on a thread pool, and the --formats alpha containers on threads of their own: wanalpha.outputs), so the
files are written while the later chunks decode. This script runs `generate.decode_and_write` on one random latent
with random decoder weights (the decode's work does not depend on their values; the encoders' does on the frames'
content, and these noise-like frames cost them more than a generated clip: an upper bound), in one process:

- first: with generate's default formats (webm, mov), the process's first decode (its first-use costs included:
  the Triton kernels' compilation, which generate does while loading, and cuDNN's first plans for each shape);
- warm: the same again, twice (the decode stage, and the writers' time after its last chunk);
- decode only: generate's decode loop (its chunks decoded and handed over to the host) with nothing written;
- mp4s + PNGs only: --formats left empty;
- smooth frames: the decoders' chunks replaced by a smooth moving picture of the same shapes (`SmoothFrames`), for
  the writers' cost on frames closer to a generated clip's;
- files done at: for each run that wrote, when each file got its last write, from the decode's start (the PNGs:
  the last frame's), which tells which writer ends the stage;
- writer threads / writer process: the default formats written by threads of this process (ClipWriter) or by a child
  process (ProcessClipWriter, generate's choice on a GPU), `--writer-runs` times each; the runs without this label
  take generate's choice, with the child started as the decode begins; "started ahead": a child process started a
  second before it, as generate starts it while it samples (generate.writer_ahead).

The difference between "warm" and "decode only" is what the writers cost the decoding beside them (they share the
CPU with the thread that launches the decoders' kernels). Decode timings are CUDA-synchronised.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, files_done, random_decoders, smooth_picture  # noqa: E402
from wanalpha.generate import _decode_clip, decode_and_write  # noqa: E402
from wanalpha.outputs import WriterProcess  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Discarded:
    """A clip writer that drops the frames it is handed: generate's decode loop with nothing written."""

    def __enter__(self) -> Discarded:
        return self

    def __exit__(self, kind, error, trace) -> None:
        return None

    def add(self, rgb, alpha) -> None:
        pass

    def close(self) -> list:
        return []


class SmoothFrames:
    """The decoders with their chunks' values replaced by a smooth moving picture (common.smooth_picture), computed
    on the decoders' device: the decode's work and shapes unchanged, the writers given frames closer to a generated
    clip's than the random decoders' texture."""

    def __init__(self, vae) -> None:
        self.vae = vae

    def parameters(self):
        return self.vae.parameters()

    def decode_frames(self, z: torch.Tensor, tile_size=None):
        done = 0
        for rgb, _ in self.vae.decode_frames(z, tile_size=tile_size):
            t, (h, w) = rgb.shape[2], rgb.shape[-2:]
            yield smooth_picture(done, t, h, w, rgb.device)
            done += t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the decoders' weights")
    parser.add_argument("--writer-runs", type=int, default=2, help="runs of each writer kind (threads, process)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device(args.device)

    vae = random_decoders(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)  # as generate's
    latent = torch.randn(1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8, device=device)

    def written(formats: list[str], in_process: bool | None = None, ahead: bool = False, smooth=False) -> dict:
        process = WriterProcess() if ahead else None
        if ahead and device.type == "cuda":  # started during the sampling, in generate: ready when the decode begins
            time.sleep(1.0)
        with tempfile.TemporaryDirectory() as folder:
            stems = [Path(folder) / "output"]
            start = time.time()
            files, timings = decode_and_write(
                SmoothFrames(vae) if smooth else vae,
                [latent],
                stems,
                16.0,
                formats,
                in_process=in_process,
                ahead=process,
            )
            done = files_done(files, "output", start)  # which writer ends the stage
        return {"decode_s": timings["decode_s"], "write_s": timings["write_s"], "files_done_s": done}

    @torch.no_grad()
    def decode_only() -> dict[str, float]:
        _sync(device)
        start = time.perf_counter()
        _decode_clip(vae, latent, None, Discarded(), start_next=False)  # generate's decode loop and hand-over
        _sync(device)
        return {"decode_s": time.perf_counter() - start}

    runs = {
        "first, default formats": written(["webm", "mov"]),
        "warm, default formats": written(["webm", "mov"]),
        "warm, decode only": decode_only(),
        "warm, decode only, again": decode_only(),
        "warm, mp4s + PNGs only": written([]),
        "warm, default formats, again": written(["webm", "mov"]),
    }
    for i in range(args.writer_runs):  # alternating, so that drift on the machine touches both alike
        again = ", again" * (i > 0)
        runs[f"warm, default formats, writer threads{again}"] = written(["webm", "mov"], in_process=True)
        runs[f"warm, default formats, writer process{again}"] = written(["webm", "mov"], in_process=False)
        runs[f"warm, default formats, writer process started ahead{again}"] = written(
            ["webm", "mov"], False, ahead=True
        )
    runs["warm, default formats, smooth frames"] = written(["webm", "mov"], smooth=True)
    runs["warm, default formats, smooth frames, writer process started ahead"] = written(
        ["webm", "mov"], False, ahead=True, smooth=True
    )
    where = environment(device)
    print(
        f"{where['device']}, {args.frames}x{args.height}x{args.width}, {args.dtype} decoders, torch {torch.__version__}"
    )
    print(f"{'run':46} {'decode s':>9} {'write after s':>14}")
    for run, timing in runs.items():
        after = f"{timing['write_s']:14.3f}" if "write_s" in timing else f"{'—':>14}"
        print(f"{run:46} {timing['decode_s']:9.3f} {after}")
    for run, timing in runs.items():
        if "files_done_s" in timing:
            print(f"{run}: files done at (s) " + ", ".join(f"{k} {v:.2f}" for k, v in timing["files_done_s"].items()))
    if args.out:
        report = {
            **where,
            "size": f"{args.frames}x{args.height}x{args.width}",
            "dtype": args.dtype,
            "runs": runs,
        }
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
