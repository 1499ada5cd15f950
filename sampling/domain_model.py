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


TEXT_FREE_MARKER = "indomain.text_free"   # metadata a LoRA file may carry to say it was trained text-free
LORA_PARTS = {"lora_up.weight": "lora_up.weight", "lora_down.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora_A.weight": "lora_down.weight", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b"}


def _file_metadata(path: Path) -> dict | None:
    """The safetensors header metadata (None if the file is not readable safetensors: read_domain_checkpoint names
    that problem)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}
    except Exception:
        return None


def is_plain_lora(metadata: dict | None, keys) -> bool:
    """A LoRA file as core's Train LoRA node (and other trainers) write it: no InDomain metadata, LoRA keys."""
    return metadata is not None and "indomain.format" not in metadata and any(
        k.rsplit(".", 2)[-1] in ("alpha", "diff", "diff_b") or k.endswith(tuple("." + p for p in LORA_PARTS))
        for k in keys)


def core_lora_as_domain(base_patcher, path: Path, metadata: dict):
    """A LoRA in core's key format (or a layout core's LoRA loader maps: lora_unet_*, diffusers names) as a
    LoRA-form domain model on the connected base, text-free by the empty prompt.

    Refused by name when a key does not map onto the base or a shape does not fit (a LoRA for another model).
    A LoRA trained WITH captions cannot be told from a text-free one by its tensors: without the
    `indomain.text_free` metadata marker the loader logs a warning and trusts the user."""
    import comfy.lora
    import comfy.utils

    from ..forms.lora import LoRAForm
    from ..guidance.checkpoint import DomainMeta
    from ..guidance.lora import KEY_PREFIX, DomainLoRA, LoRAFormatError

    ensure_base_model(base_patcher)
    name = path.name
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(base_patcher.model, {})
    desc = BaseDescription.of(base_patcher)
    mapped, unmapped, fused = {}, [], []
    for key, t in sd.items():
        part = next((p for p in sorted(LORA_PARTS, key=len, reverse=True) if key.endswith("." + p)), None)
        if part is None:
            unmapped.append(key)
            continue
        prefix = key[:-len(part) - 1]
        target = key_map.get(prefix)
        if target is None and prefix.startswith("diffusion_model."):
            target = key_map.get(prefix[len("diffusion_model."):])
        if isinstance(target, tuple):
            fused.append(key)
            continue
        if not isinstance(target, str) or not target.startswith(KEY_PREFIX):
            unmapped.append(key)
            continue
        module = target[len(KEY_PREFIX):]
        module = module[:-len(".weight")] if module.endswith(".weight") else module.rsplit(".", 1)[0]
        mapped[f"{KEY_PREFIX}{module}.{LORA_PARTS[part]}"] = t.float()
    if unmapped or fused or not mapped:
        what = (f"keys that do not map onto it ({', '.join(unmapped[:3])})" if unmapped else
                f"keys for slices of fused layers ({', '.join(fused[:3])}), which the domain form cannot inject"
                if fused else "no LoRA keys")
        raise DomainCheckpointError(
            f"{name} is not a LoRA of the connected {desc.architecture} base: {what}. Connect the base it was "
            "trained on (a LoRA is tied to its model family and size), or load it with core's LoraLoaderModelOnly.")
    _unflatten_conv_adapters(mapped, base_patcher.model.diffusion_model)
    try:
        lora = DomainLoRA.from_state_dict(mapped, name)
        lora.check_fits(base_patcher.model.diffusion_model, name)
    except LoRAFormatError as e:
        raise DomainCheckpointError(str(e)) from None
    if str(metadata.get(TEXT_FREE_MARKER, "")).lower() not in ("empty_prompt", "true"):
        log.warning("InDomain: %s carries no text-free marker (metadata %s). Its tensors cannot tell whether it was "
                    "trained with empty captions (text-free: a domain model) or with captions (then it is not "
                    "text-free and the domain term would carry its captions' content). Using it as a text-free "
                    "domain model; the domain pass gets the encoded empty prompt.", name, TEXT_FREE_MARKER)
    meta = DomainMeta(desc.architecture, desc.model_type, desc.signature,
                      weights_fingerprint(base_patcher.model.diffusion_model.state_dict()), form="lora",
                      training={"source": "plain LoRA file", "text_free_marker": metadata.get(TEXT_FREE_MARKER, "")})
    return LoRAForm().domain_model(base_patcher, lora.to_state_dict(), meta, str(path))


def _unflatten_conv_adapters(mapped: dict, unet) -> None:
    """Core's trainer stores a Conv layer's LoRA like a Linear's (down [r, in*k*k], up [out, r]; its merge reshapes
    up @ down to the weight): give them the conv shapes the forward injection uses (same product), in place."""
    import math

    modules = dict(unet.named_modules())
    for key in [k for k in mapped if k.endswith(".lora_down.weight")]:
        name = key[len("diffusion_model."):-len(".lora_down.weight")]
        w = getattr(modules.get(name), "weight", None)
        down, up_key = mapped[key], key.replace(".lora_down.weight", ".lora_up.weight")
        if w is None or w.ndim <= 2 or down.ndim != 2 or down.shape[1] != math.prod(w.shape[1:]) or up_key not in mapped:
            continue
        mapped[key] = down.reshape(down.shape[0], *w.shape[1:])
        up = mapped[up_key]
        mapped[up_key] = up.reshape(up.shape[0], up.shape[1], *([1] * (w.ndim - 2)))


def load_domain_model(base_patcher, path: str | Path):
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".safetensors":
        metadata = _file_metadata(path)
        if metadata is not None and "indomain.format" not in metadata:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = list(f.keys())
            if is_plain_lora(metadata, keys):
                return core_lora_as_domain(base_patcher, path, metadata)
    state_dict, meta = read_domain_checkpoint(path)
    check_pairing(base_patcher, meta, state_dict, path.name)
    base_fp = weights_fingerprint(base_patcher.model.diffusion_model.state_dict())
    if base_fp != meta.base_fingerprint:
        log.info("InDomain: %s was trained from other %s weights than the connected base (fine for fine-tunes "
                 "of the same family; use its original base for best fidelity).", path.name, meta.base_architecture)
    return build_domain_model(base_patcher, state_dict, meta, source=str(path))
