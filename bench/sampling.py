"""Per-step cost of decoupled guidance (the pack's Domain Guider) against core CFGGuider.

Same base model, seed, sampler, steps and resolution; the figure is the median over runs of
the mean step time (step 2 to the last, from the sampler's per-step callback, so loading and
set-up are excluded). Also measured in the same run: the model passes alone (base at batch 2,
base at batch 1, domain at batch 1), hence the physical floor
(base batch-2 + domain batch-1) / base batch-2 and the guider overhead (step time beyond the
model passes) as a fraction of a step; peak memory during sampling and a check that no model
is copied.

    python -m indomain.bench.sampling              # tiny SD15-layout UNet, 32x32 latents, CPU
    python -m indomain.bench.sampling --full       # SD1.5 size (full depth, random weights), 64x64, fp16 (CUDA only)
    python -m indomain.bench.sampling --fast       # smoke run for the test suite
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from . import common
from ..guidance.combine import DOMAIN_WEIGHT_START

# ComfyUI's detected SD1.5 UNet config (comfy/model_detection.py, "SD15"), i.e. full depth
SD15_FULL_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
    use_spatial_transformer=True, legacy=False, dims=2, use_checkpoint=False,
)


def log(msg: str) -> None:
    print(f"[sampling {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- models


def tiny_models(work: Path):
    """Tiny checkpoint (real CLIP) + a calibrated null-text domain UNet loaded as the product does."""
    from ..devkit import tiny_models as tm
    from ..devkit.domain import load_checkpoint, make_domain_unet
    from ..sampling.domain_model import load_domain_model

    model, clip, _vae = load_checkpoint(tm.tiny_checkpoint(0))
    path = make_domain_unet(model, clip, work / "bench_domain.safetensors", seed=0, perturb=0.02)
    domain = load_domain_model(model, path)

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    return model, domain, encode("a red circle"), encode(""), {"base": "tiny SD15-layout UNet (devkit, 18.7M params)",
                                                               "text_encoder": "random CLIP-L (devkit)"}


def full_models(dtype, hw):
    """SD1.5-size UNet (full depth, random weights) and its null-text domain UNet; random text contexts."""
    import comfy.model_base
    import comfy.model_management
    import comfy.sd

    from ..devkit import tiny_models as tm
    from ..guidance.nulltext import convert_to_null_text
    from ..sampling.domain_model import build_domain_model
    from ..forms.model import EmptyPrompt, base_meta, calibrate, detached_unet_copy

    sd = {k: v.to(dtype) for k, v in tm.tiny_unet_state_dict(0, config=SD15_FULL_UNET).items()}
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 77, 768, generator=gen)
    neg = torch.randn(1, 77, 768, generator=gen)
    unet = detached_unet_copy(model)
    ms = model.get_model_object("model_sampling")
    constants = calibrate(unet.to(comfy.model_management.get_torch_device()), ms, EmptyPrompt(neg, None),
                          torch.randn(4, 4, *hw, generator=gen), seed=0, batch_size=4)
    convert_to_null_text(unet, constants)
    state = {k: v.detach().to("cpu", dtype) for k, v in unet.state_dict().items()}
    del unet
    comfy.model_management.soft_empty_cache()
    domain = build_domain_model(model, state, base_meta(model, {"kind": "bench"}, {}), source="bench")
    cond = lambda t: [[t, {}]]  # noqa: E731
    return model, domain, cond(pos), cond(neg), {"base": "SD1.5 layout, full depth, random weights",
                                                 "text_encoder": "none (random contexts)"}


# ----------------------------------------------------------------------------- timing


def timed_sample(guider, latent_hw, seed: int, steps: int, sampler_name: str, device) -> tuple[float, float, int]:
    """Mean step time from step 2 to the last (sampler callback stamps): wall-clock and this thread's
    CPU time, and peak memory above entry."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(1, 4, *latent_hw)
    noise = comfy.sample.prepare_noise(latent, seed)
    ks = comfy.samplers.KSampler(guider.model_patcher, steps=steps, device=device, sampler=sampler_name,
                                 scheduler="normal", denoise=1.0)
    stamps = []

    def callback(step, x0, x, total):
        common.sync(device)
        stamps.append((time.perf_counter(), time.thread_time()))

    with common.PeakMemory(device) as mem:
        guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), ks.sigmas, callback=callback,
                      disable_pbar=True, seed=seed)
    if len(stamps) < 2:
        raise RuntimeError("need at least 2 sampling steps to time a step")
    n = len(stamps) - 1
    return (stamps[-1][0] - stamps[0][0]) / n, (stamps[-1][1] - stamps[0][1]) / n, mem.delta


def time_pass(patcher, batch: int, latent_hw, context, device, repeats: int) -> tuple[float, float]:
    """Median wall-clock and thread-CPU time of one model evaluation (ComfyUI's apply_model) at `batch`."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    m = patcher.model
    dtype = m.get_dtype()
    x = torch.randn(batch, 4, *latent_hw, device=device)
    sigma = torch.full((batch,), 5.0, device=device)
    ctx = context.to(device).expand(batch, -1, -1)
    times, cpu = [], []
    with torch.no_grad():
        m.apply_model(x, sigma, c_crossattn=ctx)  # warm-up
        for _ in range(repeats):
            common.sync(device)
            t, c = time.perf_counter(), time.thread_time()
            m.apply_model(x, sigma, c_crossattn=ctx)
            common.sync(device)
            times.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
    del dtype
    return common.median(times), common.median(cpu)


def storages(module: torch.nn.Module) -> dict[int, int]:
    """data_ptr -> bytes of every parameter/buffer storage (to see copies)."""
    out = {}
    for t in list(module.parameters()) + list(module.buffers()):
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


# ----------------------------------------------------------------------------- main


def build_parser():
    p = common.parser("sampling", __doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="SD1.5 size (full depth), 64x64 latents, fp16; needs CUDA")
    p.add_argument("--size", type=int, default=None, help="latent side (default 32; --full 64; --fast 8)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps per run (default 8)")
    p.add_argument("--runs", type=int, default=None, help="runs per case; the median is reported (default 3)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--domain-weight", type=float, default=DOMAIN_WEIGHT_START)
    p.add_argument("--allow-cpu-full", action="store_true", help="run --full on CPU anyway (slow; for checking the code path)")
    return p


def sampling_cases(model, domain, pos, neg, args) -> dict:
    """case -> (label, make guider)."""
    import comfy.samplers

    from ..sampling.guider import domain_guider

    def cfg_guider():
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(pos, neg)
        g.set_cfg(args.cfg)
        return g

    return {
        "cfg": ("core CFGGuider (batch-2 base pass)", cfg_guider),
        "text": ("Domain Guider, text-guided (3 predictions)",
                 lambda: domain_guider(model, domain, pos, neg, args.cfg, args.domain_weight)),
        "uncond": ("Domain Guider, cfg 0 (u + domain)",
                   lambda: domain_guider(model, domain, pos, neg, 0.0, args.domain_weight)),
        "partial": ("Domain Guider, text, domain term on 0-50% of the schedule",
                    lambda: domain_guider(model, domain, pos, neg, args.cfg, args.domain_weight, end_percent=0.5)),
    }


def measure(cases: dict, model, domain, neg, hw, steps: int, runs: int, pass_repeats: int, sampler: str, device) -> dict:
    """Interleaved timed runs of every case, storage identity before/after, and each model pass alone."""
    import comfy.model_base
    import comfy.model_management

    m = {"base_storage_before": storages(model.model.diffusion_model),
         "domain_storage_before": storages(domain.model.diffusion_model),
         "step_times": {k: [] for k in cases}, "step_cpu": {k: [] for k in cases}, "peaks": {k: [] for k in cases},
         "domain_calls": {}}
    # one warm-up of each case, then interleaved runs so drifting machine load hits every case alike
    for k, (_label, make) in cases.items():
        timed_sample(make(), hw, 0, steps, sampler, device)
    # diffusion models only: a text encoder loaded earlier in the same process is not a copy of either UNet
    m["loaded_after"] = [(type(lm.model.model).__name__, lm.model_memory()) for lm in comfy.model_management.current_loaded_models
                         if isinstance(lm.model.model, comfy.model_base.BaseModel)]
    for r in range(runs):
        for k, (_label, make) in cases.items():
            g = make()
            t, c, peak = timed_sample(g, hw, 0, steps, sampler, device)
            m["step_times"][k].append(t)
            m["step_cpu"][k].append(c)
            m["peaks"][k].append(peak)
            m["domain_calls"][k] = getattr(g, "model_calls", 0)
        log(f"run {r + 1}/{runs}: " + ", ".join(f"{k} {m['step_times'][k][-1] * 1000:.0f} ms" for k in cases))
    m["base_storage_after"] = storages(model.model.diffusion_model)
    m["domain_storage_after"] = storages(domain.model.diffusion_model)

    log("timing model passes alone")
    neg_ctx = neg[0][0]
    m["pass_b2"] = time_pass(model, 2, hw, neg_ctx, device, pass_repeats)
    m["pass_b1"] = time_pass(model, 1, hw, neg_ctx, device, pass_repeats)
    m["pass_d1"] = time_pass(domain, 1, hw, neg_ctx, device, pass_repeats)
    return m


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    common.enable_stack_dumps()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ..devkit import host

    host.import_comfy()
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if args.full and device.type != "cuda" and not args.allow_cpu_full:
        msg = "--full needs CUDA (SD1.5 size, fp16); no GPU here, so it was skipped (not measured)."
        print(msg)
        payload = {"bench": "sampling", "mode": "full", "skipped": msg, "environment": common.environment()}
        common.write_json(args.out, payload)
        return payload
    size = args.size or (8 if args.fast else 64 if args.full else 32)
    steps = args.steps or (3 if args.fast else 8)
    runs = args.runs or (1 if args.fast else 3)
    hw = (size, size)
    mode = "fast" if args.fast else "full" if args.full else "default"

    import tempfile

    with tempfile.TemporaryDirectory() as work:
        log(f"building models ({mode})")
        if args.full:
            model, domain, pos, neg, desc = full_models(torch.float16 if device.type == "cuda" else torch.float32, hw)
        else:
            model, domain, pos, neg, desc = tiny_models(Path(work))
        cases = sampling_cases(model, domain, pos, neg, args)
        m = measure(cases, model, domain, neg, hw, steps, runs, 2 if args.fast else 5, args.sampler, device)
    payload = summarise(m, cases, model, args, device, mode, hw, steps, runs, desc)
    common.write_json(args.out, payload)
    print(report(payload))
    print(f"\nJSON: {args.out}")
    return payload


def summarise(m: dict, cases: dict, model, args, device, mode: str, hw, steps: int, runs: int, desc) -> dict:
    """The payload: medians, ratios to CFG, pass floors, memory checks."""
    step_times, step_cpu, peaks, domain_calls = m["step_times"], m["step_cpu"], m["peaks"], m["domain_calls"]
    loaded_after = m["loaded_after"]
    (t_b2, c_b2), (t_b1, c_b1), (t_d1, c_d1) = m["pass_b2"], m["pass_b1"], m["pass_d1"]
    base_storage_before, domain_storage_before = m["base_storage_before"], m["domain_storage_before"]
    base_storage_after, domain_storage_after = m["base_storage_after"], m["domain_storage_after"]
    # With one torch thread on CPU the main thread's CPU time is the compute itself and does not
    # grow when other processes share the cores; it is the robust figure on a loaded machine.
    cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
    active_fraction = domain_calls["partial"] / max(1, domain_calls["text"])
    if cpu_clock:
        med = {k: common.median(v) for k, v in step_cpu.items()}
        t_b2, t_b1, t_d1 = c_b2, c_b1, c_d1
    else:
        med = {k: common.median(v) for k, v in step_times.items()}
    cfg_step = med["cfg"]
    passes = {"cfg": t_b2, "text": t_b2 + t_d1, "uncond": t_b1 + t_d1}
    passes["partial"] = t_b2 + active_fraction * t_d1
    base_bytes = sum(base_storage_before.values())
    domain_bytes = sum(domain_storage_before.values())
    results = {}
    for k, (label, _make) in cases.items():
        results[k] = {
            "label": label,
            "step_s": med[k],
            "ratio_to_cfg": med[k] / cfg_step,
            "model_passes_s": passes[k],
            "overhead_fraction_of_step": (med[k] - passes[k]) / med[k],
            "peak_memory_delta_mib": common.mib(max(peaks[k])),
            "domain_evaluations": domain_calls[k],
            "runs_wall_s": step_times[k],
            "runs_thread_cpu_s": step_cpu[k],
            "wall_step_s": common.median(step_times[k]),
            "wall_ratio_to_cfg": common.median(step_times[k]) / common.median(step_times["cfg"]),
        }
    targets = {"text": 1.5, "uncond": 1.05}
    payload = {
        "bench": "sampling", "mode": mode, "device": str(device), "environment": common.environment(),
        "clock": ("main-thread CPU time (1 torch thread, robust to other load); wall-clock also in runs_wall_s"
                  if cpu_clock else "wall-clock"),
        "settings": {"latent": list(hw), "steps": steps, "runs": runs, "sampler": args.sampler, "scheduler": "normal",
                     "cfg": args.cfg, "domain_weight": args.domain_weight, "seed": 0, "models": desc,
                     "dtype": str(model.model.get_dtype())},
        "passes_s": {"base_batch2": t_b2, "base_batch1": t_b1, "domain_batch1": t_d1},
        "floor_text": (t_b2 + t_d1) / t_b2,
        "floor_uncond": (t_b1 + t_d1) / t_b2,
        "results": results,
        "targets": {"text_ratio_max": 1.5, "uncond_ratio_max": 1.05, "overhead_fraction_max": 0.05},
        "meets": {k: results[k]["ratio_to_cfg"] <= v for k, v in targets.items()}
                 | {f"overhead_{k}": results[k]["overhead_fraction_of_step"] <= 0.05 for k in ("text", "uncond", "partial")},
        "memory": {
            "kind": "cuda_max_memory_allocated" if device.type == "cuda" else "process_rss_peak",
            "base_unet_mib": common.mib(base_bytes), "domain_unet_mib": common.mib(domain_bytes),
            "domain_to_base_size": domain_bytes / base_bytes,
            "loaded_models_after_decoupled_sampling": [[n, common.mib(b)] for n, b in loaded_after],
            "weights_unchanged_in_place": (base_storage_before == base_storage_after
                                           and domain_storage_before == domain_storage_after),
            "extra_peak_vs_cfg_mib": {k: common.mib(max(peaks[k]) - max(peaks["cfg"])) for k in ("text", "uncond", "partial")},
        },
    }
    mem = payload["memory"]
    # a copy of either UNet during sampling would show as a peak at least the domain UNet's size above CFG's
    mem["no_model_copies"] = bool(mem["weights_unchanged_in_place"]
                                  and len(loaded_after) <= 2
                                  and max(mem["extra_peak_vs_cfg_mib"].values()) < 0.5 * mem["domain_unet_mib"])
    return payload


def report(payload: dict) -> str:
    r = payload["results"]
    s = payload["settings"]
    rows = []
    target = {"text": "≤ 1.5", "uncond": "≤ 1.05"}
    floor = {"text": payload["floor_text"], "uncond": payload["floor_uncond"], "cfg": 1.0}
    for k in ("cfg", "text", "uncond", "partial"):
        x = r[k]
        rows.append([x["label"], f"{x['step_s'] * 1000:.1f}", f"{x['ratio_to_cfg']:.3f}",
                     f"{floor[k]:.3f}" if k in floor else "-", target.get(k, "-"),
                     f"{100 * x['overhead_fraction_of_step']:.1f}%", f"{x['peak_memory_delta_mib']:.0f}"])
    for row, k in zip(rows, ("cfg", "text", "uncond", "partial")):
        row.insert(3, f"{r[k]['wall_ratio_to_cfg']:.3f}")
    t = common.table(["case", "ms / step", "× CFG", "× CFG (wall-clock)", "floor", "target", "time beyond model passes", "peak mem Δ (MiB)"], rows,
                     f"Sampling, {payload['mode']}: {s['latent'][0]}×{s['latent'][1]} latent, {s['steps']} {s['sampler']} "
                     f"steps, median of {s['runs']} runs, {payload['device']} ({s['dtype']}); clock: {payload['clock']}")
    ps = payload["passes_s"]
    mem = payload["memory"]
    lines = [
        f"model passes alone: base batch 2 {ps['base_batch2'] * 1000:.1f} ms, base batch 1 {ps['base_batch1'] * 1000:.1f} ms, "
        f"domain batch 1 {ps['domain_batch1'] * 1000:.1f} ms",
        f"domain UNet {mem['domain_unet_mib']:.0f} MiB vs base {mem['base_unet_mib']:.0f} MiB "
        f"({mem['domain_to_base_size']:.3f}×); loaded models after sampling: {mem['loaded_models_after_decoupled_sampling']}",
        f"weights untouched in place: {mem['weights_unchanged_in_place']}; extra peak vs CFG (MiB): "
        + ", ".join(f"{k} {v:.0f}" for k, v in mem['extra_peak_vs_cfg_mib'].items())
        + f"; no model copies: {mem['no_model_copies']}",
        "targets met: " + ", ".join(f"{k} {v}" for k, v in payload["meets"].items()),
    ]
    return t + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
