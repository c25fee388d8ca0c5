"""How many CPU threads a run's PyTorch work uses: as many as there are free cores, at least one.

PyTorch's default is one OpenMP thread per core. Where other work already keeps cores busy (a laptop is rarely
idle), threads that outnumber the free cores spin at every barrier waiting for each other and a CPU run slows
down 8-10× (measured on 2 cores beside 2 busy processes, docs/benchmarks.md); threads matched to the free cores
degrade to the fair share instead. Busy cores are counted from the runnable tasks the kernel reports now, so a run
that starts beside fresh work sees it at once (and one that starts after work ended is not held back).

`OMP_NUM_THREADS` or `WANALPHA_THREADS` set by the user win. Torch-free: the choice is made before torch loads.
"""

from __future__ import annotations

import math
import os
import sys
import time

ENV = "WANALPHA_THREADS"


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _cgroup_quota() -> float | None:
    """CPUs the cgroup's quota allows (cgroup v2 cpu.max, v1 cfs files), None where there is none."""
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            quota, period = fh.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", encoding="ascii") as fh:
            quota = int(fh.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us", encoding="ascii") as fh:
            period = int(fh.read())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """The cores this process may use: its affinity (a container's cpuset, taskset), capped by a cgroup CPU quota."""
    cpus = len(_affinity())
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _busy_of(cpus: set[int], interval: float = 0.05) -> float:
    """Busy time of `cpus` over `interval` from /proc/stat (1.0 per fully busy core); 0 where it cannot be read."""

    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        with open("/proc/stat", encoding="ascii") as fh:
            for line in fh:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    values = [int(v) for v in fields]
                    out[int(name[3:])] = (sum(values), values[3] + (values[4] if len(values) > 4 else 0))
        return out

    try:
        before = sample()
        time.sleep(interval)
        after = sample()
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (total, idle) in after.items():
        if cpu in before and total > before[cpu][0]:
            busy += 1 - (idle - before[cpu][1]) / (total - before[cpu][0])
    return busy


def busy_cores(samples: int = 5, interval: float = 0.01) -> float:
    """Cores other work keeps busy now. On a whole machine: the median count of runnable tasks besides this one over
    `samples` reads of Linux's /proc/loadavg (an instant view: the load average lags by a minute). Limited to some
    cores (a cpuset, taskset) the host's count says nothing of ours: the busy time of our cores (/proc/stat); under
    a CPU quota alone, none (the quota is ours). Elsewhere the 1-minute load average; 0 where nothing can be read."""
    allowed = _affinity()
    if len(allowed) < (os.cpu_count() or len(allowed)):
        return _busy_of(allowed)
    if _cgroup_quota():
        return 0.0
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
    the count chosen, or None when the user's setting stands. Where torch is loaded already (a program that imported
    it before calling the CLI), its intra-op thread count is set to the same. DataLoader workers use one thread each
    (PyTorch)."""
    environ = os.environ if environ is None else environ
    threads = None
    if environ.get(ENV):
        environ["OMP_NUM_THREADS"] = environ[ENV]
    elif not environ.get("OMP_NUM_THREADS"):
        threads = choose_threads()
        environ["OMP_NUM_THREADS"] = str(threads)
    count = environ["OMP_NUM_THREADS"]
    torch = sys.modules.get("torch")
    if environ is os.environ and torch is not None and count.isdigit() and int(count) > 0:
        torch.set_num_threads(int(count))
    return threads
