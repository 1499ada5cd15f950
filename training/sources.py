"""Per-image latents and the per-step random generator: what both square batches (batches.py) and
aspect-ratio buckets (buckets.py) draw from.

Every random choice of a step is a pure function of (seed, step, micro-batch, rank) through
`step_generator`, so a resumed run continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import hashlib

import torch

from .data import TrainingInputError


def step_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by (seed, keys): the randomness of a step depends on nothing else."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class LatentSource:
    """Per-image latents (each [C, h, w], h/w >= the training size) and their mirrored encodings."""

    def __init__(self, latents, flipped=None, size_hw: tuple[int, int] | None = None, crop: str = "center"):
        if isinstance(latents, torch.Tensor):
            if latents.ndim not in (4, 5):
                raise TrainingInputError(f"latents must be [N, C, H, W] (or [N, C, T, H, W] clips); got shape "
                                         f"{tuple(latents.shape)}")
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

    def micro_batch(self, seed: int, micro_step: int, rank: int, batch_size: int, world: int,
                    gen: torch.Generator, hflip: float) -> torch.Tensor:
        """This rank's images at a micro-step: a pure function of the arguments (see index_at)."""
        first = micro_step * batch_size * world + rank * batch_size
        return self.batch([self.index_at(seed, first + i) for i in range(batch_size)], gen, hflip)

    def calibration_latents(self, seed: int, count: int) -> torch.Tensor:
        """The first `count` images of the run's order, centre-cropped, not flipped."""
        return torch.stack([self.batch([self.index_at(seed, i)], step_generator(seed, "calib", i), 0.0)[0]
                            for i in range(count)])

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
            out.append(src[..., top:top + th, left:left + tw])
        return torch.stack(out)
