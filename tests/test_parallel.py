"""Sequence-parallel sampling (Ulysses) on CPU processes (gloo): the split DiT computes the single-process output,
and `generate` under torchrun writes the single-process video."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port, run_cli, torchrun_cpu
from test_generate import FLAGS
from wanalpha.models.dit import DIT_VARIANTS, WanDiT
from wanalpha.parallel import SequenceParallel
from wanalpha.runtime import set_sequence_parallel

# (latent shape, batch): 3×2×5 = 30 tokens split evenly, 3×1×3 = 9 unevenly (5 + 4); batch 2 as under guidance.
CASES = [((16, 3, 4, 10), 1), ((16, 3, 2, 6), 2)]


def _inputs(shape, batch):
    g = torch.Generator().manual_seed(7)
    x = torch.randn((batch, *shape), generator=g)
    t = torch.tensor([900.0, 250.0][:batch])
    context = [torch.randn(5 + i, 64, generator=g) for i in range(batch)]
    return x, t, context


def _model() -> WanDiT:
    torch.manual_seed(0)
    return WanDiT(DIT_VARIANTS["tiny"]).eval()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dit = _model()
        set_sequence_parallel(dit, SequenceParallel())
        with torch.no_grad():
            results = [dit(*_inputs(shape, batch)) for shape, batch in CASES]
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_split_dit_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "out")), nprocs=2, join=True)
    dit = _model()
    with torch.no_grad():
        expected = [dit(*_inputs(shape, batch)) for shape, batch in CASES]
    for rank in range(2):  # every process ends each forward with the whole output
        got = torch.load(tmp_path / f"out.{rank}")
        for g, e in zip(got, expected, strict=True):
            assert g.shape == e.shape
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_heads_must_divide() -> None:
    class Three:  # a 3-process group, as far as the check is concerned
        world = 3

    with pytest.raises(ValueError, match="num_heads \\(4\\) divisible"):
        set_sequence_parallel(_model(), Three())


def test_generate_under_torchrun_writes_the_single_process_video(tmp_path: Path, tiny_stage2) -> None:
    """Without --seed, process 0 draws the seed and every process uses it (official generate script: base_seed
    broadcast from rank 0), so the two-process video is the one-process video of the seed generation.json names."""
    args = [
        "generate",
        "--prompt",
        "a red circle moving left, transparent background",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        *FLAGS,
        "--formats",
        "apng",
    ]
    proc = torchrun_cpu(*args, "--output_dir", tmp_path / "two")
    assert proc.stdout.count("generate: 1 video(s)") == 1  # process 0 alone reports and writes
    record = json.loads((tmp_path / "two/generation.json").read_text())
    assert record["sequence_parallel"] == 2 and record["config"]["seed"] == -1
    run_cli(*args, "--seed", str(record["seed"]), "--output_dir", tmp_path / "one")
    frames = []
    for run in ("one", "two"):
        pngs = sorted((tmp_path / run / "output_rgba_frames").glob("*.png"))
        frames.append(np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in pngs]).astype(int))
    assert frames[0].shape == frames[1].shape == (9, 32, 48, 4)
    assert np.abs(frames[0] - frames[1]).max() <= 1  # the same latents up to float rounding, then uint8
