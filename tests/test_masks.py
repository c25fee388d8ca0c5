"""Wan-Alpha v2.0 Gaussian masks and the noise mean shift against the official code (golden/v2_gauss_mask)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from wanalpha import flow, masks
from wanalpha.errors import WanAlphaError


@pytest.fixture(scope="module")
def golden(reference: Path) -> dict:
    return load_file(reference / "golden/v2_gauss_mask.safetensors")


def test_mask_steps_match_official(golden: dict) -> None:
    alpha = golden["alpha_u8"].numpy().astype(np.float32) / 255
    binary = masks.binarize(alpha)
    assert np.array_equal(binary.astype(np.uint8), golden["binary_u8"].numpy())
    right, left = masks.shift_rows(binary, 32), masks.shift_rows(binary, -32)  # int(H/2), as the script
    assert np.array_equal(right.astype(np.uint8), golden["binary_shifted_u8"].numpy())
    assert np.array_equal(left.astype(np.uint8), golden["binary_shifted_left_u8"].numpy())
    assert np.abs(masks.compress(right) - golden["compressed"].numpy()).max() <= 1e-6
    assert np.abs(masks.compress(binary) - golden["compressed_noshift"].numpy()).max() <= 1e-6


@pytest.mark.parametrize(("shift", "suffix"), [(32, ""), (0, "_noshift")])
def test_gaussian_mask_matches_official(golden: dict, shift: int, suffix: str) -> None:
    alpha = golden["alpha_u8"].numpy().astype(np.float32) / 255
    mask, params = masks.gaussian_mask_from_alpha(alpha, shift=shift)
    assert mask.shape == (5, 8, 12) and mask.dtype == torch.float32
    assert (mask - golden[f"gauss_mask{suffix}"]).abs().max() <= 1e-6
    expected = golden[f"ellipse_params{suffix}"].numpy()
    assert np.allclose(params, expected, atol=1e-6, equal_nan=True)


def test_training_variant_matches_official(golden: dict) -> None:
    # T2V data prep: alpha in [-1, 1] (bf16 preprocessing), threshold 0.5, no shift, 8 enlargements.
    mask, _ = masks.gaussian_mask_from_alpha(golden["train_pha_prep_bf16"], threshold=0.5, max_enlarge_iters=8)
    assert (mask - golden["train_gauss_mask"]).abs().max() <= 1e-6


@pytest.mark.parametrize("case", ["a", "b"])  # a: the mask on the latent grid; b: another grid, resized
def test_noise_shift_and_sampling_match_official(golden: dict, case: str) -> None:
    shifted = masks.shift_noise(golden["noise"], golden[f"mask_{case}_bf16"].float(), alpha_shift_mean=0.05)
    assert torch.equal(shifted, golden[f"noise_shifted_{case}"])  # bf16 arithmetic, exactly
    toy = lambda x, t: 0.3 * x - 0.001 * t.float().view(-1, 1, 1, 1, 1)  # noqa: E731 (the fixture's model)
    final = flow.sample(toy, shifted, steps=4, shift=5.0, sampler="unipc")
    assert rel_err(final, golden[f"final_{case}"]) < 1e-5
    with pytest.raises(ValueError, match="the mask has 3 frames"):
        masks.shift_noise(golden["noise"], torch.zeros(3, 8, 12))


def test_mask_files(tmp_path: Path) -> None:
    torch.save(torch.rand(21, 96, 170), tmp_path / "gauss_mask")  # the released file's format
    assert masks.load_mask(tmp_path / "gauss_mask").shape == (21, 96, 170)
    torch.save({"x": argparse.Namespace()}, tmp_path / "bad")
    with pytest.raises(WanAlphaError, match="not a saved tensor"):
        masks.load_mask(tmp_path / "bad")
    with pytest.raises(WanAlphaError, match="does not exist"):
        masks.load_mask(tmp_path / "missing")


def test_mask_command_and_generate_shift(tmp_path: Path, tiny_stage2, tiny_dataset: Path) -> None:
    from conftest import run_cli

    size = ["--num_frames", "9", "--height", "32", "--width", "48"]
    run_cli(
        "mask",
        "--mask_ellipse",
        "0.3,0.5,0.4,0.6",
        "--mask_ellipse_end",
        "0.7,0.5,0.4,0.6",
        *size,
        "--output",
        tmp_path / "moving",
    )
    moving = masks.load_mask(tmp_path / "moving")  # the official format, weights_only
    assert moving.shape == (3, 4, 6) and (tmp_path / "moving.png").is_file()
    centroid = [(m * torch.arange(6)).sum() / m.sum() for m in moving]
    assert centroid[0] < centroid[1] < centroid[2]  # it moves right
    run_cli("mask", "--mask_alpha_video", tiny_dataset / "001_alpha.mp4", "--output", tmp_path / "from_alpha")
    from_alpha = masks.load_mask(tmp_path / "from_alpha")
    from wanalpha.data.video import read_video

    frames, _ = read_video(tiny_dataset / "001_alpha.mp4")
    expected, _ = masks.gaussian_mask_from_alpha(frames.mean(-1).astype(np.float32) / 255)
    assert from_alpha.shape == (3, 4, 6) and (from_alpha - expected).abs().max() < 0.05
    proc = run_cli("mask", "--mask_ellipse", "0.5,0.5,2,1", "--output", tmp_path / "x", check=2)  # a bad flag
    assert "fractions (0-1)" in proc.stderr

    common = [
        "generate",
        "--prompt",
        "a red circle",
        "--dit_path",
        tiny_stage2["dit"],
        "--t5_path",
        tiny_stage2["t5"],
        "--base_vae_path",
        tiny_stage2["vae"],
        "--vae_lora_path",
        tiny_stage2["lora"],
        *size,
        "--steps",
        "4",
        "--seed",
        "5",
        "--formats",
        "apng",
    ]
    plain = run_cli(*common, "--alpha_shift_mean", "0.05", "--output_dir", tmp_path / "plain")
    assert "noise mean shift is off" in plain.stderr
    run_cli(*common, "--gauss_mask", tmp_path / "moving", "--output_dir", tmp_path / "shifted")
    record = json.loads((tmp_path / "shifted/generation.json").read_text())
    assert record["mask"] == {"source": f"file {tmp_path / 'moving'}", "alpha_shift_mean": 0.05}
    a = cv2.imread(str(tmp_path / "plain/output_rgba_frames/00004.png"), cv2.IMREAD_UNCHANGED)
    b = cv2.imread(str(tmp_path / "shifted/output_rgba_frames/00004.png"), cv2.IMREAD_UNCHANGED)
    assert not np.array_equal(a, b)  # the shifted noise changes the video
    proc = run_cli(
        *common,
        "--gauss_mask",
        tmp_path / "moving",
        "--mask_ellipse",
        "0.5,0.5,0.3,0.3",
        "--output_dir",
        tmp_path / "bad",
        check=2,
    )
    assert "give one mask" in proc.stderr


def test_training_prep_and_noise_shift_match_official(golden: dict) -> None:
    # T2V data prep: the bf16 preprocessing, the cached mask, then training_loss's bf16 noise shift and noising.
    prepped = masks.training_alpha(golden["alpha_u8"])
    assert prepped.dtype == torch.bfloat16 and torch.equal(prepped, golden["train_pha_prep_bf16"])
    mask = masks.training_mask(golden["alpha_u8"])
    assert (mask - golden["train_gauss_mask"]).abs().max() <= 1e-6
    shifted = masks.shift_training_noise(golden["train_noise_bf16"], mask[None], 0.05)
    assert torch.equal(shifted, golden["train_noise_shifted_bf16"])
    schedule = flow.TrainingSchedule.create()
    t, sigma, weight = schedule.at(schedule.lookup(golden["train_timestep_bf16"]), torch.bfloat16)
    assert torch.equal(t, golden["train_timestep_bf16"])
    noisy = flow.add_noise_bf16(golden["train_x0_bf16"], shifted, sigma)
    assert torch.equal(noisy, golden["train_latents_noisy_bf16"])
    pred = 0.3 * noisy - 0.001 * t  # the fixture's toy DiT, in bf16
    loss = flow.flow_loss(pred, shifted - golden["train_x0_bf16"], weight)
    assert float(loss) == pytest.approx(float(golden["train_loss_toy"]), rel=1e-6)
