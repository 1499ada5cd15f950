"""Per-family cost of decoupled sampling against core CFG, on the tiny DiT families (CPU, one run).

For every family devkit/tiny_families.py can build on this host: the same base, seed, sampler (Euler), steps and
latent; a LoRA-form domain model on the base's own weights (random adapter, text-free by the empty prompt).
Timed in the same process, interleaved, median over repeats of a whole sampling run:

    core      core CFGGuider at cfg 3 (u and c: one batched forward per step)
    one_pass  core CFGGuider at cfg 1 (c alone: one forward of batch 1 per step) - the cost of one more pass
    decoupled the pack's Domain Guider, w_c 3, w_d 2, one batched forward (u, c and the domain rows)
    two_calls the same with the domain pass as a call of its own

Ratios are decoupled / core (and two_calls / core); the floor of a third prediction is (core + one_pass) / core.
Tiny models: fixed per-call costs dominate, so these ratios are upper bounds of what real sizes see (the SD
figures of bench/sampling.py show the same effect at 8x8 against 32x32).

    python -m indomain.bench.families                  # all families, 16x16 latents, 4 steps, 5 repeats
    python -m indomain.bench.families --fast           # 2 families, 1 repeat (smoke)
    python -m indomain.bench.families --families sd3 wan21 --size 32
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from . import common


def log(msg: str) -> None:
    print(f"[families {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _setup(name: str, size: int, work: Path):
    from ..devkit import tiny_families as tf
    from ..devkit.domain import make_family_domain_lora
    from ..sampling.domain_model import load_domain_model

    base = tf.build(name, 0)
    domain = load_domain_model(base, make_family_domain_lora(base, work / f"{name}.safetensors", seed=1))
    lat = tf.latent(name, height=size, width=size, seed=0)["samples"]
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
    return base, domain, tf.text_cond(name, seed=1), tf.text_cond(name, seed=2), tf.empty_cond(name), noise


def _run(guider, noise, sigmas) -> float:
    import comfy.samplers

    t0 = time.perf_counter()
    with torch.no_grad():
        guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas,
                      disable_pbar=True, seed=0)
    return time.perf_counter() - t0


def measure(name: str, size: int, steps: int, repeats: int, work: Path) -> dict:
    import comfy.samplers

    from ..devkit import tiny_families as tf
    from ..sampling.guider import domain_guider

    base, domain, pos, neg, empty, noise = _setup(name, size, work)
    sigmas = tf.family_sigmas(base, steps)

    def core(cfg):
        g = comfy.samplers.CFGGuider(base)
        g.set_conds(pos, neg)
        g.set_cfg(cfg)
        return g

    def decoupled(one_forward):
        g = domain_guider(base, domain, pos, neg, 3.0, 2.0, empty_prompt=empty)
        g.one_forward = one_forward
        return g

    makers = {"core": lambda: core(3.0), "one_pass": lambda: core(1.0), "decoupled": lambda: decoupled(True),
              "two_calls": lambda: decoupled(False)}
    for make in makers.values():  # warm-up (first-call allocations)
        _run(make(), noise, sigmas)
    times = {k: [] for k in makers}
    for _ in range(repeats):
        for k, make in makers.items():
            times[k].append(_run(make(), noise, sigmas))
    med = {k: common.median(v) for k, v in times.items()}
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    return {"family": name, "params": params, "latent": list(noise.shape), "steps": steps, "repeats": repeats,
            "seconds": med, "decoupled_over_core": med["decoupled"] / med["core"],
            "two_calls_over_core": med["two_calls"] / med["core"],
            "floor_core_plus_one_pass": (med["core"] + med["one_pass"]) / med["core"]}


def main(argv=None) -> int:
    p = common.parser("families", __doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", default=None, help="which families (default: all this host builds)")
    p.add_argument("--size", type=int, default=16, help="latent height and width (default 16)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..devkit.host import import_comfy

    import_comfy()
    from ..devkit import tiny_families as tf

    names = args.families or list(tf.FAMILIES)
    if args.fast:
        names, args.repeats, args.size, args.steps = names[:2], 1, 8, 2
    rows, results, skipped = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ok, why = tf.available(name)
            if not ok:
                skipped[name] = why
                log(f"{name}: skipped ({why})")
                continue
            r = measure(name, args.size, args.steps, args.repeats, Path(tmp))
            log(f"{name}: decoupled/core {r['decoupled_over_core']:.2f} (floor {r['floor_core_plus_one_pass']:.2f})")
            results.append(r)
            s = r["seconds"]
            rows.append([name, f"{r['params'] / 1e6:.2f}M", "x".join(map(str, r["latent"])), s["core"] * 1e3,
                         s["decoupled"] * 1e3, r["decoupled_over_core"], r["two_calls_over_core"],
                         r["floor_core_plus_one_pass"]])
    print(common.table(["family", "params", "latent", "core CFG ms/run", "decoupled ms/run", "decoupled / core",
                        "two calls / core", "floor (core + 1 pass) / core"], rows,
                       title=f"Decoupled sampling vs core CFG, {args.steps} Euler steps, median of {args.repeats}"))
    out = common.write_json(args.out, {"environment": common.environment(), "results": results, "skipped": skipped,
                                       "settings": vars(args) | {"out": str(args.out)}})
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
