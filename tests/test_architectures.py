"""SD2.x (v-prediction) and SDXL (ADM `y` input) through the decoupled guider. ComfyUI auto-detects
those families only at full depth, so tiny models are built from forced configs (devkit)."""
from __future__ import annotations

import copy

import pytest
import torch

from indomain.devkit import tiny_models
from indomain.devkit.domain import one_guider_step

FAMILIES = {"sd2v": dict(ctx=1024, pooled=None), "sdxl": dict(ctx=2048, pooled=1280)}


def _conditioning(family, seed):
    g = torch.Generator().manual_seed(seed)
    spec = FAMILIES[family]
    extra = {}
    if spec["pooled"]:
        extra["pooled_output"] = torch.randn(1, spec["pooled"], generator=g)
    return [[torch.randn(1, 77, spec["ctx"], generator=g), extra]]


def _domain_for(base_patcher, neg):
    """Calibrate + convert the forced base (random 'empty prompt'), perturb, wrap as a domain MODEL."""
    from indomain.guidance.nulltext import calibrate_constants, convert_to_null_text
    from indomain.sampling.domain_model import build_domain_model
    from indomain.forms.model import base_meta, noisy_inputs

    base = base_patcher.model
    ms = base.model_sampling
    unet = copy.deepcopy(base.diffusion_model).float()
    ctx = neg[0][0]
    y = None
    if "pooled_output" in neg[0][1]:
        y = base.extra_conds(cross_attn=ctx, pooled_output=neg[0][1]["pooled_output"], noise=torch.zeros(1, 4, 8, 8),
                             device="cpu", width=64, height=64)["y"].cond
    gen = torch.Generator().manual_seed(0)
    batches = []
    for p in (0.2, 0.5, 0.8):
        x0 = torch.randn(2, 4, 8, 8, generator=gen)
        batches.append(noisy_inputs(ms, x0, torch.full((2,), float(ms.percent_to_sigma(p))), torch.randn(2, 4, 8, 8, generator=gen))[:2])

    def run(b):
        kw = {"context": ctx.expand(2, -1, -1)}
        if y is not None:
            kw["y"] = y.expand(2, -1)
        unet(b[0], b[1], **kw)

    constants = calibrate_constants(unet, run, batches)
    convert_to_null_text(unet, constants)
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim > 1:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.05)
    meta = base_meta(base_patcher, {"test": True}, {"test": True})
    return build_domain_model(base_patcher, unet.state_dict(), meta)


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_family_parity_formula_and_effect(comfy, family):
    import comfy.samplers as samplers

    from indomain.sampling.guider import domain_guider, sample_with_guider

    model = tiny_models.forced_model(family, seed=1)
    pos, neg = _conditioning(family, 1), _conditioning(family, 2)
    domain = _domain_for(model, neg)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    core = samplers.CFGGuider(model)
    core.set_conds(pos, neg)
    core.set_cfg(5.0)
    ref = sample_with_guider(core, model, 0, 3, "euler", "normal", latent)["samples"]
    off = sample_with_guider(domain_guider(model, domain, pos, neg, 5.0, 0.0), model, 0, 3, "euler", "normal", latent)["samples"]
    assert torch.equal(off, ref)
    on = sample_with_guider(domain_guider(model, domain, pos, neg, 5.0, 2.0), model, 0, 3, "euler", "normal", latent)["samples"]
    assert torch.isfinite(on).all() and (on - ref).abs().max() > 1e-3

    # one step against the formula from the three predictions (v-prediction / ADM included)
    seen = one_guider_step(domain_guider(model, domain, pos, neg, 2.5, 2.0))

    def pred(m, c):
        kw = {"c_crossattn": c[0][0]}
        if "pooled_output" in c[0][1]:
            kw["y"] = m.model.extra_conds(cross_attn=c[0][0], pooled_output=c[0][1]["pooled_output"],
                                          noise=seen["x"], device="cpu", width=64, height=64)["y"].cond
        with torch.no_grad():
            return m.model.apply_model(seen["x"], seen["s"], **kw).float()

    u, g, d = pred(model, neg), pred(model, pos), pred(domain, neg)
    torch.testing.assert_close(seen["out"].float(), u + 2.0 * (d - u) + 2.5 * (g - u), rtol=1e-5, atol=1e-5)


def test_sdxl_domain_file_rejected_for_sd15_base(comfy, base, tmp_path):
    from indomain.guidance.checkpoint import DomainCheckpointError, write_domain_checkpoint
    from indomain.forms import domain_info
    from indomain.sampling.domain_model import load_domain_model

    xl = tiny_models.forced_model("sdxl", seed=1)
    domain = _domain_for(xl, _conditioning("sdxl", 2))
    path = write_domain_checkpoint(tmp_path / "xl.safetensors", domain.model.diffusion_model.state_dict(),
                                   domain_info(domain).meta)
    with pytest.raises(DomainCheckpointError, match="SDXL.*SD15"):
        load_domain_model(base[0], path)
    assert load_domain_model(xl, path) is not None  # and it loads onto its own family


def test_sdxl_domain_pass_gets_the_y_it_was_trained_with(comfy, tmp_path):
    """Defect 4: the domain pass built SDXL's y from the user's *negative* and the sampling size; the domain UNet
    was trained with one y (the empty prompt's pooled embedding at the training size). The file stores that y
    and both the guider and the Apply Domain Guidance patch feed it; a file without it keeps the old way."""
    import dataclasses

    import comfy.samplers as samplers

    from indomain.forms import domain_info
    from indomain.guidance.checkpoint import (DomainCheckpointError, read_domain_checkpoint, trained_y,
                                              write_domain_checkpoint)
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider
    from indomain.nodes.patch import patch_model_for_domain_guidance
    from indomain.forms.model import EmptyPrompt, trained_calibration

    model = tiny_models.forced_model("sdxl", seed=1)
    empty, pos, neg = _conditioning("sdxl", 3), _conditioning("sdxl", 1), _conditioning("sdxl", 2)  # neg: non-empty
    y_train = model.model.extra_conds(cross_attn=empty[0][0], pooled_output=empty[0][1]["pooled_output"],
                                      noise=torch.zeros(1, 4, 8, 8), device="cpu", width=64, height=64)["y"].cond
    built = _domain_for(model, empty)
    meta = domain_info(built).meta
    sd = built.model.diffusion_model.state_dict()
    calibration = trained_calibration(dict(meta.calibration), EmptyPrompt(empty[0][0], y_train.expand(2, -1)))
    path = write_domain_checkpoint(tmp_path / "xl.safetensors", sd, dataclasses.replace(meta, calibration=calibration),
                                   precision="fp32")
    legacy = write_domain_checkpoint(tmp_path / "xl_old.safetensors", sd, meta, precision="fp32")
    _, read_meta = read_domain_checkpoint(path)
    assert torch.equal(trained_y(read_meta), y_train.float())  # stored exactly
    domain, old_domain = load_domain_model(model, path), load_domain_model(model, legacy)

    shape = (2, 4, 8, 12)  # sampling at another size than training (64x96 px), batch 2

    def pred(m, c, x, s, y=None):
        if y is None:
            y = m.model.extra_conds(cross_attn=c[0][0], pooled_output=c[0][1]["pooled_output"], noise=x,
                                    device="cpu", width=96, height=64)["y"].cond
        with torch.no_grad():
            return m.model.apply_model(x, s, c_crossattn=c[0][0].expand(x.shape[0], -1, -1),
                                       y=y.expand(x.shape[0], -1)).float()

    for how in ("guider", "patch"):
        for dom, y_dom in ((domain, y_train), (old_domain, None)):
            if how == "guider":
                guider = domain_guider(model, dom, pos, neg, 2.5, 2.0)
            else:
                guider = samplers.CFGGuider(patch_model_for_domain_guidance(model, dom, 2.0))
                guider.set_conds(pos, neg)
                guider.set_cfg(2.5)
            seen = one_guider_step(guider, shape=shape)
            x, s = seen["x"], seen["s"]
            u, g = pred(model, neg, x, s), pred(model, pos, x, s)
            d = pred(dom, neg, x, s, y_dom)  # trained y; the legacy file: the negative's at the sampling size
            torch.testing.assert_close(seen["out"].float(), u + 2.0 * (d - u) + 2.5 * (g - u), rtol=1e-5, atol=1e-5)
            if y_dom is not None:
                assert (d - pred(dom, neg, x, s)).abs().max() > 1e-4  # the two ways really differ
    # a damaged stored y is a named error at load time
    bad = dataclasses.replace(meta, calibration=dict(calibration, empty_y=dict(calibration["empty_y"], data="###")))
    with pytest.raises(DomainCheckpointError, match="empty_y"):
        read_domain_checkpoint(write_domain_checkpoint(tmp_path / "bad.safetensors", sd, bad))
