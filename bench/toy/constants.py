"""Is one constant per layer a poor stand-in for the base's empty-prompt cross-attention at some noise levels?

The null-text domain UNet starts as the base with every cross-attention output replaced by its mean over
calibration inputs at five noise levels. Before any fine-tuning it should give u = B(x, ∅); whatever it gives
instead is an error the domain term carries from the first step. Per noise level of the toy's sampling schedule,
on held-out domain images (noised at that level), this measures, in the model's output space:

- |D0 - u| / |u| and |D0 - u| / |B(c) - u| for D0 with the calibrated constants (the training start), and
- the same for the variant with constants calibrated at that noise level only (per-noise-level constants:
  beyond the paper, the variant the claim diagnosis suggested),

where B(c) is the base at the image's own prompt. If the stand-in's error is small next to |B(c) - u| at every
level, per-noise-level constants cannot explain a loss of control; if it is large somewhere, they might.
Plain torch on the UNet module (no sampling), so it costs a few forward passes per level.
"""
from __future__ import annotations

import copy

import torch


def _norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@torch.no_grad()
def stand_in_error(model_patcher, clip, latents: torch.Tensor, prompts: list[str], sigmas: list[float],
                   calib_latents: torch.Tensor, seed: int = 0) -> list[dict]:
    """Per sigma: batch means of the ratios above. `latents` (model space) and their `prompts` are the held-out
    images; `calib_latents` the domain images the calibration uses (as the trainer does)."""
    from ...guidance.nulltext import convert_to_null_text, null_text_blocks
    from ...forms.model import calibrate, cpu_model_sampling, detached_unet_copy, empty_prompt, noisy_inputs

    ms = cpu_model_sampling(model_patcher)
    prompt = empty_prompt(model_patcher, clip, tuple(latents.shape[-2:]))
    unet = detached_unet_copy(model_patcher)
    unet.eval()
    n = latents.shape[0]
    empty = prompt.expand(n, "cpu", torch.float32)
    texts = {}
    for p in set(prompts):
        cond, _ = clip.encode_from_tokens(clip.tokenize(p), return_pooled=True)
        texts[p] = cond.detach().float().cpu()
    context = torch.cat([texts[p] for p in prompts])
    single = calibrate(unet, ms, prompt, calib_latents.float(), seed)
    null = convert_to_null_text(copy.deepcopy(unet), single)
    blocks = dict(null_text_blocks(null))
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for sigma in sigmas:
        s = torch.full((n,), float(sigma))
        noise = torch.randn(latents.shape, generator=gen)
        xc, t, _ = noisy_inputs(ms, latents, s, noise)
        u = unet(xc, t, **empty)
        c = unet(xc, t, context=context)
        for name, block in blocks.items():
            block.attn2.constant.copy_(single[name])
        d_single = null(xc, t, **empty)

        per_level = calibrate(unet, ms, prompt, calib_latents.float(), seed, sigmas=[sigma])  # this level only
        for name, block in blocks.items():
            block.attn2.constant.copy_(per_level[name])
        d_level = null(xc, t, **empty)
        text = _norm(c - u)
        row = {"sigma": float(sigma), "norm_u": float(_norm(u).mean()), "norm_c_minus_u": float(text.mean())}
        for key, d in (("single", d_single), ("per_level", d_level)):
            err = _norm(d - u)
            row[f"{key}_err_over_u"] = float((err / _norm(u)).mean())
            row[f"{key}_err_over_c_minus_u"] = float((err / text).mean())
        rows.append(row)
    return rows
