"""The demo pipeline (see the package docstring). Everything goes through the real product: the trainer,
a real ComfyUI server, the shared workflow's API twin and the headless client over HTTP."""
from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..client import ComfyClient, apply_overrides, load_workflow
from ..devkit import demo_world
from ..devkit.host import PACK_ROOT
from ..guidance.combine import CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START

WORKFLOW = PACK_ROOT / "workflows" / "api" / "indomain_2_text_guided.json"


@dataclass
class DemoConfig:
    out_dir: Path = PACK_ROOT / "out" / "demo"
    images: int = 32                 # built-in domain images
    image_px: int = demo_world.PX    # 64 px = 8x8 latents for the tiny SD1.5-layout UNet
    base_steps: int = 150            # the tiny base UNet's training on the plain world (cached in .cache/models)
    base_batch: int = 16
    base_lr: float = 1e-3
    train_steps: int = 150           # the domain model, trained by the pack's trainer
    train_batch: int = 8
    form: str = "lora"               # "lora" (adapter on the base's weights; matched the full form in the toy
                                     # benchmark's spread) or "full" (a null-text UNet copy)
    lora_rank: int = 8
    lr: float | None = None          # None: the form's toy-scale rate, see learning_rate()
    sample_steps: int = 25           # the paper's setting: 25 steps dpmpp_2m karras
    cfg: float = CONTROL_WEIGHT_START
    domain_weight: float = DOMAIN_WEIGHT_START
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    prompt: str | None = None        # None: one colour per column ("a red disc", "a green disc", ...)
    base: Path | None = None         # use this checkpoint instead of the built tiny one
    domain_unet: Path | None = None  # use this domain UNet instead of training one
    fast: bool = False               # quick mode for tests: fewer steps and seeds, the domain still learned

    def shrink(self) -> "DemoConfig":
        self.images, self.train_steps, self.sample_steps, self.seeds = 16, 60, 12, [1, 2]
        return self

    def learning_rate(self) -> float:
        # toy scale (the paper's 1e-5 is for real SD weights and thousands of steps); an adapter starts at zero
        # and needs a larger step (the toy benchmark: LoRA 1e-3, full 2e-4; the demo's --fast: LoRA 1e-3 gave a
        # stripe score of +0.13, 2e-3 +0.20, the full form at 3e-4 +0.24)
        return self.lr if self.lr is not None else {"lora": 2e-3}.get(self.form, 3e-4)

    def prompts(self) -> list[str]:
        colours = list(demo_world.COLOURS)
        return [self.prompt or demo_world.prompt(colours[i % len(colours)]) for i in range(len(self.seeds))]


class Progress:
    def __init__(self, total_stages: int):
        self.total = total_stages
        self.stage = 0
        self.t0 = time.monotonic()

    def step(self, msg: str) -> None:
        self.stage += 1
        self.say(f"[{self.stage}/{self.total}] {msg}")

    def say(self, msg: str) -> None:
        print(f"[demo {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. the built-in domain


def draw_domain_images(folder: Path, count: int, seed: int = 0) -> Path:
    """'Sunset stripes': warm horizontal bands over a dark violet ground, one coloured disc each (unlabelled),
    drawn on the 8x8-cell grid the linear VAE maps exactly to latents; a style the base never saw."""
    return demo_world.draw_domain_pictures(folder, count, seed)


def domain_statistic(paths) -> dict:
    """The stripe score (devkit.demo_world.stripe_score) of some pictures: per picture, mean, min."""
    scores = demo_world.stripe_score(demo_world.load_pictures(paths))
    return {"per_image": [round(float(v), 4) for v in scores], "mean": round(float(scores.mean()), 4),
            "min": round(float(scores.min()), 4)}


# ----------------------------------------------------------------------------- 3. training


def train_domain_unet(base_ckpt: Path, images: Path, out_path: Path, cfg: DemoConfig, progress: Progress) -> Path:
    from ..devkit.domain import load_checkpoint
    from ..training.trainer import TrainConfig, train

    model, clip, vae = load_checkpoint(base_ckpt)
    every = max(1, cfg.train_steps // 10)

    def on_step(step, total, loss, images_per_s):
        if step == 1 or step % every == 0 or step == total:
            progress.say(f"    train step {step}/{total}  loss {loss:.4f}  {images_per_s:.1f} img/s")

    config = TrainConfig(steps=cfg.train_steps, lr=cfg.learning_rate(), batch_size=cfg.train_batch,
                         resolution=cfg.image_px, form=cfg.form, lora_rank=cfg.lora_rank,
                         save_every=0, ema_decay=0.999, calibration_images=min(16, cfg.images),
                         keep_resume_state=False, cache_dir=str(cfg.out_dir / "latent_cache"))
    result = train(model, clip, vae, images, config, out_path, progress=on_step)
    del model, clip, vae, result
    gc.collect()
    return out_path


# ----------------------------------------------------------------------------- 5. the comparison picture


def side_by_side(rows: list[tuple[str, list[Path]]], title: str, out_path: Path, columns: list[str] = (),
                 cell: int = 160) -> Path:
    """A grid: one labelled row per setting, one column per seed (nearest-neighbour upscaled)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=16)
        small = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = small = ImageFont.load_default()
    ncols = max(len(paths) for _, paths in rows)
    label_w, head_h, pad = 250, 56, 8
    W = label_w + ncols * (cell + pad) + pad
    H = head_h + len(rows) * (cell + pad) + pad + 22
    sheet = Image.new("RGB", (W, H), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    d.text((pad, 8), title, fill=(0, 0, 0), font=font)
    for c in range(ncols):
        d.text((label_w + c * (cell + pad) + pad, head_h - 20), columns[c] if c < len(columns) else "", fill=(60, 60, 60), font=small)
    for r, (label, paths) in enumerate(rows):
        y = head_h + r * (cell + pad)
        d.multiline_text((pad, y + cell // 2 - 20), label, fill=(0, 0, 0), font=font, spacing=4)
        for c, p in enumerate(paths):
            with Image.open(p) as im:
                tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (cell + pad) + pad, y))
    d.text((pad, H - 20), "each column: the same seed, prompt and steps in both rows; only the domain weight differs",
           fill=(90, 90, 90), font=small)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".partial.png")
    sheet.save(tmp)
    tmp.replace(out_path)
    return out_path


# ----------------------------------------------------------------------------- the whole run


def run_demo(cfg: DemoConfig) -> Path:
    from ..devkit.host import ComfyServer

    import torch

    # CPU training: Adam's second moments of tiny gradients can go subnormal, and subnormal arithmetic is
    # slow (a guard; its effect here was not measured)
    torch.set_flush_denormal(True)
    progress = Progress(6)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = cfg.prompts()

    progress.step(f"drawing {cfg.images} built-in domain images ('sunset stripes', {cfg.image_px} px)")
    images = draw_domain_images(out / "domain_images", cfg.images)

    if cfg.base:
        base = Path(cfg.base)
        progress.step(f"base checkpoint: {base}")
    else:
        progress.step("building the tiny SD1.5-layout base checkpoint: a linear VAE (decoded latents are pictures) "
                      "and a UNet trained briefly on discs on a cream ground (deterministic; cached in .cache/models)")
        base = demo_world.demo_checkpoint(cfg.base_steps, cfg.base_batch, cfg.base_lr, log=progress.say)

    if cfg.domain_unet:
        domain = Path(cfg.domain_unet)
        progress.step(f"domain UNet: {domain} (not retrained)")
    else:
        what = f"LoRA form, rank {cfg.lora_rank}" if cfg.form == "lora" else f"{cfg.form} form"
        progress.step(f"training the domain model ({what}): {cfg.train_steps} steps, batch {cfg.train_batch}, "
                      f"lr {cfg.learning_rate():g}")
        domain = train_domain_unet(base, images, out / "models" / "demo_domain.safetensors", cfg, progress)
    progress.say(f"    domain model file: {domain} ({domain.stat().st_size / 2**20:.1f} MiB)")

    progress.step("starting ComfyUI headless (real server, 127.0.0.1)")
    server_base = out / "server"
    if server_base.exists():
        shutil.rmtree(server_base)
    server = ComfyServer(server_base, models={"checkpoints": {"demo_base.safetensors": base},
                                              "domain_unets": {"demo_domain.safetensors": domain}})
    server.start()
    rows, generated = [], {}
    try:
        progress.say(f"    server up at {server.url}")
        client = ComfyClient(server.url)
        progress.step(f"running {WORKFLOW.relative_to(PACK_ROOT)} over HTTP: base CFG vs decoupled, "
                      f"seeds {cfg.seeds}, {cfg.sample_steps} steps")
        for key, label, weight in (("base", f"base model, CFG\n(cfg {cfg.cfg}, domain weight 0)", 0.0),
                                   ("decoupled", f"decoupled guidance\n(cfg {cfg.cfg}, domain weight "
                                                 f"{cfg.domain_weight})", cfg.domain_weight)):
            paths = []
            for seed, text in zip(cfg.seeds, prompts):
                wf = load_workflow(WORKFLOW)
                apply_overrides(wf, prompt=text, negative="", seed=seed, steps=cfg.sample_steps, cfg=cfg.cfg,
                                domain_weight=weight, checkpoint="demo_base.safetensors",
                                domain_unet="demo_domain.safetensors", width=cfg.image_px, height=cfg.image_px,
                                batch_size=1, filename_prefix=f"demo_w{weight:g}_s{seed}")
                result = client.run(wf, out_dir=out / "images", timeout=600)
                progress.say(f"    domain weight {weight:g}, seed {seed}, \"{text}\": {result.images[0].name} "
                             f"({result.seconds:.1f}s)")
                paths.extend(result.images[:1])
            rows.append((label, paths))
            generated[key] = paths
    finally:
        server.stop()

    progress.step("measuring the domain statistic and composing the side-by-side image")
    refs = sorted(images.glob("*.png"))
    stats = {"domain images": domain_statistic(refs), "base": domain_statistic(generated["base"]),
             "decoupled": domain_statistic(generated["decoupled"])}
    progress.say("    domain statistic = stripe score: the built-in domain's 32-px horizontal banding (luminance "
                 "Fourier amplitude down the columns minus across the rows; a plain disc scores about 0)")
    for name, st in stats.items():
        progress.say(f"    {name:>13}: mean {st['mean']:+.3f}  (per image {', '.join(f'{v:+.3f}' for v in st['per_image'][:8])}"
                     f"{', ...' if len(st['per_image']) > 8 else ''})")
    gap = stats["decoupled"]["mean"] - stats["base"]["mean"]
    progress.say(f"    decoupled minus base: {gap:+.3f} (the domain images score {stats['domain images']['mean']:.3f})")
    title = (f"InDomain demo: {cfg.prompt and repr(cfg.prompt) or 'one prompt per column'}  |  "
             f"{cfg.sample_steps} steps dpmpp_2m karras")
    rows.append(("the domain\n(training images)", refs[:len(cfg.seeds)]))
    labels = [f"{label}\nstripe score {stats[k]['mean']:+.2f}" for (label, _), k in
              zip(rows, ("base", "decoupled", "domain images"))]
    rows = [(lab, paths) for lab, (_, paths) in zip(labels, rows)]
    sheet = side_by_side(rows, title, out / "indomain_demo.png",
                         columns=[f"seed {s}: {t}" if not cfg.prompt else f"seed {s}" for s, t in zip(cfg.seeds, prompts)])
    report = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "prompts": prompts, "image": str(sheet),
              "statistic": "stripe_score (devkit/demo_world.py)", "scores": stats, "decoupled_minus_base": round(gap, 4),
              "seconds": round(time.monotonic() - progress.t0, 1)}
    tmp = out / "demo.json.partial"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "demo.json")
    progress.say("done")
    return sheet


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m indomain.demo", description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DemoConfig.out_dir, help="output folder (default out/demo)")
    ap.add_argument("--fast", action="store_true", help="smoke mode: a few steps everywhere (for tests)")
    ap.add_argument("--train-steps", type=int, help="domain UNet training steps")
    ap.add_argument("--base-steps", type=int, help="the built tiny base UNet's training steps (cached per setting)")
    ap.add_argument("--sample-steps", type=int)
    ap.add_argument("--domain-weight", type=float)
    ap.add_argument("--prompt", help="one prompt for every column (default: 'a red disc', 'a green disc', ...)")
    ap.add_argument("--base", type=Path, help="use this base checkpoint instead of the built tiny one")
    ap.add_argument("--domain-unet", type=Path, help="use this domain UNet file instead of training one")
    ap.add_argument("--form", choices=("lora", "full"), default="lora",
                    help="domain model form to train (default lora: a rank-8 adapter on the base's own weights)")
    ap.add_argument("--lr", type=float, help="training learning rate (default: 2e-3 for lora, 3e-4 for full)")
    args = ap.parse_args(argv)
    cfg = DemoConfig(out_dir=args.out, base=args.base, domain_unet=args.domain_unet, fast=args.fast, form=args.form,
                     lr=args.lr)
    if args.fast:
        cfg.shrink()
    for name in ("train_steps", "base_steps", "sample_steps", "domain_weight", "prompt"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for p in (cfg.base, cfg.domain_unet):
        if p is not None and not Path(p).is_file():
            print(f"error: {p} not found", file=sys.stderr)
            return 2
    sheet = run_demo(cfg)
    print(f"\nDemo image: {sheet}")
    return 0
