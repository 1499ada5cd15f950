"""Decoupled guidance on the real ComfyUI host: parity with core, the formula, node forms, ControlNet,
intervals, hooks, batching and re-queueing. Tiny SD15-layout models, 8x8 latents."""
from __future__ import annotations

import pytest
import torch

from indomain.devkit.graphs import decoupled_forms

CKPT, DOMAIN, CN = "tiny_sd15.safetensors", "tiny_domain.safetensors", "tiny_controlnet.safetensors"


def run_forms(comfy, **kw):
    graph, outs = decoupled_forms(CKPT, DOMAIN, **kw)
    res = comfy.run(graph, outputs=list(outs.values()))
    return {form: res.output(node)["samples"] for form, node in outs.items()}


@pytest.fixture(scope="module")
def domain_ready(domain_file):
    return domain_file


def test_domain_weight_zero_is_exactly_core(comfy, domain_ready):
    lat = run_forms(comfy, cfg=7.0, domain_weight=0.0, steps=4)
    assert torch.equal(lat["ksampler"], lat["core_ksampler"])
    assert torch.equal(lat["patch"], lat["core_ksampler"])
    assert torch.equal(lat["guider"], lat["core_guider"])


def test_three_forms_agree_and_differ_from_core(comfy, domain_ready):
    lat = run_forms(comfy, cfg=2.5, domain_weight=2.0, steps=4, sampler="dpmpp_2m", scheduler="karras")
    assert torch.isfinite(lat["ksampler"]).all()
    assert (lat["ksampler"] - lat["core_ksampler"]).abs().max() > 1e-3, "the domain term had no effect"
    torch.testing.assert_close(lat["guider"], lat["ksampler"], rtol=0, atol=1e-5)
    torch.testing.assert_close(lat["patch"], lat["ksampler"], rtol=0, atol=1e-5)


def test_batch_two_and_requeue(comfy, domain_ready):
    graph, outs = decoupled_forms(CKPT, DOMAIN, batch=2, forms=("ksampler", "guider", "patch"), steps=3)
    first = comfy.run(graph, outputs=list(outs.values()))
    second = comfy.run(graph, outputs=list(outs.values()))
    for form, node in outs.items():
        a, b = first.output(node)["samples"], second.output(node)["samples"]
        assert a.shape == (2, 4, 8, 8)
        assert torch.equal(a, b), f"{form}: re-queueing the same graph changed the result"
        assert (a[0] - a[1]).abs().max() > 1e-3  # two different samples in the batch


def test_cfg_zero_domain_one_equals_domain_alone(comfy, domain_ready):
    graph, outs = decoupled_forms(CKPT, DOMAIN, cfg=0.0, domain_weight=1.0, forms=("ksampler", "patch"), steps=4)
    ks = dict(graph["30"]["inputs"])
    graph["50"] = {"class_type": "KSampler", "inputs": {**{k: ks[k] for k in (
        "seed", "steps", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise")},
        "model": ["20", 0], "cfg": 1.0}}
    res = comfy.run(graph, outputs=["30", "37", "50"])
    alone = res.output("50")["samples"]
    torch.testing.assert_close(res.output("30")["samples"], alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(res.output("37")["samples"], alone, rtol=0, atol=1e-4)


def _encode(clip, text):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def test_one_step_equals_formula_from_three_predictions(comfy, base, domain_file):
    import comfy.samplers as samplers

    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    w_c, w_d = 2.5, 2.0
    seen = {}

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        s = sigmas[0] * x.new_ones([x.shape[0]])
        seen["x"], seen["sigma"] = x.clone(), s.clone()
        seen["out"] = model_k(x, s, **(extra_args or {}))
        return seen["out"]

    guider = domain_guider(model, domain, pos, neg, w_c, w_d)
    # a mid-schedule sigma: at sigma_max, x0 = x - sigma*eps cancels ~15x and amplifies float noise
    sigmas = torch.tensor([1.0, 0.0])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    guider.sample(noise, torch.zeros(1, 4, 8, 8), samplers.KSAMPLER(one_call), sigmas, seed=3)

    x, s = seen["x"], seen["sigma"]
    with torch.no_grad():
        u = model.model.apply_model(x, s, c_crossattn=neg[0][0]).float()
        g = model.model.apply_model(x, s, c_crossattn=pos[0][0]).float()
        d = domain.model.apply_model(x, s, c_crossattn=neg[0][0]).float()
    expected = u + w_d * (d - u) + w_c * (g - u)
    assert (d - u).abs().max() > 1e-3 and (g - u).abs().max() > 1e-3
    torch.testing.assert_close(seen["out"].float(), expected, rtol=1e-5, atol=1e-5)


def test_term_outside_interval_is_not_evaluated(comfy, base, domain_file):
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider, sample_with_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    calls = []
    hook = domain.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        guider = domain_guider(model, domain, _encode(clip, "x"), _encode(clip, ""), 2.5, 2.0,
                               start_percent=0.5, end_percent=1.0)
        steps = 6
        sample_with_guider(guider, model, 0, steps, "euler", "normal", {"samples": torch.zeros(1, 4, 8, 8)})
    finally:
        hook.remove()
    import comfy.samplers as samplers

    ms = model.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(ms, "normal", steps)[:-1]
    expected = int((sigmas <= float(ms.percent_to_sigma(0.5))).sum())
    assert 0 < expected < steps
    assert len(calls) == expected == guider.model_calls


def test_domain_model_loads_with_base_in_one_call(comfy, base, domain_file, monkeypatch):
    import comfy.model_management as mm

    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider, sample_with_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    pos, neg = _encode(clip, "x"), _encode(clip, "")  # (loads the text encoder: not part of sampling)
    calls = []
    real = mm.load_models_gpu

    def spy(models, *a, **k):
        calls.append(list(models))
        return real(models, *a, **k)

    monkeypatch.setattr(mm, "load_models_gpu", spy)
    guider = domain_guider(model, domain, pos, neg, 2.5, 2.0)
    sample_with_guider(guider, model, 0, 2, "euler", "normal", {"samples": torch.zeros(1, 4, 8, 8)})
    assert len(calls) == 1, f"expected one load_models_gpu call, got {len(calls)}"
    assert any(m.model is model.model for m in calls[0]) and any(m is domain for m in calls[0])


def test_core_cfg_hooks_still_run(comfy, base, domain_file):
    """RescaleCFG (a sampler_cfg_function) must apply on top of decoupled guidance."""
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider, sample_with_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    rescaled = comfy.node("RescaleCFG")().patch(model, 0.7)[0]
    pos, neg = _encode(clip, "x"), _encode(clip, "")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(m, w_d):
        return sample_with_guider(domain_guider(m, domain, pos, neg, 5.0, w_d), m, 1, 3, "euler", "normal", latent)["samples"]

    plain, with_rescale = run(model, 2.0), run(rescaled, 2.0)
    assert (plain - with_rescale).abs().max() > 1e-4, "RescaleCFG had no effect under the Domain Guider"
    # and with the domain term off, the guider is exactly core KSampler with RescaleCFG
    core = comfy.node("KSampler")().sample(rescaled, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
    assert torch.equal(run(rescaled, 0.0), core)


def test_controlnet_on_control_term_and_on_domain(comfy, domain_ready):
    plain = run_forms(comfy, forms=("ksampler",), batch=2, steps=3)["ksampler"]
    cn = run_forms(comfy, forms=("ksampler", "patch", "guider"), batch=2, steps=3, controlnet=CN)
    cn_dom = run_forms(comfy, forms=("ksampler", "patch", "guider"), batch=2, steps=3, controlnet=CN,
                       domain_on_controlnet=True)
    assert cn["ksampler"].shape == cn_dom["ksampler"].shape == (2, 4, 8, 8)
    assert (cn["ksampler"] - plain).abs().max() > 1e-3, "ControlNet on the control term had no effect"
    assert (cn_dom["ksampler"] - cn["ksampler"]).abs().max() > 1e-3, "'domain_on_controlnet' had no effect"
    for lat in (cn, cn_dom):
        torch.testing.assert_close(lat["patch"], lat["ksampler"], rtol=0, atol=1e-5)
        torch.testing.assert_close(lat["guider"], lat["ksampler"], rtol=0, atol=1e-5)


def test_img2img_denoise_below_one_stays_near_input(comfy, base, domain_file):
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider, sample_with_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    src = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    pos, neg = _encode(clip, "x"), _encode(clip, "")
    light = sample_with_guider(domain_guider(model, domain, pos, neg, 2.5, 2.0), model, 0, 10, "euler", "normal",
                               {"samples": src}, denoise=0.2)["samples"]
    full = sample_with_guider(domain_guider(model, domain, pos, neg, 2.5, 2.0), model, 0, 10, "euler", "normal",
                              {"samples": src}, denoise=1.0)["samples"]
    assert (light - src).abs().mean() < (full - src).abs().mean()
    assert (light - src).abs().max() > 1e-4  # it did edit
