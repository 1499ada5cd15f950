"""A procedural latent-space "domain" for training the tiny DiT families (devkit/tiny_families.py has no VAE).

The domain: vertical stripes of period STRIPE_PERIOD latent cells (+A on the first half of each period,
-A on the second, sign alternating per channel) plus a little noise. The plain set: the same noise without
stripes. `stripe_score` projects a latent on the stripe pattern (per sample; ~A on domain latents, ~0 on
the plain ones and on a random model's samples), the domain statistic the tests compare.
"""
from __future__ import annotations

import torch

STRIPE_PERIOD = 4
AMPLITUDE = 1.0


def stripe_pattern(channels: int, width: int) -> torch.Tensor:
    """[C, W] pattern: +1 / -1 half-periods along the width, sign alternating over channels."""
    col = torch.tensor([1.0 if (w % STRIPE_PERIOD) < STRIPE_PERIOD // 2 else -1.0 for w in range(width)])
    sign = torch.tensor([1.0 if c % 2 == 0 else -1.0 for c in range(channels)])
    return sign[:, None] * col[None, :]


def domain_latents(channels: int, n: int = 8, height: int = 8, width: int = 8, seed: int = 0,
                   stripes: bool = True, noise: float = 0.3) -> torch.Tensor:
    """[n, C, h, w] image latents: the striped domain (or, stripes=False, the plain set)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, height, width), generator=gen) * noise
    if stripes:
        x = x + AMPLITUDE * stripe_pattern(channels, width)[None, :, None, :]
    return x


def stripe_score(x: torch.Tensor) -> torch.Tensor:
    """Per-sample projection on the stripe pattern: mean(x * pattern) over channels, (frames,) rows, columns."""
    c, w = x.shape[1], x.shape[-1]
    p = stripe_pattern(c, w).to(x.dtype)
    p = p.view(1, c, *([1] * (x.ndim - 3)), w)
    return (x * p).flatten(1).mean(1)
