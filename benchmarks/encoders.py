"""generate's video encoders one at a time on this machine's CPU: each file of a clip written alone from a smooth
synthetic clip (common.smooth_picture, the size of generate's, as decode_writers.py's smooth frames), wall and CPU
time.

    python benchmarks/encoders.py --out encoders.json                   # 81 × 480 × 832, every format
    python benchmarks/encoders.py --formats mov --threads slice frame   # ProRes with slice and frame threads

--threads: how the encoders of video.FRAME_THREADED run, `frame` (the writers' setting: FFmpeg's frame threads) or
`slice` (PyAV's default); the other encoders as the writers run them either way. The packets of both settings are
compared (equal: the same file but for its threading). CPU time is the process's, the encoder's threads included.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import smooth_picture  # noqa: E402
from wanalpha.data import video  # noqa: E402
from wanalpha.data.render import to_uint8  # noqa: E402

FORMATS = ("rgb_mp4", "alpha_mp4", "webm", "mov")


def clip(frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(t,H,W,3) RGB and (t,H,W) alpha uint8: common.smooth_picture as generate turns decoded frames into bytes."""
    rgb, alpha = smooth_picture(0, frames, height, width)
    return to_uint8(rgb)[0].permute(1, 2, 3, 0).numpy(), to_uint8(alpha)[0, 0].numpy()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def encode(fmt: str, rgb: np.ndarray, alpha: np.ndarray, folder: Path, fps: float) -> dict:
    """One format's file written alone, in the writers' chunks (1 frame, then 4 at a time): wall and CPU seconds and
    an MD5 of its packets."""
    path = folder / f"clip_{fmt}"
    if fmt in ("rgb_mp4", "alpha_mp4"):
        encoder, frames = video.h264_encoder(path.with_suffix(".mp4"), fps), rgb if fmt == "rgb_mp4" else alpha
    else:
        encoder = video.rgba_encoder(path.with_suffix("." + fmt), fps, fmt)
        frames = np.concatenate([rgb, alpha[..., None]], axis=-1)
    cpu, start = _cpu(), time.perf_counter()
    encoder.write(frames[:1])
    for s in range(1, len(frames), 4):
        encoder.write(frames[s : s + 4])
    written = encoder.close()
    result = {"wall_s": time.perf_counter() - start, "cpu_s": _cpu() - cpu, "bytes": written.stat().st_size}
    import av

    digest = hashlib.md5()
    with av.open(str(written)) as container:
        for packet in container.demux(video=0):
            digest.update(bytes(packet))
    result["packets_md5"] = digest.hexdigest()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--fps", type=float, default=16.0)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--threads", nargs="+", choices=("frame", "slice"), default=["frame", "slice"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rgb, alpha = clip(args.frames, args.height, args.width)
    report = {
        "date": dt.date.today().isoformat(),
        "cpus": os.cpu_count(),
        "size": f"{args.frames}x{args.height}x{args.width}",
        "runs": {},
    }
    threaded = set(video.FRAME_THREADED)
    with tempfile.TemporaryDirectory() as folder:
        for threads in args.threads:
            video.FRAME_THREADED.clear()
            video.FRAME_THREADED.update(threaded if threads == "frame" else ())
            try:
                for fmt in args.formats:
                    result = report["runs"][f"{fmt}, {threads} threads"] = encode(
                        fmt, rgb, alpha, Path(folder), args.fps
                    )
                    print(
                        f"{fmt:10s} {threads:5s} threads: wall {result['wall_s']:.2f} s, CPU {result['cpu_s']:.2f} s, "
                        f"{result['bytes'] / 1e6:.2f} MB",
                        flush=True,
                    )
            finally:
                video.FRAME_THREADED.clear()
                video.FRAME_THREADED.update(threaded)
    for fmt in args.formats:
        digests = {report["runs"][f"{fmt}, {t} threads"]["packets_md5"] for t in args.threads}
        report[f"{fmt}_same_packets"] = len(digests) == 1
    print(
        f"{os.cpu_count()} CPUs; the same packets with either threading: "
        + ", ".join(f"{fmt} {report[f'{fmt}_same_packets']}" for fmt in args.formats)
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
