"""The experiments: the methods, a point (method, cfg, w_d, schedule, remedy, seed, ...), the points each
experiment samples, and the sampler that samples a point through the product's nodes."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import common
from .config import (BOUNDS, CACHE_MODES, C_CFGS, CFGS, CNET_CFGS, DOMAIN_WEIGHTS, HALVES, HEADLINE, REMEDIES, REMEDY_POINTS,
                     ToyConfig, autocast)

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
    cache: str = ""             # "" (off) | a domain_cache mode of CACHE_MODES ((c), (d))

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
        if self.cache:
            s += f" +cache {self.cache}"
        return s + f" seed={self.seed}"

    @property
    def family(self) -> str:
        """The id without the seed: the spread groups by it."""
        return self.id.rsplit(" seed=", 1)[0]


def sweep_points() -> list[Point]:
    """The Pareto sweep (seed 0): (a), (b) over CFGS, (c) over DOMAIN_WEIGHTS x C_CFGS, (c)'s half schedules and
    (d) at the HEADLINE points' weights."""
    pts = [Point("a", c) for c in CFGS] + [Point("b", c) for c in CFGS]
    pts += [Point("c", c, wd) for c in C_CFGS for wd in DOMAIN_WEIGHTS]
    pts += [Point("c", c, wd, s, e) for wd, c in HEADLINE for s, e, _ in HALVES]
    pts += [Point("d", c, wd) for wd in sorted({w for w, _ in HEADLINE}) for c in C_CFGS]
    return pts


def experiment_points(cfg: ToyConfig, experiments) -> dict[str, list[Point]]:
    out = {}
    if "sweep" in experiments:
        out["sweep"] = sweep_points()
    if "forgetting" in experiments:
        out["forgetting"] = [Point("b", c, length=ln) for ln in ("short", "long") for c in (3.0, 5.0)] + [
            Point("c", c, wd, length=ln) for ln in ("short", "long") for wd, c in HEADLINE]
    if "spread" in experiments:  # every sweep point over every seed: the front is read from the means
        out["spread"] = [dataclasses.replace(p, seed=k) for k in range(cfg.seeds) for p in sweep_points()]
    if "remedies" in experiments:
        out["remedies"] = [Point("c", c, wd, remedy=r) for wd, c in REMEDY_POINTS for r in ("", *REMEDIES)]
        # fairness (G8): the core remedies (model patches) given to (c) are given to (b) too, at (c)'s cfgs
        out["remedies"] += [Point("b", c, remedy=r) for c in sorted({c for _, c in REMEDY_POINTS})
                            for r in REMEDIES if r not in BOUNDS]
    if "controlnet" in experiments:
        fam = [Point("a", 3.0)] + [Point(m, c, cnet="cn") for m in "ab" for c in CNET_CFGS]
        fam += [Point("c", c, wd, cnet=mode) for wd, c in HEADLINE for mode in ("cn", "cn+domain")]
        out["controlnet"] = [dataclasses.replace(p, seed=k) for k in range(cfg.seeds) for p in fam]
    if "cache" in experiments:
        fam = [Point(m, c, wd, cache=mode) for m in ("c", "d") for wd, c in HEADLINE for mode in ("", *CACHE_MODES)]
        out["cache"] = [dataclasses.replace(p, seed=k) for k in range(cfg.seeds) for p in fam]
    return out


# ----------------------------------------------------------------------------- sampling


_first = common.first_output


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
            elif kind == "remedy":
                m = self.patched(self.base, arg)
            else:  # ("naive+remedy", (remedy, file)): (b)'s model with the same core patch
                m = self.patched(self.model(("naive", arg[1])), arg[0])
            self.models[key] = m
        return self.models[key]

    def patched(self, model, remedy: str):
        """A core remedy (RescaleCFG, APG) applied to `model`."""
        if remedy == "rescale":
            return self.runner.node("RescaleCFG")().patch(model, 0.7)[0]
        return _first(self.runner.node("APG").execute(model=model, eta=0.0, norm_threshold=0.0, momentum=0.0))

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
        with autocast(self.cfg):  # fp32: a no-op
            return self._sample(pt, names, base)

    def _sample(self, pt: Point, names: dict, base=None) -> torch.Tensor:
        c = self.cfg
        seed = 1000 + 100000 * pt.seed
        latent = {"samples": torch.zeros(self.n, 4, 8, 8)}
        positive = self.controlled_positive(names["controlnet"]) if pt.cnet else self.positive
        if pt.method in ("c", "d"):
            dom = self.model(("domain", names["domain" if pt.method == "c" else "lora"]))
            if pt.remedy in BOUNDS:
                assert not pt.cache, "the bound remedies are sampled uncached"
                # the pack's guider with its bound set: what InDomainKSampler runs, plus the bound
                from ...sampling.guider import domain_guider, sample_with_guider

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
                domain_end_percent=pt.end, **({"domain_cache": pt.cache} if pt.cache else {}))
            return _first(out)["samples"].float()
        if pt.method == "b":
            model = self.model(("naive+remedy", (pt.remedy, names["naive"])) if pt.remedy else ("naive", names["naive"]))
        else:
            model = self.base
        out = self.nodes.common_ksampler(model, seed, c.sample_steps, pt.cfg, c.sampler, c.scheduler, positive,
                                         self.negative, latent, denoise=1.0)
        return out[0]["samples"].float()
