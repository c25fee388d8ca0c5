"""Several processes: train-merge and train-dit under `accelerate launch` (DDP) on 2+ GPUs (marked `gpu`), and
train-merge on 2 CPU ranks (gloo) in CI, each with an interrupted + resumed run that must equal the uninterrupted
one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")


def _launch(*args, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--mixed_precision", "bf16", "-m", "wanalpha", *map(str, args)]  # fmt: skip
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.gpu
@two_gpus
def test_train_merge_ddp(tmp_path: Path, tiny_vae_files, tiny_dataset: Path) -> None:
    common = ["train-merge", "--dataset_base_path", tiny_dataset, "--base_vae_path", tiny_vae_files[0],
              "--vae_lora_path", tiny_vae_files[1], "--height", "32", "--width", "48", "--num_frames", "9",
              "--num_epochs", "2", "--num_workers", "0", "--save_steps", "1"]  # fmt: skip
    _launch(*common, "--output_path", tmp_path / "full", cwd=tmp_path)
    _launch(*common, "--output_path", tmp_path / "split", "--max_steps", "1", cwd=tmp_path)
    _launch(*common, "--output_path", tmp_path / "split", "--resume", cwd=tmp_path)
    full = load_file(tmp_path / "full/feature_merge_epoch_1.safetensors")
    split = load_file(tmp_path / "split/feature_merge_epoch_1.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert (tmp_path / "full/checkpoints/step-2/generator_rank1.pt").is_file()  # every rank's generator is kept
    rows = (tmp_path / "full/loss_log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,epoch,lr,loss")  # header + 2 updates (metrics all-reduced)


@pytest.mark.gpu
@two_gpus
def test_train_dit_ddp(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    _launch("train-dit", "--rgba_mode", "--dataset_base_path", tiny_dataset, "--height", "32", "--width", "48",
            "--num_frames", "9", "--dit_path", tiny_stage2["dit"], "--t5_path", tiny_stage2["t5"],
            "--base_vae_path", tiny_stage2["vae"], "--feature_merge_checkpoint", tiny_stage2["merge"],
            "--dora_rank", "4", "--dataset_repeat", "4", "--num_epochs", "1", "--output_path", tmp_path / "dit",
            "--num_workers", "0", cwd=tmp_path)  # fmt: skip
    saved = load_file(tmp_path / "dit/epoch-0.safetensors")
    assert len(saved) == 60 and all(k.endswith(".default.weight") for k in saved)


def _torchrun_cpu(*args, cwd: Path) -> subprocess.CompletedProcess:
    """2 ranks on the CPU (gloo): accelerate sees the torchrun environment when told to use the CPU."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
               "-m", "wanalpha", *map(str, args)]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant; GPUs run the tests above")
def test_train_merge_two_cpu_ranks_resume_exactly(tmp_path: Path, tiny_vae_files, tiny_dataset: Path) -> None:
    common = ["train-merge", "--dataset_base_path", tiny_dataset, "--base_vae_path", tiny_vae_files[0],
              "--vae_lora_path", tiny_vae_files[1], "--height", "32", "--width", "48", "--num_frames", "9",
              "--num_epochs", "2", "--num_workers", "0", "--save_steps", "1", "--mixed_precision", "no"]  # fmt: skip
    _torchrun_cpu(*common, "--output_path", tmp_path / "full", cwd=tmp_path)
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--max_steps", "1", cwd=tmp_path)
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--resume", cwd=tmp_path)
    full = load_file(tmp_path / "full/feature_merge_epoch_1.safetensors")
    split = load_file(tmp_path / "split/feature_merge_epoch_1.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert (tmp_path / "full/checkpoints/step-2/generator_rank1.pt").is_file()  # 2 ranks really ran
    assert len((tmp_path / "full/loss_log.csv").read_text().splitlines()) == 3  # 2 clips / 2 ranks × 2 epochs
