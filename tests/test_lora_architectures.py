"""The LoRA form on SD2.x (v-prediction) and SDXL (ADM `y` input): a LoRA-form domain model and the same adapter
merged into a full-form domain UNet give the same guided step, the step equals the formula computed from the
three predictions directly, w_d = 0 is exactly core, and the LoRA form holds no second UNet. Tiny forced-config
models (ComfyUI detects those families only at full depth)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from indomain.devkit import tiny_models
from indomain.devkit.domain import one_guider_step, random_domain_lora

FAMILIES = {"sd2v": dict(ctx=1024, pooled=None), "sdxl": dict(ctx=2048, pooled=1280)}


def _conditioning(family, seed):
    g = torch.Generator().manual_seed(seed)
    spec = FAMILIES[family]
    extra = {"pooled_output": torch.randn(1, spec["pooled"], generator=g)} if spec["pooled"] else {}
    return [[torch.randn(1, 77, spec["ctx"], generator=g), extra]]


def _y(model, cond, x):
    if "pooled_output" not in cond[0][1]:
        return None
    return model.model.extra_conds(cross_attn=cond[0][0], pooled_output=cond[0][1]["pooled_output"], noise=x,
                                   device="cpu", width=64, height=64)["y"].cond


def _lora_and_merged(base_patcher, neg):
    """A calibrated null-text copy of the forced base, a random adapter on it, and both domain MODELs:
    the LoRA form (adapter injected into the base's own UNet) and the adapter merged into a full-form UNet."""
    from indomain.guidance.lora import merge_into
    from indomain.guidance.nulltext import calibrate_constants, convert_to_null_text
    from indomain.sampling.domain_model import build_domain_model
    from indomain.forms.model import base_meta, noisy_inputs

    base = base_patcher.model
    ms = base.model_sampling
    unet = copy.deepcopy(base.diffusion_model).float()
    ctx = neg[0][0]
    y = _y(base_patcher, neg, torch.zeros(1, 4, 8, 8))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for p in (0.2, 0.5, 0.8):
        x0 = torch.randn(2, 4, 8, 8, generator=gen)
        batches.append(noisy_inputs(ms, x0, torch.full((2,), float(ms.percent_to_sigma(p))),
                                    torch.randn(2, 4, 8, 8, generator=gen))[:2])

    def run(b):
        kw = {"context": ctx.expand(2, -1, -1)}
        if y is not None:
            kw["y"] = y.expand(2, -1)
        unet(b[0], b[1], **kw)

    convert_to_null_text(unet, calibrate_constants(unet, run, batches))
    # scale 0.05: big enough that the domain model differs clearly from the base at these tiny widths
    lora = random_domain_lora(unet, rank=4, seed=3, scale=0.05)
    meta = base_meta(base_patcher, {"test": True}, {"test": True})
    full = build_domain_model(base_patcher, merge_into(unet.state_dict(), lora), meta)
    lora_model = build_domain_model(base_patcher, lora.to_state_dict(), dataclasses.replace(meta, form="lora"))
    return lora_model, full


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_case(comfy, request):
    family = request.param
    model = tiny_models.forced_model(family, seed=1)
    pos, neg = _conditioning(family, 1), _conditioning(family, 2)
    lora_model, full = _lora_and_merged(model, neg)
    return family, model, pos, neg, lora_model, full


def test_lora_form_step_equals_merged_full_form_and_the_formula(family_case):
    from indomain.forms import domain_info
    from indomain.sampling.guider import domain_guider

    family, model, pos, neg, lora_model, full = family_case
    assert domain_info(lora_model).form.name == "lora" and domain_info(full).form.name == "full"
    seen_lora = one_guider_step(domain_guider(model, lora_model, pos, neg, 2.5, 2.0), shape=(2, 4, 8, 8))
    seen_full = one_guider_step(domain_guider(model, full, pos, neg, 2.5, 2.0), shape=(2, 4, 8, 8))
    torch.testing.assert_close(seen_lora["out"], seen_full["out"], rtol=0, atol=1e-5)

    # independently: u and the text term from the base, d from the merged full-form UNet, combined by hand
    x, s = seen_full["x"], seen_full["s"]

    def pred(m, c):
        kw = {"c_crossattn": c[0][0].expand(x.shape[0], -1, -1)}
        y = _y(model, c, x)
        if y is not None:
            kw["y"] = y.expand(x.shape[0], -1)
        with torch.no_grad():
            return m.model.apply_model(x, s, **kw).float()

    u, g, d = pred(model, neg), pred(model, pos), pred(full, neg)
    assert (d - u).abs().max() > 1e-3, f"{family}: the domain model does not differ from the base"
    torch.testing.assert_close(seen_lora["out"].float(), u + 2.0 * (d - u) + 2.5 * (g - u), rtol=1e-5, atol=1e-5)


def test_lora_form_weight_zero_is_exactly_core(family_case):
    import comfy.samplers as samplers

    from indomain.sampling.guider import domain_guider, sample_with_guider

    family, model, pos, neg, lora_model, _ = family_case
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    core = samplers.CFGGuider(model)
    core.set_conds(pos, neg)
    core.set_cfg(5.0)
    ref = sample_with_guider(core, model, 0, 3, "euler", "normal", latent)["samples"]
    off = sample_with_guider(domain_guider(model, lora_model, pos, neg, 5.0, 0.0), model, 0, 3, "euler", "normal",
                             latent)["samples"]
    assert torch.equal(off, ref)
    on = sample_with_guider(domain_guider(model, lora_model, pos, neg, 5.0, 2.0), model, 0, 3, "euler", "normal",
                            latent)["samples"]
    assert torch.isfinite(on).all() and (on - ref).abs().max() > 1e-3


def test_lora_form_is_the_base_unet_with_an_adapter(family_case):
    """No second UNet: the LoRA-form MODEL wraps the very diffusion model the base uses."""
    _, model, _, _, lora_model, full = family_case
    assert lora_model.model.diffusion_model is model.model.diffusion_model
    assert full.model.diffusion_model is not model.model.diffusion_model
