"""Decoupled-guidance nodes: Domain KSampler, Domain Guider, Apply Domain Guidance, Guidance Term,
Multi-Term Guider. Wiring only: the guider is sampling/guider.py, the KSampler patch nodes/patch.py,
the maths guidance/combine.py."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..guidance.combine import CONTROL_WEIGHT_START, DOMAIN_WEIGHT_START
from ..guidance.domain_cache import DEFAULT_THRESHOLD, MODES as CACHE_MODES, OFF as CACHE_OFF, DomainCache
from .validation import check_finite, check_interval, combo_problem, first_problem
from ..sampling.domain_model import ensure_base_model
from ..sampling.guider import DecoupledGuider, Term, domain_guider, sample_with_guider
from .patch import patch_model_for_domain_guidance
from .search import search_aliases

Terms = io.Custom("INDOMAIN_TERMS")

TIP_BASE = "The frozen BASE model: it gives the unconditional prediction and every text/ControlNet prediction."
TIP_DOMAIN = "The domain MODEL from 'Load Domain UNet' (or 'Train Domain UNet'). It gives only the domain direction."
TIP_CFG = ("Control weight w_c: strength of the text (and ControlNet) guidance from the base model. "
           "0 = unconditional in-domain generation. Start around 2.5 (the paper) to 5.")
TIP_DOMAIN_WEIGHT = ("Domain weight w_d: how strongly to pull towards the trained domain. 0 = plain CFG on the base "
                     "(exactly core KSampler). Start around 2.0 (1.5–2.5).")
TIP_DOMAIN_CN = ("Also feed the ControlNet attached to 'positive' to the domain UNet. Off: the domain pass sees no hint "
                 "(the control comes only from the base). On: both passes follow the hint.")
TIP_START = "Percent of the schedule (0 = first step) at which the domain term switches on; outside it the domain UNet is not run."
TIP_END = "Percent of the schedule at which the domain term switches off (1 = last step)."
TIP_TERMS = "Optional extra terms from a 'Guidance Term' chain, added on top (each w * (M(x, c) - u))."
TIP_EMPTY = ("The ENCODED EMPTY PROMPT (CLIP Text Encode with no text, this base's text encoder). Needed by domain "
             "models that are text-free by the empty prompt (LoRAs for DiT families: SD3, Flux, Chroma, Flux.2, "
             "Lumina 2 / Z-Image, Qwen-Image, Wan): the domain pass gets its text and the negative's non-text inputs "
             "(reference latents, I2V latents, clip vision). If your negative is the empty prompt, connect the same "
             "node here. Ignored for SD1.x/SDXL null-text domain models (their constants replace the text).")


TIP_CACHE = ("Domain caching: evaluate the domain model on fewer steps and reuse its direction D - u in between "
             "(scaled to the noise level). off = every step (exact). every 2 / every 3 = on every 2nd / 3rd model "
             "call. adaptive = again when the base's own u has moved by more than domain_cache_threshold since the "
             "last evaluation. Saves up to a third of the sampling time, but is not exact: the reused direction "
             "weakens the domain term (less domain look; docs/performance.md).")
TIP_CACHE_THRESHOLD = ("adaptive domain caching only: the relative change of the base's unconditional prediction u "
                       "(||u - u_eval|| / ||u_eval||) after which the domain model is evaluated again. Lower = more "
                       "evaluations (closer to off), higher = fewer.")


def _cache_inputs() -> list:
    return [
        io.Combo.Input("domain_cache", options=list(CACHE_MODES), default=CACHE_OFF, optional=True, tooltip=TIP_CACHE),
        io.Float.Input("domain_cache_threshold", default=DEFAULT_THRESHOLD, min=0.0, max=10.0, step=0.01,
                       optional=True, tooltip=TIP_CACHE_THRESHOLD),
    ]


def _cache_problem(domain_cache=None) -> str | None:
    """The domain_cache combo checked at queue time (ComfyUI 0.3.75 does not check a V3 node's combo values)."""
    return combo_problem("domain_cache", domain_cache, CACHE_MODES)


def _validate_domain_cache(cls, domain_cache=None) -> bool | str:
    """validate_inputs of the nodes whose only queue-time check is domain_cache."""
    return first_problem(_cache_problem(domain_cache))


def _empty_prompt_input():
    return io.Conditioning.Input("empty_prompt", optional=True, tooltip=TIP_EMPTY)


def _domain_inputs() -> list:
    return [
        io.Float.Input("domain_weight", default=DOMAIN_WEIGHT_START, min=-10.0, max=30.0, step=0.05, round=0.01, tooltip=TIP_DOMAIN_WEIGHT),
    ]


def _tail_inputs() -> list:
    return [
        io.Boolean.Input("domain_on_controlnet", default=False, tooltip=TIP_DOMAIN_CN),
        io.Float.Input("domain_start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=TIP_START),
        io.Float.Input("domain_end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip=TIP_END),
    ]


class DomainKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainKSampler", **search_aliases("InDomainKSampler"),
            display_name="Domain KSampler",
            category="InDomain",
            description="KSampler with decoupled guidance: eps = u + w_d (D(x) - u) + w_c (B(x, c) - u), u = B(x, ∅). "
                        "denoise < 1 gives domain-guided img2img editing.",
            inputs=[
                io.Model.Input("model", tooltip=TIP_BASE),
                io.Model.Input("domain_model", tooltip=TIP_DOMAIN),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Random seed for the initial noise."),
                io.Int.Input("steps", default=25, min=1, max=10000, tooltip="Number of denoising steps (25 with a multistep solver is the paper's setting)."),
                io.Float.Input("cfg", default=CONTROL_WEIGHT_START, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=TIP_CFG),
                *_domain_inputs(),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="dpmpp_2m",
                               tooltip="Sampling algorithm (as in KSampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras",
                               tooltip="Noise schedule (as in KSampler)."),
                io.Conditioning.Input("positive", tooltip="Text prompt (optionally with a ControlNet applied): the control condition c."),
                io.Conditioning.Input("negative", tooltip="Empty prompt or your negative prompt: the unconditional ∅."),
                io.Latent.Input("latent_image", tooltip="Empty latent for generation, or an encoded image for img2img editing."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 generates from noise; below 1 edits latent_image (SDEdit) towards the domain."),
                *_tail_inputs(),
                Terms.Input("extra_terms", optional=True, tooltip=TIP_TERMS),
                _empty_prompt_input(),
                *_cache_inputs(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, domain_cache=None) -> bool | str:
        return first_problem(combo_problem("sampler_name", sampler_name, comfy.samplers.SAMPLER_NAMES),
                             combo_problem("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES),
                             _cache_problem(domain_cache))

    @classmethod
    def execute(cls, model, domain_model, seed, steps, cfg, domain_weight, sampler_name, scheduler, positive, negative,
                latent_image, denoise, domain_on_controlnet=False, domain_start_percent=0.0, domain_end_percent=1.0,
                extra_terms=None, empty_prompt=None, domain_cache=CACHE_OFF,
                domain_cache_threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        check_finite("Domain KSampler", cfg=cfg, denoise=denoise, domain_weight=domain_weight, domain_start_percent=domain_start_percent,
                     domain_end_percent=domain_end_percent, domain_cache_threshold=domain_cache_threshold)
        check_interval("Domain KSampler", domain_start_percent, domain_end_percent)
        guider = domain_guider(model, domain_model, positive, negative, cfg, domain_weight, domain_on_controlnet,
                               domain_start_percent, domain_end_percent, extra_terms, empty_prompt, "Domain KSampler",
                               domain_cache, domain_cache_threshold)
        return io.NodeOutput(sample_with_guider(guider, model, seed, steps, sampler_name, scheduler, latent_image, denoise))


class DomainGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainGuider", **search_aliases("InDomainGuider"),
            display_name="Domain Guider",
            category="InDomain",
            description="Decoupled-guidance GUIDER for SamplerCustomAdvanced (same maths as Domain KSampler).",
            inputs=[
                io.Model.Input("model", tooltip=TIP_BASE),
                io.Model.Input("domain_model", tooltip=TIP_DOMAIN),
                io.Conditioning.Input("positive", tooltip="Text prompt (optionally with a ControlNet applied): the control condition c."),
                io.Conditioning.Input("negative", tooltip="Empty prompt or your negative prompt: the unconditional ∅."),
                io.Float.Input("cfg", default=CONTROL_WEIGHT_START, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=TIP_CFG),
                *_domain_inputs(),
                *_tail_inputs(),
                Terms.Input("extra_terms", optional=True, tooltip=TIP_TERMS),
                _empty_prompt_input(),
                *_cache_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    validate_inputs = classmethod(_validate_domain_cache)

    @classmethod
    def execute(cls, model, domain_model, positive, negative, cfg, domain_weight, domain_on_controlnet=False,
                domain_start_percent=0.0, domain_end_percent=1.0, extra_terms=None, empty_prompt=None,
                domain_cache=CACHE_OFF, domain_cache_threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        check_finite("Domain Guider", cfg=cfg, domain_weight=domain_weight, domain_start_percent=domain_start_percent,
                     domain_end_percent=domain_end_percent, domain_cache_threshold=domain_cache_threshold)
        check_interval("Domain Guider", domain_start_percent, domain_end_percent)
        return io.NodeOutput(domain_guider(model, domain_model, positive, negative, cfg, domain_weight,
                                           domain_on_controlnet, domain_start_percent, domain_end_percent, extra_terms,
                                           empty_prompt, "Domain Guider", domain_cache, domain_cache_threshold))


class ApplyDomainGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainApplyGuidance", **search_aliases("InDomainApplyGuidance"),
            display_name="Apply Domain Guidance",
            category="InDomain",
            description="Patches the base MODEL so any sampler node (core KSampler included) does decoupled guidance. "
                        "The sampler's cfg stays the control weight w_c. Other CFG patches (RescaleCFG, PAG, ...) keep working.",
            inputs=[
                io.Model.Input("model", tooltip=TIP_BASE),
                io.Model.Input("domain_model", tooltip=TIP_DOMAIN),
                *_domain_inputs(),
                *_tail_inputs(),
                _empty_prompt_input(),
                *_cache_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The base model with decoupled guidance; connect to KSampler's model.")],
        )

    validate_inputs = classmethod(_validate_domain_cache)

    @classmethod
    def execute(cls, model, domain_model, domain_weight, domain_on_controlnet=False, domain_start_percent=0.0,
                domain_end_percent=1.0, empty_prompt=None, domain_cache=CACHE_OFF,
                domain_cache_threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        check_finite("Apply Domain Guidance", domain_weight=domain_weight, domain_start_percent=domain_start_percent,
                     domain_end_percent=domain_end_percent, domain_cache_threshold=domain_cache_threshold)
        check_interval("Apply Domain Guidance", domain_start_percent, domain_end_percent)
        return io.NodeOutput(patch_model_for_domain_guidance(model, domain_model, domain_weight, domain_on_controlnet,
                                                             domain_start_percent, domain_end_percent, empty_prompt,
                                                             domain_cache, domain_cache_threshold))


class GuidanceTerm(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainGuidanceTerm", **search_aliases("InDomainGuidanceTerm"),
            display_name="Guidance Term",
            category="InDomain",
            description="One term w * (M(x, c) - u) of multi-guidance. Chain several (text, ControlNet, one or more domain "
                        "UNets) and feed the chain to Multi-Term Guider or to 'extra_terms'. Terms on the same model are "
                        "batched together.",
            inputs=[
                io.Model.Input("model", tooltip="Model that evaluates this term: the base model for text/ControlNet terms, "
                               "a domain MODEL for domain terms."),
                io.Conditioning.Input("conditioning", tooltip="Condition c for this term. A ControlNet applied to it "
                                      "(ControlNetApplyAdvanced) is used by this term, also for a domain model."),
                io.Float.Input("weight", default=DOMAIN_WEIGHT_START, min=-30.0, max=30.0, step=0.05, round=0.01,
                               tooltip="Term weight w. 0 skips the term (its model is not run)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Schedule percent where the term switches on."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Schedule percent where the term switches off."),
                Terms.Input("previous", optional=True, tooltip="Earlier terms of the chain (optional)."),
            ],
            outputs=[Terms.Output(display_name="terms")],
        )

    @classmethod
    def execute(cls, model, conditioning, weight, start_percent, end_percent, previous=None) -> io.NodeOutput:
        check_finite("Guidance Term", weight=weight, start_percent=start_percent, end_percent=end_percent)
        if start_percent > end_percent:
            raise ValueError(f"Guidance Term: start_percent ({start_percent}) is after end_percent ({end_percent}); swap them.")
        label = f"term {len(previous or []) + 1}"
        return io.NodeOutput(list(previous or []) + [Term(model, conditioning, weight, start_percent, end_percent, label)])


class MultiTermGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainMultiGuider", **search_aliases("InDomainMultiGuider"),
            display_name="Multi-Term Guider",
            category="InDomain",
            description="GUIDER for out = u + Σ w_i (M_i(x, c_i) - u), u = B(x, negative), with the terms of a Guidance Term chain.",
            inputs=[
                io.Model.Input("model", tooltip=TIP_BASE),
                io.Conditioning.Input("negative", tooltip="Empty prompt or your negative prompt: the unconditional ∅."),
                Terms.Input("terms", tooltip="The Guidance Term chain."),
                *_cache_inputs(),
            ],
            outputs=[io.Guider.Output()],
        )

    validate_inputs = classmethod(_validate_domain_cache)

    @classmethod
    def execute(cls, model, negative, terms, domain_cache=CACHE_OFF,
                domain_cache_threshold=DEFAULT_THRESHOLD) -> io.NodeOutput:
        ensure_base_model(model)
        if not terms:
            raise ValueError("Multi-Term Guider: the term chain is empty; connect at least one Guidance Term.")
        check_finite("Multi-Term Guider", domain_cache_threshold=domain_cache_threshold)
        guider = DecoupledGuider(model, negative, terms)
        # the terms on another model than the base (domain models) are the cached ones; the base's own run every call
        guider.domain_cache = DomainCache(domain_cache, domain_cache_threshold)
        return io.NodeOutput(guider)
