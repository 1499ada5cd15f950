"""LoRA training: the pack's LoRA form (half-precision frozen base) against core's Train LoRA node, side by side.

One run measures both on the same model, latents, conditioning, rank and batch: an SD1.5-layout UNet at full
size (860M parameters) built from ComfyUI's own UNetModel with random weights in bf16 (no downloads), loaded by
ComfyUI's loader as a bf16 model. Each variant trains in a fresh child process (peak memory is not hidden by
the other's freed memory); children alternate pack, core, pack, core, ...

- pack: indomain.training.train_on_latents, form "lora" (null-text adapter), base_precision auto (the bf16 base
  as it is, shared, no copy), adapter + AdamW in fp32, gradient checkpointing on (the form's default).
- core: comfy_extras.nodes_train.TrainLoraNode.execute with its defaults (training_dtype bf16, lora_dtype bf16,
  gradient_checkpointing on, depth 1, algorithm LoRA, AdamW), the same rank, batch, steps and learning rate.
  It exists on ComfyUI 0.33 (host 2); on hosts whose node takes other inputs the core side is skipped (said so).

Step time: the median interval between successive optimizer steps (the trainer's progress calls; core's
ProgressBar hook), first step excluded; with one torch thread on the CPU the clock is the main thread's CPU time
(not disturbed by other processes' load), else wall-clock. Peak memory: the process's RSS sampled every 2 ms
during training (the model build excluded): peak above the level before training ("delta": what training adds)
and the absolute peak. On CUDA: torch.cuda.max_memory_allocated above the level before training.

    python -m indomain.bench.lora_vs_core_training            # 860M SD1.5-layout, 8x8 latents, batch 2, rank 32
    python -m indomain.bench.lora_vs_core_training --fast     # tiny UNet, for the test suite (figures meaningless)
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time

import torch

from . import common

RANK = 32
BATCH = 2


def log(msg: str) -> None:
    print(f"[lora_vs_core {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def model_file(fast: bool):
    """The bf16 UNet file both variants load (written once into the pack's cache): ComfyUI's loader records how to
    re-load it, which core's node needs (it re-creates the model for its own copy)."""
    from ..devkit import host, tiny_models

    host.import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from .sampling import SD15_FULL_UNET

    path = tiny_models._cached(f"bench_{'tiny' if fast else 'sd15_full'}_unet_bf16_v{tiny_models.BUILDER_VERSION}"
                               ".safetensors")
    if not path.exists():
        config = tiny_models.SD15_TINY_UNET if fast else SD15_FULL_UNET
        unet = UNetModel(**dict(config, dtype=torch.bfloat16), operations=comfy.ops.disable_weight_init)
        tiny_models.init_weights_(unet, 0)
        sd = {"model.diffusion_model." + k: v.detach().contiguous() for k, v in unet.state_dict().items()}
        del unet
        tiny_models._atomic_save(sd, path)
    return path


def build_model(fast: bool):
    """(ModelPatcher, positive CONDITIONING, latents, parameter count): the bf16 base both variants train."""
    import comfy.sd

    from ..devkit import tiny_models
    from .sampling import SD15_FULL_UNET

    path = model_file(fast)
    model = comfy.sd.load_diffusion_model(str(path), model_options={"dtype": torch.bfloat16})
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    gen = torch.Generator().manual_seed(0)
    context_dim = (tiny_models.SD15_TINY_UNET if fast else SD15_FULL_UNET)["context_dim"]
    positive = [[torch.randn(1, 77, context_dim, generator=gen), {}]]
    pattern = torch.randn(1, 4, 8, 8, generator=gen) * 4.0
    latents = pattern + 0.5 * torch.randn(4, 4, 8, 8, generator=gen)
    return model, positive, latents, params


def core_node():
    """Core's Train LoRA node class if this host has the version this bench drives (0.33's inputs), else None."""
    try:
        import comfy_extras.nodes_train as nt
    except Exception:  # noqa: BLE001 - a host without it
        return None
    node = getattr(nt, "TrainLoraNode", None)
    if node is None:
        return None
    wanted = {"model", "latents", "positive", "batch_size", "steps", "rank", "training_dtype", "lora_dtype",
              "gradient_checkpointing", "checkpoint_depth", "offloading", "bucket_mode", "bypass_mode"}
    if not wanted <= set(inspect.signature(node.execute).parameters):
        return None
    return node


def train_pack(model, positive, latents, steps, stamp):
    from ..training.trainer import TrainConfig, train_on_latents

    cfg = TrainConfig(steps=steps, lr=1e-4, batch_size=BATCH, resolution=64, seed=0, save_every=0, form="lora",
                      lora_rank=RANK, lora_alpha=float(RANK), calibration_images=4, hflip=0.0,
                      keep_resume_state=False)
    res = train_on_latents(model, positive, latents, cfg, out_path=None, progress=lambda *a: stamp())
    return {"losses": res.losses, "base_dtype": res.summary.get("base_dtype"),
            "grad_checkpointing": res.summary.get("grad_checkpointing")}


def train_core(model, positive, latents, steps, stamp):
    import comfy.utils

    node = core_node()
    if node is None:
        raise RuntimeError("core's Train LoRA node (0.33 inputs) is not on this host")
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview=None, node_id=None: stamp())
    try:
        with torch.inference_mode():  # as ComfyUI executes nodes
            out = node.execute(
                model=[model], latents=[{"samples": latents}], positive=[positive], batch_size=[BATCH],
                grad_accumulation_steps=[1], steps=[steps], learning_rate=[1e-4], rank=[RANK], optimizer=["AdamW"],
                loss_function=["MSE"], seed=[0], training_dtype=["bf16"], lora_dtype=["bf16"],
                quantized_backward=[False], algorithm=["LoRA"], gradient_checkpointing=[True],
                checkpoint_depth=[1], offloading=[False], existing_lora=["[None]"], bucket_mode=[False],
                bypass_mode=[False])
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    values = getattr(out, "result", out)
    loss_map = values[1]
    return {"losses": [float(x) for x in loss_map["loss"]], "base_dtype": "bfloat16", "grad_checkpointing": True}


def child(args) -> dict:
    from ..devkit import host

    host.import_comfy()
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    model, positive, latents, params = build_model(args.fast)
    stamps = []

    def stamp():
        common.sync(device)
        stamps.append((time.perf_counter(), time.thread_time()))

    import gc

    gc.collect()
    before = common.rss_bytes()
    with common.PeakMemory(device) as mem:
        fn = train_pack if args.child == "pack" else train_core
        out = fn(model, positive, latents, args.steps, stamp)
    peak_abs = mem._rss.peak if mem._rss is not None else None
    stamps = stamps[-args.steps:]  # core's bar also reports 0 at its start on some hosts
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    steps_s = cpu if cpu_clock else wall
    return {"variant": args.child, "params": params, "step_s": common.median(steps_s) if steps_s else None,
            "intervals_s": steps_s, "wall_intervals_s": wall,
            "clock": "main-thread CPU time" if cpu_clock else "wall-clock",
            "peak_memory_delta_bytes": mem.delta, "memory_kind": mem.kind, "rss_before_bytes": before,
            "peak_rss_bytes": peak_abs, "device": str(device), "threads": torch.get_num_threads(), **out}


def run_child(args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "indomain.bench.lora_vs_core_training", "--child", variant, "--steps", str(args.steps),
           "--threads", str(args.threads)]
    if args.fast:
        cmd.append("--fast")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("INDOMAIN_CHILD_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"lora_vs_core child ({variant}) failed with code {proc.returncode}:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def core_available_here() -> bool:
    from ..devkit import host

    host.import_comfy()
    return core_node() is not None


def main(argv=None) -> dict:
    p = common.parser("lora_vs_core_training", __doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per child (default 4; --fast 3)")
    p.add_argument("--repeats", type=int, default=None, help="children per variant (default 1)")
    p.add_argument("--child", choices=["pack", "core"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (3 if args.fast else 4)
    args.repeats = args.repeats or 1
    args.threads = args.threads or 1
    torch.set_num_threads(args.threads)
    if args.child:
        result = child(args)
        print("INDOMAIN_CHILD_RESULT " + json.dumps(result), flush=True)
        return result

    model_file(args.fast)  # written once, before the children (not in their memory or time)
    core_ok = core_available_here()
    variants = ["pack", "core"] if core_ok else ["pack"]
    runs = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants:
            log(f"run {r + 1}/{args.repeats}: {v}")
            runs[v].append(run_child(args, v))

    def agg(v):
        rs = runs[v]
        return {"step_s": common.median([x["step_s"] for x in rs]), "clock": rs[0]["clock"],
                "peak_memory_delta_mib": common.mib(common.median([x["peak_memory_delta_bytes"] for x in rs])),
                "peak_rss_mib": (common.mib(common.median([x["peak_rss_bytes"] for x in rs]))
                                 if rs[0]["peak_rss_bytes"] else None),
                "memory_kind": rs[0]["memory_kind"], "base_dtype": rs[0]["base_dtype"],
                "grad_checkpointing": rs[0]["grad_checkpointing"], "runs": rs}

    pack = agg("pack")
    payload = {"bench": "lora_vs_core_training", "mode": "fast" if args.fast else "default",
               "environment": common.environment(),
               "settings": {"model": "SD15_TINY_UNET" if args.fast else "SD1.5-layout UNet, full size (random init)",
                            "params": runs["pack"][0]["params"], "weights": "bf16", "latent": [8, 8], "batch": BATCH,
                            "rank": RANK, "steps_per_child": args.steps, "children_per_variant": args.repeats,
                            "threads": args.threads, "device": runs["pack"][0]["device"]},
               "pack": pack, "core": agg("core") if core_ok else None,
               "core_skipped": None if core_ok else "core's Train LoRA node with 0.33's inputs is not on this host",
               "targets": {"memory_ratio_max": 1.0, "time_ratio_max": 1.1}}
    if core_ok:
        core = payload["core"]
        payload["time_ratio"] = pack["step_s"] / core["step_s"]
        payload["memory_ratio"] = (pack["peak_memory_delta_mib"] / core["peak_memory_delta_mib"]
                                   if core["peak_memory_delta_mib"] > 0 else None)
        payload["peak_rss_ratio"] = (pack["peak_rss_mib"] / core["peak_rss_mib"]
                                     if pack["peak_rss_mib"] and core["peak_rss_mib"] else None)
        payload["meets"] = {"time": payload["time_ratio"] <= 1.1,
                            "memory": payload["memory_ratio"] is not None and payload["memory_ratio"] <= 1.0}
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nJSON: {args.out}")
    return payload


def report(payload: dict) -> str:
    s = payload["settings"]
    rows = []
    for name, label in (("pack", "InDomain LoRA form (bf16 base shared, fp32 adapter + AdamW)"),
                        ("core", "core Train LoRA node (bf16, defaults)")):
        v = payload.get(name)
        if v is None:
            continue
        rows.append([label, f"{v['step_s']:.3f}", f"{v['peak_memory_delta_mib']:.0f}",
                     f"{v['peak_rss_mib']:.0f}" if v["peak_rss_mib"] else "-"])
    if payload.get("core"):
        rows.append(["pack / core", f"{payload['time_ratio']:.3f}",
                     f"{payload['memory_ratio']:.3f}" if payload["memory_ratio"] is not None else "-",
                     f"{payload['peak_rss_ratio']:.3f}" if payload.get("peak_rss_ratio") else "-"])
    clock = payload["pack"]["clock"]
    t = common.table(["variant", "s / step", "peak memory above start (MiB)", "peak RSS (MiB)"], rows,
                     f"LoRA training, {payload['mode']}: {s['params'] / 1e6:.0f}M-parameter {s['model']}, bf16 "
                     f"weights, rank {s['rank']}, batch {s['batch']}, 8x8 latents, median of "
                     f"{s['steps_per_child'] - 1} step intervals per child, {s['device']}, {s['threads']} thread(s); "
                     f"clock: {clock}; memory: {payload['pack']['memory_kind']}")
    if payload.get("core_skipped"):
        return t + "\n\ncore: " + payload["core_skipped"]
    return t + "\n\ntargets (memory <= 1x core, time <= 1.1x core) met: " + ", ".join(
        f"{k} {v}" for k, v in payload["meets"].items())


if __name__ == "__main__":
    main(sys.argv[1:])
