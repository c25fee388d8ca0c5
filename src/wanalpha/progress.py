"""Progress a person sees at a terminal and in a log: rich's live bars and spinners on a terminal; where output is
piped (`make demo > log`, CI, nohup), plain lines instead — a line when a stage starts and, for long loops, one
every `LOG_SECONDS` (step, loss, rate, ETA), so a log shows a run is alive and how far it got."""

from __future__ import annotations

import contextlib
import os
import time

from rich.console import Console

LOG_SECONDS_ENV = "WANALPHA_LOG_SECONDS"


def log_seconds() -> float:
    """Seconds between plain progress lines (WANALPHA_LOG_SECONDS, default 30; 0 = every step)."""
    try:
        return max(0.0, float(os.environ.get(LOG_SECONDS_ENV, "30")))
    except ValueError:
        return 30.0


def status(console: Console, text: str):
    """A spinner with `text` on a terminal; elsewhere `text` as one plain line, said once."""
    if console.is_terminal:
        return console.status(text)
    console.print(f"{text} …", markup=False, highlight=False)
    return contextlib.nullcontext()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Plain lines for a loop of `total` steps when the console is not a terminal (a no-op on one)."""

    def __init__(self, console: Console, name: str, total: int, done: int = 0, unit: str = "step") -> None:
        self.console, self.name, self.total, self.unit = console, name, total, unit
        self.active = not console.is_terminal
        self.every = log_seconds()
        self.start_done, self.start = done, time.monotonic()
        self.last = -float("inf")

    def update(self, done: int, text: str = "") -> None:
        if not self.active:
            return
        now = time.monotonic()
        if now - self.last < self.every and done < self.total:
            return
        self.last = now
        rate = (done - self.start_done) / max(now - self.start, 1e-9)
        eta = _clock((self.total - done) / rate) if rate > 0 else "?"
        share = f"{100 * done / max(self.total, 1):.0f} %"
        detail = f", {text}" if text else ""
        line = f"{self.name}: {self.unit} {done}/{self.total} ({share}){detail}, {rate:.2f} {self.unit}s/s, ETA {eta}"
        self.console.print(line, markup=False, highlight=False)
