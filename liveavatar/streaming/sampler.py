"""Flow-matching Euler sampler with shift 3: the schedule the distilled LiveAvatar LoRA is trained for.

Reproduces diffusers' `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3)` with
`set_timesteps(n)` (docs/model.md §4.6) without depending on it: for n = 4 the timesteps are
[1000, 857.69, 602.15, 8.93] and the sigmas [1, 0.8577, 0.6022, 0.0089, 0].
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from liveavatar.settings import STEPS_MAX, STEPS_MIN

log = logging.getLogger(__name__)

TRAIN_TIMESTEPS = 1000
SHIFT = 3.0
DISTILLED_STEPS = 4


def _shift(sigma):
    return SHIFT * sigma / (1 + (SHIFT - 1) * sigma)


class FlowMatchEuler:
    """Timesteps and sigmas for `steps` denoising steps, and the Euler update between them."""

    def __init__(self, steps: int = DISTILLED_STEPS):
        if not STEPS_MIN <= steps <= STEPS_MAX:  # the rule every command applies (liveavatar.settings)
            raise ValueError(f"sample steps must be between {STEPS_MIN} and {STEPS_MAX}, got {steps}")
        if steps != DISTILLED_STEPS:
            log.warning("sampling with %d steps: the LiveAvatar weights are distilled for %d", steps, DISTILLED_STEPS)
        self.steps = steps
        # The training schedule's smallest sigma (t = 1 of 1000, shifted), computed in float32 as
        # diffusers does; the inference schedule is spaced linearly between 1 and it, then shifted.
        train_sigmas = torch.arange(TRAIN_TIMESTEPS, 0, -1, dtype=torch.float32) / TRAIN_TIMESTEPS
        sigma_min = _shift(train_sigmas)[-1].item()
        t = np.linspace(1.0 * TRAIN_TIMESTEPS, sigma_min * TRAIN_TIMESTEPS, steps)
        sigmas = torch.from_numpy(_shift(t / TRAIN_TIMESTEPS)).to(torch.float32)
        self.timesteps = sigmas * TRAIN_TIMESTEPS
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])

    def step(self, index: int, sample: torch.Tensor, velocity: torch.Tensor, to: int | None = None) -> torch.Tensor:
        """x_{s+1} = x_s + (sigma_{s+1} - sigma_s) * v: the product in v's dtype, the sum in fp32. `to`: the
        sigma index to land on instead of index + 1 (fewer steps than the schedule jump ahead)."""
        dt = (self.sigmas[index + 1 if to is None else to] - self.sigmas[index]).to(velocity.device)
        return (sample.float() + dt * velocity).to(velocity.dtype)


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor | None, guide_scale: float) -> torch.Tensor:
    """Classifier-free guidance; `guide_scale` 0 (the LiveAvatar default) means no guidance at all."""
    if uncond is None or guide_scale <= 0:
        return cond
    return (uncond.float() + guide_scale * (cond.float() - uncond.float())).to(cond.dtype)
