"""CPU threads matched to the free cores (issue #26): a run beside busy processes degrades to its fair share instead
of spinning threads that outnumber the cores."""

from __future__ import annotations

import subprocess
import sys

import pytest

from wanalpha import threads


@pytest.mark.parametrize(
    ("cpus", "busy", "expected"),
    [(2, 0, 2), (2, 1, 1), (2, 2, 1), (2, 7, 1), (8, 3, 5), (8, 2.4, 6), (16, 0, 16), (1, 0, 1), (4, -1, 4)],
)
def test_threads_are_the_free_cores(cpus: int, busy: float, expected: int) -> None:
    assert threads.choose_threads(cpus, busy) == expected


def test_the_user_setting_wins() -> None:
    env = {"OMP_NUM_THREADS": "3"}
    assert threads.configure(env) is None and env["OMP_NUM_THREADS"] == "3"
    env = {"WANALPHA_THREADS": "5", "OMP_NUM_THREADS": "3"}
    assert threads.configure(env) is None and env["OMP_NUM_THREADS"] == "5"
    env: dict = {}
    chosen = threads.configure(env)
    assert chosen is not None and env["OMP_NUM_THREADS"] == str(chosen) and 1 <= chosen <= threads.usable_cpus()


def test_busy_processes_are_counted() -> None:
    """Two processes spinning beside this one are runnable tasks: at least two busy cores are seen (more if the
    machine is busier), so on two cores the run takes one thread."""
    spin = "import sys; sys.stdout.write('go\\n'); sys.stdout.flush()\nwhile True: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "go"  # spinning from here on
        if sys.platform == "linux":
            assert threads.busy_cores() >= 2
            assert threads.choose_threads(2) == 1
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_containers_and_cpusets(monkeypatch) -> None:
    """On a share of a host (a cpuset or taskset) the host's runnable tasks say nothing of our cores: their own busy
    time counts; a cgroup CPU quota caps the usable cores and is ours alone."""
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(16)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: None)
    monkeypatch.setattr(threads, "_busy_of", lambda cpus: 3.2 if cpus == set(range(16)) else 99)
    assert threads.usable_cpus() == 16 and threads.busy_cores() == 3.2 and threads.choose_threads() == 13
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(128)))
    monkeypatch.setattr(threads, "_cgroup_quota", lambda: 3.5)
    assert threads.usable_cpus() == 4 and threads.busy_cores() == 0.0 and threads.choose_threads() == 4
