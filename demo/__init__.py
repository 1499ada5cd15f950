"""The InDomain demo, end to end on a laptop CPU: `python -m indomain.demo` (or `bash scripts/demo.sh`).

1. draws a small built-in image set in one distinctive style (PIL),
2. builds the tiny SD1.5-layout base checkpoint (devkit; deterministic, cached),
3. trains a text-free domain UNet on the images with the pack's trainer,
4. starts a real ComfyUI server headless with the pack installed,
5. runs the text-guided workflow (workflows/api/indomain_2_text_guided.json) through the HTTP API
   with the headless client, twice with the same seeds: domain_weight 0 (= plain CFG on the base)
   and the decoupled setting,
6. writes a labelled side-by-side PNG and prints its path.

The base model is a tiny random network (no real Stable Diffusion weights can be downloaded here),
so the picture shows the *mechanics* (same seeds, the domain term changes the output), not
photographic quality. Pass --base/--domain-unet to use your own files instead.
"""
from __future__ import annotations

from .run import DemoConfig, run_demo  # noqa: F401
