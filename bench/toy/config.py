"""The benchmark's settings: the sweep grids, the experiments, ToyConfig (every training and sampling
setting, with the cache key of the models it defines), the cache folder and the log line."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import common

# 3: the evaluator has an off-data class and trains on perturbed images; fine-tune records keep their losses (G5);
#    the base's lr schedule is a setting (cosine by default)
TOY_VERSION = 3

# the sweep grids (fixed: the JSON holds one row per point)
CFGS = (1.5, 3.0, 5.0, 7.0)                      # (a), (b)
# (c) x C_CFGS; G7: at w_d 2 and 3, 16 Euler steps left 4 % and 19 % of (c)'s samples off the data (0 % and 5 % at
# 32), and (c) already overshot the domain's texture (1.6x and 2.3x a real domain image's): docs/claim.md, Gates
DOMAIN_WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5)
C_CFGS = (3.0, 5.0)
HEADLINE = ((1.5, 3.0), (1.0, 5.0))              # (c)/(d) headline points (w_d, cfg): halves, spread, forgetting
HALVES = ((0.0, 0.5, "first half"), (0.5, 1.0, "second half"))
REMEDY_POINTS = ((1.5, 3.0), (1.5, 5.0))  # (c): the headline point, and the largest weight at the larger cfg
# rescale and apg are core model patches: given to (c) on the base and to (b) on its fine-tune (G8)
REMEDIES = {"rescale": "core RescaleCFG 0.7 on the base", "apg": "core APG (eta 0, no norm threshold, momentum 0)",
            "bound1": "domain update bounded per sample to 1x the text update's norm (Domain Guider domain_max_ratio 1)",
            "bound0.5": "domain update bounded per sample to 0.5x the text update's norm (domain_max_ratio 0.5)"}
BOUNDS = {"bound1": 1.0, "bound0.5": 0.5}        # the remedies that are the guider's own bound, not a core model patch
EXPERIMENTS = ("sweep", "forgetting", "spread", "remedies")  # the default run, in this order
# its own command (`--experiments controlnet`): it trains a ControlNet, which the other experiments do not need
OWN_COMMAND_EXPERIMENTS = ("controlnet",)
# on request: "diagnose" (per step, norms of D - u and B(c) - u and their cosine); "constants" (per noise level, the
# untrained null-text UNet's error against u with one constant per layer and with per-level constants: toy_constants);
# "cache" (below)
EXTRA_EXPERIMENTS = ("diagnose", "constants", "cache")
# "cache" (issue 24's quality check): (c) and (d) at the HEADLINE points, every seed, with the sampler's domain caching
# (guidance/domain_cache.py) against the same points uncached (the spread experiment's points)
CACHE_MODES = ("every 2", "every 3", "adaptive")
DIAGNOSE_POINTS = ((1.0, 3.0), (1.5, 3.0))
# the ControlNet experiment (x seeds): (a) without the ControlNet at cfg 3 (spatial agreement by chance), then
# (a), (b) at cfg 3 and 5 and (c) at the HEADLINE points, all with the ControlNet on the positive conditioning;
# (c) with domain_on_controlnet off ("cn") and on ("cn+domain")
CNET_CFGS = (3.0, 5.0)
CNET_MODES = {"": "no ControlNet", "cn": "ControlNet on the control term",
              "cn+domain": "ControlNet on the control term and on the domain term (domain_on_controlnet)"}


@dataclass
class ToyConfig:
    coverage: str = "full"
    base_steps: int = 4200                       # cosine decay; 2,100 left G3 failing, 1,050 G2 (docs/claim.md, Gates)
    base_schedule: str = "cosine"                # cosine | constant (the lr after the 50-step warm-up)
    base_lr: float = 8e-4
    base_ema: float = 0.0                        # EMA of the base's weights (0: the last); 0.998 read a worse FD (claim.md)
    base_batch: int = 16
    p_uncond: float = 0.15
    domain_images: int = 256
    domain_steps: int = 480                      # G5: 240 left (b) short of the domain texture (docs/claim.md, Gates)
    long_factor: int = 4
    domain_lr: float = 2e-4
    domain_batch: int = 8
    ema_decay: float = 0.99
    lora_rank: int = 8
    lora_lr: float = 1e-3
    cnet_steps: int = 300
    cnet_lr: float = 3e-4
    cnet_batch: int = 16
    cnet_p_uncond: float = 0.5
    evaluator_steps: int = 400
    prompts: int = 16
    samples_per_prompt: int = 3
    sample_steps: int = 16                       # G7: at 8, (c) at w_d 3 moved between 8 and 16 steps
    sampler: str = "euler"
    scheduler: str = "normal"
    seeds: int = 3
    gate_samples: int = 16                       # samples per prompt for the sampled gates: 16 x 16 = 4x the FD's 64 dims
    seed: int = 0
    # bf16: autocast (bf16 matmuls, fp32 weights and optimiser) in every training and sampling call; about 2x faster
    # on a CPU with native bf16 (AVX512-BF16 / AMX; precision_speed.py), much slower on one without. Its models are other models
    # (their own cache keys) and its readings are another instrument's: the published figures are fp32.
    precision: str = "fp32"

    @classmethod
    def fast(cls) -> "ToyConfig":
        return cls(base_steps=3, base_batch=4, domain_images=8, domain_steps=2, long_factor=2, domain_batch=4,
                   evaluator_steps=20, prompts=4, samples_per_prompt=1, gate_samples=1, sample_steps=2, seeds=2, cnet_steps=2, cnet_batch=4)

    def key(self, *fields_, **extra) -> str:
        d = dataclasses.asdict(self)
        if self.precision != "fp32":  # fp32 models keep the keys they had before the setting existed
            extra = dict(extra, precision=self.precision)
        blob = json.dumps({"v": TOY_VERSION, **{f: d[f] for f in fields_}, **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BASE_FIELDS = ("base_steps", "base_lr", "base_batch", "p_uncond", "seed", "base_schedule", "base_ema")
DOMAIN_FIELDS = BASE_FIELDS + ("coverage", "domain_images", "domain_lr", "domain_batch", "ema_decay")
CNET_FIELDS = BASE_FIELDS + ("cnet_steps", "cnet_lr", "cnet_batch", "cnet_p_uncond")


def cache_dir() -> Path:
    return Path(os.environ.get("INDOMAIN_CACHE", common.PACK_ROOT / ".cache")) / "toy"


PRECISIONS = ("fp32", "bf16")


def autocast(cfg: ToyConfig):
    """The autocast context of cfg.precision for CPU work (a no-op context at fp32)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def log(msg: str) -> None:
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)
