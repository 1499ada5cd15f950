"""Apply Domain Guidance: a model patch that makes any sampler node (core KSampler included) do
decoupled guidance, through a pre-CFG function. The maths is `guidance.combine`.

Stacking: a second Apply Domain Guidance on an already patched model adds its term to the same
pre-CFG function (out = u + w_c (c - u) + Σ w_i (D_i(x) - u), every D_i against the base's own u),
and every domain model is registered to load with the base.

A domain model that is text-free by the empty prompt (DiT LoRAs) needs its own conds: an OUTER_SAMPLE
wrapper adds them to the sampler's conds before core processes them (the empty prompt's text, the
negative's non-text conditioning: sampling/conditioning.text_free_conditioning), so core encodes them with
the run's latent, denoise mask and seed like the negative; the pre-CFG function reads them back. The
cfg-1 shortcut is off (disable_cfg1_optimization), so u exists at cfg 1 too (guidance-distilled bases)."""
from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension

from ..forms import domain_info
from ..guidance.combine import cfg_equivalent, combine, term_active
from ..guidance.checkpoint import trained_y
from ..guidance.domain_cache import DEFAULT_THRESHOLD, OFF, DomainCache, check_mode
from ..sampling.conditioning import domain_conditioning, text_free_conditioning, with_trained_y
from ..sampling.domain_model import PATCH_ATTACHMENT, ensure_base_model, ensure_domain_model, refuse_multigpu
from ..sampling.guider import ADDITIONAL_MODELS_KEY, domain_text_source


@dataclass(frozen=True, eq=False)
class PatchTerm:
    domain_model: object          # the domain MODEL (ModelPatcher)
    domain_pass: object           # its form's DomainPass
    weight: float
    domain_on_control: bool
    sigma_start: float
    sigma_end: float
    trained_y: object = None      # the domain model's training `y` (SDXL), fed instead of the negative's
    empty_prompt: object = None   # raw CONDITIONING of the empty prompt, for models text-free by it (else None)
    cond_key: str = ""            # the key of its conds in the sampler's conds (empty_prompt models)
    cache_mode: str = OFF         # domain caching of this term (guidance/domain_cache.py)
    cache_threshold: float = DEFAULT_THRESHOLD
    full_range: bool = False      # on from 0 % to 100 % of the schedule: its interval test cannot fail


@dataclass(frozen=True, eq=False)
class DomainPatch:
    """What Apply Domain Guidance put on a model: its terms, and the one pre-CFG function evaluating them."""

    terms: tuple
    pre_cfg: object


def _refuse_same_model_other_patches(terms, domain_model) -> None:
    for t in terms:
        if domain_info(t.domain_model) is domain_info(domain_model) and t.domain_model.is_clone(domain_model) \
                and not t.domain_model.clone_has_same_weights(domain_model):
            raise ValueError(
                "Apply Domain Guidance: this domain_model is a copy of one already applied to the model, with "
                "different patches (e.g. a LoRA on one copy only). ComfyUI holds one set of patches per model, so "
                "both terms would silently use one of them. Apply the patch to both copies, or load the domain "
                "UNet a second time with another 'Load Domain UNet' node.")


def patch_model_for_domain_guidance(model, domain_model, domain_weight: float, domain_on_control: bool = False,
                                    start_percent: float = 0.0, end_percent: float = 1.0, empty_prompt=None,
                                    domain_cache: str = OFF, domain_cache_threshold: float = DEFAULT_THRESHOLD):
    """A clone of `model` whose CFG (in any sampler node, core KSampler included) is decoupled guidance.

    Uses a pre-CFG function, so the sampler's `cfg` stays the control weight and every other
    CFG hook still runs. The models the domain passes need are additional models of the clone:
    loaded with the base in one load_models_gpu call and released with it. On a model that is
    already patched, the new domain term is added to the existing ones (see the module text).
    """
    ensure_base_model(model)
    ensure_domain_model(domain_model)
    refuse_multigpu(model)
    check_mode(domain_cache, domain_cache_threshold)
    m = model.clone()
    if domain_weight == 0:
        return m
    previous = m.get_attachment(PATCH_ATTACHMENT)
    terms = tuple(previous.terms) if previous is not None else ()
    _refuse_same_model_other_patches(terms, domain_model)
    ms = m.get_model_object("model_sampling")
    source = domain_text_source(domain_model, None, empty_prompt, "Apply Domain Guidance")
    terms += (PatchTerm(domain_model, domain_info(domain_model).form.domain_pass(domain_model), float(domain_weight),
                        bool(domain_on_control), float(ms.percent_to_sigma(start_percent)),
                        float(ms.percent_to_sigma(end_percent)), trained_y(domain_info(domain_model).meta),
                        empty_prompt=source, cond_key=f"indomain_domain_{len(terms)}" if source is not None else "",
                        cache_mode=domain_cache, cache_threshold=float(domain_cache_threshold),
                        full_range=start_percent <= 0 and end_percent >= 1),)
    caches = [DomainCache(t.cache_mode, t.cache_threshold) for t in terms]   # per term, reset per sampling run
    # host syncs (issue 24): reading sigma on the host waits for the device; only a partial interval or caching
    # (which scales a reused direction by sigma) needs its value
    read_sigma = any(not t.full_range or t.cache_mode != OFF for t in terms)
    run = {}   # the guider of the sampling run in progress (set by the OUTER_SAMPLE wrapper)

    def add_domain_conds(executor, *args, **kwargs):
        guider = executor.class_obj
        conds = getattr(guider, "conds", None)
        added = []
        if isinstance(conds, dict) and conds.get("negative"):
            import comfy.sampler_helpers

            for t in terms:
                if t.empty_prompt is not None:
                    empty = comfy.sampler_helpers.convert_cond(t.empty_prompt)
                    conds[t.cond_key] = text_free_conditioning(conds["negative"], empty)
                    added.append(t.cond_key)
        run["guider"] = guider
        try:
            return executor(*args, **kwargs)
        finally:
            run.clear()
            if isinstance(conds, dict):
                for k in added:
                    getattr(guider, "conds", {}).pop(k, None)

    def domain_conds(t, uncond):
        if t.empty_prompt is None:
            return uncond
        guider = run.get("guider")
        conds = getattr(guider, "conds", None) or {}
        if t.cond_key not in conds:
            raise RuntimeError("Apply Domain Guidance: the empty-prompt conds of the domain term are missing (the "
                               "sampler did not run the model's OUTER_SAMPLE wrappers, or has no negative). Use the "
                               "Domain KSampler or Domain Guider with this model instead.")
        return conds[t.cond_key]

    def pre_cfg(args):
        conds_out = args["conds_out"]
        sigma = args["sigma"]
        s = float(sigma.reshape(-1)[0]) if read_sigma else None
        active = [t for t in terms if s is None or term_active(s, t.sigma_start, t.sigma_end)]
        if len(conds_out) < 2 or conds_out[1] is None or not active:
            return conds_out
        cond, uncond = args["conds"][0], args["conds"][1]
        u = conds_out[1]
        extra = []
        for t in active:
            cache = caches[terms.index(t)]
            if not cache.wants(0, s, u.shape):
                extra.append((t.weight, cache.reuse(0, s, u)))  # the domain model is not called on this step
                continue
            conds = with_trained_y(domain_conditioning(domain_conds(t, uncond), cond, t.domain_on_control), t.trained_y)
            d = t.domain_pass.predict(args["model"], [conds],
                                      args["input"], sigma, args["model_options"])[0]
            cache.store(0, s, u, d)
            extra.append((t.weight, d))
        for cache in caches:
            cache.observe(u)
        scale = args["cond_scale"]
        if scale != 0:
            new_cond, _ = cfg_equivalent(u, conds_out[0], scale, extra)
            return [new_cond, u] + list(conds_out[2:])
        # cfg 0: ComfyUI returns the uncond slot as the result
        return [conds_out[0], combine(u, extra)] + list(conds_out[2:])

    fns = m.model_options.get("sampler_pre_cfg_function", [])
    if previous is not None and previous.pre_cfg in fns:  # one function for all terms, where the first one was
        fns[fns.index(previous.pre_cfg)] = pre_cfg
    else:
        m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)
    models = []
    for t in terms:
        models += [x for x in t.domain_pass.models if not any(x is y for y in models)]
    if models:
        m.set_additional_models(ADDITIONAL_MODELS_KEY, models)
    for call_type in (comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, comfy.patcher_extension.CallbacksMP.ON_CLEANUP):
        m.remove_callbacks_with_key(call_type, ADDITIONAL_MODELS_KEY)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ADDITIONAL_MODELS_KEY)
    if any(t.empty_prompt is not None for t in terms):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, ADDITIONAL_MODELS_KEY, add_domain_conds)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ADDITIONAL_MODELS_KEY,
                            lambda _p: [c.reset() for c in caches] + [t.domain_pass.prepare() for t in terms])
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ADDITIONAL_MODELS_KEY,
                            lambda _p: [t.domain_pass.release() for t in terms])
    m.set_attachments(PATCH_ATTACHMENT, DomainPatch(terms, pre_cfg))
    return m
