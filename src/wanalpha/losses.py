"""Stage-1 (RGB-alpha VAE) losses, one function per paper term (arXiv 2509.24979 eq. 10–13), written to match the
official training code (reference NOTES §10.4: `train_vae.py::training_step`, `loss_tools.py`, `vgg_loss.py`).

For a ground truth (straight RGB `rgb`, alpha) and the two decoders' raw 3-channel outputs (`rgb_pred`,
`alpha_pred`), with colours k_hard and k_soft drawn from the 8 RGB-cube corners:
  L_α      = L1(alpha (3 ch), alpha_pred)
  L_rgb^h  = L1(composite(rgb, alpha, k_hard, hard), composite(rgb_pred, alpha_pred, k_hard, hard))
  L_rgb^s  = the same with soft alpha over k_soft          (predictions are composited with the PREDICTED alpha)
plus, on the same three pairs, a Sobel-edge L1 and an optional VGG16 perceptual MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wanalpha.data.render import composite

# ITU-R BT.601 luma on the [-1,1] values, as loss_tools.py writes it (no offset).
GRAY_WEIGHTS = (65.738 / 256, 129.057 / 256, 25.064 / 256)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


def _frames(video: torch.Tensor) -> torch.Tensor:
    """(B,C,T,H,W) → (B·T,C,H,W)."""
    return video.transpose(1, 2).flatten(0, 1)


def sobel_magnitude(video: torch.Tensor) -> torch.Tensor:
    """Per-frame gradient magnitude of the grey image: sqrt(dv² + dh² + 1e-6), central differences, zero padding."""
    x = _frames(video)
    if x.shape[1] == 3:
        w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(dim=1, keepdim=True)
    kernel_v = torch.tensor([[0, -1, 0], [0, 0, 0], [0, 1, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    kernel_h = torch.tensor([[0, 0, 0], [-1, 0, 1], [0, 0, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    dv, dh = F.conv2d(x, kernel_v, padding=1), F.conv2d(x, kernel_h, padding=1)
    return torch.sqrt(dv**2 + dh**2 + 1e-6)


def sobel_edge_loss(target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    return l1(sobel_magnitude(target), sobel_magnitude(pred))


class VGG16Features(nn.Module):
    """torchvision's vgg16().features[:9] (conv1_1 … relu2_2), the official perceptual trunk; keys `model.{0,2,5,7}`.

    Its ImageNet weights are not bundled: load them from a local file (`load_vgg16_features`)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
        )
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def perceptual_loss(vgg: VGG16Features, target: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Official VGGLoss: inputs x·0.5+0.5 (no ImageNet mean/std), frames flattened, one pass, MSE of the features."""
    x = torch.cat([_frames(target), _frames(pred)]) * 0.5 + 0.5
    features = vgg(x)
    f_target, f_pred = features.chunk(2)
    return F.mse_loss(f_pred, f_target)


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0
    rgb_soft: float = 1.0
    rgb_hard: float = 1.0
    sobel: float = 1.0
    perceptual: float = 0.0


def rgba_reconstruction_loss(
    rgb: torch.Tensor,
    alpha: torch.Tensor,
    rgb_pred: torch.Tensor,
    alpha_pred: torch.Tensor,
    k_hard: int | torch.Tensor,
    k_soft: int | torch.Tensor,
    weights: LossWeights = LossWeights(),
    vgg: VGG16Features | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The stage-1 objective: (total loss, per-term metrics). rgb (B,3,…) straight colour and alpha (B,1|3,…) are the
    ground truth in [-1,1]; rgb_pred and alpha_pred the decoders' unclamped 3-channel outputs."""
    alpha3 = alpha.expand_as(alpha_pred)
    pairs = {
        "alpha": (alpha3, alpha_pred),
        "rgb_hard": (composite(rgb, alpha3, k_hard, hard=True), composite(rgb_pred, alpha_pred, k_hard, hard=True)),
        "rgb_soft": (composite(rgb, alpha3, k_soft), composite(rgb_pred, alpha_pred, k_soft)),
    }
    terms: dict[str, torch.Tensor] = {}
    total = rgb_pred.new_zeros((), dtype=torch.float32)
    for name, (target, pred) in pairs.items():
        target, pred = target.float(), pred.float()
        terms[f"l1_{name}"] = l1(target, pred)
        total = total + getattr(weights, name) * terms[f"l1_{name}"]
        if weights.sobel:
            terms[f"sobel_{name}"] = sobel_edge_loss(target, pred)
            total = total + weights.sobel * terms[f"sobel_{name}"]
        if weights.perceptual:
            if vgg is None:
                raise ValueError("perceptual weight > 0 needs the VGG16 trunk (vgg=...)")
            terms[f"perceptual_{name}"] = perceptual_loss(vgg, target, pred)
            total = total + weights.perceptual * terms[f"perceptual_{name}"]
    metrics = {"loss": float(total.detach())} | {k: float(v.detach()) for k, v in terms.items()}
    return total, metrics


# ---------------------------------------------------------------------------------------------------- v2 (NOTES §10.4)
def _isclose(x: torch.Tensor, value: float) -> torch.Tensor:
    """np.isclose(x, value) with its defaults (rtol 1e-5, atol 1e-8)."""
    return (x - value).abs() <= 1e-8 + 1e-5 * abs(value)


def latent_alpha_mask(alpha: torch.Tensor) -> torch.Tensor:
    """The official ±1/0 latent mask of the v2 diffusion loss (`gen_gauss_mask_for_video`): alpha (B,C,T,H,W) in
    [-1,1] (channel 0 is used; H, W multiples of 8) → int8 (B, T_lat, H/8, W/8). Each cell is the 8×8 block mean of
    frame 0, then of 4-frame groups (block means averaged): +1 where ≈ 1 (opaque), −1 where ≈ −1 (transparent). In
    latent frame 0 every other cell is −1; later, a mixed cell is −1 only when every pixel of its block is strictly
    semi-transparent in all four frames of its group, else 0."""
    a = alpha[:, 0].float()  # (B, T, H, W)
    b, frames, height, width = a.shape
    groups = (frames - 1) // 4
    first = a[:, :1]
    rest = a[:, 1 : 1 + 4 * groups].reshape(b, groups, 4, height, width)
    cells = F.avg_pool2d(first, 8)
    group_cells = F.avg_pool2d(rest.flatten(1, 2), 8).view(b, groups, 4, height // 8, width // 8).mean(2)
    c = torch.cat([cells, group_cells], dim=1)
    mask = torch.zeros(c.shape, dtype=torch.int8, device=a.device)
    mask[_isclose(c, 1.0)] = 1
    mask[_isclose(c, -1.0)] = -1
    mixed = mask == 0
    mixed[:, 0] = False
    mask[:, 0][mask[:, 0] == 0] = -1
    # Every pixel of the block strictly semi-transparent in all four frames of the group.
    semi = ~(_isclose(rest, 1.0) | _isclose(rest, -1.0))  # (B, G, 4, H, W)
    all_semi = semi.all(dim=2).view(b, groups, height // 8, 8, width // 8, 8).all(dim=5).all(dim=3)
    mask[:, 1:][mixed[:, 1:] & all_semi] = -1
    return mask


def masked_diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The official v2 transparency-aware diffusion loss: clamp((pred − target)² · mask · w(t), 0, 1).mean() over
    every element, with the ±1/0 mask (B, T, h, w) broadcast over the channels. As written upstream, the clamp sets
    the −1 cells to 0 like the 0 cells: only fully opaque cells contribute, each element capped at 1."""
    w = weight.float().to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
    per_element = (pred.float() - target.float()) ** 2 * mask.float().unsqueeze(1) * w
    return per_element.clamp(0, 1).mean()
