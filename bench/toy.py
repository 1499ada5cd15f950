"""Toy-scale reproduction of the paper's claim, run through the product.

A procedural world of 4-channel 8x8 latents (devkit/toy_world.py: 4 shapes x 4 colours, plain
style), a base text-to-image model (the tiny SD15-layout UNet, trained here from scratch on
every "a <colour> <shape>" prompt with the checkpoint's own CLIP-L embeddings, 15% empty-prompt
dropout for CFG), and a domain of unlabelled images in a distinctive style (tinted, textured
background, shifted palette) that holds only 2 shapes x 2 colours. Then, same seeds and steps:

  (a) base + CFG                                   core KSampler
  (b) naive fine-tune on the domain, empty prompt  core UNETLoader + KSampler (CFG)
  (c) decoupled guidance, null-text domain UNet    InDomainLoadDomainUNet + InDomainKSampler

(b) and (c) are trained by the pack's trainer (indomain.training.trainer.train_on_latents,
form "plain" / "full") on the same latents, steps, lr and seed. Sampling runs as API-format
graphs on the real in-process ComfyUI. Evaluators (a small CNN with shape / colour / style
heads, trained here on procedural data of both styles) give control accuracy, a domain score
and the Fréchet distance to held-out domain images in their 64-d feature space.

    python -m indomain.bench.toy            # full (about 30-40 min on 2 CPU cores the first time; cached after)
    python -m indomain.bench.toy --fast     # tiny smoke run (figures meaningless)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common

TOY_VERSION = 1


@dataclass
class ToyConfig:
    base_steps: int = 240
    base_lr: float = 8e-4
    base_batch: int = 16
    p_uncond: float = 0.15
    domain_images: int = 256
    domain_steps: int = 60
    domain_lr: float = 2e-4
    domain_batch: int = 16
    ema_decay: float = 0.99
    evaluator_steps: int = 200
    samples_per_prompt: int = 8
    sample_steps: int = 10
    sampler: str = "euler"
    scheduler: str = "normal"
    cfg: float = 3.0
    domain_weight: float = 2.0
    seed: int = 0

    @classmethod
    def fast(cls) -> "ToyConfig":
        return cls(base_steps=3, base_batch=4, domain_images=8, domain_steps=2, domain_batch=4, evaluator_steps=20,
                   samples_per_prompt=2, sample_steps=3)

    def key(self, *fields_) -> str:
        d = dataclasses.asdict(self)
        blob = json.dumps({"v": TOY_VERSION, **{f: d[f] for f in fields_}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BASE_FIELDS = ("base_steps", "base_lr", "base_batch", "p_uncond", "seed")
DOMAIN_FIELDS = BASE_FIELDS + ("domain_images", "domain_steps", "domain_lr", "domain_batch", "ema_decay")


def cache_dir() -> Path:
    return Path(os.environ.get("INDOMAIN_CACHE", common.PACK_ROOT / ".cache")) / "toy"


def log(msg: str) -> None:
    print(f"[toy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- base model


def encode(clip, text: str) -> torch.Tensor:
    cond, _pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu()


def train_base(cfg: ToyConfig, model_patcher, clip) -> tuple[dict, list[float]]:
    """Train the tiny UNet from its deterministic init on the plain world, text-conditioned."""
    from indomain.devkit import toy_world as world
    from indomain.training.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas

    ms = model_patcher.get_model_object("model_sampling")
    combos = world.all_combos()
    contexts = torch.cat([encode(clip, world.prompt(s, c)) for s, c in combos])   # (16, 77, 768)
    empty = encode(clip, "")
    unet = detached_unet_copy(model_patcher)
    for p in unet.parameters():
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.base_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    losses = []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.base_steps):
            b = world.sample_batch(cfg.base_batch, gen, style="plain")
            combo_idx = b.shape * len(world.COLOURS) + b.colour  # all_combos() order: shape-major
            ctx = contexts[combo_idx]
            drop = torch.rand(cfg.base_batch, generator=gen) < cfg.p_uncond
            ctx[drop] = empty
            sigma = sample_sigmas(ms, cfg.base_batch, gen)
            noise = torch.randn(b.latents.shape, generator=gen)
            xc, t, x_noisy = noisy_inputs(ms, b.latents, sigma, noise)
            # linear warm-up keeps the from-scratch start stable
            for g in opt.param_groups:
                g["lr"] = cfg.base_lr * min(1.0, (step + 1) / 50)
            pred = unet(xc, t, context=ctx)
            loss = torch.nn.functional.mse_loss(pred, native_target(ms, sigma, b.latents, noise, x_noisy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == cfg.base_steps - 1:
                log(f"base step {step + 1}/{cfg.base_steps} loss {losses[-1]:.4f} "
                    f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}, losses


# ----------------------------------------------------------------------------- graphs


def sampler_graph(method: str, cfg: ToyConfig, names: dict, prompts: list[str], seeds: list[int]) -> tuple[dict, list[str]]:
    """One API-format graph sampling every prompt with one method; returns (graph, sampler node ids)."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["base"]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                             "batch_size": cfg.samples_per_prompt}},
    }
    model = ["ckpt", 0]
    if method.startswith("naive"):
        g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": names["naive"], "weight_dtype": "default"}}
        model = ["unet", 0]
    if method.startswith("decoupled"):
        g["dom"] = {"class_type": "InDomainLoadDomainUNet", "inputs": {"model": ["ckpt", 0],
                                                                        "domain_unet_name": names["domain"]}}
    ids = []
    for i, (text, seed) in enumerate(zip(prompts, seeds)):
        pos = ["neg", 0]
        if text:
            g[f"p{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
            pos = [f"p{i}", 0]
        common_inputs = {"seed": seed, "steps": cfg.sample_steps, "sampler_name": cfg.sampler,
                         "scheduler": cfg.scheduler, "positive": pos, "negative": ["neg", 0],
                         "latent_image": ["lat", 0], "denoise": 1.0}
        if method.startswith("decoupled"):
            g[f"s{i}"] = {"class_type": "InDomainKSampler", "inputs": dict(
                common_inputs, model=["ckpt", 0], domain_model=["dom", 0],
                cfg=0.0 if method.endswith("uncond") else cfg.cfg, domain_weight=cfg.domain_weight,
                domain_on_controlnet=False, domain_start_percent=0.0, domain_end_percent=1.0)}
        else:
            # unconditional rows: the model's empty-prompt prediction alone (cfg 1 = no guidance)
            g[f"s{i}"] = {"class_type": "KSampler", "inputs": dict(
                common_inputs, model=model, cfg=1.0 if method.endswith("uncond") else cfg.cfg)}
        ids.append(f"s{i}")
    return g, ids


# ----------------------------------------------------------------------------- main


METHODS = {
    "base_cfg": "(a) base + CFG",
    "naive_cfg": "(b) naive fine-tune (empty prompt) + CFG",
    "decoupled": "(c) decoupled: base CFG + null-text domain UNet",
    "naive_uncond": "(b0) naive fine-tune, empty prompt, no guidance",
    "decoupled_uncond": "(c0) decoupled, cfg 0 (u + w_d (d - u))",
}


def main(argv=None) -> dict:
    p = common.parser("toy", __doc__.split("\n\n")[0])
    for f in dataclasses.fields(ToyConfig):
        if f.type in ("int", "float", "str", int, float, str):
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=f"override {f.name} (default {f.default}; --fast uses smaller values)")
    p.add_argument("--docs-grid", type=Path, default=common.PACK_ROOT / "docs" / "toy_grid.png",
                   help="also write the sample grid here (full runs only)")
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    args = p.parse_args(argv)
    common.enable_stack_dumps()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ToyConfig.fast() if args.fast else ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    t_all = time.perf_counter()
    timings = {}

    from indomain.devkit import host, tiny_models
    from indomain.devkit import toy_world as world
    from indomain.devkit.domain import load_checkpoint

    host.import_comfy()
    root = cache_dir()
    models_dir = root / "models"
    for kind in ("checkpoints", "diffusion_models", "domain_unets"):
        (models_dir / kind).mkdir(parents=True, exist_ok=True)
    import comfy.latent_formats
    import comfy.model_management

    latent_format = comfy.latent_formats.SD15()

    # -- (1) base model, cached by its settings
    base_key = cfg.key(*BASE_FIELDS)
    base_name = f"toy_base_{base_key}.safetensors"
    base_path = models_dir / "checkpoints" / base_name
    base_record = root / f"toy_base_{base_key}.json"
    t = time.perf_counter()
    if args.retrain:
        for stale in [base_path, base_record]:
            stale.unlink(missing_ok=True)
    if not base_path.exists():
        log(f"training the base model ({cfg.base_steps} steps, batch {cfg.base_batch})")
        init_model, init_clip, _ = load_checkpoint(tiny_models.tiny_checkpoint(cfg.seed))
        sd, losses = train_base(cfg, init_model, init_clip)
        del init_model, init_clip
        comfy.model_management.unload_all_models()
        built = tiny_models.tiny_checkpoint(cfg.seed, unet_sd=sd, name=base_name)
        shutil.move(str(built), base_path)
        common.write_json(base_record, {"losses": losses, "config": dataclasses.asdict(cfg)})
        timings["base_training_s"] = time.perf_counter() - t
    else:
        log(f"base model cached: {base_path.name}")
    base_losses = json.loads(base_record.read_text())["losses"] if base_record.exists() else []

    base_model, base_clip, _ = load_checkpoint(base_path)

    # -- (2) the domain images (model space) and the two fine-tunes by the pack's trainer
    from indomain.training.trainer import TrainConfig, train_on_latents

    dom_gen = torch.Generator().manual_seed(cfg.seed + 100)
    domain_train = world.sample_batch(cfg.domain_images, dom_gen, style="domain", combos=world.domain_combos())
    comfy_latents = latent_format.process_out(domain_train.latents)  # the trainer takes VAE-space latents
    dom_key = cfg.key(*DOMAIN_FIELDS)
    names = {"base": base_name, "naive": f"toy_naive_{dom_key}.safetensors", "domain": f"toy_domain_{dom_key}.safetensors"}
    paths = {"naive": models_dir / "diffusion_models" / names["naive"],
             "domain": models_dir / "domain_unets" / names["domain"]}
    train_summaries = {}
    for which, form in (("naive", "plain"), ("domain", "full")):
        record = root / f"{paths[which].stem}.json"
        if paths[which].exists() and record.exists() and not args.retrain:
            log(f"{which} fine-tune cached: {paths[which].name}")
            train_summaries[which] = json.loads(record.read_text())
            continue
        log(f"training {which} ({'null-text UNet' if form == 'full' else 'unmodified UNet, empty prompt'}, "
            f"{cfg.domain_steps} steps)")
        t = time.perf_counter()
        tc = TrainConfig(steps=cfg.domain_steps, lr=cfg.domain_lr, batch_size=cfg.domain_batch, resolution=64,
                         hflip=0.0, seed=cfg.seed, save_every=0, form=form, ema_decay=cfg.ema_decay,
                         calibration_images=min(64, cfg.domain_images), keep_resume_state=False,
                         cache_dir=str(root / "latent_cache"))
        res = train_on_latents(base_model, base_clip, comfy_latents, tc, out_path=paths[which])
        secs = time.perf_counter() - t
        train_summaries[which] = {"first_loss": res.losses[0], "last_loss": res.losses[-1],
                                  "mean_loss_last_10": sum(res.losses[-10:]) / len(res.losses[-10:]),
                                  "steps": res.steps_done, "seconds": secs}
        timings[f"{which}_training_s"] = secs
        common.write_json(record, train_summaries[which])
        comfy.model_management.unload_all_models()

    # -- (3) evaluators
    t = time.perf_counter()
    log(f"training the evaluator ({cfg.evaluator_steps} steps)")
    evaluator, evaluator_acc = world.train_evaluator(cfg.evaluator_steps, cfg.seed + 7)
    timings["evaluator_s"] = time.perf_counter() - t

    # -- (4) sampling through the product (created now, so the node lists see the new model files)
    # output_dir stays ComfyUI's (no image is saved here): changing it would leak into a test session
    runner = host.InProcessComfy(models_dir=models_dir, default_dirs=False)  # don't redirect a test session's writes
    combos = world.all_combos()
    prompts = [world.prompt(s, c) for s, c in combos]
    seeds = [1000 + i for i in range(len(prompts))]
    n = cfg.samples_per_prompt
    ask_shape = torch.tensor([world.SHAPES.index(s) for s, _ in combos]).repeat_interleave(n)
    ask_colour = torch.tensor([world.COLOURS.index(c) for _, c in combos]).repeat_interleave(n)
    in_dom = torch.tensor([world.in_domain(s, c) for s, c in combos]).repeat_interleave(n)
    samples = {}
    for method in METHODS:
        t = time.perf_counter()
        if method.endswith("uncond"):
            graph, ids = sampler_graph(method, cfg, names, [""] * 4, [5000 + i for i in range(4)])
        else:
            graph, ids = sampler_graph(method, cfg, names, prompts, seeds)
        result = runner.run(graph, outputs=ids)
        lat = torch.cat([result.output(i)["samples"] for i in ids]).float()
        samples[method] = latent_format.process_in(lat)
        timings[f"sample_{method}_s"] = time.perf_counter() - t
        log(f"sampled {method}: {tuple(lat.shape)} in {timings[f'sample_{method}_s']:.1f}s")
        comfy.model_management.unload_all_models()

    # -- (5) metrics
    ref_gen = torch.Generator().manual_seed(cfg.seed + 200)
    n_dom = len(world.domain_combos()) * n
    ref_domain = world.sample_batch(n_dom, ref_gen, style="domain", combos=world.domain_combos())
    ref_domain2 = world.sample_batch(n_dom, ref_gen, style="domain", combos=world.domain_combos())
    held_combos = [c for c in combos if not world.in_domain(*c)]
    ref_held_domain = world.sample_batch(len(held_combos) * n, ref_gen, style="domain", combos=held_combos)
    ref_plain = world.sample_batch(n_dom, ref_gen, style="plain", combos=world.domain_combos())
    with torch.no_grad():
        feat_ref = evaluator.features(ref_domain.latents)
        feat_ref_held = evaluator.features(ref_held_domain.latents)

    def fd(x, ref):
        with torch.no_grad():
            return world.frechet_distance(evaluator.features(x), ref)

    rows = {}
    for method, lat in samples.items():
        if method.endswith("uncond"):
            ev = world.evaluate(evaluator, lat, torch.zeros(len(lat), dtype=torch.long), torch.zeros(len(lat), dtype=torch.long))
            rows[method] = {"label": METHODS[method], "samples": len(lat),
                            "domain_score": float(ev["p_domain"].mean()),
                            "fd_domain": fd(lat[:n_dom], feat_ref)}
            continue
        ev = world.evaluate(evaluator, lat, ask_shape, ask_colour)
        both = ev["shape_ok"] * ev["colour_ok"]
        rows[method] = {
            "label": METHODS[method], "samples": len(lat),
            "control_all": float(both.mean()),
            "control_domain_prompts": float(both[in_dom].mean()),
            "control_held_out_prompts": float(both[~in_dom].mean()),
            "shape_acc": float(ev["shape_ok"].mean()), "colour_acc": float(ev["colour_ok"].mean()),
            "domain_score_all": float(ev["p_domain"].mean()),
            "domain_score_held_out_prompts": float(ev["p_domain"][~in_dom].mean()),
            "fd_domain_prompts": fd(lat[in_dom], feat_ref),
            "fd_held_out_prompts_vs_domain_style": fd(lat[~in_dom], feat_ref_held),
        }
    references = {
        "fd_real_domain_vs_real_domain": fd(ref_domain2.latents, feat_ref),
        "fd_real_plain_vs_real_domain": fd(ref_plain.latents, feat_ref),
        "evaluator_accuracy_on_fresh_real_data": evaluator_acc,
    }

    # -- (6) output
    timings["total_s"] = time.perf_counter() - t_all
    payload = {
        "bench": "toy", "fast": args.fast, "config": dataclasses.asdict(cfg), "environment": common.environment(),
        "world": {"shapes": world.SHAPES, "colours": world.COLOURS, "domain_shapes": world.DOMAIN_SHAPES,
                  "domain_colours": world.DOMAIN_COLOURS, "latent": [4, world.SIZE, world.SIZE]},
        "models": {"base": names["base"], "naive": names["naive"], "domain": names["domain"],
                   "base_final_loss_mean_last_20": (sum(base_losses[-20:]) / max(1, len(base_losses[-20:]))
                                                    if base_losses else None),
                   "fine_tunes": train_summaries},
        "sampled_through": {"base_cfg": "CheckpointLoaderSimple + KSampler", "naive_cfg": "UNETLoader + KSampler",
                            "decoupled": "InDomainLoadDomainUNet + InDomainKSampler",
                            "naive_uncond": "UNETLoader + KSampler (cfg 1, empty prompt)",
                            "decoupled_uncond": "InDomainLoadDomainUNet + InDomainKSampler (cfg 0)"},
        "results": rows, "references": references, "timings_s": timings,
    }
    out = common.write_json(args.out, payload)

    # grid: a real domain row, then (a)/(b)/(c) on 8 prompts (first seed each): 2 in-domain, 6 held-out
    show = [world.prompt(*c) for c in [("square", "red"), ("ring", "blue"), ("square", "green"), ("ring", "yellow"),
                                        ("cross", "red"), ("triangle", "blue"), ("cross", "green"), ("triangle", "yellow")]]
    pick = torch.tensor([prompts.index(s) * n for s in show])
    grid_rows = [("real domain images", ref_domain.latents[:8])]
    grid_rows += [(METHODS[m], samples[m][pick]) for m in ("base_cfg", "naive_cfg", "decoupled")]
    grid_rows += [(METHODS[m], samples[m][:8]) for m in ("naive_uncond", "decoupled_uncond")]
    grid = out.with_suffix(".png")
    world.grid_png(grid_rows, grid)
    caption = {"rows": [r[0] for r in grid_rows], "columns": show, "note": "row 1: random real domain images; "
               "uncond rows: 8 unconditional samples"}
    out.with_suffix(".grid.json").write_text(json.dumps(caption, indent=2))
    if not args.fast and args.docs_grid:
        args.docs_grid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(grid, args.docs_grid)

    print(report(payload))
    print(f"\nJSON: {out}\ngrid: {grid}")
    return payload


def report(payload: dict) -> str:
    r = payload["results"]
    ref = payload["references"]
    head = ["method", "control (all)", "control (domain prompts)", "control (held-out prompts)", "domain score",
            "domain score (held-out)", "FD domain prompts", "FD held-out in domain style"]
    rows = []
    for m in ("base_cfg", "naive_cfg", "decoupled"):
        x = r[m]
        rows.append([x["label"], x["control_all"], x["control_domain_prompts"], x["control_held_out_prompts"],
                     x["domain_score_all"], x["domain_score_held_out_prompts"], x["fd_domain_prompts"],
                     x["fd_held_out_prompts_vs_domain_style"]])
    t1 = common.table(head, rows, "Toy world: control vs domain fidelity (same seeds, same steps)")
    rows2 = [[r[m]["label"], r[m]["domain_score"], r[m]["fd_domain"]] for m in ("naive_uncond", "decoupled_uncond")]
    t2 = common.table(["unconditional", "domain score", "FD to domain"], rows2)
    base_fd = r["base_cfg"]["fd_domain_prompts"]
    notes = [f"FD floor (real domain vs real domain, same count): {ref['fd_real_domain_vs_real_domain']:.3g}; "
             f"plain vs domain: {ref['fd_real_plain_vs_real_domain']:.3g}",
             f"FD ratio to (a): naive {r['naive_cfg']['fd_domain_prompts'] / base_fd:.3g}, "
             f"decoupled {r['decoupled']['fd_domain_prompts'] / base_fd:.3g}",
             f"evaluator accuracy on fresh real data: {ref['evaluator_accuracy_on_fresh_real_data']}"]
    return "\n\n".join([t1, t2, "\n".join(notes)])


if __name__ == "__main__":
    main(sys.argv[1:])
