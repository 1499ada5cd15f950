"""Guidance Term chains and the Multi-Term Guider: equivalence with the Domain Guider, batching of terms
that share a model, two domain UNets at once."""
from __future__ import annotations

import pytest
import torch


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def parts(comfy, base, domain_file, models_dir):
    from indomain.devkit.domain import make_domain_unet
    from indomain.sampling.domain_model import load_domain_model

    model, clip, _ = base
    other = make_domain_unet(model, clip, models_dir / "domain_unets" / "tiny_domain_b.safetensors", seed=1, perturb=0.05)
    return dict(model=model, pos=_encode(clip, "a red circle"), pos2=_encode(clip, "a blue square"),
                neg=_encode(clip, ""), dom_a=load_domain_model(model, domain_file), dom_b=load_domain_model(model, other))


def _chain(comfy, *specs):
    terms = None
    for model, cond, weight in specs:
        terms = comfy.node("InDomainGuidanceTerm").execute(model, cond, weight, 0.0, 1.0, terms).result[0]
    return terms


def _sample(guider, model, steps=3):
    from indomain.sampling.guider import sample_with_guider

    return sample_with_guider(guider, model, 0, steps, "euler", "normal", {"samples": torch.zeros(1, 4, 8, 8)})["samples"]


def _count_forwards(module):
    calls = []
    handle = module.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls, handle


def test_chain_equals_domain_guider(comfy, parts):
    p = parts
    from indomain.sampling.guider import domain_guider

    terms = _chain(comfy, (p["model"], p["pos"], 2.5), (p["dom_a"], p["neg"], 2.0))
    multi = comfy.node("InDomainMultiGuider").execute(p["model"], p["neg"], terms).result[0]
    ref = domain_guider(p["model"], p["dom_a"], p["pos"], p["neg"], 2.5, 2.0)
    torch.testing.assert_close(_sample(multi, p["model"]), _sample(ref, p["model"]), rtol=0, atol=1e-5)


def test_terms_sharing_a_model_are_batched(comfy, parts):
    p = parts
    terms = _chain(comfy, (p["model"], p["pos"], 2.0), (p["model"], p["pos2"], 1.0), (p["dom_a"], p["neg"], 1.5),
                   (p["dom_a"], p["pos"], 0.5))
    guider = comfy.node("InDomainMultiGuider").execute(p["model"], p["neg"], terms).result[0]
    base_calls, h1 = _count_forwards(p["model"].model.diffusion_model)
    dom_calls, h2 = _count_forwards(p["dom_a"].model.diffusion_model)
    try:
        out = _sample(guider, p["model"], steps=3)
    finally:
        h1.remove(), h2.remove()
    assert torch.isfinite(out).all()
    assert base_calls == [3, 3, 3], base_calls  # u + two text terms in one batch per step
    assert dom_calls == [2, 2, 2], dom_calls    # both domain terms in one batch per step


def test_two_domain_unets_at_once(comfy, parts):
    p = parts
    one = comfy.node("InDomainMultiGuider").execute(
        p["model"], p["neg"], _chain(comfy, (p["model"], p["pos"], 2.5), (p["dom_a"], p["neg"], 2.0))).result[0]
    two = comfy.node("InDomainMultiGuider").execute(
        p["model"], p["neg"], _chain(comfy, (p["model"], p["pos"], 2.5), (p["dom_a"], p["neg"], 2.0),
                                     (p["dom_b"], p["neg"], 1.0))).result[0]
    b_calls, h = _count_forwards(p["dom_b"].model.diffusion_model)
    try:
        a, b = _sample(one, p["model"]), _sample(two, p["model"])
    finally:
        h.remove()
    assert len(b_calls) == 3 and (a - b).abs().max() > 1e-3


def test_chain_errors_name_the_fix(comfy, parts):
    p = parts
    with pytest.raises(ValueError, match="swap"):
        comfy.node("InDomainGuidanceTerm").execute(p["model"], p["pos"], 1.0, 0.8, 0.2, None)
    with pytest.raises(ValueError, match="is a domain UNet"):
        comfy.node("InDomainMultiGuider").execute(p["dom_a"], p["neg"], _chain(comfy, (p["model"], p["pos"], 1.0)))
    with pytest.raises(ValueError, match="not a domain UNet"):
        comfy.node("InDomainKSampler").execute(p["model"], p["model"], 0, 1, 2.5, 2.0, "euler", "normal", p["pos"],
                                               p["neg"], {"samples": torch.zeros(1, 4, 8, 8)}, 1.0)


def test_domain_cache_on_the_chain_equals_the_domain_guider_and_skips_domain_calls(comfy, parts):
    """Multi-Term Guider's domain_cache (issue 24): the chain text + domain with 'every 2' samples what the Domain
    Guider samples with the same setting, runs the domain model on ceil(calls / 2) calls and the base on every
    call, and moves the result away from the uncached chain (the setting reaches the guider)."""
    import math

    from indomain.sampling.guider import domain_guider

    p, steps = parts, 5
    terms = _chain(comfy, (p["model"], p["pos"], 2.5), (p["dom_a"], p["neg"], 2.0))
    node = comfy.node("InDomainMultiGuider")
    cached = node.execute(p["model"], p["neg"], terms, domain_cache="every 2").result[0]
    base_calls, h1 = _count_forwards(p["model"].model.diffusion_model)
    dom_calls, h2 = _count_forwards(p["dom_a"].model.diffusion_model)
    try:
        out = _sample(cached, p["model"], steps)
    finally:
        h1.remove()
        h2.remove()
    assert len(base_calls) == steps and len(dom_calls) == math.ceil(steps / 2)
    ref = domain_guider(p["model"], p["dom_a"], p["pos"], p["neg"], 2.5, 2.0, domain_cache="every 2")
    torch.testing.assert_close(out, _sample(ref, p["model"], steps), rtol=0, atol=1e-5)
    uncached = node.execute(p["model"], p["neg"], terms).result[0]
    assert (out - _sample(uncached, p["model"], steps)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="domain_cache"):
        node.execute(p["model"], p["neg"], terms, domain_cache="every 4")
