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
    from indomain.training.model import base_meta, make_null_text_unet

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
