"""Tiny, deterministic models that ComfyUI's own loaders accept (built at test time, never committed).

- an SD1.5-layout UNet (model_channels=320 so ComfyUI detects SD15; one level, one res block,
  transformer depth 1, no middle block: ~18.7M params)
- a full checkpoint: that UNet + a random full-size CLIP-L + a random SD VAE
- a tiny ControlNet with the same layout
- forced-config tiny SD2.x (v-prediction) and SDXL models for architecture tests

ComfyUI's ops leave weights uninitialised, so every parameter is filled explicitly from a seed.
Files are cached under .cache/models keyed by builder version and seed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .host import PACK_ROOT, import_comfy

BUILDER_VERSION = 1
CACHE_DIR = Path(os.environ.get("INDOMAIN_CACHE", PACK_ROOT / ".cache")) / "models"

SD15_TINY_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1],
    transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=-2,
    context_dim=768, num_heads=8, num_head_channels=-1, use_linear_in_transformer=False,
    adm_in_channels=None, use_temporal_attention=False, use_spatial_transformer=True,
    legacy=False, dims=2, use_checkpoint=False,
)

SD2_TINY_UNET = dict(SD15_TINY_UNET, context_dim=1024, num_heads=-1, num_head_channels=64,
                     use_linear_in_transformer=True)

SDXL_TINY_UNET = dict(SD15_TINY_UNET, context_dim=2048, num_heads=-1, num_head_channels=64,
                      use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential")

SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter deterministically (torch's default init where a torch layer exists).

    ComfyUI's `disable_weight_init` ops override reset_parameters with a no-op, so call the
    torch base-class initialisers directly.
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        done = set()
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.Linear.reset_parameters(m)
                elif isinstance(m, torch.nn.modules.conv._ConvNd):
                    torch.nn.modules.conv._ConvNd.reset_parameters(m)
                elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    if m.weight is not None:
                        m.weight.fill_(1.0)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, torch.nn.Embedding):
                    m.weight.normal_(0.0, 0.02)
                else:
                    continue
                done.update(id(p) for p in m.parameters(recurse=False))
            for name, p in module.named_parameters():
                if id(p) in done:
                    continue
                if p.ndim <= 1:
                    p.fill_(0.0 if name.endswith("bias") else 1.0)
                else:
                    p.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    return module


def tiny_unet_state_dict(seed: int = 0, config: dict | None = None) -> dict[str, torch.Tensor]:
    """State dict (no prefix) of a tiny UNet built with ComfyUI's own UNetModel."""
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    unet = UNetModel(**(config or SD15_TINY_UNET), operations=comfy.ops.disable_weight_init)
    init_weights_(unet, seed)
    return {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}


def _cached(name: str) -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return CACHE_DIR / name


def _atomic_save(sd: dict, path: Path, metadata: dict | None = None) -> Path:
    from indomain.guidance.checkpoint import save_safetensors_atomic

    return save_safetensors_atomic(sd, path, metadata)


def tiny_unet_file(seed: int = 0) -> Path:
    """A tiny SD15 UNet alone (loads with UNETLoader / load_diffusion_model)."""
    path = _cached(f"tiny_sd15_unet_v{BUILDER_VERSION}_s{seed}.safetensors")
    if not path.exists():
        sd = {"model.diffusion_model." + k: v.half() for k, v in tiny_unet_state_dict(seed).items()}
        _atomic_save(sd, path)
    return path


def tiny_checkpoint(seed: int = 0, unet_sd: dict | None = None, name: str | None = None) -> Path:
    """Full checkpoint (UNet + random CLIP-L + random SD VAE) loadable by CheckpointLoaderSimple.

    Pass `unet_sd` to wrap trained UNet weights (e.g. the toy benchmark's base) with the same
    deterministic text encoder and VAE.
    """
    path = _cached(name or f"tiny_sd15_v{BUILDER_VERSION}_s{seed}.safetensors")
    if path.exists():
        return path
    import_comfy()
    import comfy.ldm.models.autoencoder
    import comfy.model_management
    import comfy.sd

    unet_sd = unet_sd if unet_sd is not None else tiny_unet_state_dict(seed)
    model = comfy.sd.load_diffusion_model_state_dict(dict(unet_sd), model_options={"dtype": torch.float32})
    clip = comfy.sd.CLIP(model.model.model_config.clip_target(), model_options={"dtype": torch.float32})
    init_weights_(clip.cond_stage_model, seed + 1)
    vae_module = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    init_weights_(vae_module, seed + 2)
    vae = comfy.sd.VAE(sd=vae_module.state_dict())
    # the checkpoint layout comfy.sd.save_checkpoint writes, built once and stored in half precision
    # (451 MB instead of 900 MB; loaders cast as needed)
    comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    if hasattr(model, "state_dict_for_saving"):
        # newer cores (0.33): the patcher assembles the UNet part, the CLIP adds its tokenizer state
        sd = model.state_dict_for_saving(clip.state_dict_for_saving(), vae.get_sd(), None)
    else:  # 0.3.75: BaseModel.state_dict_for_saving(clip, vae, clip_vision)
        sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    parts = {k.split(".")[0] for k in sd}
    if not {"model", "cond_stage_model", "first_stage_model"} <= parts:  # never cache a file the loader can't read
        raise RuntimeError(f"tiny checkpoint layout unexpected on this ComfyUI (top-level keys {sorted(parts)})")
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    _atomic_save(sd, path, metadata={"indomain.tiny": "sd15", "seed": str(seed)})
    comfy.model_management.unload_all_models()
    return path


def tiny_controlnet(seed: int = 0) -> Path:
    """Tiny ControlNet (same layout as the tiny UNet) loadable by ControlNetLoader."""
    path = _cached(f"tiny_sd15_controlnet_v{BUILDER_VERSION}_s{seed}.safetensors")
    if path.exists():
        return path
    import_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in SD15_TINY_UNET.items() if k not in ("out_channels",)}
    cn = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, **cfg)
    init_weights_(cn, seed + 10)
    sd = {"control_model." + k: v.detach().half().contiguous() for k, v in cn.state_dict().items()}
    return _atomic_save(sd, path)


def forced_model(family: str, seed: int = 0):
    """A tiny SD2.x (v-prediction) or SDXL ModelPatcher built from a forced config.

    ComfyUI auto-detects those families only at full depth, so instantiate the config class
    ourselves. Returns a ModelPatcher whose BaseModel has explicit deterministic weights.
    """
    import_comfy()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    from comfy.model_base import ModelType

    if family == "sd2v":
        cfg = {k: v for k, v in SD2_TINY_UNET.items()}
        model_config = sm.SD20(cfg)
        model_type = ModelType.V_PREDICTION
    elif family == "sdxl":
        cfg = {k: v for k, v in SDXL_TINY_UNET.items()}
        model_config = sm.SDXL(cfg)
        model_type = ModelType.EPS
    else:
        raise ValueError(f"unknown family {family!r}")
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, "", device=None)
    model.model_type = model_type
    model.model_sampling = comfy.model_base.model_sampling(model_config, model_type)
    init_weights_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())
