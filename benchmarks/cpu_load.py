"""A CPU run beside busy processes: `wanalpha demo --quick` idle and with N processes spinning beside it, with the
threads wanalpha chooses (the free cores) and with a fixed count (PyTorch's default: one per core).

    python benchmarks/cpu_load.py                  # busy 2, fixed = the core count
    python benchmarks/cpu_load.py --busy 4 --fixed 8

Wall time of each run and the ratio loaded/idle; the fair share on C cores beside B busy processes is about
(C + B) / C of the idle time when B ≤ C. Prints JSON (machine, date, settings, times).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed_demo(out: Path, threads: int | None) -> float:
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    env.pop("WANALPHA_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "wanalpha", "demo", "--quick", "--out", str(out)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=2, help="processes spinning beside the run")
    parser.add_argument("--fixed", type=int, default=os.cpu_count(), help="the fixed thread count to compare")
    args = parser.parse_args()
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, threads in (("chosen", None), ("fixed", args.fixed)):
            times[f"idle, {label}"] = timed_demo(Path(tmp) / f"idle-{label}", threads)
        spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            for label, threads in (("chosen", None), ("fixed", args.fixed)):
                times[f"busy {args.busy}, {label}"] = timed_demo(Path(tmp) / f"busy-{label}", threads)
        finally:
            for proc in spin:
                proc.kill()
                proc.wait()
    ratios = {label: times[f"busy {args.busy}, {label}"] / times[f"idle, {label}"] for label in ("chosen", "fixed")}
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "date": dt.date.today().isoformat(),
                "busy": args.busy,
                "fixed_threads": args.fixed,
                "seconds": times,
                "loaded_over_idle": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
