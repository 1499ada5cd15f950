"""The domain model form interface (documented in forms/__init__.py) and what the forms share.

ComfyUI is imported inside the functions that need it: the command-line trainer imports this
package before it has located ComfyUI.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..guidance.checkpoint import DomainMeta, write_domain_checkpoint

DOMAIN_ATTACHMENT = "indomain.domain_model"   # ModelPatcher attachment key of a domain model's DomainRecord

MULTIGPU_REFUSAL = (
    "InDomain does not run on several GPUs yet: the domain model has no per-GPU copies. Remove 'MultiGPU Work "
    "Units' (or other multi-GPU cloning) from the base MODEL; one GPU then runs the base and the domain model.")


@dataclass(frozen=True)
class DomainRecord:
    """Attached to every domain MODEL: which form it is, the file's metadata, where it came from."""

    form: "DomainModelForm"
    meta: DomainMeta
    source: str = ""


def domain_info(model_patcher) -> DomainRecord | None:
    """The DomainRecord of a domain MODEL (None for ordinary models)."""
    get = getattr(model_patcher, "get_attachment", None)
    return get(DOMAIN_ATTACHMENT) if get is not None else None


@dataclass
class Trainable:
    module: torch.nn.Module          # what the loop trains (float32, on `device` or the CPU)
    prompt: object                   # forms.model.EmptyPrompt: the conditioning of every forward pass
    record: dict                     # saved as the file's calibration metadata (and in the resume state)


class DomainPass(Protocol):
    models: list                     # ModelPatchers to load with the base (set_additional_models); may be empty

    def prepare(self) -> None: ...

    def predict(self, base_model, conds: list, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> list: ...

    def release(self) -> None: ...


def run_options(patcher, sample_sigmas) -> dict:
    """A model's own model_options for one sampling run (its patches, not the base's), plus the
    run's sigma schedule that schedule-aware patches read from transformer_options."""
    import comfy.model_patcher

    opts = comfy.model_patcher.create_model_options_clone(patcher.model_options)
    if sample_sigmas is not None:
        opts.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
    return opts


class SeparateModelPass:
    """A pass on a model of its own (full and plain forms, and any other MODEL a Guidance Term names):
    loaded with the base, evaluated with calc_cond_batch under its own model_options."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.models = [patcher]
        self._sigmas = None
        self._options = None

    def prepare(self) -> None:
        self.patcher.pre_run()  # sets current_patcher, which calc_cond_batch uses

    def predict(self, base_model, conds, x, timestep, model_options) -> list:
        import comfy.samplers

        # its own options (not the base's), once per sampling run, not per step (holding the sigmas tensor
        # keeps its id unique)
        sample_sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        if self._options is None or self._sigmas is not sample_sigmas:
            self._sigmas, self._options = sample_sigmas, run_options(self.patcher, sample_sigmas)
        return comfy.samplers.calc_cond_batch(self.patcher.model, conds, x, timestep, self._options)

    def release(self) -> None:
        self.patcher.cleanup()
        self._sigmas = self._options = None


def separate_unet_model(base_patcher, state_dict: dict, record: DomainRecord, prepare_unet=None):
    """A ModelPatcher around a fresh BaseModel of the base's class holding `state_dict` as its UNet.

    It is an ordinary ComfyUI model: the memory manager loads, offloads and frees it.
    `prepare_unet(unet)` reshapes the fresh UNet to the file's layout before the weights load.
    """
    import comfy.model_management
    import comfy.model_patcher

    from ..guidance.checkpoint import DomainCheckpointError

    base = base_patcher.model
    offload = comfy.model_management.unet_offload_device()
    try:
        domain = type(base)(base.model_config, model_type=base.model_type, device=offload)
    except TypeError as e:
        raise DomainCheckpointError(f"InDomain cannot build a domain model for {type(base).__name__} models yet ({e}).") from None
    if prepare_unet is not None:
        prepare_unet(domain.diffusion_model)
    # same noise schedule as the base, including any ModelSampling* patch applied before the loader
    domain.model_sampling = copy.deepcopy(base_patcher.get_model_object("model_sampling"))
    # the patcher class current loaders use: CoreModelPatcher (dynamic VRAM on GPUs in newer cores) unless the
    # base itself was loaded without it; hosts without CoreModelPatcher (0.3.75) have only ModelPatcher
    patcher_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    if getattr(base_patcher, "is_dynamic", None) is not None and not base_patcher.is_dynamic():
        patcher_class = comfy.model_patcher.ModelPatcher
    patcher = patcher_class(domain, load_device=base_patcher.load_device, offload_device=base_patcher.offload_device)
    # as core's loaders: a dynamic patcher takes the file's tensors as they are (assign), others copy them in
    dynamic = bool(getattr(patcher, "is_dynamic", lambda: False)())
    domain.diffusion_model.load_state_dict(state_dict, strict=True, assign=dynamic)
    if hasattr(patcher, "cached_patcher_init"):
        # core re-creates a model from its loader for multi-GPU copies and non-dynamic delegates; say why not
        patcher.cached_patcher_init = (_cannot_recreate, ())
    patcher.set_attachments(DOMAIN_ATTACHMENT, record)
    return patcher


def _cannot_recreate(*_args, **_kwargs):
    raise ValueError("ComfyUI asked to re-create the InDomain domain model from its loader (for per-GPU copies, or "
                     "a non-dynamic copy such as torch.compile makes); it cannot be re-created that way yet. "
                     + MULTIGPU_REFUSAL)


class DomainModelForm:
    """One kind of domain model. Subclasses set `name` and implement the methods that raise here."""

    name = ""
    description = ""
    DEFAULT_LR = 1e-5  # AdamW learning rate when the user leaves it to the form (the paper's, for a whole UNet)

    def for_config(self, config) -> "DomainModelForm":
        """The form as a training run's settings configure it (e.g. the LoRA form's rank); default: itself."""
        return self

    def keeps_key(self, key: str) -> bool:
        """Whether a trained module's state key belongs in the file and the resume state (default: all;
        a form with frozen base weights keeps only what it trains and its constants)."""
        return True

    # -- training
    def build_trainable(self, base_patcher, clip, calib_latents: torch.Tensor, seed: int, device) -> Trainable:
        raise NotImplementedError

    def restore_trainable(self, base_patcher, clip, latent_hw: tuple[int, int], record: dict) -> Trainable:
        raise NotImplementedError

    def trainable_parameters(self, module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return list(module.named_parameters())

    # -- file
    def file_state(self, module_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return module_state

    def write(self, path, module_state: dict[str, torch.Tensor], meta: DomainMeta, precision: str = "fp16") -> Path:
        return write_domain_checkpoint(path, self.file_state(module_state), dataclasses.replace(meta, form=self.name),
                                       precision=precision)

    # -- sampling
    def expected_shapes(self, base_unet: torch.nn.Module, meta: DomainMeta) -> dict[str, tuple]:
        raise NotImplementedError

    def check_fits(self, base_unet: torch.nn.Module, state_dict: dict, name: str, meta: DomainMeta) -> None:
        """Raise DomainCheckpointError unless a file's tensors fit `base_unet` (default: expected_shapes exactly)."""
        from ..guidance.checkpoint import DomainCheckpointError

        expected = self.expected_shapes(base_unet, meta)
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
        if expected != got:
            missing = sorted(set(expected) - set(got))[:3]
            unexpected = sorted(set(got) - set(expected))[:3]
            wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
            raise DomainCheckpointError(
                f"{name} does not fit the connected base UNet (missing {missing}, unexpected {unexpected}, "
                f"wrong shape {wrong}). Connect the checkpoint it was trained from.")

    def domain_model(self, base_patcher, state_dict: dict, meta: DomainMeta, source: str = ""):
        raise NotImplementedError

    def domain_pass(self, domain_patcher) -> DomainPass:
        return SeparateModelPass(domain_patcher)

    def uses_empty_prompt(self, domain_patcher) -> bool:
        """True: the model is text-free by the encoded empty prompt (DiT LoRAs), so its pass must get the empty
        prompt's text (sampling/conditioning.text_free_conditioning); False: it ignores the text it is handed (the
        SD null-text forms, whose constants replace cross-attention; the plain baseline gets the negative)."""
        return False
