"""The training loop the training commands share (train-merge, train-dit): accelerate at the edges, exact resume.

Each command supplies one step function `step(batch, generator) -> (loss, metrics)` (DESIGN §7.6) and its own
export of the trainable weights; this module runs epochs (a permutation seeded by (seed, epoch), split across
ranks), gradient accumulation, clipping, logging (progress bar, loss_log.csv, TensorBoard) and training states
(checkpoints/step-N: trainable tensors, optimizer, scheduler, position, every rank's generator), written atomically
every `save_steps` and on Ctrl-C. A resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from wanalpha.data.files import atomic_path, atomic_write_text
from wanalpha.errors import WanAlphaError


@dataclass
class Position:
    """Where training stands: `update` counts optimizer steps; `batch` counts batches into `epoch`."""

    epoch: int = 0
    batch: int = 0
    update: int = 0


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for one epoch: a permutation seeded by (seed, epoch), split across ranks (padded by
    wrapping so every rank runs the same number of steps)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = math.ceil(n / world)
    order = (order * math.ceil(per_rank * world / n))[: per_rank * world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_state(
    accelerator, out: Path, tensors: dict[str, torch.Tensor], optimizer, scheduler, pos: Position, generator, limit: int
) -> None:
    """Write checkpoints/step-N atomically (temp folder + rename): the trainable tensors, optimizer, scheduler,
    position, and every rank's generator state."""
    final = out / "checkpoints" / f"step-{pos.update}"
    tmp = out / "checkpoints" / f".tmp-step-{pos.update}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(generator.get_state(), tmp / f"generator_rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(pos) | {"world_size": accelerator.num_processes}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, out: Path, optimizer, scheduler, generator) -> tuple[Position, dict] | None:
    """The latest training state: restores optimizer, scheduler and generator; returns (position, trainable
    tensors) for the caller to load into its module."""
    from safetensors.torch import load_file

    states = _checkpoints(out)
    if not states:
        return None
    state = states[-1]
    position = json.loads((state / "position.json").read_text())
    if position.pop("world_size") != accelerator.num_processes:
        raise WanAlphaError(f"{state} was written by a run with a different number of processes than this one "
                            f"({accelerator.num_processes}); resume with the same number of GPUs")  # fmt: skip
    tensors = load_file(str(state / "trainable.safetensors"))
    opt = torch.load(state / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    generator.set_state(torch.load(state / f"generator_rank{accelerator.process_index}.pt", weights_only=True))
    return Position(**position), tensors


class LossLog:
    """loss_log.csv (step, epoch, lr, loss, one column per term) + TensorBoard; rows past a resumed step are
    dropped so a resumed run continues the file without duplicates."""

    def __init__(self, out: Path, resume_update: int, console: Console) -> None:
        self.path = out / "loss_log.csv"
        self.rows: list[dict] = []
        if resume_update and self.path.is_file():
            with self.path.open(newline="") as fh:
                self.rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_update]
        self.columns: list[str] | None = list(self.rows[0]) if self.rows else None
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(out / "tensorboard"), purge_step=resume_update + 1 if resume_update else None
            )
        except ImportError:
            console.print("[yellow]note:[/] TensorBoard is not installed; logging to loss_log.csv only")

    def add(self, step: int, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        row = {"step": step, "epoch": epoch, "lr": lr} | metrics
        if self.columns is None:
            self.columns = ["step", "epoch", "lr", "loss"] + sorted(k for k in metrics if k != "loss")
        self.rows.append(row)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.add_scalar("train/lr", lr, step)

    def flush(self) -> None:
        if self.columns is None:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(rows: list[dict], path: Path, title: str = "loss") -> None:
    """A small PNG of the total loss per step (OpenCV drawing: no plotting library needed)."""
    import cv2
    import numpy as np

    if len(rows) < 2:
        return
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    w, h, m = 800, 400, 50
    img = np.full((h, w, 3), 255, np.uint8)
    lo, hi = float(loss.min()), float(loss.max()) or 1.0
    span = (hi - lo) or 1.0
    xs = m + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (w - 2 * m)
    ys = h - m - (loss - lo) / span * (h - 2 * m)
    cv2.rectangle(img, (m, m), (w - m, h - m), (200, 200, 200), 1)
    cv2.polylines(img, [np.stack([xs, ys], 1).astype(np.int32)], False, (200, 80, 30), 2, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(img, title, (m, 30), font, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{hi:.4g}", (5, m + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{lo:.4g}", (5, h - m), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"step {int(steps.min())}", (m, h - 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"step {int(steps.max())}", (w - m - 80, h - 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), img)


@dataclass(frozen=True)
class LoopSettings:
    name: str
    batch_size: int
    gradient_accumulation_steps: int
    num_epochs: int
    max_steps: int | None
    seed: int
    save_steps: int
    log_steps: int
    num_workers: int
    max_grad_norm: float
    checkpoints_total_limit: int
    resume: bool


StepFn = Callable[[dict, torch.Generator], tuple[torch.Tensor, dict[str, float]]]


def train(
    accelerator,
    settings: LoopSettings,
    out: Path,
    dataset: torch.utils.data.Dataset,
    module: torch.nn.Module,
    optimizer,
    scheduler,
    step: StepFn,
    trainable: Callable[[], dict[str, torch.Tensor]],
    load_trainable: Callable[[dict[str, torch.Tensor]], None],
    on_epoch_end: Callable[[Position], None],
    on_step_save: Callable[[Position], None] | None = None,
    on_update: Callable[[Position], None] | None = None,
    describe: Callable[[Position, dict[str, float]], str] | None = None,
    collate: Callable | None = None,
) -> tuple[Position, list[dict]]:
    """Run (or resume) training; returns the final position and the logged rows. The callbacks run on the main
    process: on_epoch_end after a complete epoch, on_step_save with each training state, on_update after each
    optimizer update."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True, highlight=False)
    main = accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:  # every process would think it is the main one and they would race on the outputs
        raise WanAlphaError(f"launched as {launched} processes but accelerate sees {world}; use `accelerate launch`, "
                            "or on the CPU set ACCELERATE_USE_CPU=true")  # fmt: skip
    s = settings
    generator = torch.Generator().manual_seed(s.seed * 1000 + 7 + rank)
    batches_per_epoch = len(epoch_batches(len(dataset), s.batch_size, s.seed, 0, rank, world))
    accum = s.gradient_accumulation_steps
    total_updates = math.ceil(batches_per_epoch / accum) * s.num_epochs
    if s.max_steps is not None:
        total_updates = min(total_updates, s.max_steps)

    pos = Position()
    if s.resume:
        loaded = load_state(accelerator, out, optimizer, scheduler, generator)
        if loaded is None:
            raise WanAlphaError(f"--resume: no training state in {out / 'checkpoints'}; start without --resume")
        pos, tensors = loaded
        load_trainable(tensors)
    elif _checkpoints(out) and main:
        console.print(f"[yellow]note:[/] {out} holds training states from an earlier run; pass --resume to "
                      "continue it (starting afresh overwrites them)")  # fmt: skip
    log = LossLog(out, pos.update, console) if main else None
    describe = describe or (lambda p, m: f"epoch {p.epoch} loss {m['loss']:.4f}")

    def save(p: Position) -> None:
        save_state(accelerator, out, trainable(), optimizer, scheduler, p, generator, s.checkpoints_total_limit)
        if log is not None:
            log.flush()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    window: list[dict[str, float]] = []
    # The trainable weights and optimizer change only at update boundaries: an interrupt saves the last one.
    boundary = (Position(**asdict(pos)), generator.get_state())
    try:
        with Progress(*columns, console=console, disable=not main) as progress:
            task = progress.add_task(s.name, total=total_updates, completed=pos.update)
            while pos.update < total_updates and pos.epoch < s.num_epochs:
                batches = epoch_batches(len(dataset), s.batch_size, s.seed, pos.epoch, rank, world)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=batches[pos.batch :], num_workers=s.num_workers, collate_fn=collate,
                    pin_memory=accelerator.device.type == "cuda",
                )  # fmt: skip
                module.train()
                for batch in loader:
                    group_end = min((pos.batch // accum + 1) * accum, len(batches))
                    group = group_end - (pos.batch // accum) * accum
                    sync = pos.batch + 1 == group_end
                    no_sync = accelerator.no_sync(module) if not sync else contextlib.nullcontext()
                    with accelerator.autocast(), no_sync:
                        loss, metrics = step(batch, generator)
                        accelerator.backward(loss / group)
                    window.append(metrics)
                    pos.batch += 1
                    if not sync:
                        continue
                    if s.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for p in module.parameters() if p.requires_grad],
                                                    s.max_grad_norm)  # fmt: skip
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    pos.update += 1
                    averaged = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    window.clear()
                    if world > 1:  # every rank's metrics, so the log describes the whole global batch
                        keys = sorted(averaged)
                        values = torch.tensor([averaged[k] for k in keys], device=accelerator.device)
                        averaged = dict(zip(keys, accelerator.reduce(values, reduction="mean").tolist(), strict=True))
                    progress.update(task, advance=1, description=describe(pos, averaged))
                    if log is not None and pos.update % s.log_steps == 0:
                        log.add(pos.update, pos.epoch, scheduler.get_last_lr()[0], averaged)
                    if pos.update % s.save_steps == 0:
                        save(pos)
                        if on_step_save is not None and main:
                            on_step_save(pos)
                    if on_update is not None and main:  # e.g. previews; the module is back in train mode after
                        on_update(pos)
                        module.train()
                    boundary = (Position(**asdict(pos)), generator.get_state())
                    if pos.update >= total_updates:
                        break
                if pos.batch >= len(batches):  # the epoch is complete
                    if main:
                        on_epoch_end(pos)
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    boundary = (Position(**asdict(pos)), generator.get_state())
        save(pos)
    except KeyboardInterrupt:
        if world == 1:
            pos, state = boundary
            generator.set_state(state)
            save(pos)
        raise
    finally:
        if log is not None:
            log.close()
    rows = log.rows if log is not None else []
    if main:
        plot_loss_curve(rows, out / "loss_curve.png", f"{s.name} loss")
        last = float(rows[-1]["loss"]) if rows else float("nan")
        Console(highlight=False).print(f"{s.name}: {pos.update} updates, {pos.epoch} epochs complete, last loss "
                                       f"{last:.4f}; outputs in {out}")  # fmt: skip
    return pos, rows
