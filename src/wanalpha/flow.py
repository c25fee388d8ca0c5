"""Flow matching (reference NOTES §4–5). Training side: the schedule, timestep sampling and loss weights of the
official Wan-Alpha training (DiffSynth `FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)
.set_timesteps(1000, training=True)`), x_t = (1-σ)·x0 + σ·noise, target = noise − x0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(s: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = shift·s / (1 + (shift−1)·s)."""
    return shift * s / (1 + (shift - 1) * s)


@dataclass(frozen=True)
class TrainingSchedule:
    """timesteps, sigmas and loss weights, (num_steps,) float32 each, exactly as the official training builds them."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def create(cls, shift: float = 5.0, num_steps: int = NUM_TRAIN_TIMESTEPS) -> TrainingSchedule:
        s = torch.linspace(1.0, 0.0, num_steps + 1)[:-1]
        sigmas = shift_sigmas(s, shift)
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        # Bell-shaped weights over t (peak ≈ 2.08 at t = 500, exactly 0 at the minimum), summing to num_steps.
        y = torch.exp(-2 * ((timesteps - num_steps / 2) / num_steps) ** 2)
        y_shifted = y - y.min()
        weights = y_shifted * (num_steps / y_shifted.sum())
        return cls(timesteps, sigmas, weights)

    def lookup(self, t: torch.Tensor) -> torch.Tensor:
        """Index of the schedule entry nearest to each t (the official argmin |timesteps − t|)."""
        return (self.timesteps.to(t.device)[None, :] - t.float()[:, None]).abs().argmin(dim=1)

    def sample(
        self, batch: int, generator: torch.Generator | None = None, model_dtype: torch.dtype = torch.bfloat16
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t as the model sees it, σ, loss weight), one per sample: id ~ U{0…999}, t = timesteps[id] cast to the
        model's dtype; σ and the weight come from the entry nearest that (rounded) t, as upstream."""
        ids = torch.randint(0, len(self.timesteps), (batch,), generator=generator)
        t = self.timesteps[ids].to(model_dtype)
        nearest = self.lookup(t)
        return t, self.sigmas[nearest], self.weights[nearest]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1−σ)·x0 + σ·noise, σ per sample."""
    s = sigma.to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over each sample of (pred − target)² in float32, times that sample's weight, averaged over the batch
    (for batch 1 exactly the official `mse(pred.float(), target.float()) · w`)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weight.to(per_sample.device)).mean()
