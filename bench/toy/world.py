"""The benchmark's view of the toy world. The world itself has ONE definition, devkit/toy_world.py (shapes,
colours, styles, rendering, the evaluator network, the mask rule), shared with the devkit and the demo; it is
re-exported here. What the benchmark adds: which prompts it asks, the unlabelled domain images it fine-tunes
on and the ControlNet experiment's hint positions, each a function of the settings."""
from __future__ import annotations

import torch

from ...devkit.toy_world import *  # noqa: F401,F403  (the world's one definition)
from ...devkit.toy_world import COLOURS, MAX_OFFSET, SHAPES, all_combos, coverage_combos, sample_batch  # noqa: F401


def asked_combos(cfg) -> list[tuple[str, str]]:
    """The (shape, colour) of each asked prompt: all 16, or `cfg.prompts` of them spread over the list."""
    combos = all_combos()
    step = max(1, len(combos) // cfg.prompts)
    return combos[::step][:cfg.prompts] if cfg.prompts < 16 else combos


def domain_training_set(cfg):
    """The unlabelled domain images every fine-tune trains on (model space), drawn from the coverage's content."""
    return sample_batch(cfg.domain_images, torch.Generator().manual_seed(cfg.seed + 100), style="domain",
                        combos=coverage_combos(cfg.coverage))


def hint_offsets(cfg, n_prompts: int) -> torch.Tensor:
    """The ControlNet experiment's hints: sample k asks prompt k mod P; its hint is that shape at a random position."""
    return torch.randint(0, MAX_OFFSET + 1, (n_prompts * cfg.samples_per_prompt, 2),
                         generator=torch.Generator().manual_seed(cfg.seed + 300))
