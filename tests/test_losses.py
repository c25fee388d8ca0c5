"""Stage-1 loss terms against the official training step (golden/v2_losses: the reconstruction terms)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wanalpha.losses import LossWeights, VGG16Features, rgba_reconstruction_loss, sobel_magnitude

TERMS = {  # ours → the official logged name
    "l1_rgb_hard": "log_loss_l1_fgr_hard",
    "l1_rgb_soft": "log_loss_l1_fgr_soft",
    "l1_alpha": "log_loss_l1_pha",
    "sobel_rgb_hard": "log_loss_sobel_fgr_hard",
    "sobel_rgb_soft": "log_loss_sobel_fgr_soft",
    "sobel_alpha": "log_loss_sobel_pha",
    "perceptual_rgb_hard": "log_loss_per_fgr_hard",
    "perceptual_rgb_soft": "log_loss_per_fgr_soft",
    "perceptual_alpha": "log_loss_per_pha",
}


def test_reconstruction_terms_match_official(reference: Path, ref_weights) -> None:
    golden = load_file(reference / "golden/v2_losses.safetensors")
    meta = json.loads((reference / "golden/v2_losses.json").read_text())
    vgg = VGG16Features()
    trunk = ref_weights.make_state_dict(meta["weights"]["vgg_trunk"]["key_shapes"], 1239)
    vgg.load_state_dict({k.removeprefix("perceptual_loss."): v for k, v in trunk.items()})
    total, metrics = rgba_reconstruction_loss(
        golden["video_fgr"],
        golden["video_pha"],
        golden["recon_fgr"],
        golden["recon_pha"],
        int(golden["bg_index_hard"]),
        int(golden["bg_index_soft"]),
        LossWeights(perceptual=1.0),
        vgg,
    )
    for ours, theirs in TERMS.items():
        assert metrics[ours] == pytest.approx(float(golden[theirs]), rel=1e-5), ours
    recon = float(golden["log_total_recon"] + golden["log_total_per"] + golden["log_total_sobel"])
    assert float(total) == pytest.approx(recon, rel=1e-5)  # the official total without its 0.1×t2v term
    frames = golden["grad_gt_hard"].shape[0]
    assert torch.allclose(sobel_magnitude(golden["gt_hard"]), golden["grad_gt_hard"].view(frames, 1, 32, 48))


def test_default_weights_skip_perceptual_and_need_vgg_when_on() -> None:
    rgb, alpha = torch.rand(1, 3, 1, 8, 8) * 2 - 1, torch.rand(1, 1, 1, 8, 8) * 2 - 1
    pred_rgb, pred_alpha = torch.rand(1, 3, 1, 8, 8), torch.rand(1, 3, 1, 8, 8)
    total, metrics = rgba_reconstruction_loss(rgb, alpha, pred_rgb, pred_alpha, 0, 7)
    assert set(metrics) == {
        "loss",
        "l1_alpha",
        "l1_rgb_hard",
        "l1_rgb_soft",
        "sobel_alpha",
        "sobel_rgb_hard",
        "sobel_rgb_soft",
    }
    assert metrics["loss"] == pytest.approx(sum(v for k, v in metrics.items() if k != "loss"), rel=1e-6)
    perfect, zero = rgba_reconstruction_loss(rgb, alpha, rgb, alpha.expand(-1, 3, -1, -1, -1), 3, 3)
    assert zero["l1_alpha"] == 0 and zero["l1_rgb_soft"] == 0 and zero["sobel_rgb_hard"] == 0
    with pytest.raises(ValueError, match="VGG16"):
        rgba_reconstruction_loss(rgb, alpha, pred_rgb, pred_alpha, 0, 0, LossWeights(perceptual=0.5))
