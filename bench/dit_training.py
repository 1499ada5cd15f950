"""Training step time and peak memory: a flow-matching DiT (tiny SD3 from core's classes) beside SD1.5 (the
tiny SD15-layout checkpoint), both the LoRA form at the same rank and batch, through the pack's trainer.

Each model trains in a fresh child process (peak memory: RSS above the level before training on CPU,
torch.cuda.max_memory_allocated on GPU). Step time: the median interval between the trainer's per-step
progress calls (first step excluded), main-thread CPU time when torch runs one thread on the CPU. Tiny
models: the figures compare the trainer's overhead per family at toy scale, not real model sizes.

    python -m indomain.bench.dit_training            # batch 8, rank 4, 8x8 latents, 8 steps, CPU fp32
    python -m indomain.bench.dit_training --fast     # smoke run
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from . import common

MODELS = ("sd15", "sd3")


def child(model_name: str, batch: int, rank: int, steps: int) -> dict:
    from ..devkit import host, tiny_families as tf, tiny_models
    from ..devkit.dit_training import domain_latents
    from ..devkit.domain import load_checkpoint

    host.import_comfy()
    import comfy.model_management

    from ..training.trainer import TrainConfig

    device = comfy.model_management.get_torch_device()
    if model_name == "sd15":
        model, text, _vae = load_checkpoint(tiny_models.tiny_checkpoint(0))
        channels = 4
    else:
        model, text = tf.build(model_name), tf.empty_cond(model_name)
        channels = tf.latent_channels(model_name)
    latents = domain_latents(channels, max(batch, 8), 8, 8, seed=0)
    cfg = TrainConfig(steps=steps, lr=1e-4, batch_size=batch, resolution=64, hflip=0.0, seed=0, save_every=0,
                      form="lora", lora_rank=rank, calibration_images=8, keep_resume_state=False)
    res, mem, steps_s, clock, wall = common.timed_training(model, text, latents, cfg, device)
    return {"model": model_name, "step_s": common.median(steps_s),
            "clock": clock, "wall_step_s": common.median(wall),
            "peak_memory_delta_mib": common.mib(mem.delta), "memory_kind": mem.kind,
            "base_params": sum(p.numel() for p in model.model.diffusion_model.parameters()),
            "adapter_numel": sum(v.numel() for v in res.state_dict.values() if v.ndim >= 2),
            "first_loss": res.losses[0], "last_loss": res.losses[-1], "device": str(device),
            "threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    p = common.parser("dit_training", __doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per model (default 8; --fast 3)")
    p.add_argument("--child", choices=MODELS, default=None, help="(internal)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps or (3 if args.fast else 8)
    if args.child:
        out = child(args.child, args.batch, args.rank, steps)
        print("INDOMAIN_CHILD_RESULT " + json.dumps(out), flush=True)
        return out
    results = {}
    for name in MODELS:
        cmd = [sys.executable, "-m", "indomain.bench.dit_training", "--child", name, "--batch", str(args.batch),
               "--rank", str(args.rank), "--steps", str(steps)] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("INDOMAIN_CHILD_RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{name} child failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results[name] = json.loads(lines[-1].split(" ", 1)[1])
    payload = {"bench": "dit_training", "environment": common.environment(),
               "settings": {"batch": args.batch, "rank": args.rank, "steps": steps, "latent": [8, 8], "form": "lora"},
               "results": results,
               "time_ratio_sd3_over_sd15": results["sd3"]["step_s"] / results["sd15"]["step_s"]}
    common.write_json(args.out, payload)
    rows = [[n, f"{r['base_params'] / 1e6:.2f}M", r["adapter_numel"], f"{r['step_s'] * 1000:.1f}",
             f"{r['peak_memory_delta_mib']:.1f}", r["memory_kind"]] for n, r in results.items()]
    print(common.table(["model", "base params", "adapter numel", "step ms", "peak MiB", "memory"], rows,
                       title=f"LoRA training, rank {args.rank}, batch {args.batch}, {steps} steps "
                             f"({results['sd15']['clock']}, {results['sd15']['device']})"))
    print(f"\nJSON: {args.out}")
    return payload


if __name__ == "__main__":
    main()
