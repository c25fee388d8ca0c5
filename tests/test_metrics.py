"""validate's matting metrics MSE, dtSSD and Conn (wanalpha.metrics): zero on the truth, hand-computed values, and a
monotone response to a growing defect."""

from __future__ import annotations

import pytest
import torch

from wanalpha.metrics import alpha_mse, connectivity_error, dtssd, rgba_metrics


def disc(frames: int = 5, size: int = 32) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    alpha = ((10 - ((xs - 16.0) ** 2 + (ys - 16.0) ** 2).sqrt()) * 64 + 128).clamp(0, 255)
    return alpha.to(torch.uint8).expand(frames, size, size).clone()


def test_mse_scale_and_monotone() -> None:
    gt = disc()
    assert alpha_mse(gt, gt) == 0
    # a constant error of 51/255 = 0.2 on the background (α 0 → 0.2): MSE = 0.04 × background share × 1e3
    pred = gt.clone()
    pred[gt == 0] = 51
    share = float((gt == 0).double().mean())
    assert alpha_mse(gt, pred) == pytest.approx(0.04 * share * 1e3)
    values = [alpha_mse(gt, (gt.int() + k).clamp(0, 255).to(torch.uint8)) for k in (0, 5, 10, 20, 40)]
    assert all(b > a for a, b in zip(values, values[1:], strict=False))


def test_dtssd_punishes_change_not_a_constant_error() -> None:
    gt = disc()
    assert dtssd(gt, gt) == 0
    assert dtssd(gt, (gt.int() + 30).clamp(max=255).to(torch.uint8)) == pytest.approx(0, abs=0.5)  # only at α 255
    values = []
    for amount in (0, 13, 26, 51):  # alternate frames brightened by amount/255 everywhere (no clipping: α ≤ 204)
        gt_low = (gt.int() * 204 // 255).to(torch.uint8)
        pred = gt_low.clone()
        pred[1::2] += amount
        values.append(dtssd(gt_low, pred))
    assert values[0] == 0 and all(b > a for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(100 * 51 / 255)  # every pair differs by exactly 0.2 everywhere: √0.04 × 100
    assert dtssd(gt[:1], gt[:1] + 1) == 0


def test_connectivity_error_hand_values() -> None:
    gt = torch.zeros(1, 16, 16, dtype=torch.uint8)
    gt[0, 4:8, 4:8] = 255
    assert connectivity_error(gt, gt) == 0
    # a pixel of α 1 away from the matte: l = 0 there, d = 1 ≥ 0.15 → φ = 0 instead of 1: Conn = 1/1000
    pred = gt.clone()
    pred[0, 12, 12] = 255
    assert connectivity_error(gt, pred) == pytest.approx(1 / 1000)
    # below the 0.15 floor it is not counted; a larger stray blob costs more
    pred = gt.clone()
    pred[0, 12, 12] = 25
    assert connectivity_error(gt, pred) == 0
    costs = []
    for side in (1, 2, 3):
        pred = gt.clone()
        pred[0, 11 : 11 + side, 11 : 11 + side] = 255
        costs.append(connectivity_error(gt, pred))
    assert costs == pytest.approx([1 / 1000, 4 / 1000, 9 / 1000])


def test_rgba_metrics_reports_them_with_the_rest() -> None:
    gt = disc()
    rgb = torch.zeros(*gt.shape, 3, dtype=torch.uint8)
    same = rgba_metrics(rgb, gt, rgb, gt)
    assert same["alpha_mse"] == 0 and same["alpha_dtssd"] == 0 and same["alpha_conn"] == 0
    noisy = (gt.int() + torch.randint(0, 40, gt.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 255)
    off = rgba_metrics(rgb, gt, rgb, noisy.to(torch.uint8))
    assert off["alpha_mse"] > 0 and off["alpha_dtssd"] > 0 and off["alpha_conn"] > 0
