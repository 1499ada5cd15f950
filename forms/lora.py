"""The LoRA form: a low-rank, null-text adapter on the base's own weights (guidance/lora.py).

Training: the base UNet (frozen, in half precision: TrainConfig.base_precision; its own weights, not a
copy, where they are already in that dtype: forms/model.shared_unet) converted to null-text with calibrated
constants, and a LoCon adapter on every Linear/Conv outside cross-attention; only the adapter trains, in
float32 (the optimiser and the EMA see only it), so memory is about the base's weights in half precision
plus activations (gradient checkpointing on by default).

Sampling: Load Domain UNet returns a clone of the BASE ModelPatcher with the adapter attached; no
second UNet exists. The domain pass runs the base's own diffusion model with the adapter injected
for that pass only (an APPLY_MODEL wrapper that, for the rows of the domain conds, adds the
low-rank term to every adapted layer's output and answers attn2 with the constant). Weights are
never rewritten, so the pass can also share one batched forward with u and the control term
(`rows_wrapper`, used by the guider).

What D is when the base carries patches: D = the base AS SAMPLED (the MODEL connected to the
sampler's / guider's / Apply Domain Guidance's `model` input: its weights and its model_options
patches, whether applied before or after Load Domain UNet) + the adapter, with every
cross-attention replaced by its constant. So a LoRA on the base reaches D (D runs on the base's
weights), and so does a forward patch such as an attn1 output patch, FreeU or a block patch; the
one-forward path (u, the control term and D in one batched call) and the two-call path (D in a
call of its own, as Apply Domain Guidance and `one_forward = False` do) compute the same D
because both run under the run's own model_options. What replaces or feeds cross-attention does
not reach D: an attn2 "replace" patch (IP-Adapter style: an image prompt on the text branch) runs
on the other rows only, and what an attn2_patch changes feeds only attn2, which D's rows answer
with the constant (an attn2_output_patch, which acts on attn2's output, acts on the constant); so
an IP-Adapter on the base acts on u and the control term and not on D, as in the full form, whose
separate domain UNet never sees the base's patches. Weight patches on the domain MODEL itself (a
LoRA applied to the output of Load Domain UNet) cannot act (D runs on the base's weights) and are
refused by name (`refuse_weight_patches`).

Text-free, per family. On SD1.x/2.x/SDXL UNets the adapter carries the paper's constants: every
cross-attention (attn2) answers with its calibrated constant on the domain rows, so the text the
domain pass is handed (the user's negative) is ignored. On the flow-matching DiTs (SD3/3.5, Flux,
Chroma, Flux.2, Lumina 2 / Z-Image, Qwen-Image, Wan 2.x) the adapter has no constants: it sits on the
base's Linear/Conv layers (core's LoRA key format, `diffusion_model.<module>.lora_up/lora_down/alpha`,
so core's LoRA loader reads the same file) and is text-free because it is trained and sampled with
the ENCODED EMPTY PROMPT. For the joint-attention DiTs (SD3, Flux, Chroma, Flux.2, Qwen-Image, Lumina 2 /
Z-Image) that is the only text-free form: text and image tokens go through the same attention (and the
same projections and MLPs, or shared-weight streams), so there is no separate cross-attention output to
replace by a constant, and dropping the text tokens altogether is an input these models never saw
(they fail with no text context). Wan has a separate cross-attention, where the paper's constants would
be an option; this form uses the empty prompt there too (one rule for every DiT; the constants for Wan
are not implemented). Which conditioning the domain pass gets is sampling/conditioning.py's
`text_free_conditioning`: the empty prompt's text, the negative's non-text conditioning.
"""
from __future__ import annotations

import torch

from ..guidance.checkpoint import DomainCheckpointError
from ..guidance.lora import ALPHA, DOWN, UP, DomainLoRA, LoRAFormatError
from ..guidance.lora_modules import DomainInjection, add_lora_layers, lora_layers, row_spec
from ..guidance.nulltext import convert_to_null_text
from .base import DOMAIN_ATTACHMENT, DomainModelForm, DomainRecord, Trainable

DEFAULT_RANK = 32
INJECTION_ATTACHMENT = "indomain.domain_lora"
WEIGHTS_ATTACHMENT = "indomain.domain_lora_weights"  # the base's patches_uuid when Load Domain UNet cloned it
WRAPPER_KEY = "indomain_domain_lora"


def rows_of(transformer_options: dict, batch: int, cond_indices):
    """Batch rows belonging to the conds in `cond_indices`, in Python (None: all rows; False: none; else a slice
    of consecutive rows or a tuple of ints), from `cond_or_uncond` (a Python list): no tensor is read, so the
    forward has no host sync for it."""
    if cond_indices is None:
        return None
    chunks = transformer_options.get("cond_or_uncond") or []
    if not chunks:
        return False
    per = batch // len(chunks)
    rows = [i * per + j for i, c in enumerate(chunks) if c in cond_indices for j in range(per)]
    if not rows:
        return False
    if len(rows) == batch:
        return None
    return row_spec(rows)


def _transformer_options(args, kwargs) -> dict:
    """The transformer_options of a BaseModel.apply_model call (positional after x, t, c_concat, c_crossattn,
    control; or a keyword)."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    if len(args) > 4 and isinstance(args[4], dict):
        return args[4]
    return {}


def injection_wrapper(injection: DomainInjection, cond_indices=None):
    """An APPLY_MODEL wrapper applying the adapter to the rows of `cond_indices` (all rows if None) of the
    diffusion model's forward.

    APPLY_MODEL (BaseModel.apply_model), not DIFFUSION_MODEL: every family runs it, while the diffusion models
    run DIFFUSION_MODEL wrappers only where their own forward does (SD3's MMDiT does not, on 0.3.75 and 0.33),
    and their forwards take transformer_options at different positions."""

    def wrapper(executor, x, *args, **kwargs):
        transformer_options = _transformer_options(args, kwargs)
        rows = rows_of(transformer_options, x.shape[0], cond_indices)
        if rows is False:
            return executor(x, *args, **kwargs)
        options = text_rows_replace_patches(transformer_options, x.shape[0], cond_indices)
        if options is not transformer_options:
            if "transformer_options" in kwargs:
                kwargs = dict(kwargs, transformer_options=options)
            else:
                args = args[:4] + (options,) + args[5:]
        model = executor.class_obj
        # under core's TorchCompileModel the diffusion model is the compiled module here (its APPLY_MODEL wrapper
        # runs outside this one): the adapter goes on the original's layers, which the compiled graph traces with
        # the adapter in it (the layers' classes are guarded, so a forward with and one without the adapter are
        # two graphs, each compiled once)
        unet = getattr(model.diffusion_model, "_orig_mod", model.diffusion_model)
        with injection.applied(unet, rows, x.shape[0], device=x.device, dtype=compute_dtype(model)):
            return executor(x, *args, **kwargs)

    return wrapper


def compute_dtype(model):
    """The dtype BaseModel.apply_model casts the diffusion model's input to (the layers' input dtype)."""
    if hasattr(model, "get_dtype_inference"):
        return model.get_dtype_inference()
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def text_rows_replace_patches(transformer_options: dict, batch: int, cond_indices) -> dict:
    """transformer_options whose attn2 replace patches (IP-Adapter style) see only the rows that are not
    domain rows, with their `cond_or_uncond`: inside the injection, attn2's to_q/to_k/to_v hand the patch
    those rows alone (guidance/lora_modules.py). With every row a domain row the patch is not run. Returns
    `transformer_options` itself when it holds no attn2 replace patch."""
    patches = (transformer_options.get("patches_replace") or {}).get("attn2")
    if not patches:
        return transformer_options
    chunks = list(transformer_options.get("cond_or_uncond") or [])
    text_chunks = [c for c in chunks if cond_indices is not None and c not in cond_indices]

    def text_rows_only(patch):
        def replace(q, k, v, extra_options):
            if q.shape[0] == batch:  # a block the adapter leaves alone: the whole batch, as core calls it
                return patch(q, k, v, extra_options)
            if q.shape[0] == 0:  # every row is a domain row: D has no cross-attention
                return q
            return patch(q, k, v, dict(extra_options, cond_or_uncond=text_chunks))
        return replace

    replace = dict(transformer_options["patches_replace"])
    replace["attn2"] = {block: text_rows_only(p) for block, p in patches.items()}
    return dict(transformer_options, patches_replace=replace)


def add_wrapper(model_options: dict, wrapper) -> dict:
    """model_options with `wrapper` added as an APPLY_MODEL wrapper (in place; returns it)."""
    import comfy.patcher_extension

    wrappers = model_options.setdefault("transformer_options", {}).setdefault("wrappers", {})
    wrappers.setdefault(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).setdefault(WRAPPER_KEY, []).append(wrapper)
    return model_options


def check_applied(injection: DomainInjection, before: int, what: str = "domain pass") -> None:
    """Refuse a domain prediction the adapter never reached (it would silently be the base's own)."""
    if injection.applications == before:
        raise RuntimeError(f"InDomain: the domain LoRA was not applied during the {what} (the model's forward did not "
                           "run the pack's APPLY_MODEL wrapper, or the batch carried no cond index). The result would "
                           "be the base model's; refusing. Report the model family.")


class InjectedPass:
    """The domain pass of a LoRA-form model: the base's diffusion model with the adapter injected.

    `models` is empty: nothing but the base is loaded. `predict` is the two-call variant (its own
    calc_cond_batch under the run's model_options, i.e. the base as sampled: see the module text); a
    guider that batches terms with u uses `rows_wrapper` instead.
    """

    shares_base_forward = True

    def __init__(self, injection: DomainInjection):
        self.injection = injection
        self.models = []
        self._run = None  # (the run's model_options, the same plus the injection): built once per sampling run

    def prepare(self) -> None:
        pass

    def rows_wrapper(self, cond_indices):
        return injection_wrapper(self.injection, set(cond_indices))

    def predict(self, base_model, conds, x, timestep, model_options) -> list:
        import comfy.model_patcher
        import comfy.samplers

        model_options = model_options if model_options is not None else {}
        if self._run is None or self._run[0] is not model_options:  # (holding it keeps its id unique)
            opts = add_wrapper(comfy.model_patcher.create_model_options_clone(model_options),
                               injection_wrapper(self.injection))
            self._run = (model_options, opts)
        before = self.injection.applications
        out = comfy.samplers.calc_cond_batch(base_model, conds, x, timestep, self._run[1])
        check_applied(self.injection, before)
        return out

    def release(self) -> None:
        self._run = None
        self.injection.clear_cache()


def refuse_weight_patches(domain_patcher) -> None:
    """A LoRA-form domain MODEL runs on the base's weights; weight patches applied to it after Load Domain UNet
    (a LoRA through LoraLoaderModelOnly / LoraLoader, a weight wrapper, a compute-dtype change) would be
    silently ignored, so they are refused by name."""
    loaded = domain_patcher.get_attachment(WEIGHTS_ATTACHMENT)
    if loaded is not None and getattr(domain_patcher, "patches_uuid", loaded) != loaded:
        raise ValueError(
            "The LoRA-form domain model has a LoRA (or another weight patch) applied after 'Load Domain UNet' "
            "(e.g. 'LoraLoaderModelOnly' or 'LoraLoader' on the domain_model output). A LoRA-form domain model runs "
            "on the base model's own weights, so that LoRA would be ignored. Apply the LoRA to the base MODEL "
            "instead ('LoraLoaderModelOnly' on the checkpoint's MODEL, before or after 'Load Domain UNet'): it then "
            "reaches the domain term and the text/control term alike. For a LoRA on the domain term only, use a "
            "full-form domain UNet file.")


class LoRAForm(DomainModelForm):
    name = "lora"
    description = "null-text LoRA (low-rank adapter on the base's own weights; cross-attention replaced by constants)"
    # adapters train at 1e-4..1e-3 (their up matrix starts at zero); 1e-5, the full form's, barely moves them
    DEFAULT_LR = 1e-4

    def __init__(self, rank: int = DEFAULT_RANK, alpha: float | None = None, base_precision: str = "auto"):
        self.rank = int(rank)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.base_precision = base_precision  # training: the frozen base's dtype (TrainConfig.base_precision)

    def configured(self, rank: int | None = None, alpha: float | None = None) -> "LoRAForm":
        return LoRAForm(self.rank if rank is None else rank, alpha, self.base_precision)

    def for_config(self, config) -> "LoRAForm":
        return LoRAForm(config.lora_rank, config.lora_alpha or None, getattr(config, "base_precision", "auto"))

    def base_dtype(self, base_patcher, device) -> torch.dtype:
        """The dtype the frozen base trains in on `device` (training/optim.base_dtype of the setting)."""
        from .precision import base_dtype

        if device is None:
            import comfy.model_management

            device = comfy.model_management.get_torch_device()
        weights = next((p.dtype for p in base_patcher.model.diffusion_model.parameters() if p.is_floating_point()), None)
        return base_dtype(self.base_precision, torch.device(device), weights)

    def keeps_key(self, key: str) -> bool:
        return key.endswith((".lora_down", ".lora_up", ".attn2.constant"))

    # -- training
    def build_trainable(self, base_patcher, clip, calib_latents, seed, device) -> Trainable:
        from .model import is_flow_model, make_null_text_unet

        if is_flow_model(base_patcher):
            return self._dit_trainable(base_patcher, clip, tuple(calib_latents.shape[-2:]), seed, device)
        unet, _constants, prompt, record = make_null_text_unet(base_patcher, clip, calib_latents, seed, device=device,
                                                               dtype=self.base_dtype(base_patcher, device))
        add_lora_layers(unet, self.rank, self.alpha, seed)
        return Trainable(unet, prompt, dict(record, lora={"rank": self.rank, "alpha": self.alpha}))

    def restore_trainable(self, base_patcher, clip, latent_hw, record) -> Trainable:
        from .model import empty_prompt, shared_unet

        lora = record.get("lora") or {}
        if lora.get("rank") not in (None, self.rank) or lora.get("alpha") not in (None, self.alpha):
            raise DomainCheckpointError(f"cannot resume: the run used rank {lora.get('rank')} / alpha {lora.get('alpha')}, "
                                        f"this one rank {self.rank} / alpha {self.alpha}. Use the original settings.")
        from .model import is_flow_model

        if is_flow_model(base_patcher):
            return self._dit_trainable(base_patcher, clip, latent_hw, 0, None, record)
        import comfy.model_management

        device = comfy.model_management.get_torch_device()
        # zero constants: the state holds the values
        unet = convert_to_null_text(shared_unet(base_patcher, self.base_dtype(base_patcher, device), device))
        add_lora_layers(unet, self.rank, self.alpha, 0)
        return Trainable(unet, empty_prompt(base_patcher, clip, latent_hw), record)

    def _dit_trainable(self, base_patcher, text, latent_hw, seed, device, record=None) -> Trainable:
        """Flow-matching DiTs: the adapter on every Linear/Conv of the base's own diffusion model, no constants;
        text-free by the encoded empty prompt, which every training step feeds (and the sampler feeds the domain
        pass). The file holds core's LoRA keys only, so core's LoRA loader reads it too."""
        from .model import dit_empty_prompt, shared_unet

        prompt = dit_empty_prompt(base_patcher, text, latent_hw)
        if device is None:
            import comfy.model_management

            device = comfy.model_management.get_torch_device()
        unet = shared_unet(base_patcher, self.base_dtype(base_patcher, device), device)
        add_lora_layers(unet, self.rank, self.alpha, seed)
        if record is None:
            record = {"text_free": "empty_prompt", "prompt": "", "seed": seed,
                      "lora": {"rank": self.rank, "alpha": self.alpha}}
        return Trainable(unet, prompt, record)

    def trainable_parameters(self, module):
        return [(n, p) for n, p in module.named_parameters() if n.endswith(("lora_down", "lora_up"))]

    # -- file
    def file_state(self, module_state):
        """The trained module's state (adapters + constants; frozen base weights are not saved) -> file keys."""
        layers = {}
        constants = {}
        for k, v in module_state.items():
            if k.endswith(".lora_down") or k.endswith(".lora_up"):
                name, part = k.rsplit(".", 1)
                layers.setdefault(name, {})[part] = v
            elif k.endswith(".attn2.constant"):
                constants[k[:-len(".attn2.constant")]] = v
        sd = {}
        for name, parts in layers.items():
            sd[f"diffusion_model.{name}.{DOWN}"] = parts["lora_down"]
            sd[f"diffusion_model.{name}.{UP}"] = parts["lora_up"]
            sd[f"diffusion_model.{name}.{ALPHA}"] = torch.tensor(self.alpha)
        for block, c in constants.items():
            sd[f"diffusion_model.{block}.attn2.constant"] = c
        return sd

    # -- sampling
    def expected_shapes(self, base_unet, meta):
        raise NotImplementedError("the LoRA form's layout depends on the file's rank: check_fits checks it")

    def check_fits(self, base_unet, state_dict, name, meta=None):
        try:
            DomainLoRA.from_state_dict(state_dict, name).check_fits(base_unet, name)
        except LoRAFormatError as e:
            raise DomainCheckpointError(str(e)) from None

    def domain_model(self, base_patcher, state_dict, meta, source=""):
        from pathlib import Path

        name = Path(source).name if source else "domain LoRA"
        try:
            lora = DomainLoRA.from_state_dict(state_dict, name)
        except LoRAFormatError as e:
            raise DomainCheckpointError(str(e)) from None
        patcher = base_patcher.clone()
        patcher.set_attachments(DOMAIN_ATTACHMENT, DomainRecord(self.configured(lora.rank, lora.alpha or None), meta, source))
        patcher.set_attachments(INJECTION_ATTACHMENT, DomainInjection(lora))
        patcher.set_attachments(WEIGHTS_ATTACHMENT, getattr(patcher, "patches_uuid", None))
        return patcher

    def domain_pass(self, domain_patcher):
        refuse_weight_patches(domain_patcher)
        return InjectedPass(domain_patcher.get_attachment(INJECTION_ATTACHMENT))

    def uses_empty_prompt(self, domain_patcher) -> bool:
        return not domain_patcher.get_attachment(INJECTION_ATTACHMENT).lora.text_free_by_constants


__all__ = ["LoRAForm", "InjectedPass", "injection_wrapper", "rows_of", "lora_layers", "DEFAULT_RANK"]
