"""Tiny random models of the flow-matching DiT families, built from ComfyUI's own classes.

Each family is `comfy.supported_models.<Class>(unet_config).get_model({})` with a tiny config
(one or two blocks, width 128-256, one or two attention heads: 0.7-3.3M parameters), every weight and buffer
filled deterministically from the seed, float32 on the CPU, wrapped in a ModelPatcher whose load
and offload devices are the CPU (what `comfy.sd.load_diffusion_model` returns on a CPU run).
`model_sampling` is the one `get_model` builds from the class (flow / CONST with the class's shift).

Nothing here is downloaded: models are built at call time (a few ms). `save()` writes the
diffusion model's state dict as a .safetensors file that `comfy.sd.load_diffusion_model` reads;
`loads_by_detection()` says for which families core's detection rebuilds the same tiny model on
the running host (see DESIGN.md "Flow-matching DiT families"): detection fills many sizes from
constants of the full-size models (Qwen-Image's heads, Lumina's heads/axes, Chroma's approximator,
Flux's 24 heads on 0.3.75), so those families are built directly and tests use `build()`.

Conditioning helpers give ComfyUI CONDITIONING lists with the family's text width; `empty_cond`
stands in for the encoded EMPTY prompt (DiTs fail with no text context at all).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from .host import import_comfy

BUILDER_VERSION = 1

FAMILIES: tuple[str, ...] = ("sd3", "flux_dev", "chroma", "flux2", "lumina2", "zimage", "wan21", "wan21_i2v",
                             "wan22", "qwen_image")

# name -> (supported_models class name, unet_config, text width, pooled width or None)
# Text widths are small stand-ins except Wan's (umT5-XXL's 4096: 0.3.75 does not detect a
# smaller text_dim; with the real width detection works on both hosts without metadata).
_SPECS: dict[str, dict] = {
    "sd3": dict(
        cls="SD3", text_dim=64, pooled_dim=32,
        unet=dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 64, "out_features": 128}},
                  num_patches=256, pos_embed_max_size=16, qk_norm="rms", pos_embed_scaling_factor=None,
                  x_block_self_attn_layers=[]),
    ),
    "flux_dev": dict(
        cls="Flux", text_dim=64, pooled_dim=32,
        unet=dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=64,
                  hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1,
                  axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True,
                  txt_ids_dims=[], yak_mlp=False, txt_norm=False),
    ),
    "chroma": dict(
        cls="Chroma", text_dim=64, pooled_dim=None,
        unet=dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=64, hidden_size=128,
                  mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                  theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=128, hidden_dim=128, n_layers=1,
                  vec_in_dim=None, txt_ids_dims=[]),  # the last two: 0.33's ChromaParams requires them
    ),
    "flux2": dict(  # Flux.2 Klein base: no guidance embed (real CFG)
        cls="Flux2", text_dim=64, pooled_dim=None,
        unet=dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=64,
                  hidden_size=128, mlp_ratio=3.0, num_heads=1, depth=1, depth_single_blocks=1,
                  axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=False,
                  global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
                  ref_index_scale=10.0, txt_ids_dims=[3], yak_mlp=False, txt_norm=False),
    ),
    "lumina2": dict(
        cls="Lumina2", text_dim=64, pooled_dim=None,
        unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=128, cap_feat_dim=64, n_layers=1,
                  n_refiner_layers=1, qk_norm=True, n_heads=1, n_kv_heads=1, axes_dims=[32, 48, 48],
                  axes_lens=[300, 512, 512], rope_theta=10000.0, ffn_dim_multiplier=4.0),
    ),
    "zimage": dict(
        cls="ZImage", text_dim=64, pooled_dim=None,
        # z_image_modulation feeds a 256-wide time embedding to min(dim, 256)-wide layers: dim >= 256
        unet=dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, cap_feat_dim=64, n_layers=1,
                  n_refiner_layers=1, qk_norm=True, n_heads=2, n_kv_heads=2, axes_dims=[32, 48, 48],
                  axes_lens=[1536, 512, 512], rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0,
                  z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
    ),
    "wan21": dict(
        cls="WAN21_T2V", text_dim=4096, pooled_dim=None,
        unet=dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=16, num_heads=1, ffn_dim=256,
                  num_layers=1, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
                  cross_attn_norm=True, eps=1e-6, in_dim=16, text_dim=4096),
    ),
    "wan21_i2v": dict(
        cls="WAN21_I2V", text_dim=4096, pooled_dim=None,
        unet=dict(image_model="wan2.1", model_type="i2v", dim=128, out_dim=16, num_heads=1, ffn_dim=256,
                  num_layers=1, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
                  cross_attn_norm=True, eps=1e-6, in_dim=36, text_dim=4096),
    ),
    "wan22": dict(  # Wan 2.2 TI2V-5B layout (48-channel latents); the 14B experts are Wan 2.1-shaped
        cls="WAN22_T2V", text_dim=4096, pooled_dim=None,
        unet=dict(image_model="wan2.1", model_type="t2v", dim=128, out_dim=48, num_heads=1, ffn_dim=256,
                  num_layers=1, patch_size=(1, 2, 2), freq_dim=256, window_size=(-1, -1), qk_norm=True,
                  cross_attn_norm=True, eps=1e-6, in_dim=48, text_dim=4096),
    ),
    "qwen_image": dict(
        cls="QwenImage", text_dim=64, pooled_dim=None,
        unet=dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=1, attention_head_dim=128,
                  num_attention_heads=1, joint_attention_dim=64, patch_size=2, axes_dims_rope=(16, 56, 56)),
    ),
}

_GAIN = 1.0  # layer weights ~ N(0, 1/fan_in): activations stay O(1) through the tiny stacks
_GUIDANCE_DISTILLED = {"flux_dev"}
_REFERENCE_FAMILIES = {"flux_dev", "flux2", "qwen_image"}  # the model consumes "reference_latents" (Chroma's does not)
_FIVE_D = {"wan21", "wan21_i2v", "wan22", "qwen_image"}


def _spec(name: str) -> dict:
    if name not in _SPECS:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return _SPECS[name]


def _host_version() -> tuple[int, ...]:
    from .host import host_version_tuple

    return host_version_tuple()


def available(name: str) -> tuple[bool, str]:
    """(True, "") when `name` can be built on the running host, else (False, why)."""
    try:
        spec = _spec(name)
    except ValueError as e:
        return False, str(e)
    import_comfy()
    import comfy.supported_models as sm

    if not hasattr(sm, spec["cls"]):
        return False, f"comfy.supported_models has no {spec['cls']} on this ComfyUI"
    return True, ""


def _unet_config(name: str) -> dict:
    """The family's tiny config, restricted to what this host's model class accepts."""
    cfg = dict(_spec(name)["unet"])
    if name in ("flux_dev", "flux2", "chroma"):
        import comfy.ldm.chroma.model as chroma_model
        import comfy.ldm.flux.model as flux_model

        params = chroma_model.ChromaParams if name == "chroma" else flux_model.FluxParams
        fields = {f.name for f in dataclasses.fields(params)} | {"image_model"}
        cfg = {k: v for k, v in cfg.items() if k in fields}
    elif name in ("lumina2", "zimage"):
        import inspect

        import comfy.ldm.lumina.model as lumina_model

        accepted = set(inspect.signature(lumina_model.NextDiT.__init__).parameters)
        cfg = {k: v for k, v in cfg.items() if k in accepted}
    return cfg


def _sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MMDiT's fixed 2-D sin-cos position table, [1, grid*grid, embed_dim] (core's own function)."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed  # numpy

    return torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float().unsqueeze(0)


def init_family_weights_(name: str, module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter and persistent buffer deterministically from `seed`: Linear/Conv weights
    normal(0, 1/fan_in), other tables (modulation, pad tokens) normal(0, 0.02), zeros for biases,
    ones for other 1-D parameters (norm scales); position tables that core leaves uninitialised (SD3's pos_embed) get their real sin-cos values."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + FAMILIES.index(name) + 17)
    layer_weights = {id(m.weight) for m in module.modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and m.weight is not None}
    with torch.no_grad():
        for pname, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim <= 1:
                p.fill_(0.0 if pname.endswith("bias") else 1.0)
            else:
                # layers: variance-preserving std gain/sqrt(fan_in) (text must reach the output through
                # a few attention layers: at std 0.02 Flux.2's 4 text tokens among 512 padded ones
                # moved a sample by 7e-5); other tables (modulation, pad tokens): 0.02
                std = _GAIN / math.sqrt(p[0].numel()) if id(p) in layer_weights else 0.02
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        for bname, b in module.named_buffers():
            if bname.endswith("pos_embed") and b.ndim == 3:
                grid = int(round(math.sqrt(b.shape[1])))
                b.copy_(_sincos_2d(b.shape[2], grid).to(b.dtype))
            elif b.is_floating_point() and not torch.isfinite(b).all():
                raise RuntimeError(f"tiny {name}: buffer {bname} is not finite after construction")
    return module


def build(name: str, seed: int = 0):
    """A ModelPatcher around the family's core BaseModel subclass (tiny, deterministic, CPU float32)."""
    ok, why = available(name)
    if not ok:
        raise RuntimeError(f"tiny {name} cannot be built here: {why}")
    import_comfy()
    import comfy.model_patcher
    import comfy.supported_models as sm

    spec = _spec(name)
    model_config = getattr(sm, spec["cls"])(_unet_config(name))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=torch.device("cpu"))
    model.diffusion_model.to(torch.float32)
    init_family_weights_(name, model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    mp = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    if hasattr(mp, "cached_patcher_init"):
        # newer cores (0.33) rebuild a model from this recipe for `clone(force_deepcopy=True)`
        # (Train LoRA does that), as load_diffusion_model records its file path there
        mp.cached_patcher_init = (_rebuild, (name, seed))
    return mp


def _rebuild(name: str, seed: int, disable_dynamic: bool = False):
    return build(name, seed)


def state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The diffusion model's weights (no prefix), as a diffusion-model file holds them."""
    mp = build(name, seed)
    return {k: v.detach().clone().contiguous() for k, v in mp.model.diffusion_model.state_dict().items()}


def file_metadata(name: str) -> dict[str, str]:
    """Metadata stored beside the weights. For Wan the file also states its text width the way newer
    cores read it ({"config": {"transformer": {"text_dim": ...}}}); the tiny Wan models use umT5's real
    4096, which 0.3.75 (that ignores the metadata) assumes too, so both hosts detect them."""
    meta = {"indomain.tiny": name, "indomain.tiny_builder": str(BUILDER_VERSION)}
    if name.startswith("wan"):
        meta["config"] = json.dumps({"transformer": {"text_dim": _spec(name)["text_dim"]}})
    return meta


def save(name: str, path, seed: int = 0) -> Path:
    """Write the tiny model's diffusion-model state dict (float32 .safetensors, atomic)."""
    from indomain.guidance.checkpoint import save_safetensors_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors_atomic(state_dict(name, seed), path, file_metadata(name))


def loads_by_detection(name: str) -> bool:
    """Whether `comfy.sd.load_diffusion_model` on the running host rebuilds this tiny model from its
    file (same class, same config). Measured on 0.3.75 and 0.33.0:
    - SD3 and Wan (2.1 T2V/I2V, 2.2): both hosts.
    - Flux dev / Flux.2: 0.33 only (0.3.75's detection fixes 24 / 48 heads of 128: width 3072+).
    - Chroma (approximator sizes fixed to full size), Lumina 2 / Z-Image (heads and rope axes
      only for the full widths 2304 / 3840), Qwen-Image (heads fixed to 24 of 128): never."""
    _spec(name)
    if name in ("sd3", "wan21", "wan21_i2v", "wan22"):
        return True
    if name in ("flux_dev", "flux2"):
        return _host_version() >= (0, 33)
    return False


def text_dim(name: str) -> int:
    return _spec(name)["text_dim"]


def guidance_distilled(name: str) -> bool:
    """True where the family embeds a guidance value instead of sampling with real CFG (Flux.1 dev)."""
    _spec(name)
    return name in _GUIDANCE_DISTILLED


def _randn(shape, seed: int, stream: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed) * 7919 + stream)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * scale


def _extras(name: str, batch: int, seed: int, stream: int) -> dict:
    spec = _spec(name)
    extra: dict = {}
    if spec["pooled_dim"]:
        extra["pooled_output"] = _randn((batch, spec["pooled_dim"]), seed, stream + 1)
    elif name in ("chroma", "flux2"):
        extra["pooled_output"] = None  # core's Flux.encode_adm reads the key; CLIPTextEncode always sets it
    if name in _GUIDANCE_DISTILLED:
        extra["guidance"] = 3.5  # FluxGuidance's default
    return extra


def text_cond(name: str, tokens: int = 4, seed: int = 0, batch: int = 1) -> list:
    """CONDITIONING for a (stand-in) encoded prompt: [[cross_attn [B, tokens, width], extras]]."""
    spec = _spec(name)
    cross = _randn((batch, tokens, spec["text_dim"]), seed, 101 + FAMILIES.index(name) * 10)
    return [[cross, _extras(name, batch, seed, 101 + FAMILIES.index(name) * 10)]]


def empty_cond(name: str, batch: int = 1) -> list:
    """The stand-in for the encoded EMPTY prompt: fixed, deterministic, distinct from any text_cond
    (own random stream; smaller scale), same token count as text_cond's default (4) so core can
    batch it with the positive."""
    spec = _spec(name)
    stream = 50_000 + FAMILIES.index(name) * 10
    cross = _randn((1, 4, spec["text_dim"]), -1, stream, scale=0.5).repeat(batch, 1, 1)
    extra = _extras(name, 1, -1, stream)
    if extra.get("pooled_output") is not None:
        extra["pooled_output"] = extra["pooled_output"].repeat(batch, 1)
    return [[cross, extra]]


def latent_channels(name: str) -> int:
    import_comfy()
    import comfy.supported_models as sm

    return getattr(sm, _spec(name)["cls"]).latent_format.latent_channels


def latent(name: str, batch: int = 1, height: int = 8, width: int = 8, frames: int = 1, seed: int = 0) -> dict:
    """LATENT {"samples": tensor}: 4-D [B,C,H,W] for image DiTs, 5-D [B,C,T,H,W] for Wan and
    Qwen-Image, channels from the class's latent_format (Flux.2: 128, Wan 2.2: 48, else 16)."""
    c = latent_channels(name)
    shape = (batch, c, frames, height, width) if name in _FIVE_D else (batch, c, height, width)
    if name not in _FIVE_D and frames != 1:
        raise ValueError(f"{name} is an image model: frames must be 1")
    return {"samples": _randn(shape, seed, 900 + FAMILIES.index(name))}


def reference_cond(name: str, cond: list, seed: int = 0, height: int = 8, width: int = 8) -> list:
    """`cond` with a reference latent appended as core's ReferenceLatent node does
    ({"reference_latents": [latent]}, append=True): Qwen-Image-Edit / Kontext / Flux.2 editing."""
    if name not in _REFERENCE_FAMILIES:
        raise ValueError(f"{name}: core's model does not consume reference latents")
    import_comfy()
    import node_helpers

    ref = latent(name, 1, height, width, 1, seed=seed + 31337)["samples"]
    return node_helpers.conditioning_set_values(cond, {"reference_latents": [ref]}, append=True)


def i2v_cond(name: str, cond: list, seed: int = 0, height: int = 8, width: int = 8, frames: int = 1,
             start_frames: int = 1) -> list:
    """`cond` with the image-to-video concat inputs core's WanImageToVideo node sets:
    concat_latent_image [1,16,T,H,W] (the encoded start image padded with grey) and concat_mask
    [1,1,T,H,W] (0 on the latent frames the start image covers, 1 elsewhere)."""
    if name != "wan21_i2v":
        raise ValueError(f"{name}: no I2V concat input (only wan21_i2v)")
    import_comfy()
    import node_helpers

    image = _randn((1, 16, frames, height, width), seed + 4242, 77)
    mask = torch.ones((1, 1, frames, height, width))
    mask[:, :, :((start_frames - 1) // 4) + 1] = 0.0
    return node_helpers.conditioning_set_values(cond, {"concat_latent_image": image, "concat_mask": mask})


def family_sigmas(model, steps: int = 4, scheduler: str = "simple") -> torch.Tensor:
    """The model's own sigmas (core's calculate_sigmas on its model_sampling)."""
    import comfy.samplers

    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def sample(model, positive: list, negative: list, lat: dict, steps: int = 4, cfg: float = 3.0, seed: int = 0,
           sampler: str = "euler") -> torch.Tensor:
    """A plain core CFG sample (comfy.samplers.CFGGuider), for tests and references."""
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    x = lat["samples"]
    noise = comfy.sample.prepare_noise(x, seed)
    return guider.sample(noise, x.clone(), comfy.samplers.sampler_object(sampler), family_sigmas(model, steps),
                         disable_pbar=True, seed=seed)


def core_trained_lora(name: str, steps: int = 4, seed: int = 0, positive: list | None = None, rank: int = 4,
                      learning_rate: float = 1e-3, frames: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA state dict written by core's own Train LoRA node (comfy_extras/nodes_train.py
    `TrainLoraNode`) on the tiny `name` model, trained for `steps` steps on two deterministic latents
    with `positive` as the caption (default: the empty prompt, i.e. a text-free LoRA), fp32.
    Keys are core's: `diffusion_model.<module>.lora_up.weight / lora_down.weight / alpha` (+ `.diff`,
    `.diff_b` for norms and biases).

    The latents go in as two LATENT inputs of batch 1: 0.3.75's node raises UnboundLocalError
    (multi_res) on a single LATENT batch; two same-shaped inputs take the path both cores share.
    """
    import inspect

    import_comfy()
    import nodes  # noqa: F401  (comfy_extras import the node registry)
    from comfy_extras import nodes_train

    mp = build(name, seed)
    lats = [latent(name, 1, 8, 8, frames, seed=seed + 1000 + i) for i in range(2)]
    positive = empty_cond(name) if positive is None else positive
    algorithm = next(iter(nodes_train.adapter_maps.keys()))
    args = dict(model=[mp], latents=lats, positive=[positive], batch_size=[1], steps=[steps],
                grad_accumulation_steps=[1], learning_rate=[learning_rate], rank=[rank], optimizer=["AdamW"],
                loss_function=["MSE"], seed=[seed], training_dtype=["fp32"], lora_dtype=["fp32"],
                quantized_backward=[False], algorithm=[algorithm], gradient_checkpointing=[True],
                checkpoint_depth=[1], offloading=[False], existing_lora=["[None]"], bucket_mode=[False],
                bypass_mode=[False])
    accepted = set(inspect.signature(nodes_train.TrainLoraNode.execute).parameters)
    missing = accepted - set(args) - {"cls"}
    if missing:
        raise RuntimeError(f"this core's TrainLoraNode wants inputs this helper does not know: {sorted(missing)}")
    out = nodes_train.TrainLoraNode.execute(**{k: v for k, v in args.items() if k in accepted})
    result = out.result if hasattr(out, "result") else out
    # 0.33 returns (lora, loss_map, steps); 0.3.75 (model, lora, loss_map, steps)
    lora = next(r for r in result if isinstance(r, dict) and any(str(k).endswith(".alpha") for k in r))
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in lora.items()}
