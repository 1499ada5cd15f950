"""The paper's claim at toy scale, run through the product: sweeps on a Pareto plot.

A procedural world of 4-channel 8x8 latents (devkit/toy_world.py: 4 shapes x 4 colours, plain
style); a base text-to-image model (the tiny SD15-layout UNet, trained here from scratch on every
"a <colour> <shape>" prompt with the checkpoint's own CLIP-L embeddings, 15% empty-prompt dropout
for CFG); a domain of UNLABELLED images in a distinctive style (tinted, checker-textured
background, shifted palette). `--coverage full` (default, the paper's setting): the domain images
hold every shape x colour; `--coverage partial`: only 2 shapes x 2 colours, so most prompts ask
for content beyond the domain's. Methods, same seeds and steps, every model trained once and cached:

  (a) base + CFG                                   core KSampler
  (b) naive fine-tune on the domain, empty prompt  core UNETLoader + KSampler (CFG)
  (c) decoupled guidance, null-text domain UNet    InDomainLoadDomainUNet + InDomainKSampler
  (d) decoupled guidance, Domain LoRA form         the same nodes, a form "lora" file

Spatial control (`--experiments controlnet`): a tiny ControlNet of the base's layout, trained here
on the base's plain world (base frozen) with the shape's mask as its hint, loaded by core's
ControlNetLoader and applied by ControlNetApplyAdvanced to the positive conditioning (the control
term); (a), (b) and (c) with it ((c) with `domain_on_controlnet` off and on), scored by the IoU of
the generated shape's mask with the hint.

(b), (c) and (d) are trained by the pack's trainer (train_on_latents, form "plain" / "full" /
"lora") on the same latents and steps. Experiments: the weight sweep ((a), (b) over cfg; (c) over
domain weight x cfg and on half the schedule; (d) at the headline points), the spread over seeds
(fine-tune and sampling seeds), forgetting at 4x the fine-tuning length, and overshoot remedies
(core RescaleCFG / APG on the base model; the guider's bound on the domain update relative to the
text update). Every point: control accuracy, domain score, Fréchet distance (FD) to domain images
of the asked content, and the overshoot ratio of the domain's known texture level (1.0 = right).
Evaluators: a small CNN trained here (shape / colour / style).

    python -m indomain.bench.toy                       # full coverage (writes docs/toy_pareto.png)
    python -m indomain.bench.toy --coverage partial    # prompts beyond the domain's content
    python -m indomain.bench.toy --experiments sweep   # the sweep alone (models cached)
    python -m indomain.bench.toy --fast                # smoke run for the test suite (figures meaningless)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import common

TOY_VERSION = 2

# the sweep grids (fixed: the JSON holds one row per point)
CFGS = (1.5, 3.0, 5.0, 7.0)                      # (a), (b)
DOMAIN_WEIGHTS = (0.5, 1.0, 1.5, 2.0, 3.0)       # (c) x C_CFGS
C_CFGS = (3.0, 5.0)
HEADLINE = ((2.0, 3.0), (1.0, 5.0))              # (c)/(d) headline points (w_d, cfg): halves, spread, forgetting
HALVES = ((0.0, 0.5, "first half"), (0.5, 1.0, "second half"))
REMEDY_POINTS = ((2.0, 3.0), (2.0, 5.0), (3.0, 5.0))  # (c): the headline loss of control, and the largest overshoot
REMEDIES = {"rescale": "core RescaleCFG 0.7 on the base", "apg": "core APG (eta 0, no norm threshold, momentum 0)",
            "bound1": "domain update bounded per sample to 1x the text update's norm (Domain Guider domain_max_ratio 1)",
            "bound0.5": "domain update bounded per sample to 0.5x the text update's norm (domain_max_ratio 0.5)"}
BOUNDS = {"bound1": 1.0, "bound0.5": 0.5}        # the remedies that are the guider's own bound, not a core model patch
EXPERIMENTS = ("sweep", "forgetting", "spread", "remedies", "controlnet")  # run in this order
# on request: "diagnose" (per step, norms of D - u and B(c) - u and their cosine); "constants" (per noise level, the
# untrained null-text UNet's error against u with one constant per layer and with per-level constants: toy_constants)
EXTRA_EXPERIMENTS = ("diagnose", "constants")
DIAGNOSE_POINTS = ((1.0, 3.0), (2.0, 3.0))
# the ControlNet experiment (x seeds): (a) without the ControlNet at cfg 3 (spatial agreement by chance), then
# (a), (b) at cfg 3 and 5 and (c) at the HEADLINE points, all with the ControlNet on the positive conditioning;
# (c) with domain_on_controlnet off ("cn") and on ("cn+domain")
CNET_CFGS = (3.0, 5.0)
CNET_MODES = {"": "no ControlNet", "cn": "ControlNet on the control term",
              "cn+domain": "ControlNet on the control term and on the domain term (domain_on_controlnet)"}


@dataclass
class ToyConfig:
    coverage: str = "full"
    base_steps: int = 400
    base_lr: float = 8e-4
    base_batch: int = 16
    p_uncond: float = 0.15
    domain_images: int = 256
    domain_steps: int = 60
    long_factor: int = 4
    domain_lr: float = 2e-4
    domain_batch: int = 8
    ema_decay: float = 0.99
    lora_rank: int = 8
    lora_lr: float = 1e-3
    cnet_steps: int = 300
    cnet_lr: float = 3e-4
    cnet_batch: int = 16
    cnet_p_uncond: float = 0.5
    evaluator_steps: int = 200
    prompts: int = 16
    samples_per_prompt: int = 3
    sample_steps: int = 8
    sampler: str = "euler"
    scheduler: str = "normal"
    seeds: int = 3
    seed: int = 0

    @classmethod
    def fast(cls) -> "ToyConfig":
        return cls(base_steps=3, base_batch=4, domain_images=8, domain_steps=2, long_factor=2, domain_batch=4,
                   evaluator_steps=20, prompts=4, samples_per_prompt=1, sample_steps=2, seeds=2, cnet_steps=2, cnet_batch=4)

    def key(self, *fields_, **extra) -> str:
        d = dataclasses.asdict(self)
        blob = json.dumps({"v": TOY_VERSION, **{f: d[f] for f in fields_}, **extra}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


BASE_FIELDS = ("base_steps", "base_lr", "base_batch", "p_uncond", "seed")
DOMAIN_FIELDS = BASE_FIELDS + ("coverage", "domain_images", "domain_lr", "domain_batch", "ema_decay")
CNET_FIELDS = BASE_FIELDS + ("cnet_steps", "cnet_lr", "cnet_batch", "cnet_p_uncond")


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
    from ..devkit import toy_world as world
    from ..forms.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas

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


def controlnet_init(unet: torch.nn.Module, seed: int) -> torch.nn.Module:
    """core's ControlNet of the tiny UNet's layout, initialised the ControlNet way: its encoder a copy of the
    base's (time embedding, input blocks), every zero conv and the hint encoder's last conv at zero, so it
    starts as "no control"; the rest (hint encoder, its middle block, which the tiny base lacks) from `seed`."""
    import comfy.cldm.cldm
    import comfy.ops

    from ..devkit import tiny_models

    conf = {k: v for k, v in tiny_models.SD15_TINY_UNET.items() if k != "out_channels"}
    cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **conf)
    tiny_models.init_weights_(cn, seed)
    base_sd, own = unet.state_dict(), cn.state_dict()
    copied = {k: v for k, v in base_sd.items() if k in own and own[k].shape == v.shape}
    cn.load_state_dict(copied, strict=False)
    with torch.no_grad():
        for m in [*cn.zero_convs, cn.middle_block_out, cn.input_hint_block[-1]]:
            for prm in m.parameters():
                prm.zero_()
    return cn.float()


def train_controlnet(cfg: ToyConfig, model_patcher, clip) -> tuple[dict, list[float]]:
    """Train a ControlNet on the base's plain world, the base frozen: the hint is the shape's mask as a ComfyUI
    hint image; the frozen base's diffusion model takes the ControlNet's output as `control=`; MSE on the
    noise; only the ControlNet is optimised. Returns (state dict without prefix, losses)."""
    from ..devkit import toy_world as world
    from ..forms.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas

    ms = model_patcher.get_model_object("model_sampling")
    contexts = torch.cat([encode(clip, world.prompt(s, c)) for s, c in world.all_combos()])
    empty = encode(clip, "")
    unet = detached_unet_copy(model_patcher)
    unet.eval()
    for prm in unet.parameters():
        prm.requires_grad_(False)
    seed = cfg.seed + 20
    cn = controlnet_init(unet, seed)
    cn.train()
    opt = torch.optim.AdamW(cn.parameters(), lr=cfg.cnet_lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(cfg.cnet_steps):
            b = world.sample_batch(cfg.cnet_batch, gen, style="plain")
            hint = world.hint_image(b.masks).movedim(-1, 1)  # (B, 3, 64, 64): what core's ControlNet feeds its model
            ctx = contexts[b.shape * len(world.COLOURS) + b.colour]
            ctx[torch.rand(cfg.cnet_batch, generator=gen) < cfg.cnet_p_uncond] = empty
            sigma = sample_sigmas(ms, cfg.cnet_batch, gen)
            noise = torch.randn(b.latents.shape, generator=gen)
            xc, t, x_noisy = noisy_inputs(ms, b.latents, sigma, noise)
            for g in opt.param_groups:
                g["lr"] = cfg.cnet_lr * min(1.0, (step + 1) / 20)
            control = cn(x=xc, hint=hint, timesteps=t, context=ctx)
            pred = unet(xc, t, context=ctx, control=control)
            loss = torch.nn.functional.mse_loss(pred, native_target(ms, sigma, b.latents, noise, x_noisy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cn.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 20 == 0 or step == cfg.cnet_steps - 1:
                log(f"controlnet step {step + 1}/{cfg.cnet_steps} loss {losses[-1]:.4f} "
                    f"({(time.perf_counter() - t0) / (step + 1):.2f} s/step)")
    return {k: v.detach().clone() for k, v in cn.state_dict().items()}, losses


# ----------------------------------------------------------------------------- points


METHODS = {
    "a": "(a) base + CFG",
    "b": "(b) naive fine-tune (empty prompt) + CFG",
    "c": "(c) decoupled, null-text domain UNet (full form)",
    "d": "(d) decoupled, Domain LoRA form",
}
SAMPLED_THROUGH = {"a": "CheckpointLoaderSimple + KSampler", "b": "UNETLoader + KSampler",
                   "c": "InDomainLoadDomainUNet + InDomainKSampler",
                   "d": "InDomainLoadDomainUNet (form lora) + InDomainKSampler",
                   "controlnet": "ControlNetLoader + ControlNetApplyAdvanced (strength 1) on the positive conditioning, "
                                 "the negative hint-free; (c) with InDomainKSampler domain_on_controlnet False / True"}


@dataclass(frozen=True)
class Point:
    method: str                 # a | b | c | d
    cfg: float
    wd: float = 0.0             # domain weight ((c), (d))
    start: float = 0.0          # domain term's schedule interval
    end: float = 1.0
    remedy: str = ""            # "" | a key of REMEDIES
    seed: int = 0               # seed index: fine-tune seed and sampling seeds
    length: str = "short"       # fine-tune length: short (domain_steps) | long (x long_factor)
    cnet: str = ""              # a key of CNET_MODES: "" | "cn" | "cn+domain"

    @property
    def id(self) -> str:
        s = f"{self.method} cfg={self.cfg:g}"
        if self.method in ("c", "d"):
            s += f" wd={self.wd:g}"
            if (self.start, self.end) != (0.0, 1.0):
                s += f" sched={self.start:g}-{self.end:g}"
        if self.remedy:
            s += f" +{self.remedy}"
        if self.length != "short":
            s += f" {self.length}"
        if self.cnet:
            s += f" +{self.cnet}"
        return s + f" seed={self.seed}"

    @property
    def family(self) -> str:
        """The id without the seed: the spread groups by it."""
        return self.id.rsplit(" seed=", 1)[0]


def experiment_points(cfg: ToyConfig, experiments) -> dict[str, list[Point]]:
    out = {}
    if "sweep" in experiments:
        pts = [Point("a", c) for c in CFGS] + [Point("b", c) for c in CFGS]
        pts += [Point("c", c, wd) for c in C_CFGS for wd in DOMAIN_WEIGHTS]
        pts += [Point("c", c, wd, s, e) for wd, c in HEADLINE for s, e, _ in HALVES]
        pts += [Point("d", c, wd) for wd in sorted({w for w, _ in HEADLINE}) for c in C_CFGS]
        out["sweep"] = pts
    if "forgetting" in experiments:
        out["forgetting"] = [Point("b", c, length=ln) for ln in ("short", "long") for c in (3.0, 5.0)] + [
            Point("c", c, wd, length=ln) for ln in ("short", "long") for wd, c in HEADLINE]
    if "spread" in experiments:
        fam = [Point("a", 3.0), Point("a", 5.0), Point("b", 3.0), Point("b", 5.0)]
        fam += [Point(m, c, wd) for m in ("c", "d") for wd, c in HEADLINE]
        out["spread"] = [dataclasses.replace(p, seed=k) for k in range(cfg.seeds) for p in fam]
    if "remedies" in experiments:
        out["remedies"] = [Point("c", c, wd, remedy=r) for wd, c in REMEDY_POINTS for r in ("", *REMEDIES)]
    if "controlnet" in experiments:
        fam = [Point("a", 3.0)] + [Point(m, c, cnet="cn") for m in "ab" for c in CNET_CFGS]
        fam += [Point("c", c, wd, cnet=mode) for wd, c in HEADLINE for mode in ("cn", "cn+domain")]
        out["controlnet"] = [dataclasses.replace(p, seed=k) for k in range(cfg.seeds) for p in fam]
    return out


# ----------------------------------------------------------------------------- sampling


def _first(out):
    """Output 0 of a node call: a V1 tuple or a V3 NodeOutput."""
    return out.result[0] if hasattr(out, "result") else out[0]


class ToySampler:
    """Samples points through the product's nodes, called in-process: core CheckpointLoaderSimple /
    CLIPTextEncode / UNETLoader / KSampler / RescaleCFG / APG and the pack's InDomainLoadDomainUNet /
    InDomainKSampler. All prompts go in ONE sampler call per point: the positive conditioning holds
    the P prompts as a batch, which ComfyUI tiles over the P x n latents (sample k asks prompt k mod P);
    a graph cannot batch conditionings, and one call per prompt was dominated by per-call overhead.
    ControlNet points: core ControlNetLoader + ControlNetApplyAdvanced (strength 1, the whole schedule) on
    the positive conditioning with `hint` (one hint image per sample, a ComfyUI IMAGE batch); the negative
    stays hint-free, so u = B(x, empty) and the hint rides on the control term."""

    def __init__(self, runner, cfg: ToyConfig, base_name: str, prompts: list[str], hint: torch.Tensor | None = None):
        self.runner, self.cfg, self.nodes = runner, cfg, runner.nodes
        self.base, clip = self.nodes.CheckpointLoaderSimple().load_checkpoint(base_name)[:2]
        enc = self.nodes.CLIPTextEncode()
        conds = [enc.encode(clip, t)[0][0] for t in prompts]
        extra = dict(conds[0][1])
        extra["pooled_output"] = torch.cat([c[1]["pooled_output"] for c in conds])
        self.positive = [[torch.cat([c[0] for c in conds]), extra]]
        self.negative = enc.encode(clip, "")[0]
        self.n = len(prompts) * cfg.samples_per_prompt
        self.models = {}
        self.hint, self.controlled = hint, {}

    def controlled_positive(self, controlnet_name: str):
        """The positive conditioning with the ControlNet applied (core nodes), made once per ControlNet file."""
        if controlnet_name not in self.controlled:
            cn = self.nodes.ControlNetLoader().load_controlnet(controlnet_name)[0]
            pos, _neg = self.nodes.ControlNetApplyAdvanced().apply_controlnet(self.positive, self.negative, cn,
                                                                             self.hint, 1.0, 0.0, 1.0)
            self.controlled[controlnet_name] = pos
        return self.controlled[controlnet_name]

    def model(self, key: tuple):
        if key not in self.models:
            kind, arg = key
            if kind == "naive":
                m = self.nodes.UNETLoader().load_unet(arg, "default")[0]
            elif kind == "domain":
                m = _first(self.runner.node("InDomainLoadDomainUNet").execute(model=self.base, domain_unet_name=arg))
            elif arg == "rescale":
                m = self.runner.node("RescaleCFG")().patch(self.base, 0.7)[0]
            else:
                m = _first(self.runner.node("APG").execute(model=self.base, eta=0.0, norm_threshold=0.0, momentum=0.0))
            self.models[key] = m
        return self.models[key]

    def release(self) -> None:
        import comfy.model_management

        self.models = {k: v for k, v in self.models.items() if k[0] == "remedy"}
        comfy.model_management.unload_all_models()

    def diagnose(self, pt: Point, names: dict) -> list[dict]:
        """Sample (c) at `pt` and record, per step, |D - u|, |B(c) - u| (x0 space, per-sample L2, batch mean)
        and their cosine. A pre-CFG hook sees the guider's CFG-equivalent pair (cond = B(c) + (w_d / w_c)(D - u),
        uncond = u) and evaluates B(c) once more itself, so D - u = (cond - B(c)) w_c / w_d."""
        import comfy.samplers

        steps = []

        def hook(args):
            cond_eq, u = args["conds_out"][0], args["conds_out"][1]
            x, sigma = args["input"], args["sigma"]
            g = comfy.samplers.calc_cond_batch(args["model"], [args["conds"][0]], x, sigma, args["model_options"])[0]
            du = ((cond_eq - g) * pt.cfg / pt.wd).flatten(1)
            gu = (g - u).flatten(1)
            steps.append({"sigma": float(sigma.reshape(-1)[0]), "norm_d_minus_u": float(du.norm(dim=1).mean()),
                          "norm_c_minus_u": float(gu.norm(dim=1).mean()), "norm_u": float(u.flatten(1).norm(dim=1).mean()),
                          "cosine": float(torch.nn.functional.cosine_similarity(du, gu, dim=1).mean())})
            return args["conds_out"]

        patched = self.base.clone()
        patched.set_model_sampler_pre_cfg_function(hook)
        key = ("diagnose", pt.id)
        self.models[key] = patched
        try:
            self.sample(dataclasses.replace(pt, remedy=""), names, base=patched)
        finally:
            self.models.pop(key, None)
        return steps

    def sample(self, pt: Point, names: dict, base=None) -> torch.Tensor:
        c = self.cfg
        seed = 1000 + 100000 * pt.seed
        latent = {"samples": torch.zeros(self.n, 4, 8, 8)}
        positive = self.controlled_positive(names["controlnet"]) if pt.cnet else self.positive
        if pt.method in ("c", "d"):
            dom = self.model(("domain", names["domain" if pt.method == "c" else "lora"]))
            if pt.remedy in BOUNDS:  # the pack's guider with its bound set: what InDomainKSampler runs, plus the bound
                from ..sampling.guider import domain_guider, sample_with_guider

                guider = domain_guider(self.base, dom, positive, self.negative, pt.cfg, pt.wd, pt.cnet == "cn+domain",
                                       pt.start, pt.end)
                guider.domain_max_ratio = BOUNDS[pt.remedy]
                return sample_with_guider(guider, self.base, seed, c.sample_steps, c.sampler, c.scheduler, latent,
                                          1.0)["samples"].float()
            base = base or (self.model(("remedy", pt.remedy)) if pt.remedy else self.base)
            out = self.runner.node("InDomainKSampler").execute(
                model=base, domain_model=dom, seed=seed, steps=c.sample_steps, cfg=pt.cfg, domain_weight=pt.wd,
                sampler_name=c.sampler, scheduler=c.scheduler, positive=positive, negative=self.negative,
                latent_image=latent, denoise=1.0, domain_on_controlnet=pt.cnet == "cn+domain", domain_start_percent=pt.start,
                domain_end_percent=pt.end)
            return _first(out)["samples"].float()
        model = self.model(("naive", names["naive"])) if pt.method == "b" else self.base
        out = self.nodes.common_ksampler(model, seed, c.sample_steps, pt.cfg, c.sampler, c.scheduler, positive,
                                         self.negative, latent, denoise=1.0)
        return out[0]["samples"].float()


# ----------------------------------------------------------------------------- fine-tunes


FORM_OF = {"naive": "plain", "domain": "full", "lora": "lora"}
FOLDER_OF = {"naive": "diffusion_models", "domain": "domain_unets", "lora": "domain_unets"}


def finetune_name(cfg: ToyConfig, which: str, seed: int, steps: int) -> str:
    extra = {"form": FORM_OF[which], "ft_seed": cfg.seed + seed, "steps": steps}
    if which == "lora":
        extra.update(lora_rank=cfg.lora_rank, lora_lr=cfg.lora_lr)
    return f"toy_{which}_{cfg.key(*DOMAIN_FIELDS, **extra)}.safetensors"


def finetune(cfg: ToyConfig, which: str, seed: int, steps: int, base_model, base_clip, latents, root: Path,
             retrain: bool) -> tuple[str, dict, bool]:
    """Train (or reuse) one fine-tune; returns (file name, summary, trained now)."""
    from ..training.trainer import TrainConfig, train_on_latents

    name = finetune_name(cfg, which, seed, steps)
    path = root / "models" / FOLDER_OF[which] / name
    record = path.with_suffix(".json")
    if path.exists() and record.exists() and not retrain:
        return name, json.loads(record.read_text()), False
    log(f"training {which} (form {FORM_OF[which]}, seed {cfg.seed + seed}, {steps} steps)")
    t = time.perf_counter()
    tc = TrainConfig(steps=steps, lr=cfg.lora_lr if which == "lora" else cfg.domain_lr, batch_size=cfg.domain_batch,
                     resolution=64, hflip=0.0, seed=cfg.seed + seed, save_every=0, form=FORM_OF[which],
                     ema_decay=cfg.ema_decay, calibration_images=min(64, cfg.domain_images), keep_resume_state=False,
                     lora_rank=cfg.lora_rank, cache_dir=str(root / "latent_cache"))
    res = train_on_latents(base_model, base_clip, latents, tc, out_path=path)
    summary = {"form": FORM_OF[which], "seed": cfg.seed + seed, "steps": res.steps_done,
               "first_loss": res.losses[0], "last_loss": res.losses[-1],
               "mean_loss_last_10": sum(res.losses[-10:]) / len(res.losses[-10:]),
               "seconds": time.perf_counter() - t}
    common.write_json(record, summary)
    import comfy.model_management

    comfy.model_management.unload_all_models()
    return name, summary, True


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """Evaluator + the references every point is measured against (same asked content, same count)."""

    def __init__(self, evaluator, combos_asked: list[tuple[str, str]], coverage: str, seed: int,
                 hint_offsets: torch.Tensor | None = None):
        from ..devkit import toy_world as world

        self.world, self.net = world, evaluator
        self.combos = combos_asked
        gen = torch.Generator().manual_seed(seed + 200)
        self.ref = world.render_list(combos_asked, gen, "domain")
        ref2 = world.render_list(combos_asked, gen, "domain")
        plain = world.render_list(combos_asked, gen, "plain")
        self.ask_shape = torch.tensor([world.SHAPES.index(s) for s, _ in combos_asked])
        self.ask_colour = torch.tensor([world.COLOURS.index(c) for _, c in combos_asked])
        content = world.coverage_combos(coverage)
        self.in_content = torch.tensor([c in content for c in combos_asked])
        with torch.no_grad():
            self.ref_feat = evaluator.features(self.ref)
        self.ref_texture = float(world.texture_level(self.ref).mean())
        self.ref_tint = float(world.tint_level(self.ref).mean())
        self.references = {"fd_real_domain_vs_real_domain": self.fd(ref2), "fd_real_plain_vs_real_domain": self.fd(plain),
                           "texture_ratio_real_plain": float(world.texture_level(plain).mean()) / self.ref_texture,
                           "texture_ratio_real_domain_second_set": float(world.texture_level(ref2).mean()) / self.ref_texture}
        self.hint_masks = None
        if hint_offsets is not None:
            # the ControlNet experiment's hints: sample k's hint is the asked shape's mask at hint_offsets[k]
            at = [(s, c, int(o[0]), int(o[1])) for (s, c), o in zip(combos_asked, hint_offsets)]
            self.hint_masks = torch.stack([world.shape_mask(s, dx, dy) for s, _, dx, dy in at])
            real = {style: torch.stack([world.render(s, c, style, dx, dy, gen) for s, c, dx, dy in at])
                    for style in ("plain", "domain")}
            # agreement by chance: the asked shape at independent random positions (mean of 32 draws)
            rnd = torch.randint(0, world.MAX_OFFSET + 1, (32, len(at), 2), generator=gen)
            chance = [float(world.iou(torch.stack([world.shape_mask(s, int(o[0]), int(o[1]))
                                                   for (s, _c), o in zip(combos_asked, offs)]), self.hint_masks).mean())
                      for offs in rnd]
            self.references.update({
                "iou_real_plain_at_hint": float(world.iou(world.detect_mask(real["plain"]), self.hint_masks).mean()),
                "iou_real_domain_at_hint": float(world.iou(world.detect_mask(real["domain"]), self.hint_masks).mean()),
                "iou_asked_shape_random_position": statistics.fmean(chance)})

    def spatial(self, lat: torch.Tensor) -> dict:
        """Agreement of each sample's shape mask (toy_world.detect_mask) with its hint: mean IoU, the fraction
        of samples with IoU >= 0.5, and the detected area over the hint's (below 1: shapes missing or small;
        above 1: background read as shape)."""
        found = self.world.detect_mask(lat)
        v = self.world.iou(found, self.hint_masks)
        area = found.flatten(1).sum(1).float() / self.hint_masks.flatten(1).sum(1)
        return {"iou": float(v.mean()), "iou_ge_half": float((v >= 0.5).float().mean()),
                "mask_area_ratio": float(area.mean())}

    def fd(self, x: torch.Tensor) -> float:
        with torch.no_grad():
            return self.world.frechet_distance(self.net.features(x), self.ref_feat)

    def __call__(self, lat: torch.Tensor) -> dict:
        ev = self.world.evaluate(self.net, lat, self.ask_shape, self.ask_colour)
        both = ev["shape_ok"] * ev["colour_ok"]
        row = {"samples": len(lat), "control": float(both.mean()),
               "shape_acc": float(ev["shape_ok"].mean()), "colour_acc": float(ev["colour_ok"].mean()),
               "domain_score": float(ev["p_domain"].mean()), "fd": self.fd(lat),
               "texture_ratio": float(self.world.texture_level(lat).mean()) / self.ref_texture,
               "tint_ratio": float(self.world.tint_level(lat).mean()) / self.ref_tint}
        if not bool(self.in_content.all()):
            row["control_in_content"] = float(both[self.in_content].mean()) if self.in_content.any() else None
            row["control_beyond_content"] = float(both[~self.in_content].mean())
        return row


def mean_sd(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def dominates(p: dict, q: dict) -> bool:
    return (p["control"] >= q["control"] and p["domain_score"] >= q["domain_score"]
            and (p["control"] > q["control"] or p["domain_score"] > q["domain_score"]))


def summarise(rows: dict, sweep_ids: list[str]) -> dict:
    """The claim's questions, answered from the sweep (seed 0)."""
    sw = {i: rows[i] for i in sweep_ids}
    by = {m: [r for r in sw.values() if r["method"] == m and r["schedule"] == [0.0, 1.0]] for m in "abcd"}
    if not by["b"] or not by["c"]:
        return {}
    best_a = max(by["a"], key=lambda r: r["control"])
    per_b = []
    for rb in by["b"]:
        dom = [r for r in by["c"] if dominates(r, rb)]
        reach = [r for r in by["c"] if r["domain_score"] >= rb["domain_score"]]
        best = max(reach, key=lambda r: r["control"]) if reach else None
        per_b.append({"b": rb["id"], "dominated_by_c": [r["id"] for r in dom],
                      "best_c_at_b_domain_score": best and best["id"],
                      "control_gap_to_best_a": best and best_a["control"] - best["control"],
                      "c_control_minus_b": best and best["control"] - rb["control"],
                      "fd_c_over_fd_b": best and best["fd"] / rb["fd"]})
    c_dominated = [r["id"] for r in by["c"] if any(dominates(rb, r) for rb in by["b"])]
    return {"best_a": {"id": best_a["id"], "control": best_a["control"], "domain_score": best_a["domain_score"]},
            "c_pareto_dominates_b": all(x["dominated_by_c"] for x in per_b), "per_b_point": per_b,
            "c_points_dominated_by_some_b": c_dominated}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = common.parser("toy", __doc__.split("\n\n")[0])
    for f in dataclasses.fields(ToyConfig):
        if f.type in ("int", "float", "str", int, float, str):
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                           help=f"override {f.name} (default {f.default}; --fast uses smaller values)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS),
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: all); also 'diagnose' "
                        "(per step: norms of D - u and B(c) - u and their cosine along (c)'s trajectories) and "
                        "'constants' (per noise level: the untrained null-text UNet against u, one constant per "
                        "layer vs per-level constants)")
    p.add_argument("--docs", type=Path, default=common.PACK_ROOT / "docs",
                   help="full runs also write toy_pareto[_partial].png and toy_grid[_partial].png here")
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    p.add_argument("--replot", type=Path, default=None,
                   help="only redraw the Pareto plot and print the tables from a JSON this script wrote")
    args = p.parse_args(argv)
    if args.replot:
        payload = json.loads(args.replot.read_text())
        if "sweep" in payload["results"]:
            plot = write_pareto(payload, args.replot.with_suffix(".pareto.png"))
            if not payload["fast"] and args.docs:
                args.docs.mkdir(parents=True, exist_ok=True)
                shutil.copy(plot, args.docs / f"toy_pareto{'' if payload['coverage'] == 'full' else '_partial'}.png")
            print(f"Pareto plot: {plot}")
        print(report(payload))
        return payload
    experiments = [e.strip() for e in args.experiments.split(",") if e.strip()]
    bad = [e for e in experiments if e not in EXPERIMENTS + EXTRA_EXPERIMENTS]
    if bad:
        p.error(f"unknown experiment(s) {', '.join(bad)}; choose from {', '.join(EXPERIMENTS + EXTRA_EXPERIMENTS)}")
    common.enable_stack_dumps()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ToyConfig.fast() if args.fast else ToyConfig()
    for f in dataclasses.fields(ToyConfig):
        v = getattr(args, f.name)
        if v is not None:
            setattr(cfg, f.name, v)
    from ..devkit import toy_world as world

    if cfg.coverage not in world.COVERAGES:
        p.error(f"--coverage must be one of {', '.join(world.COVERAGES)} (got {cfg.coverage!r})")
    if not 1 <= cfg.prompts <= 16:
        p.error(f"--prompts must be 1..16 (got {cfg.prompts})")
    if args.out == common.PACK_ROOT / "artifacts" / "bench" / "toy.json":
        args.out = args.out.with_name(f"toy_{cfg.coverage}{'_fast' if args.fast else ''}.json")
    t_all, t_cpu = time.perf_counter(), time.process_time()
    timings = {}

    from ..devkit import host, tiny_models
    from ..devkit.domain import load_checkpoint

    host.import_comfy()
    root = cache_dir()
    models_dir = root / "models"
    for kind in ("checkpoints", "diffusion_models", "domain_unets", "controlnet"):
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

    # -- (1b) the ControlNet (only for the experiment that uses it), trained on the base world, cached by its settings
    cnet_name, cnet_summary = None, None
    if "controlnet" in experiments:
        cnet_key = cfg.key(*CNET_FIELDS)
        cnet_name = f"toy_controlnet_{cnet_key}.safetensors"
        cnet_path = models_dir / "controlnet" / cnet_name
        cnet_record = root / f"toy_controlnet_{cnet_key}.json"
        if args.retrain:
            for stale in [cnet_path, cnet_record]:
                stale.unlink(missing_ok=True)
        if not (cnet_path.exists() and cnet_record.exists()):
            t = time.perf_counter()
            log(f"training the ControlNet ({cfg.cnet_steps} steps, batch {cfg.cnet_batch}, base frozen)")
            cn_model, cn_clip, _ = load_checkpoint(base_path)
            sd, losses = train_controlnet(cfg, cn_model, cn_clip)
            del cn_model, cn_clip
            comfy.model_management.unload_all_models()
            from ..guidance.checkpoint import save_safetensors_atomic

            save_safetensors_atomic({"control_model." + k: v.float().contiguous() for k, v in sd.items()}, cnet_path,
                                    metadata={"indomain.toy": "controlnet", "hint": "shape mask, white on black"})
            common.write_json(cnet_record, {"losses": losses, "config": dataclasses.asdict(cfg),
                                            "seconds": time.perf_counter() - t})
            timings["controlnet_training_s"] = time.perf_counter() - t
        else:
            log(f"ControlNet cached: {cnet_name}")
        cn_losses = json.loads(cnet_record.read_text())["losses"]
        tail = cn_losses[-20:]
        cnet_summary = {"file": cnet_name, "steps": len(cn_losses), "first_loss": cn_losses[0] if cn_losses else None,
                        "mean_loss_last_20": sum(tail) / len(tail) if tail else None}

    # -- (2) the unlabelled domain images and the fine-tunes (pack's trainer), each cached by its settings
    points = experiment_points(cfg, experiments)
    dom_gen = torch.Generator().manual_seed(cfg.seed + 100)
    domain_train = world.sample_batch(cfg.domain_images, dom_gen, style="domain",
                                      combos=world.coverage_combos(cfg.coverage))
    comfy_latents = latent_format.process_out(domain_train.latents)  # the trainer takes VAE-space latents
    names, fine_tunes, trainer_base = {}, {}, {}

    def ensure_finetunes(pts: list[Point]) -> None:
        """Train (or find cached) every fine-tune these points sample, before sampling them."""
        needed = sorted({(pt.seed, pt.length, w) for pt in pts
                         for w in {"b": ["naive"], "c": ["domain"], "d": ["lora"]}.get(pt.method, [])} - set(names))
        for seed, length, which in needed:
            steps = cfg.domain_steps * (cfg.long_factor if length == "long" else 1)
            if not trainer_base and not (models_dir / FOLDER_OF[which] / finetune_name(cfg, which, seed, steps)).exists():
                trainer_base["model"], trainer_base["clip"], _ = load_checkpoint(base_path)
            t = time.perf_counter()
            name, summary, trained = finetune(cfg, which, seed, steps, trainer_base.get("model"),
                                              trainer_base.get("clip"), comfy_latents, root, args.retrain)
            names[(seed, length, which)] = name
            fine_tunes[f"{which} seed={seed} {length}"] = dict(summary, file=name)
            if trained:
                timings[f"train_{which}_seed{seed}_{length}_s"] = time.perf_counter() - t

    # -- (3) evaluator (cheap, retrained every run from its seed) and references
    t = time.perf_counter()
    log(f"training the evaluator ({cfg.evaluator_steps} steps)")
    evaluator, evaluator_acc = world.train_evaluator(cfg.evaluator_steps, cfg.seed + 7)
    timings["evaluator_s"] = time.perf_counter() - t
    all_combos = world.all_combos()
    step = max(1, len(all_combos) // cfg.prompts)
    combos = all_combos[::step][:cfg.prompts] if cfg.prompts < 16 else all_combos
    prompts = [world.prompt(s, c) for s, c in combos]
    n = cfg.samples_per_prompt
    # the ControlNet experiment's hints: sample k asks prompt k mod P; its hint is that shape at a random position
    hint_offsets = torch.randint(0, world.MAX_OFFSET + 1, (len(combos) * n, 2), generator=torch.Generator().manual_seed(cfg.seed + 300))
    metrics = Metrics(evaluator, combos * n, cfg.coverage, cfg.seed,
                      hint_offsets=hint_offsets if "controlnet" in points else None)

    # -- (4) sampling through the product (runner created now, so the node lists see the new model files)
    runner = host.InProcessComfy(models_dir=models_dir, default_dirs=False)  # don't redirect a test session's writes
    hint = world.hint_image(metrics.hint_masks) if metrics.hint_masks is not None else None
    sampler = ToySampler(runner, cfg, base_name, prompts, hint=hint)
    extra_derived = {}  # the extra experiments' results ("diagnosis", "constants")

    def write_payload(done: list[str]) -> tuple[Path, dict]:
        """The JSON so far (written after every experiment; `complete` once all ran)."""
        points_done = {e: points[e] for e in done}
        results = {exp: [pt.id for pt in pts] for exp, pts in points_done.items()}
        derived = dict(extra_derived)
        if "sweep" in points_done:
            derived["claim"] = summarise(rows, results["sweep"])
        if "spread" in points_done:
            fams = {}
            for pid in results["spread"]:
                fams.setdefault(rows[pid]["family"], []).append(rows[pid])
            derived["spread"] = {f: {k: mean_sd([r[k] for r in rs]) for k in
                                     ("control", "domain_score", "fd", "texture_ratio")} for f, rs in fams.items()}
        if "forgetting" in points_done:
            derived["forgetting"] = [
                {"family": rows[pid]["family"].replace(" long", ""), "length": rows[pid]["length"],
                 "steps": cfg.domain_steps * (cfg.long_factor if rows[pid]["length"] == "long" else 1),
                 **{k: rows[pid][k] for k in ("control", "domain_score", "fd", "texture_ratio")}}
                for pid in results["forgetting"]]
        if "controlnet" in points_done:
            fams = {}
            for pid in results["controlnet"]:
                fams.setdefault(rows[pid]["family"], []).append(rows[pid])
            derived["controlnet"] = {f: {k: mean_sd([r[k] for r in rs]) for k in
                                         ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score", "fd",
                                          "texture_ratio", "tint_ratio")}
                                     for f, rs in fams.items()}

        timings["total_s"] = time.perf_counter() - t_all
        timings["total_cpu_s"] = time.process_time() - t_cpu
        payload = {
            "bench": "toy", "version": TOY_VERSION, "fast": args.fast, "coverage": cfg.coverage,
            "experiments": experiments, "experiments_done": done, "complete": done == list(points), "config": dataclasses.asdict(cfg), "environment": common.environment(),
            "grids": {"cfgs": CFGS, "domain_weights": DOMAIN_WEIGHTS, "c_cfgs": C_CFGS, "headline": HEADLINE,
                      "halves": [h[:2] for h in HALVES], "remedy_points": REMEDY_POINTS, "remedies": REMEDIES,
                      "controlnet_cfgs": CNET_CFGS, "controlnet_modes": CNET_MODES},
            "world": {"shapes": world.SHAPES, "colours": world.COLOURS, "coverage_combos": world.coverage_combos(cfg.coverage),
                      "prompts": prompts, "latent": [4, world.SIZE, world.SIZE]},
            "models": {"base": base_name, "base_final_loss_mean_last_20": (sum(base_losses[-20:]) / max(1, len(base_losses[-20:]))
                                                                           if base_losses else None),
                       "fine_tunes": fine_tunes, "controlnet": cnet_summary},
            "sampled_through": SAMPLED_THROUGH,
            "points": rows, "results": results, "derived": derived,
            "references": {**metrics.references, "evaluator_accuracy_on_fresh_real_data": evaluator_acc,
                           "texture_level_real_domain": metrics.ref_texture},
            "timings_s": timings,
        }
        return common.write_json(args.out, payload), payload

    rows, samples = {}, {}
    for exp, pts in points.items():
        ensure_finetunes(pts)
        t, tc = time.perf_counter(), time.process_time()
        todo = sorted([pt for pt in pts if pt.id not in rows], key=lambda q: (q.seed, q.length))
        last = None
        for pt in todo:
            if (pt.seed, pt.length) != last and last is not None:
                sampler.release()
            last = (pt.seed, pt.length)
            gnames = {w: names.get((pt.seed, pt.length, w)) for w in ("naive", "domain", "lora")}
            gnames["controlnet"] = cnet_name
            lat = latent_format.process_in(sampler.sample(pt, gnames))
            samples[pt.id] = lat
            rows[pt.id] = {"id": pt.id, "family": pt.family, "method": pt.method, "label": METHODS[pt.method],
                           "cfg": pt.cfg, "domain_weight": pt.wd if pt.method in "cd" else None,
                           "schedule": [pt.start, pt.end], "remedy": pt.remedy, "seed": pt.seed,
                           "length": pt.length, "controlnet": pt.cnet, **metrics(lat)}
        if exp == "controlnet":  # IoU with the hints, also for a point another experiment sampled (no ControlNet)
            for pt in pts:
                rows[pt.id].update(metrics.spatial(samples[pt.id]))
        sampler.release()
        timings[f"sample_{exp}_s"] = time.perf_counter() - t
        timings[f"sample_{exp}_cpu_s"] = time.process_time() - tc
        log(f"{exp}: {len(todo)} new points ({len(pts)} in all) in {timings[f'sample_{exp}_s']:.1f}s")
        out, payload = write_payload(done=list(points)[:list(points).index(exp) + 1])

    if "diagnose" in experiments:
        dpts = [Point("c", c, wd) for wd, c in DIAGNOSE_POINTS]
        ensure_finetunes(dpts)
        t = time.perf_counter()
        extra_derived["diagnosis"] = {pt.family: sampler.diagnose(pt, {"domain": names[(0, "short", "domain")]})
                                      for pt in dpts}
        sampler.release()
        timings["diagnose_s"] = time.perf_counter() - t
        log(f"diagnose: {len(dpts)} trajectories in {timings['diagnose_s']:.1f}s")
        out, payload = write_payload(done=[e for e in points])

    if "constants" in experiments:
        import comfy.samplers

        from .toy_constants import stand_in_error

        t = time.perf_counter()
        c_model, c_clip, _ = load_checkpoint(base_path)
        held = world.sample_batch(32, torch.Generator().manual_seed(cfg.seed + 400), style="domain",
                                  combos=world.coverage_combos(cfg.coverage))
        held_prompts = [world.prompt(world.SHAPES[i], world.COLOURS[j]) for i, j in zip(held.shape.tolist(),
                                                                                        held.colour.tolist())]
        sigmas = comfy.samplers.calculate_sigmas(c_model.get_model_object("model_sampling"), cfg.scheduler,
                                                 cfg.sample_steps)[:-1].tolist()  # the sampling schedule's levels
        extra_derived["constants"] = stand_in_error(c_model, c_clip, held.latents, held_prompts, sigmas,
                                                    domain_train.latents[:min(64, cfg.domain_images)], cfg.seed)
        del c_model, c_clip
        comfy.model_management.unload_all_models()
        timings["constants_s"] = time.perf_counter() - t
        log(f"constants: {len(sigmas)} noise levels in {timings['constants_s']:.1f}s")
        out, payload = write_payload(done=[e for e in points])

    # the record of the cached models (demo --toy reads it); a run of a few experiments keeps the names an earlier
    # run of the same base and settings recorded
    latest = root / f"latest_{cfg.coverage}{'_fast' if args.fast else ''}.json"
    known = {}
    if latest.is_file():
        try:
            before = json.loads(latest.read_text())
            if (before.get("base"), before.get("config"), before.get("models_dir")) == (
                    base_name, dataclasses.asdict(cfg), str(models_dir)):
                known = before.get("names", {})
        except (OSError, ValueError):
            pass  # unreadable: rewritten below
    known.update({f"{k[2]} seed={k[0]} {k[1]}": v for k, v in names.items()})
    common.write_json(latest, {"models_dir": str(models_dir), "base": base_name, "names": known,
                               "config": dataclasses.asdict(cfg), "json": str(out)})

    # -- (6) pictures: the Pareto plot and a sample grid
    suffix = "" if cfg.coverage == "full" else "_partial"
    plot = out.with_suffix(".pareto.png")
    if "sweep" in points:
        write_pareto(payload, plot)
    grid = out.with_suffix(".png")
    write_grid(payload, samples, metrics, prompts, n, grid)
    if "controlnet" in points:
        write_controlnet_grid(samples, metrics, prompts, out.with_suffix(".controlnet.png"))
    if not args.fast and args.docs and "sweep" in points:
        args.docs.mkdir(parents=True, exist_ok=True)
        shutil.copy(plot, args.docs / f"toy_pareto{suffix}.png")
        shutil.copy(grid, args.docs / f"toy_grid{suffix}.png")
    print(report(payload))
    print(f"\nJSON: {out}\nPareto plot: {plot}\ngrid: {grid}")
    return payload


def sweep_series(payload: dict) -> list[dict]:
    rows = payload["points"]
    sweep = [rows[i] for i in payload["results"]["sweep"]]

    def pts(sel, tag):
        return [{"x": r["domain_score"], "y": r["control"], "fd": r["fd"], "tag": tag(r)} for r in sel]

    full = [r for r in sweep if r["schedule"] == [0.0, 1.0]]
    series = [{"label": "(a) base + CFG, cfg " + "/".join(f"{c:g}" for c in CFGS), "line": True,
               "points": pts([r for r in full if r["method"] == "a"], lambda r: f"{r['cfg']:g}")},
              {"label": "(b) naive fine-tune + CFG, cfg " + "/".join(f"{c:g}" for c in CFGS), "line": True,
               "points": pts([r for r in full if r["method"] == "b"], lambda r: f"{r['cfg']:g}")}]
    for c in C_CFGS:
        series.append({"label": f"(c) decoupled, cfg {c:g}, w_d " + "/".join(f"{w:g}" for w in DOMAIN_WEIGHTS),
                       "line": True, "points": pts([r for r in full if r["method"] == "c" and r["cfg"] == c],
                                                   lambda r: f"{r['domain_weight']:g}")})
    series.append({"label": "(c) domain term on half the schedule (1st / 2nd)", "line": False,
                   "points": pts([r for r in sweep if r["method"] == "c" and r["schedule"] != [0.0, 1.0]],
                                 lambda r: f"{'1st' if r['schedule'][0] == 0 else '2nd'} {r['domain_weight']:g}/{r['cfg']:g}")})
    series.append({"label": "(d) Domain LoRA (w_d/cfg)", "line": False,
                   "points": pts([r for r in full if r["method"] == "d"],
                                 lambda r: f"{r['domain_weight']:g}/{r['cfg']:g}")})
    return series


def write_pareto(payload: dict, path: Path) -> Path:
    from .toy_plot import pareto_png

    title = (f"Toy world, {payload['coverage']} coverage: control vs domain score (left), FD to the domain (right); "
             f"{payload['config']['samples_per_prompt']} samples x {len(payload['world']['prompts'])} prompts per point")
    return pareto_png(sweep_series(payload), path, title, payload["references"]["fd_real_domain_vs_real_domain"])


def write_grid(payload: dict, samples: dict, metrics: Metrics, prompts: list[str], n: int, path: Path) -> None:
    """Rows: real domain images of the asked content, then one row per method at a headline point."""
    from ..devkit import toy_world as world

    pick = torch.arange(min(8, len(prompts)))  # the first sample of the first 8 prompts
    rows = [("real domain images", metrics.ref[pick])]
    (wd, c), labels = HEADLINE[0], []
    for pid in (f"a cfg={c:g} seed=0", f"b cfg={c:g} seed=0", f"c cfg={c:g} wd={wd:g} seed=0",
                f"d cfg={c:g} wd={wd:g} seed=0"):
        if pid in samples:
            rows.append((pid, samples[pid][pick]))
            labels.append(pid)
    world.grid_png(rows, path)
    path.with_suffix(".grid.json").write_text(json.dumps(
        {"rows": [r[0] for r in rows], "columns": prompts[:len(pick)], "note": "first sample of each prompt"}, indent=2))


def write_controlnet_grid(samples: dict, metrics: Metrics, prompts: list[str], path: Path) -> None:
    """The ControlNet experiment, seed 0, the first sample of the first 8 prompts: the hint, then per point its
    samples and, below them, the masks the IoU reads from them (white = shape)."""
    from ..devkit import toy_world as world

    def as_latent(masks):  # a mask drawn as a latent: white on black under to_rgb
        m = masks.float()[:, None] * 2.4 - 1.2
        return torch.cat([m, m, m, torch.zeros_like(m)], 1)

    pick = torch.arange(min(8, len(prompts)))
    rows, labels = [("hint", as_latent(metrics.hint_masks[pick]))], ["hint"]
    for pid in [f"a cfg={CNET_CFGS[0]:g} seed=0"] + [pid for pid in samples if pid.endswith(" seed=0") and " +cn" in pid]:
        if pid in samples:
            rows += [(pid, samples[pid][pick]), (pid + " mask", as_latent(world.detect_mask(samples[pid][pick])))]
            labels += [pid, pid + " (mask read)"]
    world.grid_png(rows, path)
    path.with_suffix(".grid.json").write_text(json.dumps(
        {"rows": labels, "columns": prompts[:len(pick)], "note": "first sample of each prompt"}, indent=2))


def report(payload: dict) -> str:
    rows = payload["points"]
    head = ["point", "control", "domain score", "FD", "texture ratio"]
    if payload["coverage"] == "partial":
        head += ["control, domain content", "control, beyond the content"]
    out = []
    for exp, ids in payload["results"].items():
        table_rows = []
        spatial = exp == "controlnet"
        for pid in ids:
            r = rows[pid]
            extra = [r.get("control_in_content"), r.get("control_beyond_content")] if payload["coverage"] == "partial" else []
            extra += [r["iou"], r["iou_ge_half"]] if spatial else []
            table_rows.append([pid, r["control"], r["domain_score"], r["fd"], r["texture_ratio"], *extra])
        out.append(common.table(head + (["IoU with hint", "IoU >= 0.5"] if spatial else []), table_rows,
                                f"{exp} ({payload['coverage']} coverage)"))
    sp = payload["derived"].get("spread")
    if sp:
        out.append(common.table(["point", "control", "domain score", "FD", "texture ratio"],
                                [[f] + [f"{v[k]['mean']:.3g} ± {v[k]['sd']:.2g}" for k in
                                        ("control", "domain_score", "fd", "texture_ratio")] for f, v in sp.items()],
                                f"spread over {payload['config']['seeds']} seeds (mean ± sd)"))
    cn = payload["derived"].get("controlnet")
    if cn:
        keys = ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score", "fd", "tint_ratio")
        out.append(common.table(["point", "IoU with hint", "IoU >= 0.5", "mask area / hint's", "control",
                                 "domain score", "FD", "tint ratio"],
                                [[f] + [f"{v[k]['mean']:.3g} ± {v[k]['sd']:.2g}" for k in keys] for f, v in cn.items()],
                                f"ControlNet experiment over {payload['config']['seeds']} seeds (mean ± sd)"))
        ref = payload["references"]
        out.append(f"IoU references: real plain / domain images at the hint: {ref['iou_real_plain_at_hint']:.3g} / "
                   f"{ref['iou_real_domain_at_hint']:.3g}; the asked shape at a random position (chance): "
                   f"{ref['iou_asked_shape_random_position']:.3g}")
    diag = payload["derived"].get("diagnosis")
    if diag:
        for fam, steps in diag.items():
            out.append(common.table(["sigma", "|D - u|", "|B(c) - u|", "|D - u| / |B(c) - u|", "cosine", "|u|"],
                                    [[d["sigma"], d["norm_d_minus_u"], d["norm_c_minus_u"],
                                      d["norm_d_minus_u"] / max(d["norm_c_minus_u"], 1e-12), d["cosine"], d["norm_u"]]
                                     for d in steps], f"diagnosis along ({fam}) trajectories, x0 space, batch means"))
    consts = payload["derived"].get("constants")
    if consts:
        out.append(common.table(["sigma", "|B(c) - u| / |u|", "one constant: |D0 - u| / |u|", "/ |B(c) - u|",
                                 "per-level constants: |D0 - u| / |u|", "/ |B(c) - u|"],
                                [[r["sigma"], r["norm_c_minus_u"] / max(r["norm_u"], 1e-12), r["single_err_over_u"],
                                  r["single_err_over_c_minus_u"], r["per_level_err_over_u"],
                                  r["per_level_err_over_c_minus_u"]] for r in consts],
                                "the untrained null-text UNet D0 against the base's u, per noise level (batch means)"))
    claim = payload["derived"].get("claim")
    if claim:
        out.append("claim: " + json.dumps(claim, indent=1, default=float))
    ref = payload["references"]
    out.append(f"FD floor (real domain vs real domain, same count): {ref['fd_real_domain_vs_real_domain']:.3g}; "
               f"plain vs domain: {ref['fd_real_plain_vs_real_domain']:.3g}; evaluator accuracy "
               f"{ref['evaluator_accuracy_on_fresh_real_data']}; timings {json.dumps(payload['timings_s'], default=float)}")
    return "\n\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
