"""Domain model forms: what kind of model a domain checkpoint holds, and everything that depends on it.

A form is one `DomainModelForm` object, registered in FORMS under its `name`; the name is also the
checkpoint's `indomain.form` field (files written before the field existed read as "full").

    full   the null-text UNet: a full copy of the base UNet, cross-attention replaced by calibrated
           constants (the paper's domain model; the default)
    plain  plain fine-tune of the unmodified UNet on the empty prompt (the benchmarks' naive baseline)
    lora   a low-rank null-text adapter on the base's own weights (MB-sized file, no second UNet)

The interface (forms/base.py), as the trainer and the nodes use it:

Training (training/loop.py)
    build_trainable(base_patcher, clip, calib_latents, seed, device) -> Trainable
        the module to train, built from a copy of the base (the base is never modified); the
        EmptyPrompt its forward pass gets; the record saved as calibration metadata
    restore_trainable(base_patcher, clip, latent_hw, record) -> Trainable
        the same module's skeleton for --resume (its weights come from the resume state next)
    trainable_parameters(module) -> list[(name, Parameter)]
        which parameters train (the optimiser and the EMA see only these)
File (the generic format is guidance/checkpoint.py; each form's content check is registered there)
    file_state(module_state_dict) -> dict       what of the trained module goes into the file
    write(path, module_state_dict, meta) -> Path
Sampling (nodes/)
    expected_shapes(base_unet, meta) -> {key: shape}
        what a file for this base must hold (pairing check; meta for settings such as a rank)
    domain_model(base_patcher, state_dict, meta, source) -> ModelPatcher
        what Load Domain UNet returns; carries a DomainRecord attachment (see domain_info)
    domain_pass(domain_patcher) -> DomainPass
        what the guider and the KSampler patch call for the domain prediction. A pass says which
        models to load with the base (`models`, maybe none) and predicts for a list of conds:
        prepare() / predict(base_model, conds, x, timestep, model_options) -> [x0] / release().
        It may run on a model of its own (full, plain: SeparateModelPass, which uses its own
        model_options plus the run's sample_sigmas) or on the base's own diffusion model with
        per-pass patches: base_model is the BaseModel sampling right now, model_options the run's
        options for it (transformer_options["sample_sigmas"] included); copy them before adding to them.
    uses_empty_prompt(domain_patcher) -> bool
        True when the model is text-free by the encoded empty prompt (DiT LoRAs: no constants): its pass
        gets the empty prompt's text and the negative's non-text conditioning (sampling/conditioning.py
        text_free_conditioning), and the sampling nodes refuse to run without an `empty_prompt`.

A new form: a module here with a DomainModelForm subclass, its file check in
guidance/checkpoint.py STATE_CHECKS, and an entry in FORMS below.
"""
from __future__ import annotations

from ..guidance.checkpoint import DEFAULT_FORM, DomainCheckpointError
from .base import DomainModelForm, DomainPass, DomainRecord, SeparateModelPass, Trainable, domain_info
from .full import FullForm
from .lora import LoRAForm
from .plain import PlainFineTuneForm

FORMS: dict[str, DomainModelForm] = {f.name: f for f in (FullForm(), PlainFineTuneForm(), LoRAForm())}


def form_named(name: str) -> DomainModelForm:
    try:
        return FORMS[name]
    except KeyError:
        raise DomainCheckpointError(f"unknown domain model form {name!r} (this InDomain knows {', '.join(FORMS)}); "
                                    "update the pack to use files of that form.") from None


__all__ = ["DEFAULT_FORM", "FORMS", "form_named", "DomainModelForm", "DomainPass", "DomainRecord",
           "SeparateModelPass", "Trainable", "domain_info", "FullForm", "PlainFineTuneForm", "LoRAForm"]
