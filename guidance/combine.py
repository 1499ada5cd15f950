"""Multi-guidance combination.

    out = u + sum_i w_i * (e_i - u)

`u` is the unconditional prediction of the frozen base model (B(x, ∅)); each term `e_i` is a
prediction of some model under some condition (B(x, c) for text / ControlNet control, D(x)
for the domain UNet). ComfyUI's calc_cond_batch returns denoised x0 rather than ε, and the
combination is affine (its weights relative to u sum to one), so it is the same in either
space: x0 = x - σ ε for every term.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

WeightedPrediction = tuple[float, torch.Tensor]   # (w_i, e_i): one term of the combination, evaluated


# Starting weights (the authors' code): domain 1.5–2.5, text/control ≈ 2.5 (plain-CFG users think ≈ 7).
# The nodes' defaults, the demo and the test graphs read them from here.
DOMAIN_WEIGHT_START = 2.0
CONTROL_WEIGHT_START = 2.5


def combine(uncond: torch.Tensor, terms: Sequence[WeightedPrediction]) -> torch.Tensor:
    """u + Σ w_i (e_i - u). Terms with weight 0 contribute nothing (and need not be evaluated)."""
    out = uncond
    for weight, pred in terms:
        if weight != 0:
            out = out + weight * (pred - uncond)
    return out


def cfg_equivalent(uncond: torch.Tensor, primary: Optional[torch.Tensor], primary_weight: float,
                   extra: Sequence[WeightedPrediction]) -> tuple[torch.Tensor, float]:
    """Express the combination as one CFG pair: returns (cond, scale) with
    ``uncond + scale * (cond - uncond) == combine(uncond, [(primary_weight, primary), *extra])``.

    Handing ComfyUI's cfg_function this pair (instead of the final result) keeps every core
    pre/post-CFG hook working (RescaleCFG, CFG-Zero*, PAG, APG, ...): they see a normal
    cond/uncond pair whose CFG is exactly the decoupled guidance.

    - With a primary (text/control) term of non-zero weight, its weight stays the scale and
      the other terms are folded into the cond: cond = e_p + Σ (w_i / w_p)(e_i - u).
    - Otherwise the scale is Σ w_i (e.g. the domain weight alone) and cond is their
      weighted mean direction; if that sum is 0 the result itself is returned with scale 1.
    """
    extra = [(w, e) for w, e in extra if w != 0]
    if primary is not None and primary_weight != 0:
        cond = primary
        for w, e in extra:
            cond = cond + (w / primary_weight) * (e - uncond)
        return cond, float(primary_weight)
    total = float(sum(w for w, _ in extra))
    if total == 0.0:
        return combine(uncond, extra), 1.0
    delta = torch.zeros_like(uncond)
    for w, e in extra:
        delta = delta + (w / total) * (e - uncond)
    return uncond + delta, total


def bound_update(update: torch.Tensor, reference: torch.Tensor, max_ratio: float) -> torch.Tensor:
    """`update` scaled down, per sample, so its L2 norm is at most ``max_ratio`` times `reference`'s
    (samples already inside the bound are unchanged; the direction is kept).

    Used as a bound on the domain update w_d (D - u) relative to the text/control update
    w_c (B(c) - u): the toy benchmark's diagnosis found |D - u| 3-10x |B(c) - u|, so the domain
    term can drown the text term. The ratio is per sample, over all channels and pixels.
    """
    if max_ratio <= 0:
        raise ValueError(f"max_ratio must be > 0 (got {max_ratio})")
    dims = tuple(range(1, update.ndim))
    norm = torch.linalg.vector_norm(update, dim=dims, keepdim=True)
    limit = max_ratio * torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
    factor = torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
    return update * factor


def term_active(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether a term whose interval runs from sigma_start (high noise) down to sigma_end is on.

    Same convention as ComfyUI's cond timestep ranges: off when sigma > sigma_start or
    sigma < sigma_end.
    """
    return sigma_end <= sigma <= sigma_start
