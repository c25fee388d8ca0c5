"""The training recipes' defaults are the official ones (Wan-Alpha-train, Wan-Alpha-VAE-train); each test names the
official file and line it checks against."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

from wanalpha.config import TrainDiTConfig, TrainMergeConfig
from wanalpha.training import OFFICIAL_START_FACTOR, adamw_with_warmup, official_start_updates

MERGE = TrainMergeConfig(
    dataset_base_path=Path("d"), base_vae_path=Path("v"), vae_lora_path=Path("l"), perceptual_weight=0.0
)
DIT = TrainDiTConfig(cache_dir=Path("c"), dit_path=Path("d"))


def test_no_gradient_clipping_by_default() -> None:
    """Neither official training clips gradients: Wan-Alpha-VAE-train/train_vae.py:543 builds `pl.Trainer` without
    gradient_clip_val, and Wan-Alpha-train/diffsynth/trainers/utils.py:274-283 steps the optimizer right after
    `accelerator.backward(loss)`. --max-grad-norm stays as an option."""
    assert MERGE.max_grad_norm == 0 and DIT.max_grad_norm == 0
    assert TrainMergeConfig(**{**MERGE.model_dump(), "max_grad_norm": 1.0}).max_grad_norm == 1.0


def test_weight_decay_is_adamw_default() -> None:
    """Both official optimizers are `torch.optim.AdamW(params, lr=...)` with torch's default weight decay:
    Wan-Alpha-VAE-train/train_vae.py:382 (the VAE) and Wan-Alpha-train/examples/wanvideo/model_training/
    train_gauss_ellipse.py:349 (the DiT)."""
    default = inspect.signature(torch.optim.AdamW).parameters["weight_decay"].default
    assert MERGE.weight_decay == DIT.weight_decay == default == 0.01


@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_official_lr_start(processes: int) -> None:
    """train_gauss_ellipse.py:351 `torch.optim.lr_scheduler.ConstantLR(optimizer)` (factor 1/3 for 5 steps), which
    accelerate's prepared scheduler (diffsynth/trainers/utils.py:264, stepped at :282) advances once per process per
    update: our per-update schedule gives the learning rates of that mechanism on N processes."""
    lr = 1e-4
    official = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    constant = torch.optim.lr_scheduler.ConstantLR(official)
    ours, scheduler = adamw_with_warmup(
        [torch.nn.Parameter(torch.zeros(1))], lr, 0.01, 0, OFFICIAL_START_FACTOR, official_start_updates(processes)
    )
    for _ in range(12):
        assert ours.param_groups[0]["lr"] == pytest.approx(official.param_groups[0]["lr"], rel=1e-12)
        for _ in range(processes):  # AcceleratedScheduler.step without split_batches
            constant.step()
        scheduler.step()
    assert DIT.official_lr_start


def test_epoch_files_kept_all_by_default_or_the_newest_n(tmp_path: Path) -> None:
    """Every epoch's file stays by default, as the official trainings keep theirs (Wan-Alpha-VAE-train/train_vae.py:
    `ModelCheckpoint(save_top_k=-1)`; DiffSynth's ModelLogger saves every epoch); --keep-epochs N keeps the newest
    N epochs' files (step files included) and never the last one's."""
    from wanalpha.training import prune_epochs

    assert MERGE.keep_epochs is None and DIT.keep_epochs is None
    names = [f"feature_merge_epoch_{e}.safetensors" for e in range(4)]
    names += [
        "epoch-0-500.safetensors",
        "epoch-3.safetensors",
        "rgba_vae_v2_epoch_1.bin",
        "config.yaml",
        "epoch-notes.txt",
        "loss_log.csv",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert prune_epochs(tmp_path, 3, None) == []
    removed = {p.name for p in prune_epochs(tmp_path, 3, 2)}
    assert removed == {
        "feature_merge_epoch_0.safetensors",
        "feature_merge_epoch_1.safetensors",
        "epoch-0-500.safetensors",
        "rgba_vae_v2_epoch_1.bin",
    }
    assert {p.name for p in tmp_path.iterdir()} == set(names) - removed
    prune_epochs(tmp_path, 3, 1)
    assert (tmp_path / "feature_merge_epoch_3.safetensors").exists() and (tmp_path / "epoch-3.safetensors").exists()
    assert not (tmp_path / "feature_merge_epoch_2.safetensors").exists()
