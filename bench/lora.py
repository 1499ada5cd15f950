"""What the LoRA form of the domain model costs against the full form, on one SD1.5-layout model large
enough that weights dominate (323M parameters: SD1.5 channels and blocks over three levels, random
weights), with tiny latents so one CPU run stays short.

Figures (each from this one run):
- file size: LoRA form at two ranks, full form in fp16 (the default) and fp32;
- resident parameter bytes while decoupled sampling runs (every tensor of every model ComfyUI has
  loaded, plus the adapter tensors, counted once per storage, in a sampler callback): LoRA form
  against the base alone and the full form;
- training peak memory (RSS above the level before training, one child process per form, so one
  form's freed memory cannot hide the other's) and step time, at equal batch;
- per-step sampling time of core CFG, the full form, and the LoRA form in its one-forward variant
  (u, the text term and the domain rows in one batched forward) and two-call variant.

    python -m indomain.bench.lora            # the run docs/performance.md quotes (about 5 minutes on 2 CPU cores)
    python -m indomain.bench.lora --fast     # tiny model, smoke run for the test suite
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import common

# SD1.5 blocks (320 channels, context 768, one transformer per block) over three levels, no middle
# block: 323M parameters, detected by ComfyUI as SD15
BENCH_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 4],
    transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1], transformer_depth_middle=-2,
    context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_attention=False, use_spatial_transformer=True,
    legacy=False, dims=2, use_checkpoint=False,
)


# ComfyUI's detected SDXL UNet config (comfy/model_detection.py), for the computed memory table
SDXL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10, context_dim=2048,
    num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, adm_in_channels=2816,
    num_classes="sequential", use_temporal_attention=False, use_spatial_transformer=True, legacy=False, dims=2,
    use_checkpoint=False,
)
GPU_SIZES_GIB = (8, 12, 16, 24, 48, 80)
ACTIVATION_HEADROOM = 0.7   # weights + optimiser state must leave 30% of the GPU to activations, CUDA and the rest


def log(msg: str) -> None:
    print(f"[lora {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base(fast: bool):
    """(base ModelPatcher, CLIP): the bench UNet (or the tiny one with --fast) and devkit's CLIP-L."""
    from indomain.devkit import host, tiny_models
    from indomain.devkit.domain import load_checkpoint

    host.import_comfy()
    import comfy.sd

    tiny, clip, _vae = load_checkpoint(tiny_models.tiny_checkpoint(0))
    if fast:
        return tiny, clip
    sd = tiny_models.tiny_unet_state_dict(0, config=BENCH_UNET)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
    del sd, tiny
    return model, clip


def unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def resident_parameter_bytes(extra=()) -> int:
    """Bytes of every parameter/buffer of every model ComfyUI has loaded now, plus `extra` tensors."""
    import comfy.model_management

    tensors = list(extra)
    for lm in comfy.model_management.current_loaded_models:
        m = lm.model.model if lm.model is not None else None
        if m is not None:
            tensors += list(m.parameters()) + list(m.buffers())
    return unique_bytes(tensors)


def adapter_tensors(domain) -> list:
    from indomain.forms.lora import INJECTION_ATTACHMENT

    inj = domain.get_attachment(INJECTION_ATTACHMENT)
    if inj is None:
        return []
    out = [t for a in inj.lora.layers.values() for t in (a.down, a.up, a.diff_b) if t is not None]
    out += list(inj.lora.constants.values())
    out += [t for ts in inj._cast.values() for t in ts if t is not None]
    return out


# ----------------------------------------------------------------------------- sampling child


def sampling_child(args) -> dict:
    from indomain.devkit import host

    host.import_comfy()
    import comfy.model_management
    import comfy.samplers

    from indomain.devkit.domain import random_domain_lora
    from indomain.guidance.checkpoint import write_domain_checkpoint
    from indomain.guidance.lora import merge_into
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider
    from indomain.forms.model import base_meta, make_null_text_unet

    model, clip = build_base(args.fast)
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    log(f"base UNet: {params / 1e6:.1f}M parameters")
    gen = torch.Generator().manual_seed(0)
    unet, _c, _p, record = make_null_text_unet(model, clip, torch.randn(4, 4, 8, 8, generator=gen), seed=0)
    meta = base_meta(model, record, {"kind": "bench-random"})
    import dataclasses

    sizes, files = {}, {}
    work = Path(args.work)
    for rank in args.ranks:
        lora = random_domain_lora(unet, rank=rank, seed=rank)
        files[f"lora_r{rank}"] = write_domain_checkpoint(work / f"lora_r{rank}.safetensors", lora.to_state_dict(),
                                                         dataclasses.replace(meta, form="lora"))
    merged = merge_into(unet.state_dict(), lora)  # the last (largest) rank, merged: its full-form twin
    del unet
    for precision in ("fp16", "fp32"):
        files[f"full_{precision}"] = write_domain_checkpoint(work / f"full_{precision}.safetensors", merged, meta,
                                                             precision=precision)
    del merged
    sizes = {k: p.stat().st_size for k, p in files.items()}
    log("file sizes: " + ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in sizes.items()))

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    pos, neg = encode("a red circle"), encode("")
    lora_domain = load_domain_model(model, files[f"lora_r{args.ranks[-1]}"])
    full_domain = load_domain_model(model, files["full_fp16"])
    device = comfy.model_management.get_torch_device()

    variants = {
        "core_cfg": lambda: _cfg_guider(model, pos, neg),
        "full": lambda: domain_guider(model, full_domain, pos, neg, 2.5, 2.0),
        "lora_one_forward": lambda: _with(domain_guider(model, lora_domain, pos, neg, 2.5, 2.0), one_forward=True),
        "lora_two_calls": lambda: _with(domain_guider(model, lora_domain, pos, neg, 2.5, 2.0), one_forward=False),
    }
    extra = {"lora_one_forward": lora_domain, "lora_two_calls": lora_domain}
    times = {k: [] for k in variants}
    resident = {}
    for r in range(args.repeats):
        for name, make in variants.items():
            comfy.model_management.unload_all_models()
            guider = make()
            seen = {}

            def probe(name=name):
                d = extra.get(name)
                seen["bytes"] = resident_parameter_bytes(adapter_tensors(d) if d is not None else ())

            step_s = timed_sample(guider, (args.size, args.size), args.steps, device, probe)
            times[name].append(step_s)
            resident[name] = seen["bytes"]
            log(f"run {r + 1}/{args.repeats} {name}: {step_s * 1000:.0f} ms/step, resident {seen['bytes'] / 2 ** 20:.0f} MiB")
    comfy.model_management.unload_all_models()
    base_bytes = unique_bytes(list(model.model.parameters()) + list(model.model.buffers()))
    return {"params": params, "file_bytes": sizes, "ranks": args.ranks, "resident_bytes": resident,
            "base_bytes": base_bytes, "step_s": {k: common.median(v) for k, v in times.items()},
            "step_runs_s": times, "latent": [args.size, args.size], "steps": args.steps}


def _with(guider, **attrs):
    for k, v in attrs.items():
        setattr(guider, k, v)
    return guider


def _cfg_guider(model, pos, neg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(2.5)
    return g


def timed_sample(guider, latent_hw, steps: int, device, probe) -> float:
    """Mean step time from step 2 to the last (sampler callback stamps); `probe` runs in the first callback."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, *latent_hw)
    noise = comfy.sample.prepare_noise(latent, 0)
    ks = comfy.samplers.KSampler(guider.model_patcher, steps=steps, device=device, sampler="euler",
                                 scheduler="normal", denoise=1.0)
    stamps = []

    def callback(step, x0, x, total):
        common.sync(device)
        if not stamps:
            probe()
        stamps.append(time.perf_counter())

    guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), ks.sigmas, callback=callback,
                  disable_pbar=True, seed=0)
    return (stamps[-1] - stamps[1]) / (len(stamps) - 2) if len(stamps) > 2 else stamps[-1] - stamps[0]


# ----------------------------------------------------------------------------- training child


def training_child(args) -> dict:
    from indomain.devkit import host

    host.import_comfy()
    import comfy.model_management

    from indomain.training.trainer import TrainConfig, train_on_latents

    model, clip = build_base(args.fast)
    comfy.model_management.load_models_gpu([model], force_full_load=True)
    device = comfy.model_management.get_torch_device()
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(max(args.batch, 8), 4, 8, 8, generator=gen) * 5.0
    cfg = TrainConfig(steps=args.train_steps, lr=1e-5, batch_size=args.batch, resolution=64, hflip=0.5, seed=0,
                      save_every=0, form=args.variant, calibration_images=4, keep_resume_state=False)
    if args.variant == "lora":
        cfg.lora_rank = args.ranks[-1]
    stamps = []

    def progress(step, total, loss, ips):
        stamps.append(time.perf_counter())

    with common.PeakMemory(device) as mem:
        res = train_on_latents(model, clip, latents, cfg, out_path=None, progress=progress)
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    trained = sum(v.numel() for k, v in res.state_dict.items() if v.is_floating_point())
    return {"variant": args.variant, "step_s": common.median(intervals), "intervals_s": intervals,
            "peak_memory_delta_bytes": mem.delta, "memory_kind": mem.kind, "saved_numel": trained,
            "batch": args.batch, "last_loss": res.losses[-1]}


# ----------------------------------------------------------------------------- driver


def run_child(kind: str, args, variant: str | None = None, work: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "indomain.bench.lora", "--child", kind, "--batch", str(args.batch),
           "--size", str(args.size), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--train-steps", str(args.train_steps), "--ranks", ",".join(map(str, args.ranks))]
    if variant:
        cmd += ["--variant", variant]
    if work:
        cmd += ["--work", work]
    if args.fast:
        cmd.append("--fast")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    log(f"child: {kind} {variant or ''}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for ln in proc.stdout.splitlines():
        if ln.startswith("[lora"):
            print("   " + ln, flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("INDOMAIN_CHILD_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"lora bench child {kind} {variant} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-5000:]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def main(argv=None) -> dict:
    p = common.parser("lora", __doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=None, help="latent side for the sampling timings (default 32; --fast 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per timing (default 4)")
    p.add_argument("--repeats", type=int, default=None, help="timings per sampling variant (default 2; --fast 1)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 4; --fast 2)")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per child (default 4; --fast 3)")
    p.add_argument("--ranks", default="8,32", help="the two LoRA ranks for file sizes (the last one is sampled "
                   "and trained; 32 is the training default) (default 8,32)")
    p.add_argument("--child", choices=["sampling", "training"], default=None, help=_hidden())
    p.add_argument("--variant", default=None, help=_hidden())
    p.add_argument("--work", default=None, help=_hidden())
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or (8 if args.fast else 32)
    args.steps = args.steps or 4
    args.repeats = args.repeats or (1 if args.fast else 2)
    args.batch = args.batch or (2 if args.fast else 4)
    args.train_steps = args.train_steps or (3 if args.fast else 4)
    args.ranks = [int(r) for r in str(args.ranks).split(",")] if isinstance(args.ranks, str) else args.ranks
    if args.child:
        result = sampling_child(args) if args.child == "sampling" else training_child(args)
        print("INDOMAIN_CHILD_RESULT " + json.dumps(result), flush=True)
        return result

    with tempfile.TemporaryDirectory() as work:
        sampling = run_child("sampling", args, work=work)
    training = {v: run_child("training", args, variant=v) for v in ("full", "lora")}
    st, res, fb = sampling["step_s"], sampling["resident_bytes"], sampling["file_bytes"]
    payload = {
        "bench": "lora", "mode": "fast" if args.fast else "default", "environment": common.environment(),
        "model": {"params": sampling["params"], "config": "tiny SD15 (devkit)" if args.fast else "BENCH_UNET"},
        "sampling": sampling, "training": training,
        "ratios": {
            "resident_lora_over_base": res["lora_one_forward"] / sampling["base_bytes"],
            "resident_full_over_base": res["full"] / sampling["base_bytes"],
            "train_memory_lora_over_full": (training["lora"]["peak_memory_delta_bytes"]
                                            / max(1, training["full"]["peak_memory_delta_bytes"])),
            "train_step_lora_over_full": training["lora"]["step_s"] / training["full"]["step_s"],
            "step_full_over_cfg": st["full"] / st["core_cfg"],
            "step_lora_one_forward_over_cfg": st["lora_one_forward"] / st["core_cfg"],
            "step_lora_two_calls_over_cfg": st["lora_two_calls"] / st["core_cfg"],
        },
        "targets": {"resident_lora_over_base": 1.05, "train_memory_lora_over_full": 0.5,
                    "train_step_lora_over_full": 1.0, "step_lora_over_cfg": 1.5},
    }
    r = payload["ratios"]
    payload["meets"] = {"resident": r["resident_lora_over_base"] <= 1.05,
                        "train_memory": r["train_memory_lora_over_full"] <= 0.5,
                        "train_step": r["train_step_lora_over_full"] <= 1.0,
                        "sampling_step": min(r["step_lora_one_forward_over_cfg"], r["step_lora_two_calls_over_cfg"]) <= 1.5}
    payload["memory_table"] = memory_table(payload)
    common.write_json(args.out, payload)
    print(report(payload))
    print("\n" + payload["memory_table"])
    print(f"\nJSON: {args.out}")
    return payload


def parameter_counts(rank: int) -> dict:
    """(UNet parameters, LoRA adapter parameters at `rank`) of SD1.5 and SDXL, counted on the meta device."""
    from indomain.devkit import host

    host.import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from indomain.guidance.lora import adapted_modules
    from .sampling import SD15_FULL_UNET

    out = {}
    for name, cfg in (("SD1.5", SD15_FULL_UNET), ("SDXL", SDXL_UNET)):
        with torch.device("meta"):
            unet = UNetModel(**cfg, operations=comfy.ops.disable_weight_init)
        params = sum(p.numel() for p in unet.parameters())
        adapter = sum(rank * (m.weight.shape[0] + m.weight[0].numel()) for _n, m in adapted_modules(unet))
        out[name] = {"params": params, "adapter_params": adapter}
    return out


def memory_table(payload: dict) -> str:
    """docs/performance.md table: GPU memory of each form for SD1.5 and SDXL, computed from this run's measured bytes per
    parameter (training: peak RSS per UNet parameter at tiny latents, where weights and optimiser state dominate;
    sampling: resident parameter bytes over the base's, applied to fp16 weights). Activations are not included."""
    t, s = payload["training"], payload["sampling"]
    params = payload["model"]["params"]
    rank = s["ranks"][-1]
    train_bpp = {f: t[f]["peak_memory_delta_bytes"] / params for f in ("full", "lora")}
    sample_mult = {"full": s["resident_bytes"]["full"] / s["base_bytes"],
                   "lora": s["resident_bytes"]["lora_one_forward"] / s["base_bytes"]}
    counts = parameter_counts(rank)
    rows = []
    for model, c in counts.items():
        for form in ("full", "lora"):
            train = (train_bpp[form] + 2) * c["params"]  # + the base ComfyUI keeps loaded in fp16 during training
            sample = 2 * sample_mult[form] * c["params"]  # fp16 weights on a GPU
            fits_t = [g for g in GPU_SIZES_GIB if train <= ACTIVATION_HEADROOM * g * 2 ** 30]
            fits_s = [g for g in GPU_SIZES_GIB if sample <= ACTIVATION_HEADROOM * g * 2 ** 30]
            label = "full" if form == "full" else f"LoRA r{rank}"
            rows.append([model, label, f"{c['params'] / 1e6:.0f}M", f"{train_bpp[form]:.1f}", f"{train / 2 ** 30:.1f}",
                         f"≥ {fits_t[0]} GB" if fits_t else f"> {GPU_SIZES_GIB[-1]} GB", f"{sample / 2 ** 30:.1f}",
                         f"≥ {fits_s[0]} GB" if fits_s else f"> {GPU_SIZES_GIB[-1]} GB"])
    return common.table(
        ["model", "form", "UNet params", "training B/param (measured, CPU)", "training GiB", "training fits",
         "sampling GiB (UNets, fp16)", "sampling fits"], rows,
        "Memory per form — computed, not measured on a GPU: weights, gradients, AdamW and EMA from the measured bytes "
        "per parameter, plus the base's fp16 copy that ComfyUI keeps loaded; activations not included "
        f"(a GPU 'fits' when these take ≤ {ACTIVATION_HEADROOM:.0%} of it)")


def _hidden():
    import argparse

    return argparse.SUPPRESS


def report(payload: dict) -> str:
    s, t, r = payload["sampling"], payload["training"], payload["ratios"]
    mib = common.mib
    fb = s["file_bytes"]
    lo, hi = s["ranks"][0], s["ranks"][-1]
    out = [common.table(["file", "MiB"], [[k, f"{mib(v):.1f}"] for k, v in fb.items()],
                        f"File size ({payload['model']['params'] / 1e6:.0f}M-parameter SD1.5-layout UNet)")]
    out.append(common.table(
        ["sampling", "resident parameter MiB", "× base alone", "ms / step", "× core CFG"],
        [["base alone (core CFG)", f"{mib(s['base_bytes']):.0f}", "1.000", f"{s['step_s']['core_cfg'] * 1000:.0f}", "1.000"],
         ["full form", f"{mib(s['resident_bytes']['full']):.0f}", f"{r['resident_full_over_base']:.3f}",
          f"{s['step_s']['full'] * 1000:.0f}", f"{r['step_full_over_cfg']:.3f}"],
         [f"LoRA r{hi}, one forward", f"{mib(s['resident_bytes']['lora_one_forward']):.0f}",
          f"{r['resident_lora_over_base']:.3f}", f"{s['step_s']['lora_one_forward'] * 1000:.0f}",
          f"{r['step_lora_one_forward_over_cfg']:.3f}"],
         [f"LoRA r{hi}, two calls", f"{mib(s['resident_bytes']['lora_two_calls']):.0f}",
          f"{s['resident_bytes']['lora_two_calls'] / s['base_bytes']:.3f}", f"{s['step_s']['lora_two_calls'] * 1000:.0f}",
          f"{r['step_lora_two_calls_over_cfg']:.3f}"]],
        f"Decoupled sampling, {s['latent'][0]}×{s['latent'][1]} latent, batch 1, euler {s['steps']} steps, median of "
        f"{len(s['step_runs_s']['core_cfg'])} runs (cfg 2.5, w_d 2)"))
    out.append(common.table(
        ["training", "peak memory Δ MiB", "× full", "s / step", "× full", "saved tensors"],
        [["full form", f"{mib(t['full']['peak_memory_delta_bytes']):.0f}", "1.000", f"{t['full']['step_s']:.2f}", "1.000",
          f"{t['full']['saved_numel'] / 1e6:.1f}M"],
         [f"LoRA r{hi}", f"{mib(t['lora']['peak_memory_delta_bytes']):.0f}", f"{r['train_memory_lora_over_full']:.3f}",
          f"{t['lora']['step_s']:.2f}", f"{r['train_step_lora_over_full']:.3f}", f"{t['lora']['saved_numel'] / 1e6:.1f}M"]],
        f"Training at batch {t['full']['batch']}, 8×8 latents, AdamW + EMA, fp32 CPU ({t['full']['memory_kind']})"))
    out.append("targets met: " + ", ".join(f"{k} {v}" for k, v in payload["meets"].items()))
    return "\n\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
