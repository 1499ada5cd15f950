"""`bash scripts/demo.sh --toy`: the toy world side by side, from the toy benchmark's cached models.

Rows are prompts ("a red square", ...); columns are (a) the base with CFG, (b) the naive fine-tune
on the unlabelled domain images with CFG, (c) decoupled guidance (base + null-text domain UNet,
through InDomainKSampler). Same seed in every cell of a row. Nothing is trained here: with no cached
models it exits with status 2 and names the command that builds them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..bench import toy
from ..devkit import toy_world as world
from ..pack import PACK_ROOT

PROMPTS = [("square", "red"), ("ring", "blue"), ("cross", "green"), ("triangle", "yellow"),
           ("square", "yellow"), ("ring", "green"), ("cross", "blue"), ("triangle", "red")]
NO_CACHE = 2


def _missing(manifest: Path, coverage: str, fast: bool = False) -> int:
    # --gates report: the picture needs the cached models whatever the instrument's gates say (they are printed)
    build = ("python -m indomain.bench.toy --gates report" + ("" if coverage == "full" else " --coverage partial")
             + (" --fast" if fast else ""))
    print(f"No cached toy-world models ({manifest} or a model file it names is missing). Build them first with:\n"
          f"    .venv/bin/{build}\n(then run `bash scripts/demo.sh --toy` again).", file=sys.stderr)
    return NO_CACHE


def picture(columns: list[tuple[str, object]], prompts: list[str], path: Path, scale: int = 14) -> Path:
    """Grid PNG: a header row of column labels, a label column of prompts, one 8x8 latent per cell."""
    from PIL import Image, ImageDraw

    from ..bench.toy.plot import _font

    cell, pad, left, top = world.SIZE * scale, 8, 130, 30
    w = left + len(columns) * (cell + pad) + pad
    h = top + len(prompts) * (cell + pad) + pad
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = _font(13)
    for j, (label, lat) in enumerate(columns):
        x0 = left + j * (cell + pad)
        d.text((x0, 6), label, fill="black", font=font)
        rgb = world.to_rgb(lat)
        for i in range(len(prompts)):
            tile = Image.fromarray(rgb[i]).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (x0, top + i * (cell + pad)))
    for i, text in enumerate(prompts):
        d.text((6, top + i * (cell + pad) + cell // 2 - 7), text, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.png")
    img.save(tmp)
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bash scripts/demo.sh --toy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--coverage", choices=world.COVERAGES, default="full",
                    help="which toy benchmark's models to use (default full)")
    ap.add_argument("--cfg", type=float, default=3.0, help="CFG / control weight for every column (default 3)")
    ap.add_argument("--domain-weight", type=float, default=2.0, help="domain weight of the decoupled column (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed index (default 0)")
    ap.add_argument("--out", type=Path, default=PACK_ROOT / "artifacts" / "demo" / "toy_world.png",
                    help="where to write the picture")
    ap.add_argument("--fast", action="store_true", help="use the models of `python -m indomain.bench.toy --fast` (tests)")
    args = ap.parse_args(argv)
    manifest = toy.cache_dir() / f"latest_{args.coverage}{'_fast' if args.fast else ''}.json"
    if not manifest.is_file():
        return _missing(manifest, args.coverage, args.fast)
    m = json.loads(manifest.read_text())
    models_dir = Path(m["models_dir"])
    names = {w: m["names"].get(f"{w} seed=0 short") for w in ("naive", "domain", "lora")}
    files = [models_dir / "checkpoints" / m["base"]]
    files += [models_dir / folder / names[w] if names[w] else None for w, folder in
              (("naive", "diffusion_models"), ("domain", "domain_unets"))]
    if any(f is None or not f.is_file() for f in files):
        return _missing(manifest, args.coverage, args.fast)

    from ..devkit import host

    host.import_comfy()
    import comfy.latent_formats

    fmt = comfy.latent_formats.SD15()
    cfg = toy.ToyConfig(**m["config"])
    cfg.samples_per_prompt = 1
    prompts = [world.prompt(s, c) for s, c in PROMPTS]
    runner = host.InProcessComfy(models_dir=models_dir, default_dirs=False)
    sampler = toy.ToySampler(runner, cfg, m["base"], prompts)
    points = [("(a) base", toy.Point("a", args.cfg, seed=args.seed)),
              ("(b) naive", toy.Point("b", args.cfg, seed=args.seed)),
              ("(c) decoupled", toy.Point("c", args.cfg, args.domain_weight, seed=args.seed))]
    columns = [(label, fmt.process_in(sampler.sample(pt, names))) for label, pt in points]
    sampler.release()
    import torch

    gen = torch.Generator().manual_seed(7)
    real = world.render_list(PROMPTS, gen, "domain")
    columns.append(("real domain", real))
    level = float(world.texture_level(real).mean())
    for label, lat in columns[:3]:
        print(f"{label}: domain texture level {float(world.texture_level(lat).mean()) / level:.2f} x real domain images")
    out = picture(columns, prompts, args.out)
    print(f"toy world picture: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
