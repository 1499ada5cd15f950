"""The demo's rows over control and domain weights, in-process: control and stripe per setting.

The demo (`python -m indomain.demo`) runs one setting over HTTP; this sweeps the same models and sampler
(25 steps dpmpp_2m karras, the demo's prompts and seeds) through the same nodes called in-process: core
KSampler on the base and on the plain fine-tune, InDomainLoadDomainUNet + InDomainKSampler with the plain
fine-tune as the domain term (the demo's default form). `--coverage partial` draws the domain's discs in red
and blue only, `--low violet` puts its pink bands over dark violet instead of the cream ground. Figures:
control (fraction of pictures following the ask, devkit/demo_world.py follows_ask), per asked colour, and the
mean stripe score; a PNG of each row's pictures goes beside the fine-tune.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..bench import common

SETTINGS = ("base:2.5:0", "naive:2.5:0", "naive:2.5:0:0.3", "naive:2.5:0:0.5", "decoupled:2.5:2", "decoupled:2.5:1.5",
            "decoupled:2.5:1", "decoupled:2.5:2:0.3", "decoupled:2.5:2:0.5", "decoupled:2.5:1.5:0.5")


def _save_grid(px: np.ndarray, path: Path, per_row: int = 8) -> None:
    from PIL import Image

    n = len(px) // per_row * per_row
    rows = [np.concatenate(list(px[i:i + per_row]), axis=1) for i in range(0, n, per_row)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv=None) -> dict:
    p = common.parser("demo_sweep", __doc__.split("\n\n")[0])
    p.prog = "python -m indomain.demo.sweep"
    p.add_argument("--coverage", choices=("full", "partial"), default="full",
                   help="the domain pictures' disc colours: full = all four (the demo), partial = red and blue")
    p.add_argument("--low", choices=("cream", "violet"), default="cream",
                   help="the ground between the pink bands: cream (the demo's domain: the base's own ground) or dark violet")
    p.add_argument("--train-steps", type=int, help="the plain fine-tune's steps (default: the demo's)")
    p.add_argument("--lr", type=float, help="the plain fine-tune's learning rate (default: the demo's)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated row:cfg:domain_weight[:domain_start_percent], row one of base, naive, decoupled; "
                        "naive with a start s runs the base for the first s of the steps, then the fine-tune")
    p.add_argument("--seeds", type=int, default=8, help="columns (one seed and prompt each; 4 pictures per column)")
    args = p.parse_args(argv)
    settings = [s.strip().split(":") for s in args.settings.split(",") if s.strip()]
    bad = [":".join(s) for s in settings if len(s) not in (3, 4) or s[0] not in ("base", "naive", "decoupled")]
    if bad:  # before any training
        p.error(f"bad --settings {', '.join(bad)}: each is row:cfg:domain_weight[:domain_start_percent], row one of "
                "base, naive, decoupled")
    settings = [s + ["0"] * (4 - len(s)) for s in settings]
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..devkit import demo_world, host

    host.import_comfy()
    from .run import COLUMN_COLOURS, DemoConfig, Progress, train_domain_unet

    torch.set_flush_denormal(True)  # as the demo: subnormal Adam moments are slow on CPU
    # the domain pictures and the fine-tune go beside the JSON
    cfg = DemoConfig(out_dir=args.out.parent / f"demo_sweep_{args.coverage}{'_fast' if args.fast else ''}",
                     coverage=args.coverage, lr=args.lr)
    sample_steps, seeds = cfg.sample_steps, args.seeds
    if args.fast:
        cfg.base_steps, cfg.train_steps, cfg.images, sample_steps, seeds = 4, 3, 8, 2, 2
    if args.train_steps:
        cfg.train_steps = args.train_steps
    progress = Progress(1)
    base = demo_world.demo_checkpoint(cfg.base_steps, cfg.base_batch, cfg.base_lr, log=progress.say)
    images = demo_world.draw_domain_pictures(cfg.out_dir / f"domain_images_{args.low}", cfg.images,
                                             colours=cfg.domain_colours(), low=demo_world.GROUNDS[args.low])
    models = cfg.out_dir / "models"
    naive = models / "domain_unets" / f"naive_b{cfg.base_steps}_t{cfg.train_steps}_lr{cfg.learning_rate('plain'):g}_{args.coverage}_{args.low}.safetensors"
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

    def pictures(row: str, cfg_: float, weight: float, start: float) -> tuple[np.ndarray, list[str]]:
        out, asked = [], []
        for i in range(seeds):
            colour = COLUMN_COLOURS[i % len(COLUMN_COLOURS)]
            positive = encode(clip, demo_world.prompt(colour))[0]
            latent = {"samples": torch.zeros(cfg.batch, 4, 8, 8)}
            if row == "decoupled":
                lat = common.first_output(runner.node("InDomainKSampler").execute(
                    model=base_model, domain_model=domain_model, seed=i + 1, steps=sample_steps, cfg=cfg_,
                    domain_weight=weight, sampler_name="dpmpp_2m", scheduler="karras", positive=positive,
                    negative=negative, latent_image=latent, denoise=1.0, domain_start_percent=start))["samples"]
            elif row == "naive" and start > 0:
                # the matched remedy: the base for the first `start` of the steps, then the fine-tune (core's
                # two-sampler hand-over, as a refiner is chained)
                k = round(start * sample_steps)
                first = runner.nodes.common_ksampler(base_model, i + 1, sample_steps, cfg_, "dpmpp_2m", "karras",
                                                     positive, negative, latent, last_step=k)[0]
                lat = runner.nodes.common_ksampler(naive_model, i + 1, sample_steps, cfg_, "dpmpp_2m", "karras",
                                                   positive, negative, first, disable_noise=True,
                                                   start_step=k)[0]["samples"]
            else:
                model = base_model if row == "base" else naive_model
                lat = runner.nodes.common_ksampler(model, i + 1, sample_steps, cfg_, "dpmpp_2m", "karras", positive,
                                                   negative, latent)[0]["samples"]
            cells = demo_world.latent_to_cells(latent_format.process_in(lat.float()))
            out.append(demo_world.to_pixels(cells))
            asked += [colour] * cfg.batch
        return np.concatenate(out), asked

    rows = []
    for row, cfg_, weight, start in settings:
        spec = f"{row}:{cfg_}:{weight}:{start}"
        t = time.perf_counter()
        px, asked = pictures(row, float(cfg_), float(weight), float(start))
        follows = demo_world.follows_ask(px, asked)
        _save_grid(px, naive.with_name(f"{naive.stem}_{row}_{cfg_}_{weight}_{start}.png"))
        per_colour = {c: float(follows[[a == c for a in asked]].mean()) for c in COLUMN_COLOURS if c in asked}
        rows.append({"row": row, "cfg": float(cfg_), "domain_weight": float(weight),
                     "domain_start_percent": float(start), "pictures": len(asked),
                     "control": float(follows.mean()), "control_by_colour": per_colour,
                     "stripe": float(demo_world.stripe_score(px).mean()), "seconds": time.perf_counter() - t})
        progress.say(f"{spec}: control {rows[-1]['control']:.3f} stripe {rows[-1]['stripe']:+.3f} {per_colour}")
    print(common.table(["row", "cfg", "domain weight", "domain start", "control", "stripe", "control by colour"],
                       [[r["row"], r["cfg"], r["domain_weight"], r["domain_start_percent"], r["control"], r["stripe"],
                         " ".join(f"{c} {v:.2f}" for c, v in r["control_by_colour"].items())] for r in rows],
                       title=f"demo sweep, domain coverage {args.coverage}"))
    payload = {"bench": "demo_sweep", "fast": args.fast, "coverage": args.coverage, "environment": common.environment(),
               "config": {"base_steps": cfg.base_steps, "train_steps": cfg.train_steps, "images": cfg.images,
                          "sample_steps": sample_steps, "seeds": seeds, "batch": cfg.batch}, "rows": rows}
    common.write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
