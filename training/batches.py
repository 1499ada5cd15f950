"""Training batches: per-image latents, crops and flips, and the determinism that makes resume exact.

Every random choice of a step (which images, flips, crops, noise levels, noise) is a pure
function of (seed, step, micro-batch, rank), so a resumed run continues exactly where an
uninterrupted one would be, and a run is repeatable from its seed.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .data import TrainingInputError
from .model import cpu_model_sampling, native_target, noisy_inputs, sample_sigmas


def step_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by (seed, keys): the randomness of a step depends on nothing else."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class LatentSource:
    """Per-image latents (each [C, h, w], h/w >= the training size) and their mirrored encodings."""

    def __init__(self, latents, flipped=None, size_hw: tuple[int, int] | None = None, crop: str = "center"):
        if isinstance(latents, torch.Tensor):
            if latents.ndim != 4:
                raise TrainingInputError(f"latents must be [N, C, H, W]; got shape {tuple(latents.shape)}")
            latents = list(latents)
        if isinstance(flipped, torch.Tensor):
            flipped = list(flipped)
        if not latents:
            raise TrainingInputError("no training latents were given (the image folder produced none).")
        self.latents = [x.detach().float().cpu().clone() for x in latents]
        self.flipped = None if flipped is None else [x.detach().float().cpu().clone() for x in flipped]
        self.crop = crop
        if size_hw is None:
            size_hw = (min(x.shape[-2] for x in self.latents), min(x.shape[-1] for x in self.latents))
        self.size_hw = tuple(int(s) for s in size_hw)
        small = [i for i, x in enumerate(self.latents) if x.shape[-2] < self.size_hw[0] or x.shape[-1] < self.size_hw[1]]
        if small:
            raise TrainingInputError(f"latent {small[0]} is smaller than the training size {self.size_hw}")
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.latents)

    def index_at(self, seed: int, position: int) -> int:
        """The image at global sample `position`: epoch-wise permutations, a pure function of (seed, position)."""
        n = len(self)
        epoch = position // n
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = torch.randperm(n, generator=step_generator(seed, "perm", epoch))
        return int(self._perms[epoch][position % n])

    def batch(self, indices: list[int], gen: torch.Generator, hflip: float) -> torch.Tensor:
        th, tw = self.size_hw
        out = []
        for i in indices:
            flip = bool(torch.rand((), generator=gen) < hflip)
            src = self.latents[i]
            if flip:
                src = self.flipped[i] if self.flipped is not None else torch.flip(src, dims=[-1])
            h, w = src.shape[-2:]
            if self.crop == "random":
                top = int(torch.randint(0, h - th + 1, (), generator=gen))
                left = int(torch.randint(0, w - tw + 1, (), generator=gen))
            else:
                top, left = (h - th) // 2, (w - tw) // 2
            out.append(src[:, top:top + th, left:left + tw])
        return torch.stack(out)


def model_resolution_factor(model_patcher, vae=None) -> int:
    """Pixels per latent cell times the UNet's total downsampling: resolutions must be multiples of this."""
    vae_ratio = 8
    if vae is not None:
        r = getattr(vae, "downscale_ratio", 8)
        vae_ratio = r if isinstance(r, int) else 8
    levels = len(model_patcher.model.model_config.unet_config.get("channel_mult", [1]))
    return vae_ratio * 2 ** max(0, levels - 1)


@dataclass
class TrainingData:
    """The run's latents at their training size, the base's latent format and a CPU copy of its noise
    schedule (a step's noise and sigmas are drawn on the CPU: device independent), and a fingerprint."""

    source: LatentSource
    size_hw: tuple[int, int]
    latent_format: object
    model_sampling: object
    fingerprint: str
    info: dict

    @classmethod
    def prepare(cls, model_patcher, latents, flipped_latents, config, data_info: dict | None) -> "TrainingData":
        latent_format = model_patcher.model.latent_format
        size_hw = (config.resolution // 8, config.resolution // 8)
        if isinstance(latents, torch.Tensor) and config.crop == "center" and tuple(latents.shape[-2:]) != size_hw:
            size_hw = tuple(latents.shape[-2:])  # latents given at their own size (e.g. the toy world)
        factor = model_resolution_factor(model_patcher) // 8
        if size_hw[0] % factor or size_hw[1] % factor:
            raise TrainingInputError(f"latent size {size_hw} is not a multiple of {factor}, which this UNet needs "
                                     f"(resolution must be a multiple of {8 * factor} px).")
        if latents[0].shape[0] != latent_format.latent_channels:
            raise TrainingInputError(f"latents have {latents[0].shape[0]} channels but this model uses "
                                     f"{latent_format.latent_channels}; encode them with this checkpoint's VAE.")
        source = LatentSource(latents, flipped_latents, size_hw, config.crop)
        info = dict(data_info or {})
        info.setdefault("images", len(source))
        fingerprint = info.get("fingerprint") or hashlib.sha256(
            b"".join(x.numpy().tobytes() for x in source.latents[:64])).hexdigest()
        return cls(source, size_hw, latent_format, cpu_model_sampling(model_patcher), fingerprint, info)

    def calibration_latents(self, config) -> torch.Tensor:
        """The first `calibration_images` latents of the run's order, uncropped-flip-free, processed."""
        n = min(len(self.source), max(1, config.calibration_images))
        return self.latent_format.process_in(torch.stack(
            [self.source.batch([self.source.index_at(config.seed, i)], step_generator(config.seed, "calib", i), 0.0)[0]
             for i in range(n)]))

    def micro_batch(self, config, micro_step: int, rank: int, world: int, device):
        """(model input, timestep, target) of one micro-batch, on `device`."""
        global_batch = config.batch_size * world
        positions = [micro_step * global_batch + rank * config.batch_size + i for i in range(config.batch_size)]
        gen = step_generator(config.seed, "batch", micro_step, rank)
        x0 = self.latent_format.process_in(self.source.batch([self.source.index_at(config.seed, p) for p in positions],
                                                             gen, config.hflip))
        sigma = sample_sigmas(self.model_sampling, x0.shape[0], gen)
        noise = torch.randn(x0.shape, generator=gen)
        xc, t, x_noisy = noisy_inputs(self.model_sampling, x0, sigma, noise)
        target = native_target(self.model_sampling, sigma, x0, noise, x_noisy)
        return xc.to(device), t.to(device), target.to(device)
