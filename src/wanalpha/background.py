"""Work on a helper thread that its caller can stop: generate reads the weights there while its own thread prepares
the GPU kernels it will run (PyTorch keeps cuDNN's plans and cuBLAS's handles per thread, so the thread that samples
and decodes is the one that must prepare them).

Stopping is cooperative: the work calls `checkpoint()` between its units (a tensor read, a phase), which raises
`Stopped` once the caller has asked it to stop; elsewhere `checkpoint()` does nothing.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

_local = threading.local()


class Stopped(Exception):
    """The work was asked to stop (its caller failed or was interrupted); nobody reads its result."""


def checkpoint() -> None:
    """Inside `Background` work: raise Stopped once its caller asked it to stop. Elsewhere: nothing."""
    stop = getattr(_local, "stop", None)
    if stop is not None and stop.is_set():
        raise Stopped("asked to stop")


class Background(Generic[T]):
    """`work()` on a thread of its own, started at once, with `device` as that thread's current CUDA device (PyTorch's
    current device is per thread: a helper thread would start on GPU 0). `failed` is set the moment the work fails,
    so the caller can end its own work early; `result()` waits for it and returns its value or raises its error;
    `stop()` asks it to end at its next `checkpoint()` and waits for it, so that none of its GPU work outlives the
    caller's failure. `quiet`: stop() says nothing on stderr (the processes of a multi-GPU run other than the first,
    which would each print the same line)."""

    def __init__(
        self, work: Callable[[], T], device: torch.device | None = None, name: str = "background", quiet: bool = False
    ) -> None:
        self.failed = threading.Event()
        self.quiet = quiet
        self._stop = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work, device), name=name, daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], T], device: torch.device | None) -> None:
        _local.stop = self._stop
        try:
            if device is not None and device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)
            self._value = work()
        except BaseException as error:  # noqa: BLE001 - handed to the caller by result()
            self._error = error
            self.failed.set()

    def result(self) -> T:
        """Wait for the work; its value, or its error raised here (with its own traceback)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def stop(self) -> None:
        """Ask the work to end at its next checkpoint and wait for it; what it returns or raises is dropped. A Ctrl-C
        during the wait (after whatever failed the caller: an error, or a first Ctrl-C) does not leave the work
        running behind the process's exit, GPU work and all: the wait goes on, saying so on stderr, and that
        KeyboardInterrupt is raised once the work has ended; another Ctrl-C leaves at once."""
        self._stop.set()
        try:
            self._thread.join()
        except KeyboardInterrupt:
            if not self.quiet:
                sys.stderr.write(f"{self._thread.name}: ending at its next step, a moment; Ctrl-C again to leave now\n")
            self._thread.join()
            raise


def moved(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """module.to(device) a leaf module at a time, with a `checkpoint()` after each: the move of a model of many GB
    (UMT5-XXL's 11, a bf16 14B DiT's 28) can be stopped part-way (its caller failed or was interrupted) instead of
    holding the caller's stop() until the last tensor is on the GPU. The same result as module.to(device)."""
    for child in module.modules():
        if next(child.children(), None) is None:
            child.to(device)
            checkpoint()
    return module.to(device)  # what containers hold themselves
