"""Domain caching: cost per sample against core CFG and the uncached decoupled sampler, in one run.

Two setups, each timed in one process, cases interleaved (median over repeats of a whole sampling run, thread CPU
time with --threads 1, so load from other processes does not enter; wall-clock in the JSON):

    sd15_full  tiny SD15-layout UNet + calibrated null-text domain UNet (full form: a model of its own), 32x32
    flux_lora  tiny Flux (dev) DiT + a LoRA-form domain (rows in u's batched forward), text-free by the empty prompt

Cases: core CFGGuider; the Domain Guider uncached (domain_cache off), every 2, every 3, adaptive (threshold
0.25); and where core's EasyCache / LazyCache apply to the base: each on core CFG, on the uncached Domain Guider and
combined with every 2. Also per case: the domain model's evaluations (a count) and the largest absolute difference
of the sample from the uncached one, relative to the uncached sample's largest value (not a quality measure: the
toy benchmark's instrument is not calibrated yet).

    python -m indomain.bench.domain_cache --threads 1            # both setups, 12 Euler steps, 3 repeats
    python -m indomain.bench.domain_cache --fast                 # smoke
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import common

MODES = ("off", "every 2", "every 3", "adaptive")


def log(msg: str) -> None:
    print(f"[domain_cache {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _core_patch(node_id: str, model):
    """EasyCache / LazyCache from core's own node on `model`, at core's default settings."""
    from comfy_extras import nodes_easycache

    cls = {"EasyCache": nodes_easycache.EasyCacheNode, "LazyCache": nodes_easycache.LazyCacheNode}[node_id]
    return cls.execute(model, reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False).result[0]


def _setup_sd15(work: Path, size: int):
    from .sampling import tiny_models

    model, domain, pos, neg, desc = tiny_models(work)
    noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    import comfy.samplers

    return dict(model=model, domain=domain, pos=pos, neg=neg, empty=None, noise=noise, cfg=7.0,
                sigmas=lambda steps: comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                                     "normal", steps).cpu(),
                desc=desc["base"] + ", full-form null-text domain UNet")


def _setup_flux(work: Path, size: int):
    from ..devkit import tiny_families as tf
    from ..devkit.domain import make_family_domain_lora
    from ..sampling.domain_model import load_domain_model

    name = "flux_dev"
    ok, why = tf.available(name)
    if not ok:
        return None, why
    base = tf.build(name, 0)
    domain = load_domain_model(base, make_family_domain_lora(base, work / f"{name}.safetensors", seed=1))
    lat = tf.latent(name, height=size, width=size, seed=0)["samples"]
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    return dict(model=base, domain=domain, pos=tf.text_cond(name, seed=1), neg=tf.text_cond(name, seed=2),
                empty=tf.empty_cond(name), noise=noise, cfg=3.0, sigmas=lambda steps: tf.family_sigmas(base, steps),
                desc=f"tiny Flux dev DiT ({params / 1e6:.2f}M params), LoRA-form domain (rank 4)"), ""


def _run(guider, noise, sigmas) -> tuple[float, float, torch.Tensor]:
    import comfy.samplers

    t0, c0 = time.perf_counter(), time.thread_time()
    with torch.no_grad():
        out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                            disable_pbar=True, seed=0)
    return time.perf_counter() - t0, time.thread_time() - c0, out


def cases(s: dict, with_core_caches: bool) -> dict:
    import comfy.samplers

    from ..sampling.guider import domain_guider

    def core(model):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(s["pos"], s["neg"])
        g.set_cfg(s["cfg"])
        return g

    def decoupled(model, mode):
        return domain_guider(model, s["domain"], s["pos"], s["neg"], s["cfg"], 2.0, empty_prompt=s["empty"],
                             domain_cache=mode, domain_cache_threshold=0.25)

    m = s["model"]
    out = {"core CFG": lambda: core(m)}
    out.update({f"decoupled, cache {mode}": (lambda mode=mode: decoupled(m, mode)) for mode in MODES})
    if with_core_caches:
        for node_id in ("EasyCache", "LazyCache"):
            patched = _core_patch(node_id, m)
            out[f"core CFG + {node_id}"] = lambda p=patched: core(p)
            out[f"decoupled, cache off + {node_id}"] = lambda p=patched: decoupled(p, "off")
            out[f"decoupled, cache every 2 + {node_id}"] = lambda p=patched: decoupled(p, "every 2")
    return out


def measure(s: dict, steps: int, repeats: int, with_core_caches: bool) -> dict:
    makers = cases(s, with_core_caches)
    sigmas = s["sigmas"](steps)
    samples, evals = {}, {}
    for k, make in makers.items():  # warm-up, and the sample each case gives
        g = make()
        samples[k] = _run(g, s["noise"], sigmas)[2]
        evals[k] = getattr(g, "model_calls", 0)
    cpu, wall = {k: [] for k in makers}, {k: [] for k in makers}
    for r in range(repeats):
        for k, make in makers.items():
            w, c, _ = _run(make(), s["noise"], sigmas)
            wall[k].append(w)
            cpu[k].append(c)
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {cpu[k][-1]:.2f}s" for k in makers))
    ref = samples["decoupled, cache off"]
    scale = float(ref.abs().max())
    single = torch.get_num_threads() == 1
    clock = cpu if single else wall
    med = {k: common.median(v) for k, v in clock.items()}
    rows = {}
    for k in makers:
        rows[k] = {"seconds": med[k], "over_core_cfg": med[k] / med["core CFG"],
                   "over_uncached": med[k] / med["decoupled, cache off"],
                   "wall_over_core_cfg": common.median(wall[k]) / common.median(wall["core CFG"]),
                   "domain_evaluations": evals[k],
                   "max_abs_diff_vs_uncached_rel": float((samples[k] - ref).abs().max()) / max(scale, 1e-12)
                   if k.startswith("decoupled") else None}
    return {"setup": s["desc"], "latent": list(s["noise"].shape), "steps": steps, "repeats": repeats,
            "clock": "thread CPU time" if single else "wall-clock", "cases": rows}


def main(argv=None) -> int:
    p = common.parser("domain_cache", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--setups", nargs="*", default=["sd15_full", "flux_lora"])
    p.add_argument("--no-core-caches", action="store_true", help="skip the EasyCache / LazyCache cases")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..devkit.host import import_comfy

    import_comfy()
    if args.fast:
        args.steps, args.repeats = 3, 1
    results, skipped = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.setups:
            log(f"{name}: building")
            if name == "sd15_full":
                s = _setup_sd15(Path(tmp), 8 if args.fast else 32)
            else:
                s, why = _setup_flux(Path(tmp), 8 if args.fast else 16)
                if s is None:
                    skipped[name] = why
                    log(f"{name}: skipped ({why})")
                    continue
            results[name] = r = measure(s, args.steps, args.repeats, not args.no_core_caches)
            rows = [[k, v["seconds"], v["over_core_cfg"], v["over_uncached"], v["domain_evaluations"],
                     "-" if v["max_abs_diff_vs_uncached_rel"] is None else f"{v['max_abs_diff_vs_uncached_rel']:.2e}"]
                    for k, v in r["cases"].items()]
            print(common.table(["case", "s / sample", "× core CFG", "× uncached", "domain evaluations",
                                "max |Δ| vs uncached / max |uncached|"], rows,
                               title=f"{name}: {r['setup']}, latent {'x'.join(map(str, r['latent']))}, {r['steps']} "
                                     f"Euler steps, median of {r['repeats']} ({r['clock']})"))
    out = common.write_json(args.out, {"environment": common.environment(), "results": results, "skipped": skipped,
                                       "settings": vars(args) | {"out": str(args.out)}})
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
