"""The InDomain demo, end to end on a laptop CPU: `python -m indomain.demo` (or `bash scripts/demo.sh`).

1. draws the built-in domain: 32 unlabelled "sunset stripes" pictures (coloured discs on warm bands over
   dark violet),
2. builds the tiny SD1.5-layout base checkpoint (devkit/demo_world.py; deterministic, cached in .cache/models):
   a *linear* VAE (each 8x8 pixel block <-> one latent cell, so decoded latents are pictures) and a UNet
   trained briefly on a plain world (a "red / green / blue / yellow disc" on a cream ground, text-conditioned),
3. trains a text-free domain model on the domain pictures with the pack's trainer (LoRA form by default: a
   rank-8 adapter on the base's own weights; `--form full` trains a null-text UNet copy),
4. starts a real ComfyUI server headless with the pack installed,
5. runs the text-guided workflow (workflows/api/indomain_2_text_guided.json) through the HTTP API
   with the headless client, twice with the same seeds and prompts: domain_weight 0 (= plain CFG on the
   base) and the decoupled setting,
6. measures the domain statistic of both rows (the stripe score: the domain's 32-px horizontal banding),
   prints it, writes it to demo.json, and writes a labelled side-by-side PNG and prints its path.

The models are tiny and trained for a minute or two on CPU, so the pictures are 8x8-cell mosaics, not
photographs; what they show is the method: the same seeds and prompts, and the domain term adds the
domain's look while the prompt's colour comes from the base. Pass --base/--domain-unet to use your own files
(the stripe score then measures nothing about your domain).
"""
from __future__ import annotations

from .run import DemoConfig, run_demo  # noqa: F401
