"""The InDomain demo, end to end on a laptop CPU: `python -m indomain.demo` (or `bash scripts/demo.sh`).

1. draws the built-in domain: 32 unlabelled "sunset stripes" pictures (a disc of any of the four colours on pink
   bands across the cream ground): a style the base never saw (`--coverage partial`: red and blue discs only),
2. builds the tiny SD1.5-layout base checkpoint (devkit/demo_world.py; deterministic, cached in .cache/models):
   a *linear* VAE (each 8x8 pixel block <-> one latent cell, so decoded latents are pictures) and a UNet
   trained on a plain world (a "red / green / blue / yellow disc" on a cream ground, text-conditioned),
3. trains the naive way with the pack's trainer: a plain fine-tune of the base UNet on the domain pictures
   with empty captions (form "plain"),
4. takes the text-free domain model: by default step 3's file itself (so the naive and the decoupled rows use
   the same weights, only differently); `--form full` trains the paper's null-text UNet copy on the same
   pictures, steps and seed, `--form lora` a rank-8 adapter,
5. starts a real ComfyUI server headless with the pack installed,
6. runs the text-guided workflow (workflows/api/indomain_2_text_guided.json) through the HTTP API with
   the headless client, three rows with the same seeds and prompts: the base with plain CFG (domain weight 0),
   the plain fine-tune with plain CFG (its MODEL through core's UNETLoader), and decoupled guidance (the
   base and the domain model at domain weight 2, the domain term on from half-way through the steps),
7. measures two statistics per row: control (the fraction of pictures with a disc of the asked colour,
   a fixed per-cell colour rule) and the domain (the stripe score: the domain's 32-px horizontal banding),
   prints them, writes them to demo.json and into the row labels of a side-by-side PNG, and prints its path.

The models are tiny and trained for minutes on CPU, so the pictures are 8x8-cell mosaics, not photographs;
what they test is the paper's claim: the plain fine-tune gets the domain and loses the ask (it draws discs of
the wrong colour); decoupled guidance draws the asked colour in the domain (docs/performance.md, "The demo",
with the same hand-over given to the plain fine-tune; `python -m indomain.demo.sweep` sweeps the weights).
Pass --base/--domain-unet/--naive-unet to use your own files (the statistics then measure nothing about your
domain).
"""
from __future__ import annotations

from .run import DemoConfig, run_demo  # noqa: F401
