"""Building a trainable domain UNet from a ComfyUI base model (copy, calibrate, null-text), and the model's
native noise and loss target: what every form builds with and what the trainer's loss uses.

Uses ComfyUI's own model code and model sampling, so the loss target is the model's native
one (ε for SD1.x/SDXL, v for v-prediction models) and every family ComfyUI loads works.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..guidance.checkpoint import DEFAULT_FORM, DomainMeta, architecture_signature, weights_fingerprint
from ..guidance.nulltext import calibrate_constants, convert_to_null_text

CALIBRATION_SIGMA_PERCENTS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class EmptyPrompt:
    """The empty-prompt inputs for the UNet (context, and SDXL's y), computed once from the text encoder."""

    context: torch.Tensor
    y: torch.Tensor | None

    def expand(self, batch: int, device, dtype) -> dict:
        out = {"context": self.context.to(device=device, dtype=dtype).expand(batch, -1, -1)}
        if self.y is not None:
            out["y"] = self.y.to(device=device, dtype=dtype).expand(batch, -1)
        return out


def trained_calibration(record: dict, prompt: EmptyPrompt) -> dict:
    """The file's calibration metadata: the run's record, plus the `y` vector every step used (SDXL: the empty
    prompt's pooled embedding at the training size), which the domain pass feeds when it samples."""
    from ..guidance.checkpoint import TRAINED_Y_KEY, vector_to_json

    return record if prompt.y is None else dict(record, **{TRAINED_Y_KEY: vector_to_json(prompt.y[:1])})


def is_conditioning(text) -> bool:
    """Whether `text` is a ComfyUI CONDITIONING (a list of [tensor, dict]) rather than a CLIP."""
    return (isinstance(text, (list, tuple)) and len(text) > 0 and isinstance(text[0], (list, tuple))
            and len(text[0]) == 2 and isinstance(text[0][0], torch.Tensor) and isinstance(text[0][1], dict))


def encoded_empty_prompt(text) -> list:
    """The encoded empty prompt as a CONDITIONING: `text` is one already (CLIP Text Encode of ""), or a CLIP
    that encodes "" here (the family's own text encoder)."""
    if is_conditioning(text):
        return [[text[0][0], dict(text[0][1])]]
    out = text.encode_from_tokens(text.tokenize(""), return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return [[cond, out]]


def is_flow_model(model_patcher) -> bool:
    """A flow-matching (CONST) model: SD3/3.5, Flux, Chroma, Flux.2, Lumina 2 / Z-Image, Qwen-Image, Wan."""
    import comfy.model_sampling as ms

    return isinstance(model_patcher.get_model_object("model_sampling"), ms.CONST)


def empty_prompt(model_patcher, clip, latent_hw: tuple[int, int]):
    """Encode "" with the checkpoint's own text encoder (or take the given encoded empty prompt) and let the
    model build its extra inputs. Flow-matching DiTs get a DiTPrompt (dit_empty_prompt)."""
    if is_flow_model(model_patcher):
        return dit_empty_prompt(model_patcher, clip, latent_hw)
    if is_conditioning(clip):
        cond, pooled = clip[0][0], clip[0][1].get("pooled_output")
    else:
        tokens = clip.tokenize("")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    base = model_patcher.model
    h, w = latent_hw
    noise = torch.zeros(1, base.latent_format.latent_channels, h, w)
    extra = base.extra_conds(cross_attn=cond, pooled_output=pooled, noise=noise, device="cpu",
                             width=w * 8, height=h * 8)
    context = extra["c_crossattn"].cond if "c_crossattn" in extra else cond
    y = extra["y"].cond if "y" in extra else None
    return EmptyPrompt(context.detach().float().cpu().clone(), None if y is None else y.detach().float().cpu().clone())


# conditioning a text-free domain model of a DiT cannot be trained with: (key, what it is)
NON_TEXT_CONDITIONING = (
    ("reference_latents", "reference latents (Qwen-Image-Edit, Kontext, Flux.2 editing)"),
    ("concat_latent_image", "image-to-video concat latents (Wan I2V / WanImageToVideo)"),
    ("concat_mask", "image-to-video concat mask (Wan I2V)"),
    ("clip_vision_output", "a CLIP vision output (Wan I2V, unCLIP)"),
)


class DiTPrompt:
    """The encoded empty prompt as a DiT's diffusion model takes it: `context` plus the family's extra inputs
    (SD3/Flux pooled `y`, Flux `guidance`, Lumina `num_tokens`, ...), built by the model's own extra_conds
    exactly as ComfyUI's sampler builds them, at batch 1."""

    y = None   # (no SDXL-style size vector: trained_calibration stores nothing extra)

    def __init__(self, context: torch.Tensor, extra: dict):
        self.context = context
        self.extra = extra

    def expand(self, batch: int, device, dtype) -> dict:
        def one(v):
            if not isinstance(v, torch.Tensor):
                return v
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            return v.expand(batch, *v.shape[1:]) if v.ndim and v.shape[0] == 1 else v

        out = {"context": one(self.context)}
        out.update({k: one(v) for k, v in self.extra.items()})
        return out


def model_latent_shape(model_patcher, latent_hw: tuple[int, int], batch: int = 1) -> tuple[int, ...]:
    """[B, C, h, w], or [B, C, 1, h, w] for the families with video latents (Wan, Qwen-Image)."""
    lf = model_patcher.model.latent_format
    h, w = latent_hw
    if getattr(lf, "latent_dimensions", 2) == 3:
        return (batch, lf.latent_channels, 1, h, w)
    return (batch, lf.latent_channels, h, w)


def dit_empty_prompt(model_patcher, text, latent_hw: tuple[int, int]) -> DiTPrompt:
    """The DiT's inputs for the encoded empty prompt (`text`: a CONDITIONING or a CLIP). Image conditioning is
    refused by name: the domain model is trained text-free and image-free (the sampler adds it to u and D)."""
    from ..guidance.checkpoint import DomainCheckpointError

    cond = encoded_empty_prompt(text)
    cross, extras = cond[0]
    family = type(model_patcher.model.model_config).__name__
    for key, what in NON_TEXT_CONDITIONING:
        if extras.get(key) is not None:
            raise DomainCheckpointError(
                f"the empty-prompt conditioning carries {what} ('{key}'): training a domain model for {family} with "
                "image conditioning is not supported. Connect the plain encoded empty prompt (CLIP Text Encode "
                "with an empty text); at sampling time the reference / I2V inputs reach the domain model from the "
                "negative.")
    base = model_patcher.model
    shape = model_latent_shape(model_patcher, latent_hw)
    noise = torch.zeros(shape)
    # as core's encode_model_conds builds them (its width/height defaults included)
    params = {k: v for k, v in extras.items() if k != "model_conds"}
    params.update(cross_attn=cross, noise=noise, device="cpu")
    params.setdefault("width", shape[3] * 8)
    params.setdefault("height", shape[2] * 8)
    params.setdefault("prompt_type", "negative")
    built = base.extra_conds(**params)
    if "c_concat" in built:
        raise DomainCheckpointError(
            f"{family} takes concat latents (an image-to-video or inpainting model, e.g. Wan 2.1 I2V): training a "
            "domain model for it is not supported. Train the domain on the family's text-to-video / image model "
            "(e.g. Wan 2.1 T2V) instead.")
    out = {}
    for k, c in built.items():
        v = getattr(c, "cond", c)
        if isinstance(v, torch.Tensor):
            # a copy: a conditioning a server node made under inference_mode holds inference tensors, which the
            # trained layers (SD3's pooled-y embedder has an adapter) cannot save for backward
            v = (v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()).clone()
        out[k] = v
    context = out.pop("c_crossattn", None)
    if context is None:
        raise DomainCheckpointError(f"{family}: the empty prompt gave no text context (c_crossattn); connect the "
                                    "encoded empty prompt of the family's own text encoder.")
    return DiTPrompt(context, out)


def unload_model(model_patcher) -> None:
    """Unload a model (and its clones) from its device through ComfyUI's memory manager."""
    import comfy.model_management as mm

    if hasattr(mm, "unload_model_and_clones"):  # newer cores (0.33)
        mm.unload_model_and_clones(model_patcher, unload_additional_models=False)
        return
    keep = [lm for lm in mm.current_loaded_models if lm.model is None or not model_patcher.is_clone(lm.model)]
    mm.free_memory(1e30, model_patcher.load_device, keep_loaded=keep)


def unpatched_unet_state(model_patcher) -> dict[str, torch.Tensor]:
    """The base UNet's own weights on the CPU (keys without prefix), whatever is loaded: a clone of the same
    model loaded with LoRAs or other weight patches patches the shared module's weights in place, so the
    model and its clones are unloaded first (ComfyUI restores the originals), and any weight still backed up
    is taken from the backup. Tensors already on the CPU are not copied."""
    unload_model(model_patcher)
    backup = getattr(model_patcher, "backup", None) or {}
    out = {}
    for k, v in model_patcher.model.diffusion_model.state_dict().items():
        saved = backup.get(f"diffusion_model.{k}")
        w = saved.weight if saved is not None else v
        out[k] = w.detach().to("cpu")
    return out


def detached_unet_copy(model_patcher) -> torch.nn.Module:
    """A float32 copy of the base UNet with any patches (LoRA etc.) baked in, free of ComfyUI's
    per-call weight casting, ready for training."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    unet = copy.deepcopy(model_patcher.model.diffusion_model).float().cpu()
    # the copy is made: give the base's GPU memory to training (ComfyUI reloads it when it samples again)
    unload_model(model_patcher)
    for m in unet.modules():
        if hasattr(m, "comfy_cast_weights"):
            m.comfy_cast_weights = False
        if hasattr(m, "weight_function"):
            m.weight_function = []
        if hasattr(m, "bias_function"):
            m.bias_function = []
    for p in unet.parameters():
        p.requires_grad_(False)
    return unet


def _alias(t: torch.Tensor) -> torch.Tensor:
    """An ordinary tensor on the same storage as `t` (no copy). ComfyUI loads models under inference mode, and
    autograd refuses to save inference tensors for the backward pass; a tensor made outside inference mode on the
    same storage is an ordinary one, so the frozen base's weights can be used as they are."""
    with torch.inference_mode(False):
        return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(),
                                                                    t.size(), t.stride())


def shared_unet(model_patcher, dtype: torch.dtype, device) -> torch.nn.Module:
    """The base's diffusion model for training a frozen-base form (LoRA) in `dtype`, with no second copy of it.

    The module tree is copied (the form wraps layers and replaces attn2 in the copy, never in the base), the
    weights are not: every weight already in `dtype` on `device` that no weight patch changed is the base's own
    storage. The others (another dtype, another device, or patched by a LoRA on the base: ComfyUI may restore the
    original in place when it unloads) are cast copies, made one tensor at a time. Nothing writes to the shared
    weights (they are frozen; the optimiser sees the adapter only), so the ModelPatcher's model is unchanged
    after the run and stays loaded. When every weight had to be copied, the base is unloaded from the device
    (ComfyUI moves it to its offload device, as it does whenever it needs the memory), so the device holds one
    copy. `module.indomain_shared` records the numbers of shared and copied weights (tests, messages)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher], force_full_load=True)
    src = model_patcher.model.diffusion_model
    device = torch.device(device)
    patched = {k[len("diffusion_model."):] for k in (getattr(model_patcher, "patches", None) or {})
               if str(k).startswith("diffusion_model.")}
    memo, shared, copied = {}, 0, 0
    with torch.inference_mode(False):
        for name, p in src.named_parameters(remove_duplicate=True):
            t = p.detach()
            if t.dtype == dtype and t.device == device and f"{name}" not in patched:
                new, shared = _alias(t), shared + 1
            else:
                new, copied = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True), copied + 1
            memo[id(p)] = torch.nn.Parameter(new, requires_grad=False)
        for _name, b in src.named_buffers(remove_duplicate=True):
            memo[id(b)] = b.detach().to(device=device, copy=True)
        unet = copy.deepcopy(src, memo)
    if shared == 0:
        unload_model(model_patcher)  # all copied: give the base's device memory to training (as detached_unet_copy)
    matmul = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    for m in unet.modules():
        if hasattr(m, "comfy_cast_weights"):
            # Linear/Conv: autocast computes in the base's dtype; the rest (norms, embeddings) casts its small
            # weights to its input's dtype per call, as ComfyUI's manual cast does (the UNets hand their output
            # layers float32 input: a bf16 GroupNorm weight on float32 input is an error on the CPU)
            m.comfy_cast_weights = dtype != torch.float32 and not isinstance(m, matmul)
        elif dtype != torch.float32 and isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for pname, p in list(m._parameters.items()):  # plain torch norms: their few weights in float32
                if p is not None:
                    m._parameters[pname] = torch.nn.Parameter(p.detach().float(), requires_grad=False)
        if hasattr(m, "weight_function"):
            m.weight_function = []
        if hasattr(m, "bias_function"):
            m.bias_function = []
    if isinstance(getattr(unet, "dtype", None), torch.dtype):
        unet.dtype = dtype  # the UNets cast their input to it
    unet.indomain_shared = {"shared": shared, "copied": copied}
    return unet


def noisy_inputs(model_sampling, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor):
    """(model input, timestep, noisy latent) exactly as ComfyUI's BaseModel feeds its UNet."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_noisy = model_sampling.noise_scaling(s, noise, x0)
    xc = model_sampling.calculate_input(s, x_noisy)
    t = model_sampling.timestep(sigma).float()
    return xc, t, x_noisy


def native_target(model_sampling, sigma: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, x_noisy: torch.Tensor):
    """The target whose prediction ComfyUI's calculate_denoised maps back to x0."""
    import comfy.model_sampling as ms

    if isinstance(model_sampling, ms.V_PREDICTION):
        s = sigma.view(-1, *([1] * (x0.ndim - 1)))
        sd = model_sampling.sigma_data
        return (x_noisy * sd ** 2 / (s ** 2 + sd ** 2) - x0) * (s ** 2 + sd ** 2) ** 0.5 / (s * sd)
    if isinstance(model_sampling, ms.EPS):
        return noise
    raise NotImplementedError(f"training for {type(model_sampling).__name__} models is not supported "
                              "(InDomain trains ε- and v-prediction UNets: SD1.x, SD2.x, SDXL)")


def sample_sigmas(model_sampling, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform discrete timesteps, as in DDPM training."""
    n = len(model_sampling.sigmas)
    idx = torch.randint(0, n, (batch,), generator=generator)
    return model_sampling.sigmas[idx].float()


@torch.no_grad()
def calibrate(unet: torch.nn.Module, model_sampling, prompt: EmptyPrompt, latents: torch.Tensor, seed: int,
              batch_size: int = 8, percents=CALIBRATION_SIGMA_PERCENTS, sigmas=None) -> dict[str, torch.Tensor]:
    """Mean cross-attention output of every layer of `unet` (the base) on noisy domain latents, noised to the
    given schedule `percents` (or to explicit `sigmas`, which take precedence)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    if sigmas is None:
        sigmas = [float(model_sampling.percent_to_sigma(p)) for p in percents]
    for sigma in sigmas:
        sigma = float(sigma)
        for i in range(0, latents.shape[0], batch_size):
            x0 = latents[i:i + batch_size]
            noise = torch.randn(x0.shape, generator=gen)
            batches.append((x0, torch.full((x0.shape[0],), sigma), noise))

    device = next(unet.parameters()).device

    half = next((p.dtype for p in unet.parameters() if p.dtype in (torch.bfloat16, torch.float16)), None)

    def run(batch):
        x0, sigma, noise = batch
        xc, t, _ = noisy_inputs(model_sampling, x0, sigma, noise)
        xc, t = xc.to(device), t.to(device)
        # a half-precision base (the LoRA form's) runs under autocast in its dtype, as it trains
        with torch.autocast(device_type=device.type, dtype=half) if half is not None else contextlib.nullcontext():
            unet(xc, t, **prompt.expand(x0.shape[0], device, xc.dtype))

    return calibrate_constants(unet, run, batches)


def cpu_model_sampling(model_patcher):
    """A CPU copy of the model's noise schedule (sigmas are looked up on the CPU, whatever the device)."""
    ms = copy.deepcopy(model_patcher.get_model_object("model_sampling"))
    with torch.inference_mode(False):
        for m in ms.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.detach().cpu().clone()
    return ms


def make_null_text_unet(model_patcher, clip, calib_latents: torch.Tensor, seed: int = 0, device=None, dtype=None):
    """Base UNet -> (null-text UNet in float32, constants, EmptyPrompt, calibration record).

    `device`: where to run the calibration passes (the returned UNet stays there); default CPU.
    `dtype` (a frozen-base form): the UNet shares the base's weights in that dtype (shared_unet) instead of
    being a float32 copy.
    """
    if dtype is not None:
        unet = shared_unet(model_patcher, dtype, device if device is not None else "cpu")
    else:
        unet = detached_unet_copy(model_patcher)
    if device is not None:
        unet.to(device)
    ms = cpu_model_sampling(model_patcher)
    prompt = empty_prompt(model_patcher, clip, tuple(calib_latents.shape[-2:]))
    constants = calibrate(unet, ms, prompt, calib_latents.detach().float().cpu(), seed)
    convert_to_null_text(unet, constants)
    record = {"latents": int(calib_latents.shape[0]), "sigma_percents": list(CALIBRATION_SIGMA_PERCENTS),
              "prompt": "", "seed": seed,
              "constant_norm_mean": float(sum(v.norm() for v in constants.values()) / max(1, len(constants)))}
    return unet, constants, prompt, record


def base_meta(model_patcher, calibration: dict, training: dict, form: str = DEFAULT_FORM) -> DomainMeta:
    base = model_patcher.model
    sd = base.diffusion_model.state_dict()
    return DomainMeta(
        base_architecture=type(base.model_config).__name__,
        model_type=base.model_type.name,
        base_signature=architecture_signature({k: tuple(v.shape) for k, v in sd.items()}),
        base_fingerprint=weights_fingerprint(sd),
        calibration=calibration,
        training=training,
        form=form,
    )

