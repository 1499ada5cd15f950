"""Aspect-ratio buckets: non-square images train at about the same pixel count in a few shapes,
instead of being cropped to a square.

Bucket shapes: for each aspect ratio in ASPECT_RATIOS (and its portrait twin) the width x height of
about resolution² pixels, both sides snapped to the model's size factor (64 px for SD1.5/SDXL).
Each image goes to the bucket whose aspect ratio is nearest its own (in log ratio), is resized
to cover it and cropped (centre, or random on the latent grid with crop = "random").

Batches are drawn within one bucket (one tensor shape per step). The schedule is a pure function
of (seed, micro-step): each epoch every bucket's images are permuted and cut into chunks of the
global batch (the last chunk of a bucket filled up from the start of its permutation), and the
chunks of all buckets are shuffled. A resumed run therefore draws exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import math

import torch

from .sources import LatentSource, step_generator

# w / h of the landscape shapes; each also gives its portrait twin (h / w)
ASPECT_RATIOS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0)


def bucket_sizes(resolution: int, factor: int = 64) -> list[tuple[int, int]]:
    """(width, height) in pixels, sorted from tallest to widest; about resolution² pixels each."""
    area = resolution * resolution
    sizes = set()
    for ratio in ASPECT_RATIOS:
        for r in (ratio, 1.0 / ratio):
            w = math.sqrt(area * r)
            h = area / w
            sizes.add((max(factor, round(w / factor) * factor), max(factor, round(h / factor) * factor)))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (log ratio) to width/height; ties go to the first listed."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


class BucketedLatentSource:
    """Per-image latents of different shapes, grouped by bucket; batches come from one bucket at a time."""

    def __init__(self, latents, flipped, bucket_hw: list[tuple[int, int]], crop: str = "center"):
        if not latents:
            from .data import TrainingInputError

            raise TrainingInputError("no training latents were given (the images produced none).")
        if len(bucket_hw) != len(latents):
            raise ValueError("one bucket (latent h, w) per latent is needed")
        self.latents = [x.detach().float().cpu() for x in latents]
        self.keys = sorted(set(tuple(int(s) for s in hw) for hw in bucket_hw))
        self.members = {k: [i for i, hw in enumerate(bucket_hw) if tuple(hw) == k] for k in self.keys}
        self.sources = {k: LatentSource([latents[i] for i in self.members[k]],
                                        None if flipped is None else [flipped[i] for i in self.members[k]],
                                        k, crop)
                        for k in self.keys}
        self._plans: dict[tuple[int, int, int], list] = {}

    def __len__(self) -> int:
        return len(self.latents)

    @property
    def bucket_counts(self) -> dict[str, int]:
        """{"HxW" (latent cells): images}, for logs and metadata."""
        return {f"{h}x{w}": len(self.members[(h, w)]) for h, w in self.keys}

    def chunks_per_epoch(self, global_batch: int) -> int:
        return sum(math.ceil(len(self.members[k]) / global_batch) for k in self.keys)

    def _plan(self, seed: int, epoch: int, global_batch: int) -> list[tuple[tuple[int, int], list[int]]]:
        key = (seed, epoch, global_batch)
        if key not in self._plans:
            if len(self._plans) > 4:
                self._plans.clear()
            chunks = []
            for b, k in enumerate(self.keys):
                n = len(self.members[k])
                perm = torch.randperm(n, generator=step_generator(seed, "bucket-perm", epoch, b)).tolist()
                for c in range(math.ceil(n / global_batch)):
                    chunks.append((k, [perm[(c * global_batch + j) % n] for j in range(global_batch)]))
            order = torch.randperm(len(chunks), generator=step_generator(seed, "bucket-order", epoch)).tolist()
            self._plans[key] = [chunks[i] for i in order]
        return self._plans[key]

    def micro_batch_indices(self, seed: int, micro_step: int, rank: int, batch_size: int,
                            world: int) -> tuple[tuple[int, int], list[int]]:
        """(bucket, this rank's image indices within the bucket) at a micro-step: a pure function of the arguments."""
        global_batch = batch_size * world
        per_epoch = self.chunks_per_epoch(global_batch)
        bucket, members = self._plan(seed, micro_step // per_epoch, global_batch)[micro_step % per_epoch]
        return bucket, members[rank * batch_size:(rank + 1) * batch_size]

    def micro_batch(self, seed: int, micro_step: int, rank: int, batch_size: int, world: int,
                    gen: torch.Generator, hflip: float) -> torch.Tensor:
        bucket, local = self.micro_batch_indices(seed, micro_step, rank, batch_size, world)
        return self.sources[bucket].batch(local, gen, hflip)

    def calibration_latents(self, seed: int, count: int) -> torch.Tensor:
        """`count` images in a seeded order, centre-cropped to their common size (the constants are means over
        positions, so a crop is fine)."""
        order = torch.randperm(len(self), generator=step_generator(seed, "calib-order")).tolist()[:count]
        picked = []
        for i in order:
            k = next(k for k in self.keys if i in self.members[k])
            src = self.sources[k]
            picked.append(src.batch([self.members[k].index(i)], step_generator(seed, "calib", i), 0.0)[0])
        h = min(x.shape[-2] for x in picked)
        w = min(x.shape[-1] for x in picked)
        return torch.stack([x[:, (x.shape[-2] - h) // 2:(x.shape[-2] - h) // 2 + h,
                              (x.shape[-1] - w) // 2:(x.shape[-1] - w) // 2 + w] for x in picked])
