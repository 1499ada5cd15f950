"""Cost of null-text domain training against plain fine-tuning of the unmodified UNet.

Both variants run the pack's trainer (indomain.training.trainer.train_on_latents) on the
same latents, seed, batch and settings; they differ only in `form` ("full": the null-text
UNet, no cross-attention; "plain": the unmodified UNet fed the empty-prompt context, i.e. what
plain fine-tuning costs). Step time is the median interval between the trainer's per-step
progress calls (first step excluded); peak memory is measured in a fresh child process per
variant (RSS above the level before training on CPU, torch.cuda.max_memory_allocated on GPU),
so one variant's freed memory cannot hide the other's. Children alternate A B A B ...

    python -m indomain.bench.training            # tiny SD15-layout UNet, batch 32 on 8x8 latents, CPU fp32
    python -m indomain.bench.training --full     # SD1.5 size (full depth), 64x64 latents (CUDA only)
    python -m indomain.bench.training --fast     # smoke run for the test suite
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from . import common


def log(msg: str) -> None:
    print(f"[training {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def child(args) -> dict:
    """One variant in this process: build, train `steps` steps, report step times and peak memory."""
    from ..devkit import host, tiny_models
    from ..devkit.domain import load_checkpoint

    host.import_comfy()
    import comfy.model_management
    import comfy.sd

    from ..training.trainer import TrainConfig

    device = comfy.model_management.get_torch_device()
    _m, clip, _v = load_checkpoint(tiny_models.tiny_checkpoint(0))
    if args.full:
        from .sampling import SD15_FULL_UNET

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        sd = {k: v.to(dtype) for k, v in tiny_models.tiny_unet_state_dict(0, config=SD15_FULL_UNET).items()}
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
        del sd
    else:
        model = _m
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(max(args.batch, 8), 4, args.size, args.size, generator=gen) * 5.0  # VAE-space scale
    cfg = TrainConfig(steps=args.steps, lr=1e-5, batch_size=args.batch, resolution=args.size * 8, hflip=0.5,
                      seed=0, save_every=0, form="full" if args.variant == "null_text" else "plain", calibration_images=8,
                      keep_resume_state=False)
    res, mem, steps_s, clock, intervals = common.timed_training(model, clip, latents, cfg, device)
    trainable = sum(v.numel() for v in res.state_dict.values() if v.is_floating_point())
    return {"variant": args.variant, "step_s": common.median(steps_s), "clock": clock,
            "wall_step_s": common.median(intervals), "intervals_s": intervals, "clock_intervals_s": steps_s,
            "peak_memory_delta_bytes": mem.delta, "memory_kind": mem.kind, "weights_numel": trainable,
            "first_loss": res.losses[0], "last_loss": res.losses[-1], "device": str(device),
            "threads": torch.get_num_threads()}


def run_child(args, variant: str, cwd: str) -> dict:
    """One variant in a fresh process, so one variant's freed memory cannot hide the other's."""
    cmd = [sys.executable, "-m", "indomain.bench.training", "--child", variant, "--size", str(args.size),
           "--batch", str(args.batch), "--steps", str(args.steps)]
    if args.full:
        cmd += ["--full", "--allow-cpu-full"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("INDOMAIN_CHILD_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training bench child ({variant}) failed with code {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv=None) -> dict:
    p = common.parser("training", __doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="SD1.5 size (full depth), 64x64 latents; needs CUDA")
    p.add_argument("--size", type=int, default=None, help="latent side (default 8; --full 64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32; --full 4; --fast 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per child (default 6; --fast 3)")
    p.add_argument("--repeats", type=int, default=None, help="child processes per variant (default 2; --fast 1)")
    p.add_argument("--allow-cpu-full", action="store_true", help="run --full on CPU anyway (slow)")
    p.add_argument("--inline", action="store_true",
                   help="run both variants in this process (no child processes; memory figures then unreliable)")
    p.add_argument("--child", choices=["plain", "null_text"], default=None, help=argparse_hidden())
    p.add_argument("--variant", default=None, help=argparse_hidden())
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or (64 if args.full else 8)
    args.batch = args.batch or (4 if (args.full or args.fast) else 32)
    args.steps = args.steps or (3 if args.fast else 6)
    args.repeats = args.repeats or (1 if args.fast else 2)
    if args.child:
        args.variant = args.child
        result = child(args)
        print("INDOMAIN_CHILD_RESULT " + json.dumps(result), flush=True)
        return result

    cuda = torch.cuda.is_available()
    if args.full and not cuda and not args.allow_cpu_full:
        msg = "--full needs CUDA (SD1.5 size); no GPU here, so it was skipped (not measured)."
        print(msg)
        payload = {"bench": "training", "mode": "full", "skipped": msg, "environment": common.environment()}
        common.write_json(args.out, payload)
        return payload

    runs = {"plain": [], "null_text": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for variant in ("plain", "null_text"):
                log(f"run {r + 1}/{args.repeats}: {variant}")
                if args.inline:
                    args.variant = variant
                    runs[variant].append(child(args))
                else:
                    runs[variant].append(run_child(args, variant, tmp))

    def agg(variant):
        rs = runs[variant]
        return {"step_s": common.median([x["step_s"] for x in rs]),
                "wall_step_s": common.median([x["wall_step_s"] for x in rs]), "clock": rs[0]["clock"],
                "peak_memory_delta_mib": common.mib(common.median([x["peak_memory_delta_bytes"] for x in rs])),
                "weights_numel": rs[0]["weights_numel"], "memory_kind": rs[0]["memory_kind"],
                "runs": rs}

    plain, null = agg("plain"), agg("null_text")
    payload = {
        "bench": "training", "mode": "fast" if args.fast else "full" if args.full else "default",
        "environment": common.environment(),
        "settings": {"latent": [args.size, args.size], "batch": args.batch, "steps_per_child": args.steps,
                     "children_per_variant": args.repeats, "optimizer": "AdamW (pack trainer), EMA, grad-clip 1.0",
                     "precision": "fp32 on CPU; trainer's auto mixed precision on CUDA",
                     "device": runs["plain"][0]["device"], "threads": runs["plain"][0]["threads"]},
        "memory_isolated": not args.inline,
        "plain": plain, "null_text": null,
        "time_ratio": null["step_s"] / plain["step_s"],
        "wall_time_ratio": null["wall_step_s"] / plain["wall_step_s"],
        "memory_ratio": (null["peak_memory_delta_mib"] / plain["peak_memory_delta_mib"]
                         if plain["peak_memory_delta_mib"] > 0 else None),
        "weights_ratio": null["weights_numel"] / plain["weights_numel"],
        "targets": {"time_ratio_max": 0.9, "memory": "lower than plain"},
    }
    payload["meets"] = {"time": payload["time_ratio"] <= 0.9,
                        "memory": payload["memory_ratio"] is not None and payload["memory_ratio"] < 1.0}
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nJSON: {args.out}")
    return payload


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def report(payload: dict) -> str:
    s = payload["settings"]
    pl, nt = payload["plain"], payload["null_text"]
    rows = [
        ["plain fine-tune (unmodified UNet, empty prompt)", f"{pl['step_s'] * 1000:.0f}", "1.000",
         f"{pl['peak_memory_delta_mib']:.0f}", "1.000", f"{pl['weights_numel'] / 1e6:.2f}M", "-"],
        ["null-text domain UNet", f"{nt['step_s'] * 1000:.0f}", f"{payload['time_ratio']:.3f}",
         f"{nt['peak_memory_delta_mib']:.0f}",
         f"{payload['memory_ratio']:.3f}" if payload["memory_ratio"] is not None else "-",
         f"{nt['weights_numel'] / 1e6:.2f}M", "time ≤ 0.9×, memory < 1×"],
    ]
    t = common.table(["variant", "ms / step", "× plain", "peak mem Δ (MiB)", "× plain", "weights", "target"], rows,
                     f"Training, {payload['mode']}: batch {s['batch']}, {s['latent'][0]}×{s['latent'][1]} latents, "
                     f"median step of {s['children_per_variant']}×{s['steps_per_child']} steps per variant, "
                     f"{s['device']}, {s['threads']} thread(s); clock: {pl['clock']} (wall-clock ratio "
                     f"{payload['wall_time_ratio']:.3f}); memory: {pl['memory_kind']}")
    return t + "\n\ntargets met: " + ", ".join(f"{k} {v}" for k, v in payload["meets"].items())


if __name__ == "__main__":
    main(sys.argv[1:])
