"""A procedural latent-space "domain" for training the tiny DiT families (devkit/tiny_families.py has no VAE).

The domain: a colour cast in latent space, every latent offset by +A on the even channels and -A on the odd
ones, plus a little noise (a picture-level property such as a house style's palette). The plain set: the
same noise without the cast. `domain_score` projects a latent's per-channel mean on the cast direction (per
sample; ~A on domain latents, ~0 on the plain ones), the domain statistic the tests compare between samples
of the base and decoupled samples with the trained domain model.

(A position-dependent pattern such as stripes needs the tiny one-block models to learn position from their
rotary / sin-cos tables within a few dozen LoRA steps, which they do not: the cast is learnable by every family
in 40 steps, so a test on it measures the trainer, not the tiny models' capacity.)
"""
from __future__ import annotations

import torch

AMPLITUDE = 1.0


def cast_direction(channels: int) -> torch.Tensor:
    """[C]: +1 on even channels, -1 on odd ones."""
    return torch.tensor([1.0 if c % 2 == 0 else -1.0 for c in range(channels)])


def domain_latents(channels: int, n: int = 8, height: int = 8, width: int = 8, seed: int = 0,
                   domain: bool = True, noise: float = 0.5, sign: float = 1.0) -> torch.Tensor:
    """[n, C, h, w] image latents: the domain (or, domain=False, the plain set); `sign` -1 casts the other way
    (a test picks the direction away from where the untrained model's own samples happen to lie)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, channels, height, width), generator=gen) * noise
    if domain:
        x = x + sign * AMPLITUDE * cast_direction(channels).view(1, channels, 1, 1)
    return x


def domain_score(x: torch.Tensor) -> torch.Tensor:
    """Per-sample projection of the per-channel mean on the cast direction (any [B, C, ...] latent)."""
    d = cast_direction(x.shape[1]).to(x.dtype)
    return (x.flatten(2).mean(2) * d).mean(1)
