"""`wanalpha train-merge` (stage 1): train the FeatureMergeBlock; the encoder and both LoRA'd decoders are frozen.

One step (official recipe, reference NOTES §10.4; paper eq. 10–12): draw three background colours (encoder input,
hard composite, soft composite) among the 8 RGB-cube corners; hard-render the straight RGB over the first as the
encoder input; encode RGB and alpha (or read both latents from the cache); merge; decode with both decoders; the
stage-1 losses. Runs plainly or under `accelerate launch` (DDP over the merge block; bf16 autocast by default on GPUs).

Resumable exactly: a training state (merge weights, optimizer, scheduler, step, epoch position, colour-generator
states of every rank) is written atomically every --save_steps and when interrupted; `--resume` continues from it.
The data order of epoch e is a permutation seeded by (seed, e), so a resumed run sees the same batches.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console

from wanalpha.checkpoints.provenance import file_sha256, write_provenance
from wanalpha.checkpoints.vae import load_rgba_vae, save_merge_block
from wanalpha.config import TrainMergeConfig
from wanalpha.data.dataset import ClipSpec, RGBAClipDataset, to_model_space
from wanalpha.data.files import atomic_write_text, write_if_changed
from wanalpha.data.latent_cache import CachedClipDataset
from wanalpha.data.render import composite
from wanalpha.errors import WanAlphaError
from wanalpha.losses import LossWeights, VGG16Features, rgba_reconstruction_loss
from wanalpha.models.rgba import RGBAlphaVAE

NUM_COLOURS = 8


@dataclass
class Position:
    """Where training stands: `update` counts optimizer steps; `batch` counts batches into `epoch`."""

    epoch: int = 0
    batch: int = 0
    update: int = 0


def draw_colours(generator: torch.Generator, batch: int, choices: list[int]) -> tuple[torch.Tensor, ...]:
    """(k_enc, k_hard, k_soft), one per sample, in the official order; k_enc among the cached colours."""
    k_enc = torch.tensor(choices)[torch.randint(0, len(choices), (batch,), generator=generator)]
    k_hard = torch.randint(0, NUM_COLOURS, (batch,), generator=generator)
    k_soft = torch.randint(0, NUM_COLOURS, (batch,), generator=generator)
    return k_enc, k_hard, k_soft


def merge_step(
    model: RGBAlphaVAE,
    batch: dict,
    colours: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: LossWeights,
    vgg: VGG16Features | None = None,
    cached_colours: list[int] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One stage-1 objective evaluation (DESIGN §7.6): (loss, metrics)."""
    device = next(model.merge.parameters()).device
    rgb, alpha = to_model_space(batch["rgb"].to(device), batch["alpha"].to(device))
    k_enc, k_hard, k_soft = (k.to(device) for k in colours)
    if "rgb_latents" in batch:  # cached: pick each sample's latent for its drawn encoder colour
        slot = torch.tensor([cached_colours.index(int(k)) for k in k_enc], device=device)
        z_rgb = batch["rgb_latents"].to(device)[torch.arange(len(slot), device=device), slot]
        z_alpha = batch["alpha_latent"].to(device)
    else:
        with torch.no_grad():
            z_rgb, z_alpha = model.encode_latents(composite(rgb, alpha, k_enc, hard=True), alpha)
    z = model.merge(z_rgb, z_alpha)
    rgb_pred, alpha_pred = model.decode(z, raw=True)
    return rgba_reconstruction_loss(rgb, alpha, rgb_pred, alpha_pred, k_hard, k_soft, weights, vgg)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for one epoch: a permutation seeded by (seed, epoch), split across ranks (padded by
    wrapping so every rank runs the same number of steps)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    per_rank = math.ceil(n / world)
    order = (order * math.ceil(per_rank * world / n))[: per_rank * world]
    mine = order[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def load_vgg(path: Path) -> VGG16Features:
    from wanalpha.checkpoints.io import read_state_dict

    sd = read_state_dict(path, "VGG16 weights")
    # torchvision's file names the trunk `features.N.*`; keep the first 9 layers (conv1_1 … relu2_2).
    trunk = {f"model.{k.split('.', 2)[1]}.{k.split('.', 2)[2]}": v for k, v in sd.items()
             if k.startswith("features.") and int(k.split(".")[1]) < 9}  # fmt: skip
    vgg = VGG16Features()
    missing = set(vgg.state_dict()) - set(trunk)
    if missing:
        raise WanAlphaError(f"VGG16 weights {path}: missing {sorted(missing)}; expected torchvision's vgg16 file")
    vgg.load_state_dict(trunk)
    return vgg


# ------------------------------------------------------------------------------------------- training state


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def save_state(accelerator, out: Path, merge, optimizer, scheduler, pos: Position, generator, limit: int) -> None:
    """Write checkpoints/step-N atomically (temp folder + rename); every rank adds its colour-generator state."""
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

        save_file({k: v.detach().cpu().contiguous() for k, v in accelerator.unwrap_model(merge).state_dict().items()},
                  str(tmp / "merge.safetensors"))  # fmt: skip
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "position.json").write_text(json.dumps(asdict(pos) | {"world_size": accelerator.num_processes}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_state(accelerator, out: Path, merge, optimizer, scheduler, generator) -> Position | None:
    from safetensors.torch import load_file

    states = _checkpoints(out)
    if not states:
        return None
    state = states[-1]
    position = json.loads((state / "position.json").read_text())
    if position.pop("world_size") != accelerator.num_processes:
        raise WanAlphaError(f"{state} was written by a run with a different number of processes than this one "
                            f"({accelerator.num_processes}); resume with the same number of GPUs")  # fmt: skip
    accelerator.unwrap_model(merge).load_state_dict(load_file(str(state / "merge.safetensors")))
    opt = torch.load(state / "optimizer.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    generator.set_state(torch.load(state / f"generator_rank{accelerator.process_index}.pt", weights_only=True))
    return Position(**position)


# ------------------------------------------------------------------------------------------------- logging


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
        import io

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


def plot_loss_curve(rows: list[dict], path: Path) -> None:
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
    cv2.putText(img, "train-merge loss", (m, 30), font, 0.7, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{hi:.4g}", (5, m + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"{lo:.4g}", (5, h - m), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"step {int(steps.min())}", (m, h - 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"step {int(steps.max())}", (w - m - 80, h - 20), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    from wanalpha.data.files import atomic_path

    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), img)


# --------------------------------------------------------------------------------------------------- train


def _dataset(cfg: TrainMergeConfig):
    if cfg.cache_dir is not None:
        fields = cfg.model_fields_set  # flags the user gave must agree with the cache
        expect = {k: getattr(cfg, k) for k in ("height", "width", "num_frames", "frame_stride") if k in fields}
        expect["vae_sha256"] = file_sha256(cfg.base_vae_path)
        dataset = CachedClipDataset(cfg.cache_dir, expect)
        return dataset, dataset.colours, []
    spec = ClipSpec(cfg.height, cfg.width, cfg.num_frames, cfg.frame_stride, cfg.loop_short_clips)
    dataset = RGBAClipDataset(cfg.dataset_base_path, cfg.dataset_metadata_path, spec)
    return dataset, list(range(NUM_COLOURS)), dataset.skipped


def run(cfg: TrainMergeConfig) -> Path:
    from accelerate import Accelerator
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from wanalpha.runtime import default_device, resolve_precision

    precision = resolve_precision(cfg.mixed_precision, default_device())
    accelerator = Accelerator(mixed_precision=precision)
    console = Console(stderr=True, highlight=False)
    main = accelerator.is_main_process
    out = Path(cfg.output_path)
    dataset, choices, skipped = _dataset(cfg)
    if main:
        for name, reason in skipped:
            console.print(f"[yellow]skipped[/] {name}: {reason}")
    torch.manual_seed(cfg.seed)  # the merge block's initialisation
    model = load_rgba_vae(cfg.base_vae_path, cfg.vae_lora_path, device=accelerator.device,
                          with_encoder=cfg.cache_dir is None)  # fmt: skip
    model.rgb_decoder.gradient_checkpointing = model.alpha_decoder.gradient_checkpointing = cfg.gradient_checkpointing
    vgg = load_vgg(cfg.vgg_path).to(accelerator.device) if cfg.perceptual_weight > 0 else None
    weights = LossWeights(cfg.alpha_weight, cfg.rgb_soft_weight, cfg.rgb_hard_weight, cfg.sobel_weight,
                          cfg.perceptual_weight)  # fmt: skip
    optimizer = torch.optim.AdamW(model.merge.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.lr_warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / (warmup + 1)))
    merge, optimizer = accelerator.prepare(model.merge, optimizer)
    model.merge = merge
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + 7 + accelerator.process_index)

    rank, world = accelerator.process_index, accelerator.num_processes
    batches_per_epoch = len(epoch_batches(len(dataset), cfg.batch_size, cfg.seed, 0, rank, world))
    accum = cfg.gradient_accumulation_steps
    updates_per_epoch = math.ceil(batches_per_epoch / accum)
    total_updates = updates_per_epoch * cfg.num_epochs
    if cfg.max_steps is not None:
        total_updates = min(total_updates, cfg.max_steps)

    pos = Position()
    if cfg.resume:
        loaded = load_state(accelerator, out, merge, optimizer, scheduler, generator)
        if loaded is None:
            raise WanAlphaError(f"--resume: no training state in {out / 'checkpoints'}; start without --resume")
        pos = loaded
    elif _checkpoints(out) and main:
        console.print(f"[yellow]note:[/] {out} holds training states from an earlier run; pass --resume to "
                      "continue it (starting afresh overwrites them)")  # fmt: skip
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_if_changed(out / "config.yaml", cfg.to_yaml())
        write_provenance(out, "train-merge", inputs={"base_vae": cfg.base_vae_path, "decoder_lora": cfg.vae_lora_path})
    log = LossLog(out, pos.update, console) if main else None
    model.rgb_decoder.eval(), model.alpha_decoder.eval()
    if model.encoder is not None:
        model.encoder.eval()

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    progress = Progress(*columns, console=console, disable=not main)
    window: list[dict[str, float]] = []
    # Weights and optimizer change only at update boundaries: an interrupted run saves the last boundary.
    boundary = (Position(**asdict(pos)), generator.get_state())
    try:
        with progress:
            task = progress.add_task("train-merge", total=total_updates, completed=pos.update)
            while pos.update < total_updates and pos.epoch < cfg.num_epochs:
                batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, pos.epoch, rank, world)
                loader = torch.utils.data.DataLoader(
                    dataset, batch_sampler=batches[pos.batch :], num_workers=cfg.num_workers,
                    pin_memory=accelerator.device.type == "cuda", persistent_workers=False,
                )  # fmt: skip
                merge.train()
                for batch in loader:
                    group_end = min((pos.batch // accum + 1) * accum, len(batches))
                    group = group_end - (pos.batch // accum) * accum
                    sync = pos.batch + 1 == group_end
                    colours = draw_colours(generator, len(batch["index"]), choices)
                    with accelerator.autocast(), accelerator.no_sync(merge) if not sync else _null():
                        loss, metrics = merge_step(model, batch, colours, weights, vgg, choices)
                        accelerator.backward(loss / group)
                    window.append(metrics)
                    pos.batch += 1
                    if not sync:
                        continue
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(merge.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    pos.update += 1
                    averaged = {k: sum(m[k] for m in window) / len(window) for k in window[0]}
                    window.clear()
                    progress.update(task, advance=1, description=_describe(pos, averaged))
                    if main and pos.update % cfg.log_steps == 0:
                        log.add(pos.update, pos.epoch, scheduler.get_last_lr()[0], averaged)
                    if pos.update % cfg.save_steps == 0:
                        _save(accelerator, out, merge, optimizer, scheduler, pos, generator, cfg, log)
                    boundary = (Position(**asdict(pos)), generator.get_state())
                    if pos.update >= total_updates:
                        break
                if pos.batch >= len(batches):  # the epoch is complete
                    if main:
                        path = out / f"feature_merge_epoch_{pos.epoch}.safetensors"
                        save_merge_block(accelerator.unwrap_model(merge), path, epoch=pos.epoch, step=pos.update)
                    pos.epoch, pos.batch = pos.epoch + 1, 0
                    boundary = (Position(**asdict(pos)), generator.get_state())
        _save(accelerator, out, merge, optimizer, scheduler, pos, generator, cfg, log)
    except KeyboardInterrupt:
        if world == 1:
            pos, state = boundary
            generator.set_state(state)
            _save(accelerator, out, merge, optimizer, scheduler, pos, generator, cfg, log)
        raise
    finally:
        if log is not None:
            log.close()
    if main:
        plot_loss_curve(log.rows, out / "loss_curve.png")
        last = log.rows[-1]["loss"] if log.rows else float("nan")
        Console(highlight=False).print(
            f"train-merge: {pos.update} updates, {pos.epoch} epochs complete, last loss {float(last):.4f}; "
            f"outputs in {out}"
        )
    return out


def _describe(pos: Position, metrics: dict[str, float]) -> str:
    """The progress line: epoch, total loss and the three L1 terms (paper eq. 10-12)."""
    labels = {"l1_alpha": "α", "l1_rgb_soft": "rgb_s", "l1_rgb_hard": "rgb_h"}
    terms = " ".join(f"{label} {metrics[key]:.3f}" for key, label in labels.items() if key in metrics)
    return f"epoch {pos.epoch} loss {metrics['loss']:.4f} ({terms})"


def _null():
    import contextlib

    return contextlib.nullcontext()


def _save(accelerator, out, merge, optimizer, scheduler, pos, generator, cfg, log) -> None:
    save_state(accelerator, out, merge, optimizer, scheduler, pos, generator, cfg.checkpoints_total_limit)
    if log is not None:
        log.flush()
