"""The paper's claim at toy scale, run through the product: sweeps on a Pareto plot.

A procedural world of 4-channel 8x8 latents (devkit/toy_world.py, the one world definition: 4 shapes x 4 colours, plain
style); a base text-to-image model (the tiny SD15-layout UNet, trained here from scratch on every
"a <colour> <shape>" prompt with the checkpoint's own CLIP-L embeddings, 15% empty-prompt dropout
for CFG); a domain of UNLABELLED images in a distinctive style (tinted, checker-textured
background, shifted palette). `--coverage full` (default, the paper's setting): the domain images
hold every shape x colour; `--coverage partial`: only 2 shapes x 2 colours, so most prompts ask
for content beyond the domain's. Methods, same seeds and steps, every model trained once and cached:

  (a) base + CFG                                   core KSampler
  (b) naive fine-tune on the domain, empty prompt  core UNETLoader + KSampler (CFG)
  (c) decoupled guidance, null-text domain UNet    InDomainLoadDomainUNet + InDomainKSampler
  (d) decoupled guidance, Domain LoRA form         the same nodes, a form "lora" file

Spatial control (`--experiments controlnet`): a tiny ControlNet of the base's layout, trained here
on the base's plain world (base frozen) with the shape's mask as its hint, loaded by core's
ControlNetLoader and applied by ControlNetApplyAdvanced to the positive conditioning (the control
term); (a), (b) and (c) with it ((c) with `domain_on_controlnet` off and on), scored by the IoU of
the generated shape's mask with the hint.

(b), (c) and (d) are trained by the pack's trainer (train_on_latents, form "plain" / "full" /
"lora") on the same latents and steps. Experiments: the weight sweep ((a), (b) over cfg; (c) over
domain weight x cfg and on half the schedule; (d) at the headline points), the spread over seeds
(fine-tune and sampling seeds), forgetting at 4x the fine-tuning length, and overshoot remedies
(core RescaleCFG / APG on the base model; the guider's bound on the domain update relative to the
text update). Every point: control accuracy, domain score, Fréchet distance (FD) to domain images
of the asked content, and the overshoot ratio of the domain's known texture level (1.0 = right).
Evaluators: a small CNN trained here (shape / colour / style).

    python -m indomain.bench.toy                       # full coverage (writes docs/toy_pareto.png)
    python -m indomain.bench.toy --coverage partial    # prompts beyond the domain's content
    python -m indomain.bench.toy --experiments sweep   # the sweep alone (models cached)
    python -m indomain.bench.toy --experiments controlnet   # spatial control (its own command)
    python -m indomain.bench.toy --fast                # smoke run for the test suite (figures meaningless)
    python -m indomain.bench.toy --gates only          # the instrument's gates alone, no reading
    python -m indomain.bench.toy.sampler_check         # G7's diagnosis: (c) at N and 2N steps per sampler:w_d

Gates first (gates.py, issue 21): G1-G8 check that the instrument can tell a good method from a bad one, are
printed before any reading and carried in the JSON (`gates`, `verdict`, `calibrated`); a failed gate stops the
run ("instrument not calibrated: ...", `"reading": null`). `--gates report` reads anyway, the reading marked
UNCALIBRATED; `--gates only` measures the gates and stops.

A package by idea: config (settings, grids, cache keys), gates (the instrument's checks), world (the benchmark's view of devkit/toy_world.py),
models (training: base, ControlNet, fine-tunes), experiments (points and the sampler), metrics (the evaluator's
reading, references, the claim's questions), constants (the null-text stand-in check), report (tables), plot
(pictures), run (`main`: a short list of steps).
"""
from __future__ import annotations

from .config import (BASE_FIELDS, BOUNDS, C_CFGS, CFGS, CNET_CFGS, CNET_FIELDS, CNET_MODES, DIAGNOSE_POINTS,  # noqa: F401
                     DOMAIN_FIELDS, DOMAIN_WEIGHTS, EXPERIMENTS, EXTRA_EXPERIMENTS, OWN_COMMAND_EXPERIMENTS, HALVES, HEADLINE, REMEDIES,
                     REMEDY_POINTS, TOY_VERSION, ToyConfig, cache_dir, log)
from .experiments import METHODS, SAMPLED_THROUGH, Point, ToySampler, experiment_points  # noqa: F401
from .metrics import Metrics, dominates, mean_sd, summarise  # noqa: F401
from .report import report  # noqa: F401
