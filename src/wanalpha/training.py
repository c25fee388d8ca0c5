"""The training loop the training commands share (train-merge, train-dit): accelerate at the edges, exact resume.

Each command runs its own loop body over a `TrainingLoop` (one step function `step(batch, draws) -> (loss,
metrics)`, DESIGN §7.6, and its own files per update and per epoch); this module runs epochs (a permutation seeded
by (seed, epoch), split across ranks), gradient accumulation, clipping, logging (progress bar, loss_log.csv,
TensorBoard) and training states (checkpoints/step-N: trainable tensors, optimizer, scheduler, position), written
atomically every `save_steps` and on Ctrl-C. A resumed run replays exactly what an uninterrupted one would have done.

Random draws (background colours, noise, timesteps) come from one generator per sample, seeded by (seed, epoch, the
sample's place in the epoch's order), not by the process that runs it: a global batch trains the same on one GPU
as on eight, DDP or FSDP (accelerate's FSDP2: weights and optimizer state sharded; the training state is gathered
into one full file, so a sharded run's checkpoints load in a single process and vice versa). A dataset with
`set_epoch(epoch)` is told each epoch before its loader starts: its own draws (data augmentation) are then seeded by
(seed, epoch, item) in the same way.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console

from wanalpha.data.files import atomic_write_text, read_json, read_safetensors
from wanalpha.errors import WanAlphaError
from wanalpha.progress import PlainProgress


@dataclass
class Position:
    """Where training stands: `update` counts optimizer steps; `batch` counts batches into `epoch`."""

    epoch: int = 0
    batch: int = 0
    update: int = 0


def epoch_order(n: int, seed: int, epoch: int, world: int) -> list[int]:
    """The dataset indices of one epoch: a permutation seeded by (seed, epoch), padded by wrapping to a multiple of
    the process count (every rank runs the same number of steps)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = math.ceil(n / world)
    return (order * math.ceil(per_rank * world / n))[: per_rank * world]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for one epoch, as places in `epoch_order`: global batch u is places
    [u·world·batch_size, (u+1)·world·batch_size), so one process with batch_size·world sees the same batches."""
    places = list(range(len(epoch_order(n, seed, epoch, world))))[rank::world]
    return [places[i : i + batch_size] for i in range(0, len(places), batch_size)]


class Draws:
    """The random draws of one batch: a generator per sample, seeded by (seed, epoch, its place in the epoch), so
    what a sample draws does not depend on the process count, its batch-mates or an interruption."""

    def __init__(self, seed: int, epoch: int, places: list[int]) -> None:
        self.generators = [
            torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + p) % 2**63) for p in places
        ]

    def __len__(self) -> int:
        return len(self.generators)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample: (B,) int64."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self.generators])

    def randn(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Standard normal noise of `shape` per sample: (B, *shape) float32."""
        return torch.stack([torch.randn(tuple(shape), generator=g) for g in self.generators])


_SHARDED: weakref.WeakSet = weakref.WeakSet()  # the accelerators `make_accelerator` set up for FSDP


def sharded(accelerator) -> bool:
    """Whether accelerate shards the model (FSDP): state then moves through collectives every rank must join."""
    return accelerator in _SHARDED


OFFICIAL_START_FACTOR, OFFICIAL_START_STEPS = 1 / 3, 5  # torch ConstantLR's defaults, the official DiT schedule


def official_start_updates(processes: int) -> int:
    """Updates the official DiT training runs at lr/3: its `ConstantLR(optimizer)` (factor 1/3 for 5 scheduler steps)
    is stepped by accelerate's AcceleratedScheduler once per process per update, so ⌈5/N⌉ updates on N processes."""
    return -(-OFFICIAL_START_STEPS // processes)


def adamw_with_warmup(
    params, lr: float, weight_decay: float, warmup_steps: int, start_factor: float = 1.0, start_updates: int = 0
) -> tuple:
    """(AdamW, its LambdaLR): the learning rate rises linearly over `warmup_steps` updates, then stays (what both
    training commands use); the first `start_updates` updates also run at `start_factor` × (the official DiT
    training's ConstantLR start)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def factor(u: int) -> float:
        return min(1.0, (u + 1) / (warmup_steps + 1)) * (start_factor if u < start_updates else 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def make_accelerator(mixed_precision: str, broadcast_buffers: bool = True):
    """The Accelerator for a training command. accelerate routes FSDP only to accelerator devices; on the CPU
    (gloo; the tests) an FSDP launch gets the same FSDP2 plugin its GPU path builds from the environment.
    broadcast_buffers=False: DDP does not send process 0's buffers to the others before each forward (for frozen
    buffers every process loaded alike: the FP8 DiT's weights)."""
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin

    from wanalpha.runtime import default_device, resolve_precision

    handlers = [] if broadcast_buffers else [DistributedDataParallelKwargs(broadcast_buffers=False)]
    accelerator = Accelerator(
        mixed_precision=resolve_precision(mixed_precision, default_device()), kwargs_handlers=handlers
    )
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if use_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise WanAlphaError(
                "FSDP version 1 is not supported; set `fsdp_version: 2` in the accelerate config "
                "(configs/accelerate/fsdp.yaml)"
            )
        _SHARDED.add(accelerator)  # remembered here: on the CPU accelerate's state can fall back to MULTI_CPU later
    return accelerator


def trainable_state(accelerator, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full trainable tensors under their plain names. Every rank must call it: under FSDP it gathers the
    shards, and only the main process receives them (the others get {})."""
    if sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(module, options=options)
    plain = accelerator.unwrap_model(module)
    return {name: p.detach() for name, p in plain.named_parameters() if p.requires_grad}


def load_trainable_state(accelerator, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Full trainable tensors (from any run, sharded or not) into this run's module; every rank must call it."""
    if sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        accelerator.unwrap_model(module).load_state_dict(tensors, strict=False)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_state(
    accelerator,
    out: Path,
    tensors: dict[str, torch.Tensor],
    module,
    optimizer,
    scheduler,
    pos: Position,
    settings: LoopSettings,
) -> None:
    """Write checkpoints/step-N atomically (temp folder + rename): the trainable tensors (full, from
    `trainable_state`), the optimizer state (full, keyed by parameter name), scheduler and position. Every rank must
    call it. The files do not depend on how the run was spread over processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    final = out / "checkpoints" / f"step-{pos.update}"
    tmp = out / "checkpoints" / f".tmp-step-{pos.update}"
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # under FSDP: gathered to the main process
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options)
    if accelerator.is_main_process:
        from safetensors.torch import save_file

        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        layout = {
            "world_size": accelerator.num_processes,
            "batch_size": settings.batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        }
        (tmp / "position.json").write_text(json.dumps(asdict(pos) | layout))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[: -settings.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, out: Path, module, optimizer, scheduler, settings: LoopSettings):
    """The latest training state: restores optimizer and scheduler; returns (position, trainable tensors) for the
    caller to load into its module, or None. A state resumes on another number of processes (or with FSDP instead
    of DDP) as long as each update's global batch, processes × batch_size × gradient_accumulation_steps, is the same;
    the position is then counted in this run's batches."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    states = _checkpoints(out)
    if not states:
        return None
    state = states[-1]
    fix = f"remove {state} to resume from the state before it, or start without --resume"
    position = read_json(state / "position.json", fix)
    old = {k: position.pop(k) for k in ("world_size", "batch_size", "gradient_accumulation_steps") if k in position}
    old_world, old_batch = old.get("world_size", 1), old.get("batch_size", settings.batch_size)
    old_accum = old.get("gradient_accumulation_steps", settings.gradient_accumulation_steps)
    world, batch, accum = accelerator.num_processes, settings.batch_size, settings.gradient_accumulation_steps
    if old_world * old_batch * old_accum != world * batch * accum:
        raise WanAlphaError(
            f"{state} was trained with {old_world} process(es) × batch_size {old_batch} × "
            f"gradient_accumulation_steps {old_accum} samples per update; this run has {world} × "
            f"{batch} × {accum}; keep the product the same to resume"
        )
    pos = Position(**position)
    pos.batch = pos.batch // old_accum * accum  # a state is saved at an update boundary: whole updates done
    tensors = read_safetensors(state / "trainable.safetensors", fix)
    opt = torch.load(state / "optimizer.pt", weights_only=True, map_location="cpu")
    # A full state: FSDP distributes it into this rank's shards; otherwise it is keyed by the same parameter names.
    options = StateDictOptions(full_state_dict=sharded(accelerator))
    set_optimizer_state_dict(module, optimizer, opt["optimizer"], options=options)
    scheduler.load_state_dict(opt["scheduler"])
    return pos, tensors


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

    def annotate(self, step: int, epoch: int, values: dict[str, float], group: str) -> None:
        """Values measured at `step` outside the training step (train-dit's preview scores): columns
        `{group}_{name}` of that step's row (a row of their own, without a loss, when the step was not logged),
        after the training terms, and TensorBoard's `{group}/{name}`."""
        row = next((r for r in reversed(self.rows) if int(r["step"]) == step), None)
        if row is None:
            row = {"step": step, "epoch": epoch}
            self.rows.append(row)
        named = {f"{group}_{key}": value for key, value in values.items()}
        row.update(named)
        if self.columns is None:
            self.columns = ["step", "epoch", "lr", "loss"]
        self.columns += [k for k in named if k not in self.columns]
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{group}/{key}", value, step)

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


def loss_rows(rows: list[dict]) -> list[dict]:
    """The log's rows that hold a loss (a row of scores alone, logged at a step the loss was not, has none)."""
    return [r for r in rows if r.get("loss") not in (None, "")]


def plot_loss_curve(rows: list[dict], path: Path, title: str = "loss") -> None:
    """A small PNG of the total loss per step (OpenCV drawing: no plotting library needed)."""
    import cv2
    import numpy as np

    from wanalpha.data.video import write_image

    rows = loss_rows(rows)
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
    write_image(path, img[..., ::-1])  # drawn in OpenCV's BGR


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
    keep_epochs: int | None = None  # epoch files kept (the newest N); None: all of them


# The files each epoch (and step) leaves: feature_merge_epoch_E, rgba_vae_v2_epoch_E(.bin), epoch-E and epoch-E-STEP.
EPOCH_FILE = re.compile(r"^(?:feature_merge_epoch_|rgba_vae_v2_epoch_|epoch-)(\d+)(?:-\d+)?\.(?:safetensors|bin)$")


def prune_epochs(out: Path, epoch: int, keep: int | None) -> list[Path]:
    """Remove the epoch (and step) files of epochs older than the newest `keep` (up to `epoch`, just written); the
    newest epoch's files, the final ones among them, are never removed. Returns what was removed."""
    removed = []
    if keep is None:
        return removed
    for path in Path(out).iterdir():
        match = EPOCH_FILE.match(path.name)
        if match and int(match.group(1)) <= epoch - max(keep, 1):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _finite(module: torch.nn.Module) -> torch.Tensor:
    """Whether every trainable weight of this process (its shard, under FSDP) is finite: a 0-dim bool tensor."""
    local = [getattr(p, "_local_tensor", p) for p in module.parameters() if p.requires_grad]  # DTensor shards
    return torch.stack([torch.isfinite(p).all() for p in local]).all() if local else torch.tensor(True)


def _stop_if_diverged(accelerator, module, metrics: dict[str, float], pos: Position, out: Path) -> None:
    """Stop with one line, before anything of this update is saved, when the loss or a trained weight is no longer
    finite (every process takes the same decision: the loss is the reduced one, the weights' verdict is summed)."""
    bad_weights = (~_finite(module)).float().to(accelerator.device)
    if accelerator.num_processes > 1:
        bad_weights = accelerator.reduce(bad_weights, reduction="sum")
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    bad = (["the loss"] if "loss" in bad else bad[:3]) + (["a trained weight"] if bad_weights > 0 else [])
    if bad:
        raise WanAlphaError(
            f"training diverged at update {pos.update} (epoch {pos.epoch}): {', '.join(bad)} not "
            f"finite; nothing of it was saved (the newest training state in {out / 'checkpoints'} "
            "is the last good one); lower --learning-rate or set --max-grad-norm, then rerun with "
            "--resume"
        )


class Update(NamedTuple):
    """One optimizer update just made: its position, its logged metrics (averaged over the update's micro-batches
    and the processes) and, when a training state was saved with it (every save_steps), the trainable tensors saved
    (every rank has them)."""

    pos: Position
    metrics: dict[str, float]
    saved: dict[str, torch.Tensor] | None


class TrainingLoop:
    """The training loop of train-merge and train-dit, read top to bottom by the command that runs it:

        with TrainingLoop(accelerator, settings, out, module, optimizer, scheduler, trainable) as loop:
            if loop.resumed is not None:          # --resume: the trainable tensors of the newest training state
                load_my_weights(loop.resumed)
            for epoch in loop.epochs(dataset, collate):
                for batch, draws in epoch:        # this rank's micro-batches, from where the run stands
                    with loop.accumulate():       # autocast; no gradient sync until the update's last micro-batch
                        loss, metrics = my_step(batch, draws)
                        loop.backward(loss)
                    update = loop.update(metrics) # None until the update's last micro-batch; then the optimizer
                    if update is None:            # step, the divergence check, progress, log and (every
                        continue                  # save_steps) a training state
                    ...                           # the command's own work per update (step files, previews)
                tensors = epoch.end()             # the trainable tensors if the epoch is complete, else None
                ...                               # the command's epoch file (on the main process)

    Epochs are permutations seeded by (seed, epoch), split across ranks (`epoch_batches`); `trainable()` gives the
    full trainable tensors (e.g. `trainable_state`) and runs on every rank. Leaving the `with` block normally saves
    a final training state and prints the summary; Ctrl-C (KeyboardInterrupt, also SIGTERM) saves the last update
    boundary (one process) before it propagates. `epoch.end()`, `update()` and leaving the block are collectives
    under FSDP: every rank calls them."""

    def __init__(
        self,
        accelerator,
        settings: LoopSettings,
        out: Path,
        module: torch.nn.Module,
        optimizer,
        scheduler,
        trainable: Callable[[], dict[str, torch.Tensor]],
        describe: Callable[[Position, dict[str, float]], str] | None = None,
    ) -> None:
        self.accelerator, self.settings, self.out = accelerator, settings, Path(out)
        self.module, self.optimizer, self.scheduler, self.trainable = module, optimizer, scheduler, trainable
        self.describe = describe or (lambda p, m: f"epoch {p.epoch} loss {m['loss']:.4f}")
        self.console = Console(stderr=True, highlight=False)
        self.main = accelerator.is_main_process
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched != self.world:  # every process would think it is the main one and they would race on the outputs
            raise WanAlphaError(
                f"launched as {launched} processes but accelerate sees {self.world}; use `accelerate "
                "launch`, or on the CPU set ACCELERATE_USE_CPU=true"
            )
        self.pos = Position()
        self.resumed: dict[str, torch.Tensor] | None = None
        self.total_updates = 0
        self.rows: list[dict] = []
        self._window: list[dict[str, float]] = []
        self._sync = True  # whether the current micro-batch ends its update
        self._group = 1  # the micro-batches of the current update
        self._log: LossLog | None = None
        self._stack = contextlib.ExitStack()

    # -- the block -------------------------------------------------------------------------------------------------
    def __enter__(self) -> TrainingLoop:
        s = self.settings
        if s.resume:
            loaded = load_state(self.accelerator, self.out, self.module, self.optimizer, self.scheduler, s)
            if loaded is None:
                raise WanAlphaError(
                    f"--resume: no training state in {self.out / 'checkpoints'}; start without --resume"
                )
            self.pos, self.resumed = loaded
        elif _checkpoints(self.out) and self.main:
            self.console.print(
                f"[yellow]note:[/] {self.out} holds training states from an earlier run; pass --resume "
                "to continue it (starting afresh overwrites them)"
            )
        # The trainable weights and optimizer change only at update boundaries: an interrupt saves the last one.
        self._boundary = Position(**asdict(self.pos))
        self._log = LossLog(self.out, self.pos.update, self.console) if self.main else None
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        try:
            if kind is None:
                self._save(self.pos)
            elif issubclass(kind, KeyboardInterrupt) and self.world == 1:
                self.pos = self._boundary
                self._save(self.pos)
        finally:
            self._stack.close()
            if self._log is not None:
                self._log.close()
        if kind is None and self.main:
            self.rows = self._log.rows
            name = self.settings.name
            plot_loss_curve(self.rows, self.out / "loss_curve.png", f"{name} loss")
            losses = loss_rows(self.rows)
            last = float(losses[-1]["loss"]) if losses else float("nan")
            Console(highlight=False).print(
                f"{name}: {self.pos.update} updates, {self.pos.epoch} epochs complete, "
                f"last loss {last:.4f}; outputs in {self.out}"
            )
        return False

    def _save(self, pos: Position) -> dict[str, torch.Tensor]:
        tensors = self.trainable()
        save_state(self.accelerator, self.out, tensors, self.module, self.optimizer, self.scheduler, pos, self.settings)
        if self._log is not None:
            self._log.flush()
        return tensors

    def _progress(self, batches_per_epoch: int) -> None:
        """The progress bar (main process; plain lines when stderr is not a terminal), from the position."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        s = self.settings
        self.total_updates = math.ceil(batches_per_epoch / s.gradient_accumulation_steps) * s.num_epochs
        if s.max_steps is not None:
            self.total_updates = min(self.total_updates, s.max_steps)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar = self._stack.enter_context(Progress(*columns, console=self.console, disable=not self.main))
        self._task = self._bar.add_task(
            f"{s.name}: starting (workers, the first batch)", total=self.total_updates, completed=self.pos.update
        )
        self._plain = (
            PlainProgress(self.console, s.name, self.total_updates, self.pos.update, unit="update")
            if self.main
            else None
        )
        if self._plain is not None and self._plain.active:
            self.console.print(
                f"{s.name}: {self.total_updates} updates from update {self.pos.update}; starting "
                "(workers, the first batch)",
                markup=False,
            )

    @property
    def done(self) -> bool:
        return self.pos.update >= self.total_updates or self.pos.epoch >= self.settings.num_epochs

    # -- epochs and micro-batches ------------------------------------------------------------------------------------
    def epochs(self, dataset: torch.utils.data.Dataset, collate: Callable | None = None) -> Iterator[Epoch]:
        """The epochs still to run, each an iterable of this rank's (batch, draws) from where the run stands."""
        s = self.settings
        self._progress(len(epoch_batches(len(dataset), s.batch_size, s.seed, 0, self.rank, self.world)))
        while not self.done:
            epoch = Epoch(self, dataset, collate)
            yield epoch
            if epoch.complete:
                if self.main:
                    prune_epochs(self.out, self.pos.epoch, s.keep_epochs)
                self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0
                self._boundary = Position(**asdict(self.pos))
            elif not self.done:
                raise RuntimeError("an epoch's micro-batches must be run to their end (or to the last update)")

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: autocast, and no gradient sync before the update's last."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.accelerator.autocast())
        if not self._sync:
            stack.enter_context(self.accelerator.no_sync(self.module))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        """The micro-batch's backward, scaled by the number of micro-batches in its update."""
        self.accelerator.backward(loss / self._group)

    def log_scores(self, values: dict[str, float], group: str = "preview") -> None:
        """Scores measured at the current update outside the step (train-dit's preview samples): loss_log.csv
        columns `{group}_{name}` in the update's row, and TensorBoard's `{group}/{name}` (main process)."""
        if self._log is not None:
            self._log.annotate(self.pos.update, self.pos.epoch, values, group)

    def update(self, metrics: dict[str, float]) -> Update | None:
        """After a micro-batch's backward: None until the update's last micro-batch; then the optimizer update, the
        divergence check, progress, the loss log and (every save_steps) a training state."""
        s, pos = self.settings, self.pos
        self._window.append(metrics)
        pos.batch += 1
        if not self._sync:
            return None
        if s.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], s.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.update += 1
        averaged = {k: sum(m[k] for m in self._window) / len(self._window) for k in self._window[0]}
        self._window.clear()
        if self.world > 1:  # every rank's metrics, so the log describes the whole global batch
            keys = sorted(averaged)
            values = torch.tensor([averaged[k] for k in keys], device=self.accelerator.device)
            averaged = dict(zip(keys, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True))
        _stop_if_diverged(self.accelerator, self.module, averaged, pos, self.out)
        line = self.describe(pos, averaged)
        self._bar.update(self._task, advance=1, description=line)
        if self._plain is not None:
            self._plain.update(pos.update, line)
        if self._log is not None and pos.update % s.log_steps == 0:
            self._log.add(pos.update, pos.epoch, self.scheduler.get_last_lr()[0], averaged)
        saved = self._save(pos) if pos.update % s.save_steps == 0 else None
        self._boundary = Position(**asdict(pos))
        return Update(Position(**asdict(pos)), averaged, saved)


class Epoch:
    """One epoch of a TrainingLoop: iterating gives this rank's remaining (batch, draws); `end()` after it."""

    def __init__(self, loop: TrainingLoop, dataset: torch.utils.data.Dataset, collate: Callable | None) -> None:
        s = loop.settings
        self.loop, self.number = loop, loop.pos.epoch
        self.batches = epoch_batches(len(dataset), s.batch_size, s.seed, self.number, loop.rank, loop.world)
        self.order = epoch_order(len(dataset), s.seed, self.number, loop.world)
        self.dataset, self.collate = dataset, collate

    @property
    def complete(self) -> bool:
        return self.loop.pos.batch >= len(self.batches)

    def __iter__(self) -> Iterator[tuple[dict, Draws]]:
        loop, s = self.loop, self.loop.settings
        accum, start = s.gradient_accumulation_steps, loop.pos.batch
        if hasattr(self.dataset, "set_epoch"):  # data augmentation seeded by (seed, epoch, index); before the
            self.dataset.set_epoch(self.number)  # loader, whose workers copy the dataset as it is now
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=[[self.order[p] for p in b] for b in self.batches[start:]],
            num_workers=s.num_workers,
            collate_fn=self.collate,
            pin_memory=loop.accelerator.device.type == "cuda",
        )
        loop.module.train()
        for batch, places in zip(loader, self.batches[start:], strict=True):
            b = loop.pos.batch
            group_end = min((b // accum + 1) * accum, len(self.batches))
            loop._group = group_end - (b // accum) * accum
            loop._sync = b + 1 == group_end
            yield batch, Draws(s.seed, self.number, places)
            if loop.pos.batch == b:
                raise RuntimeError("TrainingLoop.update(metrics) must follow every micro-batch's backward")
            if loop._sync:  # after an update: the command's per-update work (previews) may have left eval mode
                loop.module.train()
            if loop.pos.update >= loop.total_updates:
                break

    def end(self) -> dict[str, torch.Tensor] | None:
        """After the epoch's micro-batches: the trainable tensors (every rank: a collective under FSDP) when the
        epoch is complete, for the command's epoch file; None when the run stopped inside it (max_steps)."""
        return self.loop.trainable() if self.complete else None
