"""ComfyUI-side machinery shared by the nodes: building the domain model, the decoupled guider,
and the model patch that makes core KSampler do decoupled guidance.

The maths is `guidance.combine`; this module decides which model sees which conditioning and
keeps ComfyUI's own conventions (ModelPatcher, set_additional_models, calc_cond_batch,
pre/post-CFG hooks) intact.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from ..guidance.checkpoint import (DomainCheckpointError, DomainMeta, architecture_signature,
                                   read_domain_checkpoint, weights_fingerprint)
from ..guidance.combine import cfg_equivalent, combine, term_active
from ..guidance.nulltext import convert_to_null_text, expected_null_text_shapes, is_null_text

log = logging.getLogger("indomain")

ADDITIONAL_MODELS_KEY = "indomain"


# ----------------------------------------------------------------------------- base description


@dataclass(frozen=True)
class BaseDescription:
    architecture: str      # ComfyUI model config class name, e.g. "SD15", "SDXL"
    model_type: str        # "EPS", "V_PREDICTION", ...
    signature: str         # sha256 of the base UNet key/shape layout

    @classmethod
    def of(cls, model_patcher) -> "BaseDescription":
        base = model_patcher.model
        shapes = {k: tuple(v.shape) for k, v in base.diffusion_model.state_dict().items()}
        return cls(type(base.model_config).__name__, base.model_type.name, architecture_signature(shapes))


def domain_info(model_patcher) -> Optional[dict]:
    """The InDomain record on a domain MODEL (None for ordinary models)."""
    return getattr(model_patcher.model, "indomain", None)


def ensure_base_model(model_patcher, what: str = "model") -> None:
    if domain_info(model_patcher) is not None or is_null_text(model_patcher.model.diffusion_model):
        raise ValueError(f"The '{what}' input is a domain UNet. Connect the base checkpoint's MODEL "
                         "(e.g. from Load Checkpoint) there, and the domain MODEL to 'domain_model'.")


def ensure_domain_model(model_patcher, what: str = "domain_model") -> None:
    if not is_null_text(model_patcher.model.diffusion_model):
        raise ValueError(f"The '{what}' input is not a domain UNet. Load one with the 'Load Domain UNet' node "
                         "(InDomainLoadDomainUNet), or train one with 'Train Domain UNet'.")


# ----------------------------------------------------------------------------- loading


def check_pairing(base_patcher, meta: DomainMeta, state_dict: dict, name: str) -> None:
    """Raise DomainCheckpointError when the domain UNet was made from another architecture than the base."""
    ensure_base_model(base_patcher)
    desc = BaseDescription.of(base_patcher)
    if meta.base_architecture != desc.architecture or meta.model_type != desc.model_type:
        raise DomainCheckpointError(
            f"{name} was trained from a {meta.base_architecture} ({meta.model_type}) base, but the MODEL connected to "
            f"'Load Domain UNet' is {desc.architecture} ({desc.model_type}). Connect a {meta.base_architecture} "
            "checkpoint (ideally the one it was trained from), or train a domain UNet from this base.")
    if meta.base_signature != desc.signature:
        raise DomainCheckpointError(
            f"{name} was trained from a {meta.base_architecture} base with a different UNet layout than the MODEL "
            "connected (layout signature mismatch). Connect the checkpoint it was trained from.")
    expected = expected_null_text_shapes(base_patcher.model.diffusion_model)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        unexpected = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise DomainCheckpointError(
            f"{name} does not fit the connected base UNet (missing {missing}, unexpected {unexpected}, "
            f"wrong shape {wrong}). Connect the checkpoint it was trained from.")


def build_domain_model(base_patcher, state_dict: dict, meta: DomainMeta, source: str = ""):
    """A ModelPatcher around a fresh BaseModel of the base's class holding the null-text UNet.

    It is an ordinary ComfyUI model: the memory manager loads, offloads and frees it.
    """
    base = base_patcher.model
    offload = comfy.model_management.unet_offload_device()
    try:
        domain = type(base)(base.model_config, model_type=base.model_type, device=offload)
    except TypeError as e:
        raise DomainCheckpointError(f"InDomain cannot build a domain model for {type(base).__name__} models yet ({e}).") from None
    convert_to_null_text(domain.diffusion_model)  # zero constants; the file's values load next
    domain.diffusion_model.load_state_dict(state_dict, strict=True)
    # same noise schedule as the base, including any ModelSampling* patch applied before the loader
    domain.model_sampling = copy.deepcopy(base_patcher.get_model_object("model_sampling"))
    domain.indomain = {"meta": meta, "source": source}
    patcher = comfy.model_patcher.ModelPatcher(domain, load_device=base_patcher.load_device,
                                               offload_device=base_patcher.offload_device)
    return patcher


def load_domain_model(base_patcher, path: str | Path):
    path = Path(path)
    state_dict, meta = read_domain_checkpoint(path)
    check_pairing(base_patcher, meta, state_dict, path.name)
    base_fp = weights_fingerprint(base_patcher.model.diffusion_model.state_dict())
    if base_fp != meta.base_fingerprint:
        log.info("InDomain: %s was trained from other %s weights than the connected base (fine for fine-tunes "
                 "of the same family; use its original base for best fidelity).", path.name, meta.base_architecture)
    return build_domain_model(base_patcher, state_dict, meta, source=str(path))


# ----------------------------------------------------------------------------- conditioning helpers


def first_control(conditioning):
    """The ControlNet attached to a CONDITIONING (raw or processed), or None."""
    for c in conditioning or []:
        d = c[1] if isinstance(c, (list, tuple)) else c
        if d.get("control") is not None:
            return d["control"]
    return None


def domain_conditioning(negative, positive=None, with_control: bool = False):
    """The domain pass's CONDITIONING: the negative (∅) entries, whose text the null-text UNet
    ignores but whose extra inputs (SDXL's pooled/size vector `y`) it needs; ControlNet removed,
    or taken from the positive when `with_control`."""
    control = first_control(positive) if with_control else None
    out = []
    for tensor, d in negative:
        d = {k: v for k, v in d.items() if k not in ("control", "control_apply_to_uncond")}
        if control is not None:
            d["control"] = control
        out.append([tensor, d])
    return out


def run_options(patcher, sample_sigmas) -> dict:
    """A model's own model_options for one sampling run (its patches, not the base's), plus the
    run's sigma schedule that schedule-aware patches read from transformer_options."""
    opts = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    if sample_sigmas is not None:
        opts.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
    return opts


# ----------------------------------------------------------------------------- guidance terms


@dataclass(eq=False)  # identity semantics: terms hold tensors and are looked up with `in`
class GuidanceTerm:
    """One term w * (M(x, c) - u) of the combination; evaluated only inside [start, end] percent."""

    model: object                 # ModelPatcher
    conditioning: list            # CONDITIONING
    weight: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    label: str = "term"
    # filled at sample time
    key: str = ""
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    has_control: bool = False

    def describe(self) -> str:
        return f"{self.label} (w={self.weight:g}, {self.start_percent:g}–{self.end_percent:g})"


@dataclass
class _ModelGroup:
    patcher: object
    terms: list = field(default_factory=list)
    model_options: dict | None = None


class DecoupledGuider(comfy.samplers.CFGGuider):
    """u = B(x, negative); out = u + Σ_i w_i (M_i(x, c_i) - u).

    Terms on the base model are batched with u in one calc_cond_batch call; terms on another
    model (the domain UNet) are batched per model. Other models are registered with
    set_additional_models on a clone of the base, so ComfyUI loads them in the same
    load_models_gpu call. When no term beyond one base term is active this *is* core
    CFG (the same function call), so domain_weight = 0 reproduces KSampler exactly.
    """

    def __init__(self, model, negative, terms: list[GuidanceTerm]):
        ensure_base_model(model)
        base = model.clone()
        self.terms = list(terms)
        self.primary: Optional[GuidanceTerm] = None
        self.groups: dict[int, _ModelGroup] = {}
        for t in self.terms:
            if t.model.is_clone(base):
                if not base.clone_has_same_weights(t.model):
                    raise ValueError(
                        f"{t.describe()}: its MODEL is the base model with different patches (e.g. a LoRA on one "
                        "branch only). ComfyUI holds one set of patches per model; apply the LoRA before branching.")
                if self.primary is None:
                    self.primary = t
                continue
            if type(t.model.model.latent_format) is not type(base.model.latent_format):
                raise ValueError(f"{t.describe()}: its MODEL works in a different latent space "
                                 f"({type(t.model.model.latent_format).__name__}) than the base "
                                 f"({type(base.model.latent_format).__name__}); all terms must share one.")
            group = self.groups.setdefault(id(t.model.model), _ModelGroup(t.model))
            group.terms.append(t)
        extra = [g.patcher for g in self.groups.values()]
        if extra:
            base.set_additional_models(ADDITIONAL_MODELS_KEY, extra)
        super().__init__(base)
        conds = {"negative": negative}
        for i, t in enumerate(self.terms):
            t.key = "positive" if t is self.primary else f"indomain_term_{i}"
            t.has_control = first_control(t.conditioning) is not None
            conds[t.key] = t.conditioning
        self.inner_set_conds(conds)
        self.cfg = self.primary.weight if self.primary is not None else 1.0
        self.model_calls = 0  # evaluations of non-base models (for tests and benchmarks)

    # -- sampling lifecycle
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        ms = self.model_patcher.get_model_object("model_sampling")
        for t in self.terms:
            t.sigma_start = float(ms.percent_to_sigma(t.start_percent))
            t.sigma_end = float(ms.percent_to_sigma(t.end_percent))
        for g in self.groups.values():
            g.model_options = run_options(g.patcher, sigmas)
            g.patcher.pre_run()  # sets current_patcher, which calc_cond_batch uses
        self._term_conds = None
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        finally:
            for g in self.groups.values():
                g.patcher.cleanup()

    def _conds_for(self, term: GuidanceTerm):
        if self._term_conds is None:
            self._term_conds = {}
            for t in self.terms:
                conds = self.conds[t.key]
                if not t.has_control:  # process_conds may copy a positive's control into other conds
                    conds = [{k: v for k, v in c.items() if k != "control"} for c in conds]
                self._term_conds[t.key] = conds
        return self._term_conds[term.key]

    def active_terms(self, sigma: float) -> list[GuidanceTerm]:
        return [t for t in self.terms if t.weight != 0 and term_active(sigma, t.sigma_start, t.sigma_end)]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = float(timestep.reshape(-1)[0])
        active = self.active_terms(sigma)
        primary = self.primary if self.primary in active else None
        others = [t for t in active if t is not primary]
        negative = self.conds["negative"]
        if not others:
            if primary is not None:  # exactly core CFG
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds["positive"],
                                                        primary.weight, model_options=model_options, seed=seed)
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, negative, 1.0,
                                                    model_options=model_options, seed=seed)

        base_terms = [t for t in others if id(t.model.model) not in self.groups]
        conds = [self.conds["positive"] if primary is not None else None, negative]
        conds += [self._conds_for(t) for t in base_terms]
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        preds = {id(t): out[2 + i] for i, t in enumerate(base_terms)}
        for g in self.groups.values():
            g_terms = [t for t in g.terms if t in others]
            if not g_terms:
                continue
            self.model_calls += 1
            g_out = comfy.samplers.calc_cond_batch(g.patcher.model, [self._conds_for(t) for t in g_terms], x, timestep,
                                                   g.model_options)
            preds.update({id(t): g_out[i] for i, t in enumerate(g_terms)})

        uncond = out[1]
        cond, scale = cfg_equivalent(uncond, out[0] if primary is not None else None,
                                     primary.weight if primary is not None else 0.0,
                                     [(t.weight, preds[id(t)]) for t in others])
        conds_out = [cond, uncond]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds[:2], "conds_out": conds_out, "cond_scale": scale, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            conds_out = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, conds_out[0], conds_out[1], scale, x, timestep,
                                           model_options=model_options, cond=conds[0], uncond=conds[1])


def domain_guider(model, domain_model, positive, negative, cfg: float, domain_weight: float,
                  domain_on_control: bool = False, start_percent: float = 0.0, end_percent: float = 1.0,
                  extra_terms: list[GuidanceTerm] | None = None) -> DecoupledGuider:
    """The standard decoupled guider: text/control term from the base, domain term from the domain UNet."""
    ensure_domain_model(domain_model)
    terms = [GuidanceTerm(model, positive, cfg, label="control (cfg)")]
    terms.append(GuidanceTerm(domain_model, domain_conditioning(negative, positive, domain_on_control), domain_weight,
                              start_percent, end_percent, label="domain"))
    terms += [copy.copy(t) for t in (extra_terms or [])]
    return DecoupledGuider(model, negative, terms)


# ----------------------------------------------------------------------------- KSampler patch


def patch_model_for_domain_guidance(model, domain_model, domain_weight: float, domain_on_control: bool = False,
                                    start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` whose CFG (in any sampler node, core KSampler included) is decoupled guidance.

    Uses a pre-CFG function, so the sampler's `cfg` stays the control weight and every other
    CFG hook still runs. The domain model is an additional model of the clone: loaded with
    the base in one load_models_gpu call and released with it.
    """
    ensure_base_model(model)
    ensure_domain_model(domain_model)
    m = model.clone()
    if domain_weight == 0:
        return m
    m.set_additional_models(ADDITIONAL_MODELS_KEY, [domain_model])
    ms = m.get_model_object("model_sampling")
    sigma_start = float(ms.percent_to_sigma(start_percent))
    sigma_end = float(ms.percent_to_sigma(end_percent))
    stats = {"domain_calls": 0}
    run = {"sigmas": None, "options": None}  # per sampling run, not per step (holding the tensor keeps its id unique)

    def pre_cfg(args):
        conds_out = args["conds_out"]
        sigma = args["sigma"]
        if len(conds_out) < 2 or conds_out[1] is None or not term_active(float(sigma.reshape(-1)[0]), sigma_start, sigma_end):
            return conds_out
        cond, uncond = args["conds"][0], args["conds"][1]
        control = first_control(cond) if domain_on_control else None
        d_conds = []
        for c in uncond:
            c = {k: v for k, v in c.items() if k != "control"}
            if control is not None:
                c["control"] = control
            d_conds.append(c)
        sample_sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        if run["options"] is None or run["sigmas"] is not sample_sigmas:
            run["sigmas"], run["options"] = sample_sigmas, run_options(domain_model, sample_sigmas)
        stats["domain_calls"] += 1
        d = comfy.samplers.calc_cond_batch(domain_model.model, [d_conds], args["input"], sigma, run["options"])[0]
        u = conds_out[1]
        scale = args["cond_scale"]
        if scale != 0:
            new_cond, _ = cfg_equivalent(u, conds_out[0], scale, [(domain_weight, d)])
            return [new_cond, u] + list(conds_out[2:])
        # cfg 0: ComfyUI returns the uncond slot as the result
        return [conds_out[0], combine(u, [(domain_weight, d)])] + list(conds_out[2:])

    m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ADDITIONAL_MODELS_KEY,
                            lambda _p: domain_model.pre_run())
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ADDITIONAL_MODELS_KEY,
                            lambda _p: domain_model.cleanup())
    m.indomain_stats = stats
    return m


# ----------------------------------------------------------------------------- sampling helper


def sample_with_guider(guider, model, seed: int, steps: int, sampler_name: str, scheduler: str, latent: dict,
                       denoise: float = 1.0, disable_noise: bool = False):
    """Core KSampler's flow (noise, sigmas, preview callback, progress) with our guider instead of CFGGuider."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if disable_noise:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    else:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    noise_mask = latent.get("noise_mask")
    callback = latent_preview.prepare_callback(model, steps)
    disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED
    ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                 scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    sampler = comfy.samplers.sampler_object(sampler_name)
    samples = guider.sample(noise, latent_image, sampler, ks.sigmas, denoise_mask=noise_mask, callback=callback,
                            disable_pbar=disable_pbar, seed=seed)
    samples = samples.to(comfy.model_management.intermediate_device())
    out = latent.copy()
    out["samples"] = samples
    return out
