"""Flow matching (reference NOTES §4–5). Training side: the schedule, timestep sampling and loss weights of the
official Wan-Alpha training (DiffSynth `FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)
.set_timesteps(1000, training=True)`), x_t = (1-σ)·x0 + σ·noise, target = noise − x0. Sampling side: the official
UniPC / Euler schedules and samplers, and classifier-free guidance (`guided_velocity`).
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
        return self.at(torch.randint(0, len(self.timesteps), (batch,), generator=generator), model_dtype)

    def at(self, ids: torch.Tensor, model_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, ...]:
        """(t, σ, weight) for drawn schedule indices `ids` (see `sample`)."""
        t = self.timesteps[ids].to(model_dtype)
        nearest = self.lookup(t)
        return t, self.sigmas[nearest], self.weights[nearest]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1−σ)·x0 + σ·noise, σ per sample."""
    s = sigma.to(x0.device).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


def add_noise_bf16(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """add_noise as the v2 training computes it: bf16 x0 and noise, each sample's σ a float32 0-dim tensor, so the
    products and the sum are rounded to bf16 (upstream `FlowMatchScheduler.add_noise`). Returns bf16."""
    x0, noise = x0.to(torch.bfloat16), noise.to(torch.bfloat16)
    sigma = sigma.float().to(x0.device)
    return torch.stack([(1 - s) * x + s * n for x, n, s in zip(x0, noise, sigma, strict=True)])


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over each sample of (pred − target)² in float32, times that sample's weight, averaged over the batch
    (for batch 1 exactly the official `mse(pred.float(), target.float()) · w`)."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (per_sample * weight.to(per_sample.device)).mean()


# ------------------------------------------------------------------------------------------------- samplers


def schedule(steps: int = 50, shift: float = 5.0, sampler: str = "unipc") -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) as the official schedulers give them (NOTES §5).

    unipc (upstream FlowUniPCMultistepScheduler, shift applied in set_timesteps): int64 timesteps = TRUNCATED
    1000·σ, starting at 999 (σ_max = float32(0.999) shifted); steps+1 float32 sigmas ending in 0.
    euler (DiffSynth FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)): float32 timesteps 1000·σ and
    steps float32 sigmas starting at exactly 1 (the final 0 is implicit).
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if sampler == "unipc":
        import numpy as np

        train_sigmas = (1.0 - np.linspace(1, 1 / NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS)[::-1]).astype(np.float32)
        sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
        s = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]
        s = shift * s / (1 + (shift - 1) * s)
        timesteps = torch.from_numpy(s * NUM_TRAIN_TIMESTEPS).to(torch.int64)
        sigmas = torch.from_numpy(np.concatenate([s, [0.0]]).astype(np.float32))
        return timesteps, sigmas
    if sampler == "euler":
        sigmas = shift_sigmas(torch.linspace(1.0, 0.0, steps + 1)[:-1], shift)
        return sigmas * NUM_TRAIN_TIMESTEPS, sigmas
    raise ValueError(f"unknown sampler {sampler!r}; use 'unipc' or 'euler'")


class UniPC:
    """Flow UniPC (bh2, order 2, predict-x0, lower-order final; NOTES §5): one `step` per model evaluation.

    A re-statement of upstream `FlowUniPCMultistepScheduler.step` for flow prediction, in float32 tensor math."""

    def __init__(self, sigmas: torch.Tensor, order: int = 2) -> None:
        self.sigmas, self.order = sigmas, order
        self.outputs: list[torch.Tensor] = []  # converted outputs m_i (x0 predictions), newest last
        self.last_sample: torch.Tensor | None = None
        self.last_order = 0
        self.index = 0

    def _lambda(self, i: int) -> torch.Tensor:
        sigma = self.sigmas[i]
        return torch.log(1 - sigma) - torch.log(sigma)

    def _coefficients(self, h: torch.Tensor, rks: list, order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = torch.expm1(hh)
        rks_t = torch.tensor([*rks, 1.0])
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(rows), torch.tensor(b), h_phi_1

    def _update(self, x: torch.Tensor, target: int, source: int, order: int, corrector_out=None) -> torch.Tensor:
        """Predictor (target = index + 1) or corrector (target = index, with the new output) from `source`."""
        m0 = self.outputs[-1] if corrector_out is None else self.outputs[-2]
        history = self.outputs if corrector_out is None else self.outputs[:-1]
        sigma_t, sigma_s0 = self.sigmas[target], self.sigmas[source]
        alpha_t = 1 - sigma_t
        lambda_s0 = self._lambda(source)
        h = self._lambda(target) - lambda_s0
        rks, diffs = [], []
        for i in range(1, order):
            rk = (self._lambda(source - i) - lambda_s0) / h
            rks.append(rk)
            diffs.append((history[-(i + 1)] - m0) / rk)
        rows, b, h_phi_1 = self._coefficients(h, rks, order)
        b_h = h_phi_1  # bh2: B(h) = expm1(-h)
        x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
        if corrector_out is None:
            if diffs:
                rho = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(rows[:-1, :-1], b[:-1])
                x_t = x_t - alpha_t * b_h * sum(r * d for r, d in zip(rho.to(x.dtype), diffs, strict=True))
            return x_t.to(x.dtype)
        rho = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(rows, b)
        rho = rho.to(x.dtype)
        correction = sum(r * d for r, d in zip(rho[:-1], diffs, strict=True)) if diffs else 0
        return (x_t - alpha_t * b_h * (correction + rho[-1] * (corrector_out - m0))).to(x.dtype)

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self.index
        converted = sample - self.sigmas[i] * velocity  # flow prediction → x0
        if i > 0 and self.last_sample is not None:  # UniC corrector with the previous step's order
            self.outputs.append(converted)
            sample = self._update(self.last_sample, i, i - 1, self.last_order, corrector_out=converted)
            self.outputs.pop()
        self.outputs = (self.outputs + [converted])[-self.order :]
        steps = len(self.sigmas) - 1
        order = min(self.order, steps - i, len(self.outputs))  # lower-order final, warm-up
        self.last_order, self.last_sample = order, sample
        self.index += 1
        return self._update(sample, i + 1, i, order)


def guided_velocity(model, context: torch.Tensor, negative: torch.Tensor | None, scale: float):
    """Classifier-free guidance as the official Wan pipeline applies it: a `velocity_fn` for `sample` from
    `model(x, t, contexts) → v` (a batch and one context per sample). With the negative prompt's context, the
    conditional and the unconditional prediction come from one batched call and combine as
    uncond + scale·(cond − uncond); without one (guidance off, cfg 1) the conditional prediction alone."""
    if negative is None:
        return lambda x, t: model(x, t, [context])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), [context, negative]).chunk(2)
        return uncond + scale * (cond - uncond)

    return velocity


def sample(
    velocity_fn,
    noise: torch.Tensor,
    steps: int = 50,
    shift: float = 5.0,
    sampler: str = "unipc",
    progress=None,
) -> torch.Tensor:
    """Integrate from noise (σ≈1) to x0. `velocity_fn(x, t)` gets the (B,) timestep tensor exactly as the official
    loop passes it (int64 for UniPC, float32 for Euler) and returns v; `progress(i)` is called after each step."""
    timesteps, sigmas = schedule(steps, shift, sampler)
    x = noise.float()
    batch = x.shape[0]
    solver = UniPC(sigmas) if sampler == "unipc" else None
    for i, t in enumerate(timesteps):
        v = velocity_fn(x, t.expand(batch).to(noise.device)).float()
        if solver is not None:
            x = solver.step(v, x)
        else:
            sigma_next = sigmas[i + 1] if i + 1 < len(sigmas) else torch.tensor(0.0)
            x = x + v * (sigma_next - sigmas[i])
        if progress is not None:
            progress(i)
    return x
