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
    coverage: str = "full"           # their disc colours: "full" all four (the paper's setting: the domain holds what
                                     # the prompts ask for), "partial" red and blue only
    image_px: int = demo_world.PX    # 64 px = 8x8 latents for the tiny SD1.5-layout UNet
    base_steps: int = 300            # the tiny base UNet's training on the plain world (cached in .cache/models)
    base_batch: int = 16
    base_lr: float = 1e-3            # peak; warm-up then cosine decay (demo_world.base_lr_at)
    train_steps: int = 600           # the fine-tunes (naive and domain model), trained by the pack's trainer
    train_batch: int = 8
    form: str = "plain"              # the decoupled row's domain model: "plain" (the naive row's own file, used as
                                     # the domain term: the two rows differ only in how the same weights are used;
                                     # one fine-tune instead of two), "full" (the paper's null-text UNet copy,
                                     # trained with the same steps, lr and seed) or "lora"
    lora_rank: int = 8
    lr: float | None = None          # None: the form's toy-scale rate, see learning_rate()
    sample_steps: int = 25           # the paper's setting: 25 steps dpmpp_2m karras
    cfg: float = CONTROL_WEIGHT_START
    domain_weight: float = DOMAIN_WEIGHT_START
    domain_start: float = 0.5        # the domain term's domain_start_percent: the base alone lays out the first half
                                     # of the steps (from the start, the domain term floods or recolours discs; see
                                     # docs/performance.md "The demo", where the plain fine-tune gets the same hand-over)
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    batch: int = 4                   # pictures per column (the statistics use all; the picture shows the first)
    prompt: str | None = None        # None: one colour per column (COLUMN_COLOURS)
    base: Path | None = None         # use this checkpoint instead of the built tiny one
    domain_unet: Path | None = None  # use this domain UNet instead of training one
    naive_unet: Path | None = None   # use this plain fine-tune (a UNet file) instead of training one
    fast: bool = False               # quick mode for tests: half the fine-tune, 12 sampling steps

    def shrink(self) -> "DemoConfig":
        self.train_steps, self.sample_steps = 300, 12
        return self

    def learning_rate(self, form: str | None = None) -> float:
        # toy scale (the paper's 1e-5 is for real SD weights and thousands of steps); an adapter starts at zero
        # and needs a larger step (the toy benchmark: LoRA 1e-3, full 2e-4)
        form = form or self.form
        return self.lr if self.lr is not None else {"lora": 2e-3}.get(form, 3e-4)

    def domain_colours(self) -> tuple[str, ...]:
        return demo_world.PARTIAL_COLOURS if self.coverage == "partial" else tuple(demo_world.COLOURS)

    def domain_discs_text(self) -> str:
        return "red and blue discs only" if self.coverage == "partial" else "discs of all four colours"

    def prompts(self) -> list[str]:
        return [self.prompt or demo_world.prompt(COLUMN_COLOURS[i % len(COLUMN_COLOURS)])
                for i in range(len(self.seeds))]


# one colour per column (with --coverage partial the first asks for a colour the domain lacks)
COLUMN_COLOURS = ("green", "red", "yellow", "blue")


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


def draw_domain_images(folder: Path, count: int, seed: int = 0, colours=None) -> Path:
    """'Sunset stripes': pink horizontal bands across the cream ground, one disc each (unlabelled), drawn on the
    8x8-cell grid the linear VAE maps exactly to latents; a style the base never saw. `colours`: the discs'
    colours (default all four)."""
    return demo_world.draw_domain_pictures(folder, count, seed, colours)


def row_statistics(paths, asked: list[str] | None) -> dict:
    """The two statistics of some pictures: the stripe score (the domain, devkit.demo_world.stripe_score) per
    picture and its mean, and with `asked` (one colour per picture) the control score (demo_world.follows_ask:
    the fraction of pictures with a disc of the asked colour on a ground)."""
    pictures = demo_world.load_pictures(paths)
    scores = demo_world.stripe_score(pictures)
    out = {"stripe": round(float(scores.mean()), 4), "stripe_per_image": [round(float(v), 4) for v in scores]}
    if asked is not None:
        follows = demo_world.follows_ask(pictures, asked)
        out.update(control=round(float(follows.mean()), 4), follows_per_image=[bool(v) for v in follows],
                   asked=list(asked))
    return out


# ----------------------------------------------------------------------------- 3. training


def train_domain_unet(base_ckpt: Path, images: Path, out_path: Path, cfg: DemoConfig, progress: Progress,
                      form: str | None = None) -> Path:
    """One fine-tune on the domain pictures (empty captions) through the pack's trainer: `form` "plain" (the
    naive fine-tune: the unmodified base UNet), "full" or "lora" (a domain model). Same steps, batch, seed."""
    from ..devkit.domain import load_checkpoint
    from ..training.trainer import TrainConfig, train

    model, clip, vae = load_checkpoint(base_ckpt)
    every = max(1, cfg.train_steps // 10)

    def on_step(step, total, loss, images_per_s):
        if step == 1 or step % every == 0 or step == total:
            progress.say(f"    train step {step}/{total}  loss {loss:.4f}  {images_per_s:.1f} img/s")

    form = form or cfg.form
    config = TrainConfig(steps=cfg.train_steps, lr=cfg.learning_rate(form), batch_size=cfg.train_batch,
                         resolution=cfg.image_px, form=form, lora_rank=cfg.lora_rank,
                         save_every=0, ema_decay=0.999, calibration_images=min(16, cfg.images),
                         keep_resume_state=False, cache_dir=str(cfg.out_dir / "latent_cache"))
    result = train(model, clip, vae, images, config, out_path, progress=on_step)
    del model, clip, vae, result
    gc.collect()
    return out_path


# ----------------------------------------------------------------------------- 5. the comparison picture


def side_by_side(rows: list[tuple[str, list[Path]]], title: str, out_path: Path, columns: list[str] = (),
                 cell: int = 160, footer: str = "") -> Path:
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
        d.multiline_text((pad, y + cell // 2 - 34), label, fill=(0, 0, 0), font=font, spacing=4)
        for c, p in enumerate(paths):
            with Image.open(p) as im:
                tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_w + c * (cell + pad) + pad, y))
    d.text((pad, H - 20), footer, fill=(90, 90, 90), font=small)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.stem + ".partial.png")
    sheet.save(tmp)
    tmp.replace(out_path)
    return out_path


# ----------------------------------------------------------------------------- the whole run


ROWS = (("base", "base model + CFG"), ("naive", "plain fine-tune + CFG"),
        ("decoupled", "decoupled guidance:\nbase + domain model"))


def row_workflow(key: str, cfg: DemoConfig, text: str, seed: int) -> dict:
    """The shared text-guided workflow's API twin for one row and column. base: domain weight 0 (bit-exact core
    CFG on the base); naive: the same, its MODEL the plain fine-tune through core's UNETLoader; decoupled: the
    base and the domain model at cfg.domain_weight."""
    wf = load_workflow(WORKFLOW)
    weight = cfg.domain_weight if key == "decoupled" else 0.0
    apply_overrides(wf, prompt=text, negative="", seed=seed, steps=cfg.sample_steps, cfg=cfg.cfg,
                    domain_weight=weight, checkpoint="demo_base.safetensors", domain_unet="demo_domain.safetensors",
                    width=cfg.image_px, height=cfg.image_px, batch_size=cfg.batch,
                    filename_prefix=f"demo_{key}_s{seed}")
    sampler = next(k for k, n in wf.items() if n["class_type"] == "InDomainKSampler")
    if key == "decoupled":
        wf[sampler]["inputs"]["domain_start_percent"] = cfg.domain_start
    if key == "naive":
        wf["90"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "demo_naive.safetensors",
                                                           "weight_dtype": "default"},
                    "_meta": {"title": "Load Diffusion Model (the plain fine-tune)"}}
        wf[sampler]["inputs"]["model"] = ["90", 0]
    return wf


def row_label(key: str, title: str, cfg: DemoConfig, st: dict) -> str:
    setting = (f"cfg {cfg.cfg:g}, domain weight {cfg.domain_weight:g}\nfrom {cfg.domain_start:.0%} of the steps"
               if key == "decoupled"
               else f"cfg {cfg.cfg:g}, domain weight 0")
    return f"{title}\n({setting})\ncontrol {st['control']:.2f}  stripe {st['stripe']:+.2f}"


def run_demo(cfg: DemoConfig) -> Path:
    from ..devkit.host import ComfyServer

    import torch

    # CPU training: Adam's second moments of tiny gradients can go subnormal, and subnormal arithmetic is
    # slow (a guard; its effect here was not measured)
    torch.set_flush_denormal(True)
    progress = Progress(7)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = cfg.prompts()

    progress.step(f"drawing {cfg.images} built-in domain images ('sunset stripes': {cfg.domain_discs_text()} "
                  f"on pink bands, {cfg.image_px} px)")
    images = draw_domain_images(out / "domain_images", cfg.images, colours=cfg.domain_colours())

    if cfg.base:
        base = Path(cfg.base)
        progress.step(f"base checkpoint: {base}")
    else:
        progress.step("building the tiny SD1.5-layout base checkpoint: a linear VAE (decoded latents are pictures) "
                      "and a UNet trained on discs of four colours on a cream ground (deterministic; cached in "
                      ".cache/models)")
        base = demo_world.demo_checkpoint(cfg.base_steps, cfg.base_batch, cfg.base_lr, log=progress.say)

    models = out / "models"
    if cfg.naive_unet:
        naive = Path(cfg.naive_unet)
        progress.step(f"plain fine-tune: {naive} (not retrained)")
    else:
        progress.step(f"training the plain fine-tune (the naive way: the base UNet on the domain pictures with "
                      f"empty captions): {cfg.train_steps} steps, batch {cfg.train_batch}, lr {cfg.learning_rate('plain'):g}")
        naive = train_domain_unet(base, images, models / "demo_naive.safetensors", cfg, progress, form="plain")

    if cfg.domain_unet:
        domain = Path(cfg.domain_unet)
        progress.step(f"domain model: {domain} (not retrained)")
    elif cfg.form == "plain":
        domain = naive
        progress.step("domain model: the plain fine-tune itself, used as the domain term")
    else:
        what = f"LoRA form, rank {cfg.lora_rank}" if cfg.form == "lora" else "full form: a null-text UNet copy"
        progress.step(f"training the domain model ({what}) on the same pictures: {cfg.train_steps} steps, batch "
                      f"{cfg.train_batch}, lr {cfg.learning_rate():g}")
        domain = train_domain_unet(base, images, models / "demo_domain.safetensors", cfg, progress)
    progress.say(f"    domain model file: {domain} ({domain.stat().st_size / 2**20:.1f} MiB)")

    progress.step("starting ComfyUI headless (real server, 127.0.0.1)")
    server_base = out / "server"
    if server_base.exists():
        shutil.rmtree(server_base)
    server = ComfyServer(server_base, models={"checkpoints": {"demo_base.safetensors": base},
                                              "diffusion_models": {"demo_naive.safetensors": naive},
                                              "domain_unets": {"demo_domain.safetensors": domain}})
    server.start()
    generated, shown = {}, {}
    try:
        progress.say(f"    server up at {server.url}")
        client = ComfyClient(server.url)
        progress.step(f"running {WORKFLOW.relative_to(PACK_ROOT)} over HTTP: base CFG, plain fine-tune CFG, "
                      f"decoupled; seeds {cfg.seeds}, {cfg.batch} pictures each, {cfg.sample_steps} steps")
        images_dir = out / "images"
        if images_dir.exists():
            shutil.rmtree(images_dir)
        for key, _title in ROWS:
            generated[key], shown[key] = [], []
            for seed, text in zip(cfg.seeds, prompts):
                result = client.run(row_workflow(key, cfg, text, seed), out_dir=images_dir, timeout=600)
                progress.say(f"    {key:>9}, seed {seed}, \"{text}\": {len(result.images)} pictures "
                             f"({result.seconds:.1f}s)")
                generated[key].extend(result.images[:cfg.batch])
                shown[key].append(result.images[0])
    finally:
        server.stop()

    progress.step("measuring control and domain, composing the picture")
    refs = sorted(images.glob("*.png"))
    colour_of = [t.split()[1] if t.startswith("a ") and len(t.split()) > 1 else "" for t in prompts]
    per_picture = [c for c in colour_of for _ in range(cfg.batch)]
    can_score = all(c in demo_world.COLOURS for c in colour_of)
    stats = {key: row_statistics(generated[key], per_picture if can_score else None) for key, _ in ROWS}
    stats["domain images"] = row_statistics(refs, None)
    progress.say("    control = the fraction of pictures with a disc of the asked colour on a ground (each 8x8 cell "
                 "classed to the nearest palette colour; devkit/demo_world.py follows_ask)")
    progress.say("    stripe = the domain's 32-px horizontal banding (luminance Fourier amplitude down the columns "
                 "minus across the rows; a plain disc scores about 0, the domain's pictures about 0.12)")
    for key, st in stats.items():
        ctl = f"control {st['control']:.2f}" if "control" in st else "control  -  "
        progress.say(f"    {key:>13}: {ctl}  stripe {st['stripe']:+.3f}")
    gap = stats["decoupled"]["stripe"] - stats["base"]["stripe"]
    progress.say(f"    decoupled minus base: stripe {gap:+.3f} (the domain images score {stats['domain images']['stripe']:.3f})")
    title = (f"InDomain demo: {cfg.prompt and repr(cfg.prompt) or 'one prompt per column'}  |  "
             f"{cfg.sample_steps} steps dpmpp_2m karras  |  figures over {cfg.batch} pictures per column")
    rows = []
    for key, title_ in ROWS:
        st = stats[key]
        rows.append((row_label(key, title_, cfg, st) if "control" in st else f"{title_}\nstripe {st['stripe']:+.2f}",
                     shown[key]))
    rows.append((f"the domain (training images:\n{cfg.domain_discs_text()})\nstripe {stats['domain images']['stripe']:+.2f}",
                 refs[:len(cfg.seeds)]))
    footer = ("each column: the same seed, prompt and steps in every row; " +
              ("the decoupled row's domain model is the plain fine-tune's own file" if domain == naive else
               "the plain fine-tune and the domain model: the same pictures, steps and seed"))
    sheet = side_by_side(rows, title, out / "indomain_demo.png", footer=footer,
                         columns=[f"seed {s}: {t}" if not cfg.prompt else f"seed {s}" for s, t in zip(cfg.seeds, prompts)])
    report = {"config": {k: str(v) for k, v in cfg.__dict__.items()}, "prompts": prompts, "image": str(sheet),
              "statistics": {"control": "follows_ask (devkit/demo_world.py)", "stripe": "stripe_score (devkit/demo_world.py)"},
              "rows": {key: [p.name for p in generated[key]] for key, _ in ROWS},
              "scores": stats, "decoupled_minus_base": round(gap, 4),
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
    ap.add_argument("--domain-start", type=float,
                    help="the decoupled row's domain_start_percent (default 0.5: the base alone for the first half)")
    ap.add_argument("--prompt", help="one prompt for every column (default: 'a green disc', 'a red disc', 'a yellow disc', 'a blue disc'; the control statistic needs 'a <colour> disc')")
    ap.add_argument("--base", type=Path, help="use this base checkpoint instead of the built tiny one")
    ap.add_argument("--domain-unet", type=Path, help="use this domain UNet file instead of training one")
    ap.add_argument("--naive-unet", type=Path, help="use this plain fine-tune (a UNet file) instead of training one")
    ap.add_argument("--form", choices=("plain", "full", "lora"), default="plain",
                    help="the decoupled row's domain model (default plain: the naive row's fine-tune itself; full: "
                         "the paper's null-text UNet copy; lora: a rank-8 adapter on the base's own weights)")
    ap.add_argument("--coverage", choices=("full", "partial"), default="full",
                    help="the domain pictures' disc colours: full = all four (default, the paper's setting), "
                         "partial = red and blue only (the columns asking green and yellow ask outside the domain)")
    ap.add_argument("--batch", type=int, help="pictures per column (default 4; the statistics use all of them)")
    ap.add_argument("--lr", type=float, help="fine-tune learning rate (default: 3e-4; 2e-3 for the lora form)")
    args = ap.parse_args(argv)
    cfg = DemoConfig(out_dir=args.out, base=args.base, domain_unet=args.domain_unet, naive_unet=args.naive_unet,
                     fast=args.fast, form=args.form, lr=args.lr,
                     coverage=args.coverage)
    if args.fast:
        cfg.shrink()
    for name in ("train_steps", "base_steps", "sample_steps", "domain_weight", "domain_start", "prompt", "batch"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    for p in (cfg.base, cfg.domain_unet, cfg.naive_unet):
        if p is not None and not Path(p).is_file():
            print(f"error: {p} not found", file=sys.stderr)
            return 2
    sheet = run_demo(cfg)
    print(f"\nDemo image: {sheet}")
    return 0
