"""Several processes: train-merge and train-dit under `accelerate launch` (DDP, FSDP) on 2+ GPUs (marked `gpu`), and
on 2 CPU ranks (gloo) in CI: train-merge under DDP and train-dit under FSDP2. A run spread over processes must equal
one process with the same global batch; an interrupted + resumed run must equal the uninterrupted one, also when it
resumes with another number of processes (an FSDP training state in one process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, torchrun_cpu

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")


CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch(*args, cwd: Path, config: str = "ddp.yaml") -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        "2",
        "-m",
        "wanalpha",
        *map(str, args),
    ]
    proc = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONFAULTHANDLER="1")
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.gpu
@two_gpus
def test_train_merge_ddp(tmp_path: Path, tiny_vae_files, tiny_dataset: Path) -> None:
    common = [
        "train-merge",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_vae_files[0],
        "--vae_lora_path",
        tiny_vae_files[1],
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "9",
        "--num_epochs",
        "2",
        "--num_workers",
        "0",
        "--save_steps",
        "1",
        "--perceptual_weight",
        "0",
    ]
    _launch(*common, "--output_path", tmp_path / "full", cwd=tmp_path)
    _launch(*common, "--output_path", tmp_path / "split", "--max_steps", "1", cwd=tmp_path)
    _launch(*common, "--output_path", tmp_path / "split", "--resume", cwd=tmp_path)
    full = load_file(tmp_path / "full/feature_merge_epoch_1.safetensors")
    split = load_file(tmp_path / "split/feature_merge_epoch_1.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    rows = (tmp_path / "full/loss_log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("step,epoch,lr,loss")  # header + 2 updates (metrics all-reduced)


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_train_dit_two_gpus(tmp_path: Path, tiny_stage2, tiny_dataset: Path, config: str) -> None:
    _launch(
        "train-dit",
        "--rgba_mode",
        "--dataset_base_path",
        tiny_dataset,
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "9",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--feature_merge_checkpoint",
        tiny_stage2["merge"],
        "--dora_rank",
        "4",
        "--dataset_repeat",
        "4",
        "--num_epochs",
        "1",
        "--output_path",
        tmp_path / "dit",
        "--num_workers",
        "0",
        cwd=tmp_path,
        config=config,
    )
    saved = load_file(tmp_path / "dit/epoch-0.safetensors")
    assert len(saved) == 60 and all(k.endswith(".default.weight") for k in saved)


# What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets, for torchrun on the CPU.
FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "DiTBlock",
}


def _torchrun_cpu(*args, cwd: Path, fsdp: bool = False) -> subprocess.CompletedProcess:
    """2 ranks on the CPU (gloo): accelerate sees the torchrun environment when told to use the CPU."""
    return torchrun_cpu(*args, cwd=cwd, env={"ACCELERATE_USE_CPU": "true"} | (FSDP_ENV if fsdp else {}))


def _rows(out: Path) -> list[list[float]]:
    lines = (out / "loss_log.csv").read_text().splitlines()[1:]
    return [[float(x) for x in line.split(",")] for line in lines]


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in a)


cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU variant; GPUs run the tests above")


@cpu_only
def test_train_merge_two_cpu_ranks_resume_exactly(tmp_path: Path, tiny_vae_files, tiny_dataset: Path) -> None:
    common = [
        "train-merge",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_vae_files[0],
        "--vae_lora_path",
        tiny_vae_files[1],
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "9",
        "--num_epochs",
        "2",
        "--num_workers",
        "0",
        "--save_steps",
        "1",
        "--mixed_precision",
        "no",
        "--perceptual_weight",
        "0",
    ]
    _torchrun_cpu(*common, "--output_path", tmp_path / "full", cwd=tmp_path)
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--max_steps", "1", cwd=tmp_path)
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--resume", cwd=tmp_path)
    full = load_file(tmp_path / "full/feature_merge_epoch_1.safetensors")
    split = load_file(tmp_path / "split/feature_merge_epoch_1.safetensors")
    assert all(torch.equal(full[k], split[k]) for k in full)
    assert len(_rows(tmp_path / "full")) == 2  # 2 clips / 2 ranks × 2 epochs
    # One process with the same global batch (2 clips per update) trains the same block: equal losses; weights
    # within a few Adam steps of rounding (an update of a near-zero gradient is ±lr = 1e-4 whatever its size).
    run_cli(*common, "--output_path", tmp_path / "one", "--batch_size", "2")
    assert _close(full, load_file(tmp_path / "one/feature_merge_epoch_1.safetensors"), tol=3e-4)
    assert torch.allclose(torch.tensor(_rows(tmp_path / "one")), torch.tensor(_rows(tmp_path / "full")), rtol=1e-5)


@cpu_only
def test_train_dit_fsdp_two_cpu_ranks(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    """FSDP2 (weights, gradients and optimizer state sharded over 2 gloo ranks) equals one process with the same
    global batch; its training state resumes exactly under FSDP and in a single process; its files load anywhere."""
    cache = tmp_path / "cache"
    run_cli(
        "cache",
        "--stage",
        "dit",
        "--dataset_base_path",
        tiny_dataset,
        "--base_vae_path",
        tiny_stage2["vae"],
        "--feature_merge_checkpoint",
        tiny_stage2["merge"],
        "--t5_path",
        tiny_stage2["t5"],
        "--height",
        "32",
        "--width",
        "48",
        "--num_frames",
        "9",
        "--output_dir",
        cache,
    )
    common = [
        "train-dit",
        "--cache_dir",
        cache,
        "--dit_path",
        tiny_stage2["dit"],
        "--dora_rank",
        "4",
        "--dataset_repeat",
        "4",
        "--num_epochs",
        "2",
        "--num_workers",
        "0",
        "--dit_dtype",
        "fp32",
        "--mixed_precision",
        "no",
        "--learning_rate",
        "1e-3",
        "--save_steps",
        "3",
        "--no-official-lr-start",
    ]  # the official lr/3 start lasts ⌈5/N⌉ updates: it depends on N
    run_cli(*common, "--batch_size", "2", "--output_path", tmp_path / "one")
    _torchrun_cpu(*common, "--output_path", tmp_path / "fsdp", cwd=tmp_path, fsdp=True)
    one, fsdp = (load_file(tmp_path / f"{run}/epoch-1.safetensors") for run in ("one", "fsdp"))
    assert len(fsdp) == 60 and _close(one, fsdp)  # full tensors, official names: gathered from the shards
    assert torch.allclose(torch.tensor(_rows(tmp_path / "one")), torch.tensor(_rows(tmp_path / "fsdp")), rtol=1e-5)
    # Interrupted after 3 updates: resumed under FSDP, bit-exact; resumed in one process, the same training.
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--max_steps", "3", cwd=tmp_path, fsdp=True)
    shutil.copytree(tmp_path / "split", tmp_path / "split_one")
    _torchrun_cpu(*common, "--output_path", tmp_path / "split", "--resume", cwd=tmp_path, fsdp=True)
    split = load_file(tmp_path / "split/epoch-1.safetensors")
    assert all(torch.equal(fsdp[k], split[k]) for k in fsdp)
    run_cli(*common, "--batch_size", "2", "--output_path", tmp_path / "split_one", "--resume")
    assert _close(one, load_file(tmp_path / "split_one/epoch-1.safetensors"))
    # Another global batch cannot continue the state: a one-line error.
    proc = run_cli(*common, "--output_path", tmp_path / "split_one", "--resume", check=1)
    assert "samples per update" in proc.stderr and "Traceback" not in proc.stderr
