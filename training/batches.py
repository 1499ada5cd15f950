"""Training batches: the run's data (square crops, or aspect-ratio buckets) and each step's batch, noise and target.

Every random choice of a step (which images, flips, crops, noise levels, noise) is a pure
function of (seed, step, micro-batch, rank), so a resumed run continues exactly where an
uninterrupted one would be, and a run is repeatable from its seed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .buckets import BucketedLatentSource
from .data import TrainingInputError
from ..forms.model import cpu_model_sampling, native_target, noisy_inputs, sample_sigmas
from .sources import LatentSource, step_generator


def model_resolution_factor(model_patcher, vae=None) -> int:
    """Pixels per latent cell times the UNet's total downsampling: resolutions must be multiples of this."""
    from .data import vae_spatial_ratio

    vae_ratio = 8 if vae is None else vae_spatial_ratio(vae)  # Wan 2.2 / Flux.2: 16; video VAEs state a tuple
    unet_config = model_patcher.model.model_config.unet_config
    if "channel_mult" not in unet_config:  # a transformer: latents must be whole patches
        patch = unet_config.get("patch_size", 1) or 1
        patch = max(patch) if isinstance(patch, (list, tuple)) else int(patch)
        return vae_ratio * max(1, patch)
    levels = len(unet_config.get("channel_mult", [1]))
    return vae_ratio * 2 ** max(0, levels - 1)


def flow_objective(model_sampling, timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                   logit_std: float = 1.0):
    """The FlowObjective of a flow-matching (CONST) model_sampling, with its shift and timestep multiplier as
    the model samples (a ModelSamplingSD3 / ModelSamplingFlux / ModelSamplingAuraFlow node's setting included:
    the trainer reads the patched model's model_sampling). None for eps / v models (their objective is
    forms.model.native_target)."""
    import math

    import comfy.model_sampling as ms

    from .objective import FlowObjective

    if not isinstance(model_sampling, ms.CONST):
        return None
    if isinstance(model_sampling, ms.ModelSamplingFlux):      # sigma = flux_time_shift(mu, 1, t), timestep = sigma
        shift, multiplier = math.exp(float(model_sampling.shift)), 1.0
    elif isinstance(model_sampling, ms.ModelSamplingDiscreteFlow):  # time_snr_shift(shift, t), timestep = sigma * mult
        shift, multiplier = float(model_sampling.shift), float(model_sampling.multiplier)
    else:
        raise TrainingInputError(f"training flow-matching models sampled by {type(model_sampling).__name__} is not "
                                 "supported (InDomain trains ModelSamplingDiscreteFlow and ModelSamplingFlux "
                                 "families: SD3, Flux, Chroma, Flux.2, Lumina 2 / Z-Image, Qwen-Image, Wan).")
    return FlowObjective(shift=shift, multiplier=multiplier, timestep_sampling=timestep_sampling,
                         logit_mean=logit_mean, logit_std=logit_std)


@dataclass
class TrainingData:
    """The run's latents at their training size, the base's latent format and a CPU copy of its noise
    schedule (a step's noise and sigmas are drawn on the CPU: device independent), and a fingerprint."""

    source: object                      # LatentSource, or BucketedLatentSource with config.buckets
    size_hw: tuple[int, int]
    latent_format: object
    model_sampling: object
    fingerprint: str
    info: dict
    objective: object = None            # training.objective.FlowObjective for flow-matching models, else None
    video_latents: bool = False         # the model takes [B, C, T, h, w] (Wan, Qwen-Image): images become 1-frame clips

    @classmethod
    def prepare(cls, model_patcher, latents, flipped_latents, config, data_info: dict | None,
                bucket_hw: list | None = None, vae_ratio: int = 8) -> "TrainingData":
        """`bucket_hw` (with config.buckets): each latent's bucket (h, w) in latent cells (default: its own size).
        `vae_ratio`: pixels per latent cell of the VAE that made the latents (8; 16 for Wan 2.2's and Flux.2's)."""
        latent_format = model_patcher.model.latent_format
        size_hw = (config.resolution // vae_ratio, config.resolution // vae_ratio)
        if isinstance(latents, torch.Tensor) and config.crop == "center" and tuple(latents.shape[-2:]) != size_hw:
            size_hw = tuple(latents.shape[-2:])  # latents given at their own size (e.g. the toy world)
        factor = model_resolution_factor(model_patcher) // 8  # latent cells per patch (no VAE: 8 px a cell)
        if size_hw[0] % factor or size_hw[1] % factor:
            raise TrainingInputError(f"latent size {size_hw} is not a multiple of {factor}, which this UNet needs "
                                     f"(resolution must be a multiple of {vae_ratio * factor} px).")
        if latents[0].shape[0] != latent_format.latent_channels:
            raise TrainingInputError(f"latents have {latents[0].shape[0]} channels but this model uses "
                                     f"{latent_format.latent_channels}; encode them with this checkpoint's VAE.")
        if config.buckets:
            if bucket_hw is None:
                bucket_hw = [tuple(x.shape[-2:]) for x in latents]
            odd = [hw for hw in bucket_hw if hw[0] % factor or hw[1] % factor]
            if odd:
                raise TrainingInputError(f"bucket latent size {odd[0]} is not a multiple of {factor}, which this UNet "
                                         "needs.")
            source = BucketedLatentSource(latents, flipped_latents, bucket_hw, config.crop)
        else:
            source = LatentSource(latents, flipped_latents, size_hw, config.crop)
        info = dict(data_info or {})
        info.setdefault("images", len(source))
        fingerprint = info.get("fingerprint") or hashlib.sha256(
            b"".join(x.numpy().tobytes() for x in source.latents[:64])).hexdigest()
        model_sampling = cpu_model_sampling(model_patcher)
        objective = flow_objective(model_sampling, config.timestep_sampling, config.logit_mean, config.logit_std)
        if objective is None and config.timestep_sampling != "uniform":
            raise TrainingInputError("timestep_sampling 'logit_normal' is for flow-matching models (SD3, Flux, Wan, "
                                     "Qwen-Image, ...); this model is trained on uniform discrete timesteps.")
        video = getattr(latent_format, "latent_dimensions", 2) == 3
        return cls(source, size_hw, latent_format, model_sampling, fingerprint, info, objective, video)

    def model_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Image latents [B, C, h, w] as the model takes them: single-frame clips [B, C, 1, h, w] for video
        families; clips [B, C, T, h, w] stay as they are."""
        return x.unsqueeze(2) if self.video_latents and x.ndim == 4 else x

    def calibration_latents(self, config) -> torch.Tensor:
        """The first `calibration_images` latents of the run's order, uncropped-flip-free, processed."""
        n = min(len(self.source), max(1, config.calibration_images))
        return self.latent_format.process_in(self.model_latents(self.source.calibration_latents(config.seed, n)))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every latent (h, w) a batch can have: the training size, or each bucket's."""
        return list(getattr(self.source, "keys", [tuple(self.size_hw)]))

    def micro_batch(self, config, micro_step: int, rank: int, world: int, device):
        """(model input, timestep, target) of one micro-batch, on `device`."""
        gen = step_generator(config.seed, "batch", micro_step, rank)
        x0 = self.latent_format.process_in(self.model_latents(self.source.micro_batch(
            config.seed, micro_step, rank, config.batch_size, world, gen, config.hflip)))
        if self.objective is not None:  # flow matching: the model's shifted schedule, velocity target
            sigma = self.objective.draw_sigmas(x0.shape[0], gen)
            noise = torch.randn(x0.shape, generator=gen)
            xc = self.objective.noisy(x0, noise, sigma)   # CONST models take x_t as it is (calculate_input)
            t = self.objective.timestep(sigma)
            return xc.to(device), t.to(device), self.objective.target(x0, noise).to(device)
        sigma = sample_sigmas(self.model_sampling, x0.shape[0], gen)
        noise = torch.randn(x0.shape, generator=gen)
        xc, t, x_noisy = noisy_inputs(self.model_sampling, x0, sigma, noise)
        target = native_target(self.model_sampling, sigma, x0, noise, x_noisy)
        return xc.to(device), t.to(device), target.to(device)
