"""Domain caching: evaluate the domain term on fewer model calls and reuse its direction in between.

The domain direction D(x) - u changes slowly from step to step. With caching on, a domain term's D is evaluated
on some model calls only; on the others its last direction is reused, scaled to the current noise level:

    D - u  ≈  (D - u)|eval * sigma / sigma_eval

(in ComfyUI's output space, the denoised x0: x0 = x - sigma * eps, so a direction in eps carries over to x0 scaled
by sigma). A "call" is one guider evaluation (one predict_noise / one pre-CFG call), so multi-call samplers (Heun,
DPM-2, ...) count each of their model calls; the rule works with every sampler.

When D is evaluated again:
- "every N": on every N-th call the term is active (the first active call always evaluates);
- "adaptive": when the base's own unconditional u (computed on every call anyway, so free) has moved by more than
  `threshold` relative to the u of the last evaluation, ||u_last - u_eval|| / ||u_eval|| per sample (the largest
  over the batch). u_last is the u of the PREVIOUS call: whether D joins this call's forward (the LoRA form batches
  its rows with u) must be known before u is, so the adaptive rule always reuses at least once after an
  evaluation and re-evaluates one call after u moved past the threshold.
Always evaluated, whatever the mode: the first call a term is active (also after a per-term schedule switched it
on), a call whose noise level is above the last evaluation's (a restart sampler going back up), and a batch or
latent shape other than the cached one. State is per sampling run: reset() starts a run with nothing cached.

Plain torch (no ComfyUI import): the guider (sampling/guider.py) and Apply Domain Guidance (nodes/patch.py) wire it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

OFF, EVERY_2, EVERY_3, ADAPTIVE = "off", "every 2", "every 3", "adaptive"
MODES = (OFF, EVERY_2, EVERY_3, ADAPTIVE)
DEFAULT_THRESHOLD = 0.25
_INTERVALS = {EVERY_2: 2, EVERY_3: 3}


def check_mode(mode: str, threshold: float) -> None:
    if mode not in MODES:
        raise ValueError(f"domain_cache must be one of {', '.join(repr(m) for m in MODES)} (got {mode!r})")
    if not (threshold >= 0) or threshold == float("inf"):
        raise ValueError(f"domain_cache_threshold must be a finite number >= 0 (got {threshold})")


@dataclass
class _Entry:
    delta: torch.Tensor       # D - u at the evaluation (output space)
    sigma: float              # the noise level it was evaluated at
    u: torch.Tensor           # u at the evaluation (adaptive rule)
    since: int = 0            # active calls since the evaluation


def relative_change(u: torch.Tensor, reference: torch.Tensor) -> float:
    """max over the batch of ||u - reference|| / ||reference|| (per sample, all channels and pixels)."""
    dims = tuple(range(1, u.ndim))
    num = torch.linalg.vector_norm((u - reference).float(), dim=dims)
    den = torch.linalg.vector_norm(reference.float(), dim=dims).clamp_min(torch.finfo(torch.float32).tiny)
    return float((num / den).max())


class DomainCache:
    """The cache of one sampling run: per domain term (any hashable key), its last direction and noise level."""

    def __init__(self, mode: str = OFF, threshold: float = DEFAULT_THRESHOLD):
        check_mode(mode, threshold)
        self.mode, self.threshold = mode, float(threshold)
        self.reset()

    @property
    def enabled(self) -> bool:
        return self.mode != OFF

    def reset(self) -> None:
        """A new sampling run: nothing cached."""
        self._entries: dict = {}
        self._last_u: torch.Tensor | None = None
        self.evaluations = 0      # domain evaluations decided by wants() this run
        self.reuses = 0

    def wants(self, key, sigma: float, shape) -> bool:
        """Whether the term `key` must evaluate D on this call (True always when off)."""
        if not self.enabled:
            return True
        e = self._entries.get(key)
        if e is None or tuple(e.delta.shape) != tuple(shape) or sigma > e.sigma * (1 + 1e-6) or e.sigma <= 0:
            return True
        if self.mode in _INTERVALS:
            return e.since + 1 >= _INTERVALS[self.mode]
        last = self._last_u
        if last is None or last.shape != e.u.shape:
            return True
        return relative_change(last, e.u) > self.threshold

    def store(self, key, sigma: float, u: torch.Tensor, pred: torch.Tensor) -> None:
        """D was evaluated on this call: remember its direction."""
        self.evaluations += 1
        if self.enabled:
            self._entries[key] = _Entry((pred - u).detach(), float(sigma), u.detach())

    def reuse(self, key, sigma: float, u: torch.Tensor) -> torch.Tensor:
        """The cached prediction of D on this call: u + (D - u)|eval * sigma / sigma_eval."""
        e = self._entries[key]
        e.since += 1
        self.reuses += 1
        return u + e.delta.to(u) * (float(sigma) / e.sigma)

    def observe(self, u: torch.Tensor) -> None:
        """The u of this call (the adaptive rule compares the next call against it)."""
        if self.mode == ADAPTIVE:
            self._last_u = u.detach()

    def stats(self) -> dict:
        return {"mode": self.mode, "evaluations": self.evaluations, "reuses": self.reuses}
