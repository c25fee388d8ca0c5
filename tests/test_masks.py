"""Wan-Alpha v2.0 Gaussian masks and the noise mean shift against the official code (golden/v2_gauss_mask)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
