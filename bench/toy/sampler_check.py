"""G7's diagnosis: (c) at one cfg, read at N and 2N sampling steps, for candidate samplers and domain weights.

    python -m indomain.bench.toy.sampler_check --threads 2 --candidates euler:2,dpmpp_2m:3

Each candidate is sampler:domain_weight; the models are the benchmark's cached base and seed-0 domain model (trained
here when missing, as the benchmark does), the samples the gates' (gate_samples per prompt), N the benchmark's
sample_steps. Per candidate: control, domain score, off-data share, texture ratio and FD at N and at 2N, and G7's own
verdict on the pair (gates.g7_sampler)."""
from __future__ import annotations

import dataclasses
import sys

from .. import common
from . import gates as G
from . import world
from .config import log
from .experiments import Point, ToySampler
from .metrics import Metrics
from .run import Run, parse_args

READ = ("control", "domain_score", "off_data", "texture_ratio", "fd")


def main(argv=None) -> dict:
    p = common.parser("toy_sampler_check", __doc__.split("\n\n")[0])
    p.add_argument("--candidates", default="euler:2,euler:3",
                   help="comma-separated sampler:domain_weight (ComfyUI sampler names), each read at N and 2N steps")
    p.add_argument("--cfg", type=float, default=3.0, help="the control weight (default 3, the operating cfg)")
    args = p.parse_args(argv)
    cands = [c.strip().split(":") for c in args.candidates.split(",") if c.strip()]
    if not cands or any(len(c) != 2 for c in cands):
        p.error("--candidates: a comma-separated list of sampler:domain_weight, e.g. euler:2,dpmpp_2m:3")
    toy_args = ["--gates", "only", "--out", str(args.out)] + (["--fast"] if args.fast else []) \
        + (["--threads", str(args.threads)] if args.threads else [])
    targs, cfg, experiments = parse_args(toy_args)
    run = Run(targs, cfg, experiments)
    run.evaluator()
    run.gate_combos = world.asked_combos(cfg) * cfg.gate_samples  # the gates' prompts (their gates not needed here)
    run.base()
    run.domain_images()
    run.sampling()
    metrics = Metrics(run.net, run.gate_combos, cfg.coverage, cfg.seed)
    run.ensure_finetunes([Point("c", args.cfg, 1.0)])
    names = {"domain": run.names[(0, "short", "domain")]}
    out = {"cfg": args.cfg, "sample_steps": cfg.sample_steps, "samples": len(run.gate_combos), "candidates": {}}
    for sampler_name, wd in cands:
        pt, per_sample, readings = Point("c", args.cfg, float(wd)), [], {}
        for steps in (cfg.sample_steps, 2 * cfg.sample_steps):
            sampler = ToySampler(run.runner, dataclasses.replace(cfg, samples_per_prompt=cfg.gate_samples,
                                                                 sampler=sampler_name, sample_steps=steps),
                                 run.base_name, run.prompts)
            lat = run.latent_format.process_in(sampler.sample(pt, names))
            sampler.release()
            m = metrics(lat)
            readings[str(steps)] = {k: m[k] for k in READ}
            per_sample.append({"per_sample": metrics.per_sample(lat)})
            log(f"{sampler_name} w_d {float(wd):g} cfg {args.cfg:g}, {steps} steps: "
                + ", ".join(f"{k} {m[k]:.3f}" for k in READ))
        g7 = G.g7_sampler({f"{sampler_name} w_d {float(wd):g}": tuple(per_sample)})
        G.print_gates([g7])
        out["candidates"][f"{sampler_name}:{float(wd):g}"] = {"readings": readings, "agree": g7["pass"],
                                                              "why": g7["why"], "figures": g7["figures"]}
    payload = {"bench": "toy_sampler_check", "fast": args.fast, "environment": common.environment(), **out}
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
