"""How many CPU threads a run's PyTorch work uses: as many as there are free cores, at least one.

PyTorch's default is one OpenMP thread per core. Where other work already keeps cores busy (a laptop is rarely
idle), threads that outnumber the free cores spin at every barrier waiting for each other and a CPU run slows
down 8-10× (measured on 2 cores beside 2 busy processes, docs/benchmarks.md); threads matched to the free cores
degrade to the fair share instead. Busy cores are counted from the runnable tasks the kernel reports now, so a run
that starts beside fresh work sees it at once (and one that starts after work ended is not held back).

`OMP_NUM_THREADS` or `WANALPHA_THREADS` set by the user win. Torch-free: the choice is made before torch loads.
"""

from __future__ import annotations

import os
import time

ENV = "WANALPHA_THREADS"


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.01) -> float:
    """Cores other work keeps busy now: the median count of runnable tasks besides this one over `samples` reads of
    Linux's /proc/loadavg (an instant view: the load average lags by a minute); elsewhere the 1-minute load
    average; 0 where neither can be read."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)  # minus this process
        except (OSError, ValueError, IndexError):
            break
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return float(max(0, sorted(counts)[len(counts) // 2]))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(cpus: int | None = None, busy: float | None = None) -> int:
    """Threads for this run: the free cores (usable minus busy, rounded), at least 1, at most the usable cores."""
    cpus = usable_cpus() if cpus is None else cpus
    busy = busy_cores() if busy is None else busy
    return max(1, min(cpus, round(cpus - busy)))


def configure(environ: dict | None = None) -> int | None:
    """Set OMP_NUM_THREADS (read when torch loads) for this run unless the user set it or WANALPHA_THREADS; returns
    the count chosen, or None when the user's setting stands. DataLoader workers use one thread each (PyTorch)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV):
        environ["OMP_NUM_THREADS"] = environ[ENV]
        return None
    if environ.get("OMP_NUM_THREADS"):
        return None
    threads = choose_threads()
    environ["OMP_NUM_THREADS"] = str(threads)
    return threads
