"""The decoupled guider: u = B(x, negative); out = u + Σ_i w_i (M_i(x, c_i) - u), and running it like KSampler.

The maths is `guidance.combine`; this module decides which model sees which conditioning and
keeps ComfyUI's own conventions (ModelPatcher, set_additional_models, calc_cond_batch,
pre/post-CFG hooks) intact. A domain model's prediction comes from its form's DomainPass (forms/).

Which conditioning goes where:
- u = B(x, negative): the base's unconditional on the user's negative, exactly as core's CFG computes it (a long
  negative such as Wan's stock one stays u's; w_d = 0 is core CFG bit for bit).
- B(x, c): the base on the positive (text, ControlNet, reference latents, I2V inputs, a distilled model's guidance
  value: whatever the positive carries).
- D(x): text-free. SD1.x/2.x/SDXL null-text domain models get the negative (their constants replace
  cross-attention, so its text is ignored; SDXL gets its training `y`). Domain models text-free by the EMPTY PROMPT
  (LoRAs for the DiT families: SD3, Flux, Chroma, Flux.2, Lumina 2 / Z-Image, Qwen-Image, Wan) get the encoded
  empty prompt's text (the `empty_prompt` input; a Guidance Term's own conditioning) plus every non-text input of
  the negative: reference latents (Qwen-Image-Edit, Kontext, Flux.2), Wan I2V's concat latent / mask and
  clip-vision output, the guidance value of a distilled model, areas and masks
  (conditioning.text_free_conditioning). So u and D see the same image conditioning and differ only in text and
  model. The ControlNet reaches D only with domain_on_controlnet. A DiT domain model with no empty prompt
  connected is refused by name: DiTs fail with no text context, and the negative may be a real text.
- Guidance-distilled bases (Flux.1 dev: a guidance embed; cfg 1 users): core skips u at cfg 1; this guider
  computes u whenever another term is active (and Apply Domain Guidance turns the cfg-1 shortcut off), every pass
  getting its own conditioning's guidance value, so cfg 1 gives B(c) + w_d (D - u).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.model_management
import comfy.samplers

from ..forms import SeparateModelPass, domain_info
from ..guidance.combine import bound_update, cfg_equivalent, term_active
from ..guidance.domain_cache import DomainCache
from ..guidance.checkpoint import trained_y
from .conditioning import (EMPTY_PROMPT_REFUSAL, domain_conditioning, fill_text_free, first_control,
                           text_free_conditioning, with_control, with_trained_y)
from .domain_model import ensure_base_model, ensure_domain_model, refuse_multigpu, refuse_patched_model

ADDITIONAL_MODELS_KEY = "indomain"


@dataclass(frozen=True, eq=False)  # identity semantics: terms hold tensors
class Term:
    """One term w * (M(x, c) - u) as the user set it; evaluated only inside [start, end] percent."""

    model: object                 # ModelPatcher
    conditioning: list            # CONDITIONING
    weight: float
    start_percent: float = 0.0
    end_percent: float = 1.0
    label: str = "term"

    def describe(self) -> str:
        return f"{self.label} (w={self.weight:g}, {self.start_percent:g}–{self.end_percent:g})"


@dataclass(eq=False)
class _ScheduledTerm:
    """A term's per-guider state: its cond key, its sigma interval (per sampling run), its conds."""

    term: Term
    key: str
    has_control: bool
    sigma_start: float = float("inf")
    sigma_end: float = 0.0
    trained_y: object = None      # a domain model's training `y` (SDXL), fed instead of the negative's


@dataclass
class _PassGroup:
    """Terms evaluated by one pass (one domain model or other MODEL), batched in one call."""

    domain_pass: object
    terms: list = field(default_factory=list)


class DecoupledGuider(comfy.samplers.CFGGuider):
    """u = B(x, negative); out = u + Σ_i w_i (M_i(x, c_i) - u).

    Terms on the base model are batched with u in one calc_cond_batch call; terms on a domain
    model or another model are batched per model, through that model's pass. Models a pass
    needs are registered with set_additional_models on a clone of the base, so ComfyUI loads
    them in the same load_models_gpu call. When no term beyond one base term is active this
    *is* core CFG (the same function call), so domain_weight = 0 reproduces KSampler exactly.

    The first base term's weight is `self.cfg`, read at every step like core's guiders do, so
    core's CFGOverride (which sets guider.cfg over a percent range) changes it there.
    """

    def __init__(self, model, negative, terms: list[Term]):
        ensure_base_model(model)
        refuse_multigpu(model)
        refuse_patched_model(model, "Domain KSampler / Domain Guider / Multi-Term Guider")
        base = model.clone()
        negative = fill_text_free(negative, base)
        self.terms: list[_ScheduledTerm] = []
        self.primary: _ScheduledTerm | None = None
        self.groups: dict[int, _PassGroup] = {}
        conds = {"negative": negative}
        for i, t in enumerate(terms):
            group = self._group_for(t, base)
            is_primary = group is None and self.primary is None
            record = domain_info(t.model)
            st = _ScheduledTerm(t, "positive" if is_primary else f"indomain_term_{i}",
                                first_control(t.conditioning) is not None,
                                trained_y=trained_y(record.meta) if record is not None else None)
            if is_primary:
                self.primary = st
            if group is not None:
                group.terms.append(st)
            self.terms.append(st)
            term_conds = fill_text_free(t.conditioning, base)
            if record is not None and record.form.uses_empty_prompt(t.model):
                # text-free by the empty prompt (DiT LoRAs): the term's conditioning gives the text, the negative
                # every non-text input (reference latents, I2V concat / clip-vision, guidance); the term's own
                # ControlNet (if any) stays the term's
                control = first_control(term_conds)
                term_conds = [[c[0], with_control(c[1], control)]
                              for c in text_free_conditioning(negative, term_conds)]
            conds[st.key] = term_conds
        extra = [m for g in self.groups.values() for m in g.domain_pass.models]
        if extra:
            base.set_additional_models(ADDITIONAL_MODELS_KEY, extra)
        super().__init__(base)
        self.inner_set_conds(conds)
        self.cfg = self.primary.term.weight if self.primary is not None else 1.0
        self.model_calls = 0  # evaluations of passes other than the base (for tests and benchmarks)
        # a LoRA-form domain pass runs in the same batched forward as u and the base terms (False: its own call)
        self.one_forward = True
        # > 0: each domain-model term's update w (D - u) is scaled down, per sample, to at most this many times the
        # text/control update's norm (guidance.combine.bound_update). Off (0) by default and not a node input:
        # the toy benchmark's "bound" remedies try it (docs/claim.md, overshoot remedies)
        self.domain_max_ratio = 0.0
        # domain caching (guidance/domain_cache.py): terms on another model evaluated on fewer calls; off by default
        self.domain_cache = DomainCache()

    def _group_for(self, t: Term, base) -> _PassGroup | None:
        """The pass group of a term, or None for a term on the base model itself."""
        record = domain_info(t.model)
        if record is None and t.model.is_clone(base):
            if not base.clone_has_same_weights(t.model):
                raise ValueError(
                    f"{t.describe()}: its MODEL is the base model with different patches (e.g. a LoRA on one "
                    "branch only). ComfyUI holds one set of patches per model; apply the LoRA before branching.")
            return None
        if type(t.model.model.latent_format) is not type(base.model.latent_format):
            raise ValueError(f"{t.describe()}: its MODEL works in a different latent space "
                             f"({type(t.model.model.latent_format).__name__}) than the base "
                             f"({type(base.model.latent_format).__name__}); all terms must share one.")
        key = id(record) if record is not None else id(t.model.model)
        if key in self.groups and self.groups[key].terms:
            owner = self.groups[key].terms[0].term.model
            if owner is not t.model and not owner.clone_has_same_weights(t.model):
                raise ValueError(
                    f"{t.describe()}: its MODEL is a copy of another term's model with different "
                    "patches (e.g. a LoRA on one copy only). ComfyUI holds one set of patches per model, so both "
                    "terms would silently use the first copy's. Apply the patch to both copies, or load the domain "
                    "UNet a second time with another 'Load Domain UNet' node.")
        if key not in self.groups:
            domain_pass = record.form.domain_pass(t.model) if record is not None else SeparateModelPass(t.model)
            self.groups[key] = _PassGroup(domain_pass)
        return self.groups[key]

    # -- sampling lifecycle
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        ms = self.model_patcher.get_model_object("model_sampling")
        for st in self.terms:
            st.sigma_start = float(ms.percent_to_sigma(st.term.start_percent))
            st.sigma_end = float(ms.percent_to_sigma(st.term.end_percent))
        for g in self.groups.values():
            g.domain_pass.prepare()
        self._term_conds = None
        self.domain_cache.reset()
        try:
            return super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        finally:
            for g in self.groups.values():
                g.domain_pass.release()

    def _conds_for(self, st: _ScheduledTerm):
        if self._term_conds is None:
            self._term_conds = {}
            for s in self.terms:
                conds = self.conds[s.key]
                if not s.has_control:  # process_conds may copy a positive's control into other conds
                    conds = [with_control(c) for c in conds]
                conds = with_trained_y(conds, s.trained_y)
                self._term_conds[s.key] = conds
        return self._term_conds[st.key]

    def weight(self, st: _ScheduledTerm) -> float:
        """A term's weight at this step: the primary (first base) term's is self.cfg."""
        return self.cfg if st is self.primary else st.term.weight

    def _shared_group(self) -> _PassGroup | None:
        """The one pass group that shares the base's forward (the first whose pass can), if one_forward is on.
        Only one: each group's rows are indices into the whole batch, which a second, nested injection
        would not see."""
        if not self.one_forward:
            return None
        for g in self.groups.values():
            if getattr(g.domain_pass, "shares_base_forward", False):
                return g
        return None

    def _options_with_rows(self, model_options: dict, group: _PassGroup, cond_indices) -> dict:
        """model_options plus the group's injection wrapper for the rows of `cond_indices` (built once per
        model_options object and index set, i.e. once per sampling run)."""
        import comfy.model_patcher

        from ..forms.lora import add_wrapper

        key = (id(model_options), tuple(cond_indices))
        cached = getattr(self, "_rows_options", None)
        if cached is None or cached[0] != key or cached[1] is not model_options:
            opts = add_wrapper(comfy.model_patcher.create_model_options_clone(model_options),
                               group.domain_pass.rows_wrapper(cond_indices))
            self._rows_options = cached = (key, model_options, opts)
        return cached[2]

    def active_terms(self, sigma: float | None) -> list[_ScheduledTerm]:
        """The terms on at `sigma` (None: every term runs over the whole schedule, see step_sigma)."""
        return [st for st in self.terms if self.weight(st) != 0
                and (sigma is None or term_active(sigma, st.sigma_start, st.sigma_end))]

    # -- host syncs (issue 24): reading sigma on the host waits for the device; only a term's interval needs it
    def step_sigma(self, timestep) -> float | None:
        """This step's sigma read on the host, or None when every term runs over the whole schedule (0-100%),
        where the interval test cannot fail: then the step reads no tensor value. Domain caching (opt-in) scales
        a reused direction by sigma, so it reads it."""
        if not self.domain_cache.enabled and all(st.term.start_percent <= 0 and st.term.end_percent >= 1
                                                 for st in self.terms):
            return None
        return float(timestep.reshape(-1)[0])

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = self.step_sigma(timestep)
        active = self.active_terms(sigma)
        primary = self.primary if self.primary in active else None
        others = [st for st in active if st is not primary]
        negative = self.conds["negative"]
        if not others:
            if primary is not None:  # exactly core CFG
                return comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, self.conds["positive"],
                                                        self.cfg, model_options=model_options, seed=seed)
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, None, negative, 1.0,
                                                    model_options=model_options, seed=seed)

        grouped = {id(st) for g in self.groups.values() for st in g.terms}
        cache = self.domain_cache  # cached terms leave the batch: their model is not called on this step
        cached = {id(st) for st in others if id(st) in grouped and not cache.wants(id(st), sigma, x.shape)}
        base_terms = [st for st in others if id(st) not in grouped]
        conds = [self.conds["positive"] if primary is not None else None, negative]
        conds += [self._conds_for(st) for st in base_terms]
        # a pass on the base's own UNet (LoRA form) joins u's batched forward, its rows marked by cond index
        shared = self._shared_group()
        shared_terms = [st for st in shared.terms if st in others and id(st) not in cached] if shared is not None else []
        first_shared = len(conds)
        conds += [self._conds_for(st) for st in shared_terms]
        run_options = model_options
        if shared_terms:
            run_options = self._options_with_rows(model_options, shared,
                                                  range(first_shared, first_shared + len(shared_terms)))
        injection = getattr(shared.domain_pass, "injection", None) if shared_terms else None
        applied_before = injection.applications if injection is not None else 0
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model, "model_options": run_options}
            out = model_options["sampler_calc_cond_batch_function"](args)
        else:
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, run_options)
        preds = {id(st): out[2 + i] for i, st in enumerate(base_terms)}
        preds.update({id(st): out[first_shared + i] for i, st in enumerate(shared_terms)})
        if shared_terms:
            self.model_calls += 1
            if injection is not None:
                from ..forms.lora import check_applied

                check_applied(injection, applied_before, "batched forward")
        for g in self.groups.values():
            g_terms = [st for st in g.terms if st in others and id(st) not in cached]
            if not g_terms or g is shared:
                continue
            self.model_calls += 1
            g_out = g.domain_pass.predict(self.inner_model, [self._conds_for(st) for st in g_terms], x, timestep,
                                          model_options)
            preds.update({id(st): g_out[i] for i, st in enumerate(g_terms)})

        uncond = out[1]
        for st in others:
            if id(st) in cached:
                preds[id(st)] = cache.reuse(id(st), sigma, uncond)
            elif id(st) in grouped:
                cache.store(id(st), sigma, uncond, preds[id(st)])
        cache.observe(uncond)
        terms = [(self.weight(st), preds[id(st)]) for st in others]
        if self.domain_max_ratio > 0 and primary is not None:
            reference = self.cfg * (out[0] - uncond)
            terms = [(w, uncond + bound_update(w * (e - uncond), reference, self.domain_max_ratio) / w)
                     if id(st) in grouped else (w, e) for (w, e), st in zip(terms, others)]
        cond, scale = cfg_equivalent(uncond, out[0] if primary is not None else None,
                                     self.cfg if primary is not None else 0.0, terms)
        conds_out = [cond, uncond]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds[:2], "conds_out": conds_out, "cond_scale": scale, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            conds_out = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, conds_out[0], conds_out[1], scale, x, timestep,
                                           model_options=model_options, cond=conds[0], uncond=conds[1])


def domain_text_source(domain_model, negative, empty_prompt, node: str):
    """What gives the domain pass its text: the negative for the SD null-text forms (their constants ignore it),
    the encoded empty prompt for models text-free by the empty prompt (refused by name when it is missing)."""
    if not domain_info(domain_model).form.uses_empty_prompt(domain_model):
        return negative
    if not empty_prompt:
        raise ValueError(EMPTY_PROMPT_REFUSAL.format(node=node))
    return empty_prompt


def domain_guider(model, domain_model, positive, negative, cfg: float, domain_weight: float,
                  domain_on_control: bool = False, start_percent: float = 0.0, end_percent: float = 1.0,
                  extra_terms: list[Term] | None = None, empty_prompt=None,
                  node: str = "Domain KSampler / Domain Guider", domain_cache: str = "off",
                  domain_cache_threshold: float = 0.25) -> DecoupledGuider:
    """The standard decoupled guider: text/control term from the base, domain term from the domain model.

    `empty_prompt`: the encoded empty prompt, required when the domain model is text-free by it (DiT LoRAs;
    DecoupledGuider then takes its text and the negative's non-text conditioning); ignored otherwise.
    `domain_cache` / `domain_cache_threshold`: guidance/domain_cache.py (off: D on every call)."""
    ensure_domain_model(domain_model)
    source = domain_text_source(domain_model, negative, empty_prompt, node)
    terms = [Term(model, positive, cfg, label="control (cfg)"),
             Term(domain_model, domain_conditioning(source, positive, domain_on_control), domain_weight,
                  start_percent, end_percent, label="domain")]
    guider = DecoupledGuider(model, negative, terms + list(extra_terms or []))
    guider.domain_cache = DomainCache(domain_cache, domain_cache_threshold)
    return guider


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
