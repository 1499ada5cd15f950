"""Domain MODELs on the ComfyUI side: tell base and domain models apart, check that a file fits the
base, and build or load one (the file's form builds it: forms/)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..forms import domain_info, form_named
from ..guidance.checkpoint import (DomainCheckpointError, DomainMeta, architecture_signature,
                                   read_domain_checkpoint, weights_fingerprint)
from ..guidance.nulltext import is_null_text

log = logging.getLogger("indomain")


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
    expected = form_named(meta.form).expected_shapes(base_patcher.model.diffusion_model, meta)
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        unexpected = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise DomainCheckpointError(
            f"{name} does not fit the connected base UNet (missing {missing}, unexpected {unexpected}, "
            f"wrong shape {wrong}). Connect the checkpoint it was trained from.")


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
