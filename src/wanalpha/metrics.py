"""Reconstruction metrics for RGBA video (validate): MAE / PSNR / SSIM on the 0–255 scale, plus the matting
metrics of the video matting literature for alpha, each on the scale its tables use (alpha in [0,1]): SAD (per
frame, /1000), MSE (×1e3), gradient error (/1000), connectivity error Conn (Rhemann et al. 2009, /1000) and dtSSD
(Erofeev et al. 2015, ×1e2), as the VideoMatte240K evaluation of Robust Video Matting reports them. Inputs are uint8
tensors: rgb (T,H,W,3), alpha (T,H,W). Formulas: docs/eval.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wanalpha.data.render import checkerboard


def _gaussian(sigma: float, radius: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM (Wang et al. 2004: 11-tap Gaussian window, σ 1.5, K1 0.01, K2 0.03, L 255) of (N,C,H,W)
    images in [0,255]; border pixels use zero-padded windows."""
    g = _gaussian(1.5, 5)
    channels = a.shape[1]
    window = (g[:, None] * g[None, :]).expand(channels, 1, 11, 11).to(a)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=5, groups=channels)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def _psnr(mse: float, peak: float = 255.0) -> float:
    """PSNR in dB of a mean squared error, for values spanning `peak` (255: 8-bit levels)."""
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def _gradient_magnitude(alpha: torch.Tensor, sigma: float = 1.4) -> torch.Tensor:
    """|∇α| with Gaussian-derivative filters (the matting benchmark's gradient error), alpha (T,1,H,W) in [0,1]."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=alpha.dtype)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    dg = -x / sigma**2 * g
    g, dg = g / g.sum(), dg / dg.abs().sum() * 2
    kx = (g[:, None] * dg[None, :]).view(1, 1, 2 * radius + 1, 2 * radius + 1)
    ky = kx.transpose(2, 3)
    gx = F.conv2d(alpha, kx.to(alpha), padding=radius)
    gy = F.conv2d(alpha, ky.to(alpha), padding=radius)
    return torch.sqrt(gx**2 + gy**2)


def alpha_mse(gt: torch.Tensor, pred: torch.Tensor) -> float:
    """Mean over frames of mean (α̂ − α)², alpha in [0,1], ×1e3 (the matting tables' "MSE ×10⁻³")."""
    return float((((pred.double() - gt.double()) / 255) ** 2).mean() * 1e3)


def dtssd(gt: torch.Tensor, pred: torch.Tensor) -> float:
    """Temporal coherence (Erofeev et al. 2015): for t ≥ 1, sqrt(Σ_p ((α̂_t − α̂_{t−1}) − (α_t − α_{t−1}))² / N)
    with N pixels a frame and alpha in [0,1], mean over the T−1 frame pairs, ×1e2; 0 for one frame. A constant
    error costs nothing, an error that changes from frame to frame does. (RVM's script also counts a 0 for the first
    frame in its average; the tables' definition is over the frame pairs, as here.)"""
    if len(gt) < 2:
        return 0.0
    change = (pred.double().diff(dim=0) - gt.double().diff(dim=0)) / 255
    return float((change**2).mean(dim=(1, 2)).sqrt().mean() * 1e2)


def connectivity_error(gt: torch.Tensor, pred: torch.Tensor, step: float = 0.1) -> float:
    """Conn (Rhemann et al. 2009), per frame /1000, mean over frames. For thresholds λ_i = i·step (i = 1…1/step)
    let Ω_i be the largest 4-connected component of {α ≥ λ_i} ∩ {α̂ ≥ λ_i}; l(p) = λ_{i−1} for the first i whose
    Ω_i leaves p out (1 when none does); with d = α − l, φ(α) = 1 − d·[d ≥ 0.15]; Conn = Σ_p |φ(α̂) − φ(α)|. A
    prediction is punished for values that are not connected to the true matte's core."""
    import cv2
    import numpy as np

    thresholds = np.arange(0, 1 + step, step)
    errors = []
    for g, p in zip(
        gt.cpu().numpy().astype(np.float64) / 255, pred.cpu().numpy().astype(np.float64) / 255, strict=True
    ):
        level = np.full(g.shape, -1.0)
        for i in range(1, len(thresholds)):
            both = ((g >= thresholds[i]) & (p >= thresholds[i])).astype(np.uint8)
            count, labels, stats, _ = cv2.connectedComponentsWithStats(both, connectivity=4)
            largest = labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if count > 1 else np.zeros_like(g, bool)
            level[(level == -1) & ~largest] = thresholds[i - 1]
        level[level == -1] = 1.0

        def phi(a: np.ndarray, level=level) -> np.ndarray:
            d = a - level
            return 1 - d * (d >= 0.15)

        errors.append(np.abs(phi(p) - phi(g)).sum() / 1000)
    return float(np.mean(errors))


def checkerboard_composite(rgb: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """uint8 rgb (T,H,W,3) over the grey checkerboard with uint8 alpha (T,H,W) → float (T,H,W,3) in [0,255]."""
    board = (checkerboard(rgb.shape[1], rgb.shape[2]).permute(1, 2, 0) + 1) * 127.5
    a = alpha.float().unsqueeze(-1) / 255
    return rgb.float() * a + board * (1 - a)


def rgba_metrics(
    gt_rgb: torch.Tensor, gt_alpha: torch.Tensor, pred_rgb: torch.Tensor, pred_alpha: torch.Tensor
) -> dict[str, float]:
    """Every metric of one clip (means over frames)."""
    ga, pa = gt_alpha.float(), pred_alpha.float()
    # alpha
    alpha_err = pa - ga
    metrics = {
        "alpha_mae": float(alpha_err.abs().mean()),
        "alpha_psnr": _psnr(float((alpha_err**2).mean())),
        "alpha_ssim": float(ssim_map(ga[:, None], pa[:, None]).mean()),
        # matting: SAD and gradient error per frame in thousands, alpha in [0,1]
        "alpha_sad": float((alpha_err.abs() / 255).sum(dim=(1, 2)).mean() / 1000),
        "alpha_mse": alpha_mse(gt_alpha, pred_alpha),
        "alpha_dtssd": dtssd(gt_alpha, pred_alpha),
        "alpha_conn": connectivity_error(gt_alpha, pred_alpha),
    }
    grad_gt, grad_pred = _gradient_magnitude(ga[:, None] / 255), _gradient_magnitude(pa[:, None] / 255)
    metrics["alpha_grad"] = float(((grad_pred - grad_gt) ** 2).sum(dim=(1, 2, 3)).mean() / 1000)
    # checkerboard composite: what a viewer sees
    gc, pc = checkerboard_composite(gt_rgb, gt_alpha), checkerboard_composite(pred_rgb, pred_alpha)
    comp_err = pc - gc
    metrics["composite_mae"] = float(comp_err.abs().mean())
    metrics["composite_psnr"] = _psnr(float((comp_err**2).mean()))
    metrics["composite_ssim"] = float(ssim_map(gc.permute(0, 3, 1, 2), pc.permute(0, 3, 1, 2)).mean())
    # RGB weighted by the true alpha (RGB under alpha 0 is arbitrary)
    w = ga.unsqueeze(-1) / 255
    wsum = float(w.sum()) * 3
    rgb_err = pred_rgb.float() - gt_rgb.float()
    if wsum > 0:
        metrics["rgb_weighted_mae"] = float((rgb_err.abs() * w).sum()) / wsum
        metrics["rgb_weighted_psnr"] = _psnr(float((rgb_err**2 * w).sum()) / wsum)
        smap = ssim_map(gt_rgb.float().permute(0, 3, 1, 2), pred_rgb.float().permute(0, 3, 1, 2))
        metrics["rgb_weighted_ssim"] = float((smap * w.permute(0, 3, 1, 2)).sum() / w.sum() / 3)
    else:  # a fully transparent clip has no RGB to judge
        metrics |= {"rgb_weighted_mae": 0.0, "rgb_weighted_psnr": float("inf"), "rgb_weighted_ssim": 1.0}
    return metrics
