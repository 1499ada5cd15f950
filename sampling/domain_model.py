"""Domain MODELs on the ComfyUI side: tell base and domain models apart, check that a file fits the
base, and build or load one (the file's form builds it: forms/)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..forms import domain_info, form_named
from ..forms.base import MULTIGPU_REFUSAL
from ..guidance.checkpoint import (DomainCheckpointError, DomainMeta, architecture_signature,
                                   read_domain_checkpoint, trained_y, weights_fingerprint)
from ..guidance.nulltext import is_null_text

log = logging.getLogger("indomain")

PATCH_ATTACHMENT = "indomain.domain_pass"   # set by Apply Domain Guidance (nodes/patch.py) on the model it returns


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


def ensure_base_model(model_patcher, what: str = "model") -> None:
    if domain_info(model_patcher) is not None or is_null_text(model_patcher.model.diffusion_model):
        raise ValueError(f"The '{what}' input is a domain UNet. Connect the base checkpoint's MODEL "
                         "(e.g. from Load Checkpoint) there, and the domain MODEL to 'domain_model'.")


def ensure_domain_model(model_patcher, what: str = "domain_model") -> None:
    if domain_info(model_patcher) is None:
        raise ValueError(f"The '{what}' input is not a domain UNet. Load one with the 'Load Domain UNet' node "
                         "(InDomainLoadDomainUNet), or train one with 'Train Domain UNet'.")


def refuse_patched_model(model_patcher, node: str) -> None:
    """A model from Apply Domain Guidance carries its domain term as a pre-CFG hook; a guider that adds its own
    terms would run both, and its additional models would replace the patch's (the patch's domain model
    would not be loaded while its hook runs)."""
    get = getattr(model_patcher, "get_attachment", None)
    patch = get(PATCH_ATTACHMENT) if get is not None else None
    if patch is not None:
        weights = ", ".join(f"{t.weight:g}" for t in patch.terms)
        raise ValueError(
            f"{node}: the 'model' input comes from 'Apply Domain Guidance' (domain weight {weights}), which already "
            "adds a domain term. Connect the unpatched base MODEL here and set the domain term on this node "
            "(domain_model / domain_weight; more domain models through 'Guidance Term' -> extra_terms), or sample "
            "the patched model with the plain KSampler.")


def refuse_multigpu(model_patcher) -> None:
    """Newer cores' MultiGPU Work Units give the base per-GPU copies; the domain model has none (yet)."""
    get = getattr(model_patcher, "get_additional_models_with_key", None)
    if get is not None and get("multigpu"):
        raise ValueError(MULTIGPU_REFUSAL)


def check_pairing(base_patcher, meta: DomainMeta, state_dict: dict, name: str) -> None:
    """Raise DomainCheckpointError when the domain model was made from another architecture than the base."""
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
    form_named(meta.form).check_fits(base_patcher.model.diffusion_model, state_dict, name, meta)
    y = trained_y(meta, name)
    adm = base_patcher.model.model_config.unet_config.get("adm_in_channels")
    if y is not None and adm != y.shape[1]:
        raise DomainCheckpointError(f"{name}: its stored y vector has {y.shape[1]} values, but the connected base "
                                    f"takes {adm or 'none'}. Connect the checkpoint it was trained from.")


def build_domain_model(base_patcher, state_dict: dict, meta: DomainMeta, source: str = ""):
    """The domain MODEL for a (checked) state dict: its form decides what that is."""
    return form_named(meta.form).domain_model(base_patcher, state_dict, meta, source)


def load_domain_model(base_patcher, path: str | Path):
    path = Path(path)
    state_dict, meta = read_domain_checkpoint(path)
    check_pairing(base_patcher, meta, state_dict, path.name)
    base_fp = weights_fingerprint(base_patcher.model.diffusion_model.state_dict())
    if base_fp != meta.base_fingerprint:
        log.info("InDomain: %s was trained from other %s weights than the connected base (fine for fine-tunes "
                 "of the same family; use its original base for best fidelity).", path.name, meta.base_architecture)
    return build_domain_model(base_patcher, state_dict, meta, source=str(path))
