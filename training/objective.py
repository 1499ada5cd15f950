"""The training objective of flow-matching models (plain torch, no ComfyUI import).

A flow-matching ("CONST" in ComfyUI) model sees x_t = (1 - sigma) x0 + sigma * noise and outputs the
velocity v = noise - x0: ComfyUI's calculate_denoised maps it back as x0 = x_t - sigma * v. Its sampling
schedule is a uniform timestep t in [0, 1] moved by the family's shift,

    sigma = shift * t / (1 + (shift - 1) * t)

(ModelSamplingDiscreteFlow's time_snr_shift; ModelSamplingFlux's flux_time_shift(mu, 1, t) is the same map
with shift = exp(mu)), and the model is fed the timestep sigma * multiplier (1000 for SD3 / Wan, 1 for
Flux, Chroma, Flux.2, Qwen-Image, Lumina 2 / Z-Image).

`FlowObjective` draws sigma the same way (uniform t, then the shift: so training sees the noise levels the
sampler visits, under whatever shift the user's ModelSampling* node set), or with t logit-normal
(SD3 paper, sec. 3.1) before the shift; builds x_t; and gives the velocity target. The loss is the MSE in
velocity space: the error of x0 = x_t - sigma * v is sigma times the velocity error, so this loss is the
x0-space MSE divided by sigma^2 (`x0_loss_factor`). Core's Train LoRA node draws the same shifted sigma
(percent_to_sigma(U(0, 1))) but takes the MSE in x0 space, i.e. it weights every sample by sigma^2: the
low-noise steps (fine detail) get almost no gradient there, and the most at full noise.

eps / v-prediction (SD1.x, SD2.x, SDXL) are unchanged: forms/model.py's native_target and sample_sigmas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def shift_sigma(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow schedule's shift: sigma = shift * t / (1 + (shift - 1) * t) (identity at shift 1)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class FlowObjective:
    """Velocity-target training of a flow-matching model with the model's own sampling shift."""

    shift: float = 1.0               # the shift of sigma(t) as above (Flux-style mu: shift = exp(mu))
    multiplier: float = 1.0          # model timestep = sigma * multiplier
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0          # logit-normal: t = sigmoid(N(logit_mean, logit_std))
    logit_std: float = 1.0

    def __post_init__(self):
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)} "
                             f"(got {self.timestep_sampling!r})")
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be a positive number (got {self.shift})")
        if not (self.logit_std > 0):
            raise ValueError(f"logit_std must be > 0 (got {self.logit_std})")

    def draw_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Unshifted timesteps t in (0, 1): uniform, or logit-normal."""
        if self.timestep_sampling == "logit_normal":
            z = torch.randn((batch,), generator=generator, dtype=torch.float64)
            return torch.sigmoid(z * self.logit_std + self.logit_mean).float()
        return torch.rand((batch,), generator=generator, dtype=torch.float64).float()

    def draw_sigmas(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Noise levels as the model's sampler spaces them: t as drawn, then the family's shift."""
        return shift_sigma(self.draw_t(batch, generator).double(), self.shift).float()

    @staticmethod
    def _b(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - sigma) x0 + sigma * noise."""
        s = self._b(sigma, x0)
        return (1.0 - s) * x0 + s * noise

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """What the diffusion model is fed as its timestep."""
        return (sigma * self.multiplier).float()

    @staticmethod
    def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity the model outputs: noise - x0 (d x_t / d sigma)."""
        return noise - x0

    def denoised(self, x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """x0 from a velocity (what ComfyUI's calculate_denoised does for CONST models)."""
        return x_t - self._b(sigma, x_t) * velocity

    @staticmethod
    def x0_loss_factor(sigma: torch.Tensor) -> torch.Tensor:
        """Per-sample factor f with velocity-space squared error = f * x0-space squared error: 1 / sigma^2."""
        return 1.0 / (sigma.double() ** 2)

    def loss(self, velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training loss: MSE between the predicted and the true velocity."""
        return torch.nn.functional.mse_loss(velocity.float(), self.target(x0, noise).float())
