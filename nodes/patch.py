"""Apply Domain Guidance: a model patch that makes any sampler node (core KSampler included) do
decoupled guidance, through a pre-CFG function. The maths is `guidance.combine`."""
from __future__ import annotations

import comfy.patcher_extension

from ..forms import domain_info
from ..guidance.combine import cfg_equivalent, combine, term_active
from .conditioning import domain_conditioning
from .domain_model import ensure_base_model, ensure_domain_model
from .guider import ADDITIONAL_MODELS_KEY

PASS_ATTACHMENT = "indomain.domain_pass"   # the patched model's DomainPass (its `calls` count domain evaluations)


def patch_model_for_domain_guidance(model, domain_model, domain_weight: float, domain_on_control: bool = False,
                                    start_percent: float = 0.0, end_percent: float = 1.0):
    """A clone of `model` whose CFG (in any sampler node, core KSampler included) is decoupled guidance.

    Uses a pre-CFG function, so the sampler's `cfg` stays the control weight and every other
    CFG hook still runs. The models the domain pass needs are additional models of the clone:
    loaded with the base in one load_models_gpu call and released with it.
    """
    ensure_base_model(model)
    ensure_domain_model(domain_model)
    m = model.clone()
    if domain_weight == 0:
        return m
    domain_pass = domain_info(domain_model).form.domain_pass(domain_model)
    if domain_pass.models:
        m.set_additional_models(ADDITIONAL_MODELS_KEY, domain_pass.models)
    ms = m.get_model_object("model_sampling")
    sigma_start = float(ms.percent_to_sigma(start_percent))
    sigma_end = float(ms.percent_to_sigma(end_percent))

    def pre_cfg(args):
        conds_out = args["conds_out"]
        sigma = args["sigma"]
        if len(conds_out) < 2 or conds_out[1] is None or not term_active(float(sigma.reshape(-1)[0]), sigma_start, sigma_end):
            return conds_out
        cond, uncond = args["conds"][0], args["conds"][1]
        sample_sigmas = args["model_options"].get("transformer_options", {}).get("sample_sigmas")
        d = domain_pass.predict(args["model"], [domain_conditioning(uncond, cond, domain_on_control)], args["input"],
                                sigma, sample_sigmas)[0]
        u = conds_out[1]
        scale = args["cond_scale"]
        if scale != 0:
            new_cond, _ = cfg_equivalent(u, conds_out[0], scale, [(domain_weight, d)])
            return [new_cond, u] + list(conds_out[2:])
        # cfg 0: ComfyUI returns the uncond slot as the result
        return [conds_out[0], combine(u, [(domain_weight, d)])] + list(conds_out[2:])

    m.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=True)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, ADDITIONAL_MODELS_KEY,
                            lambda _p: domain_pass.prepare())
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, ADDITIONAL_MODELS_KEY,
                            lambda _p: domain_pass.release())
    m.set_attachments(PASS_ATTACHMENT, domain_pass)
    return m
