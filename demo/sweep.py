"""The demo's rows over control and domain weights, in-process: control and stripe per setting.

The demo (`python -m indomain.demo`) runs one setting over HTTP; this sweeps the same models and sampler
(25 steps dpmpp_2m karras, the demo's prompts and seeds) through the same nodes called in-process: core
KSampler on the base and on the plain fine-tune, InDomainLoadDomainUNet + InDomainKSampler with the plain
fine-tune as the domain term (the demo's default form). `--coverage full` draws the domain's pictures in all
four disc colours (the paper's setting) instead of the demo's red and blue. Figures: control (fraction of
pictures following the ask, devkit/demo_world.py follows_ask), per asked colour, and the mean stripe score.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..bench import common

SETTINGS = ("base:2.5:0", "naive:2.5:0", "decoupled:2.5:2", "decoupled:2.5:1", "decoupled:5:1")


def main(argv=None) -> dict:
    p = common.parser("demo_sweep", __doc__.split("\n\n")[0])
    p.prog = "python -m indomain.demo.sweep"
    p.add_argument("--coverage", choices=("partial", "full"), default="partial",
                   help="the domain pictures' disc colours: partial = red and blue (the demo), full = all four")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated row:cfg:domain_weight, row one of base, naive, decoupled")
    p.add_argument("--seeds", type=int, default=8, help="columns (one seed and prompt each; 4 pictures per column)")
    args = p.parse_args(argv)
    settings = [s.strip().split(":") for s in args.settings.split(",") if s.strip()]
    bad = [":".join(s) for s in settings if len(s) != 3 or s[0] not in ("base", "naive", "decoupled")]
    if bad:  # before any training
        p.error(f"bad --settings {', '.join(bad)}: each is row:cfg:domain_weight, row one of base, naive, decoupled")
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..devkit import demo_world, host

    host.import_comfy()
    from .run import COLUMN_COLOURS, DemoConfig, Progress, train_domain_unet

    torch.set_flush_denormal(True)  # as the demo: subnormal Adam moments are slow on CPU
    # the domain pictures and the fine-tune go beside the JSON
    cfg = DemoConfig(out_dir=args.out.parent / f"demo_sweep_{args.coverage}{'_fast' if args.fast else ''}")
    sample_steps, seeds = cfg.sample_steps, args.seeds
    if args.fast:
        cfg.base_steps, cfg.train_steps, cfg.images, sample_steps, seeds = 4, 3, 8, 2, 2
    colours = tuple(demo_world.COLOURS) if args.coverage == "full" else demo_world.DOMAIN_COLOURS
    progress = Progress(1)
    base = demo_world.demo_checkpoint(cfg.base_steps, cfg.base_batch, cfg.base_lr, log=progress.say)
    images = demo_world.draw_domain_pictures(cfg.out_dir / "domain_images", cfg.images, colours=colours)
    models = cfg.out_dir / "models"
    naive = models / "domain_unets" / f"naive_b{cfg.base_steps}_t{cfg.train_steps}_{args.coverage}.safetensors"
    if not naive.exists():
        train_domain_unet(base, images, naive, cfg, progress, form="plain")

    import comfy.latent_formats
    import comfy.sd

    from ..devkit.domain import load_checkpoint

    runner = host.InProcessComfy(models_dir=models, default_dirs=False)
    base_model, clip, _ = load_checkpoint(base)
    naive_model = comfy.sd.load_diffusion_model(str(naive))
    domain_model = common.first_output(runner.node("InDomainLoadDomainUNet").execute(
        model=base_model, domain_unet_name=naive.name))
    encode = runner.nodes.CLIPTextEncode().encode
    negative = encode(clip, "")[0]
    latent_format = comfy.latent_formats.SD15()

    def pictures(row: str, cfg_: float, weight: float) -> tuple[np.ndarray, list[str]]:
        out, asked = [], []
        for i in range(seeds):
            colour = COLUMN_COLOURS[i % len(COLUMN_COLOURS)]
            positive = encode(clip, demo_world.prompt(colour))[0]
            latent = {"samples": torch.zeros(cfg.batch, 4, 8, 8)}
            if row == "decoupled":
                lat = common.first_output(runner.node("InDomainKSampler").execute(
                    model=base_model, domain_model=domain_model, seed=i + 1, steps=sample_steps, cfg=cfg_,
                    domain_weight=weight, sampler_name="dpmpp_2m", scheduler="karras", positive=positive,
                    negative=negative, latent_image=latent, denoise=1.0))["samples"]
            else:
                model = base_model if row == "base" else naive_model
                lat = runner.nodes.common_ksampler(model, i + 1, sample_steps, cfg_, "dpmpp_2m", "karras", positive,
                                                   negative, latent)[0]["samples"]
            cells = demo_world.latent_to_cells(latent_format.process_in(lat.float()))
            out.append(demo_world.to_pixels(cells))
            asked += [colour] * cfg.batch
        return np.concatenate(out), asked

    rows = []
    for row, cfg_, weight in settings:
        spec = f"{row}:{cfg_}:{weight}"
        t = time.perf_counter()
        px, asked = pictures(row, float(cfg_), float(weight))
        follows = demo_world.follows_ask(px, asked)
        per_colour = {c: float(follows[[a == c for a in asked]].mean()) for c in COLUMN_COLOURS if c in asked}
        rows.append({"row": row, "cfg": float(cfg_), "domain_weight": float(weight), "pictures": len(asked),
                     "control": float(follows.mean()), "control_by_colour": per_colour,
                     "stripe": float(demo_world.stripe_score(px).mean()), "seconds": time.perf_counter() - t})
        progress.say(f"{spec}: control {rows[-1]['control']:.3f} stripe {rows[-1]['stripe']:+.3f} {per_colour}")
    print(common.table(["row", "cfg", "domain weight", "control", "stripe", "control by colour"],
                       [[r["row"], r["cfg"], r["domain_weight"], r["control"], r["stripe"],
                         " ".join(f"{c} {v:.2f}" for c, v in r["control_by_colour"].items())] for r in rows],
                       title=f"demo sweep, domain coverage {args.coverage}"))
    payload = {"bench": "demo_sweep", "fast": args.fast, "coverage": args.coverage, "environment": common.environment(),
               "config": {"base_steps": cfg.base_steps, "train_steps": cfg.train_steps, "images": cfg.images,
                          "sample_steps": sample_steps, "seeds": seeds, "batch": cfg.batch}, "rows": rows}
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
