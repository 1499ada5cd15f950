"""Make small domain UNet files for tests without a training run (calibrate + convert + perturb)."""
from __future__ import annotations

from pathlib import Path

import torch

from .host import import_comfy


def load_checkpoint(path):
    import_comfy()
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae


def make_domain_unet(model, clip, out_path: Path, seed: int = 0, perturb: float = 0.02, latent_hw=(8, 8)) -> Path:
    """Null-text UNet calibrated on random latents, weights nudged by `perturb` relative noise so it
    differs from the base (as a trained one would)."""
    from indomain.guidance.checkpoint import write_domain_checkpoint
    from indomain.forms.model import base_meta, make_null_text_unet

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(8, 4, *latent_hw, generator=gen)
    unet, constants, _prompt, record = make_null_text_unet(model, clip, latents, seed)
    if perturb:
        with torch.no_grad():
            for p in unet.parameters():
                if p.ndim > 1:
                    p.add_(torch.randn(p.shape, generator=gen) * p.std() * perturb)
    meta = base_meta(model, record, {"kind": "test-perturbed", "perturb": perturb, "seed": seed})
    return write_domain_checkpoint(out_path, unet.state_dict(), meta)


def random_domain_lora(unet, rank: int = 4, alpha: float = 4.0, seed: int = 0, scale: float = 0.02):
    """A DomainLoRA with random adapters on every adaptable layer of `unet` (a null-text UNet: its
    constants are taken), as a trained one would look."""
    from indomain.guidance.lora import DomainLoRA, LayerAdapter, adapted_modules
    from indomain.guidance.nulltext import null_text_blocks

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in adapted_modules(unet):
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=gen) * scale
        up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=gen) * scale
        layers[name] = LayerAdapter(down, up, alpha)
    constants = {name: b.attn2.constant.detach().float().clone() for name, b in null_text_blocks(unet)}
    return DomainLoRA(layers, constants, rank, alpha)


def make_domain_lora_pair(model, clip, lora_path: Path, full_path: Path, seed: int = 0, rank: int = 4,
                          latent_hw=(8, 8)) -> tuple[Path, Path]:
    """A LoRA-form domain file and the same adapter merged into a full-form file, both float32:
    the pair the LoRA parity tests compare."""
    import dataclasses

    from indomain.guidance.checkpoint import write_domain_checkpoint
    from indomain.guidance.lora import merge_into
    from indomain.forms.model import base_meta, make_null_text_unet

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(8, 4, *latent_hw, generator=gen)
    unet, _constants, _prompt, record = make_null_text_unet(model, clip, latents, seed)
    lora = random_domain_lora(unet, rank=rank, seed=seed)
    meta = base_meta(model, record, {"kind": "test-random-lora", "rank": rank, "seed": seed})
    full = write_domain_checkpoint(full_path, merge_into(unet.state_dict(), lora), meta, precision="fp32")
    lora_meta = dataclasses.replace(meta, form="lora")
    return write_domain_checkpoint(lora_path, lora.to_state_dict(), lora_meta, precision="fp32"), full


def one_guider_step(guider, shape=(1, 4, 8, 8), seed: int = 5) -> dict:
    """Run `guider` for one step at sigma 1 and return what the sampler saw: {"x", "s", "out"} (to check a
    step against predictions computed from the models directly)."""
    import comfy.samplers

    seen = {}

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        seen["x"], seen["s"], seen["out"] = x.clone(), s, model_k(x, s, **(extra_args or {}))
        return seen["out"]

    guider.sample(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), torch.zeros(*shape),
                  comfy.samplers.KSAMPLER(one_call), torch.tensor([1.0, 0.0]), seed=seed)
    return seen


def core_x0(model, conds, noise, sigmas):
    """One model, one condition, through core's CFGGuider at cfg 1 (which evaluates the positive only): (x, out)
    at the first sigma, for checking a decoupled step against separate core passes."""
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(conds, conds)
    g.set_cfg(1.0)
    return x0_at_one_step(g, noise, sigmas)


def x0_at_one_step(guider, noise, sigmas):
    """The guider's denoised prediction at the first sigma, for a fixed noise (one sampler call): (x, out)."""
    import comfy.samplers

    seen = {}

    def one_call(model_k, x, sig, extra_args=None, callback=None, disable=None):
        seen["x"] = x.clone()
        seen["out"] = model_k(x, sig[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return seen["out"]

    guider.sample(noise, torch.zeros_like(noise), comfy.samplers.KSAMPLER(one_call), sigmas, seed=3)
    return seen["x"], seen["out"].float()


def make_family_domain_lora(model, path: Path, seed: int = 0, rank: int = 4, scale: float | None = None,
                            core_format: bool = False) -> Path:
    """A LoRA-form domain file for any family (DiTs included): a random low-rank adapter on every Linear/Conv of
    the base's diffusion model, no constants (text-free by the empty prompt), float32, as a trained one would
    look. `scale`: std of up and down (default: a delta of ~5% of the weights' own scale). `core_format`: the
    tensors alone, without InDomain metadata (what core's Train LoRA node writes)."""
    import dataclasses

    from indomain.guidance.checkpoint import save_safetensors_atomic, write_domain_checkpoint
    from indomain.guidance.lora import DomainLoRA, LayerAdapter, adapted_modules
    from indomain.forms.model import base_meta

    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in adapted_modules(model.model.diffusion_model):
        w = m.weight
        s = scale if scale is not None else (0.05 * float(w.detach().float().std()) / (rank ** 0.5)) ** 0.5
        down = torch.randn(rank, *w.shape[1:], generator=gen) * s
        up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=gen) * s
        layers[name] = LayerAdapter(down, up, float(rank))
    lora = DomainLoRA(layers, {}, rank, float(rank))
    if core_format:
        return save_safetensors_atomic(lora.to_state_dict(torch.float32), path)
    meta = dataclasses.replace(base_meta(model, {"text_free": "empty_prompt"}, {"kind": "test-random-lora",
                                                                                  "rank": rank, "seed": seed}),
                               form="lora")
    return write_domain_checkpoint(path, lora.to_state_dict(), meta, precision="fp32")


def merged_lora_model(model, path: Path):
    """The base with the LoRA file merged into its weights by core's own LoRA loader (load_lora_for_models): the
    independent reference a LoRA-form domain model is compared with."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    merged, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    return merged
