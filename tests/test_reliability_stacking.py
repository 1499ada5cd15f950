"""Issue 13, defect 5: stacking.

- Two Apply Domain Guidance nodes in a row give the sum of both domain terms, each against the base's own
  u (checked at cfg 2.5 and cfg 0, batch 2, against separate core passes of each model), and both domain
  models are registered to load with the base.
- A model from Apply Domain Guidance fed to Domain KSampler / Domain Guider / Multi-Term Guider is refused
  with the fix (the guider's own domain models would replace the patch's, and the term would run twice).
- Two copies of one domain model with different patches are refused (ComfyUI holds one set of patches per
  model: one copy's would silently be used for both).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from indomain.devkit.domain import core_x0, make_domain_unet, x0_at_one_step


def _encode(clip, text):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.fixture(scope="module")
def two_domains(comfy, base, domain_file, tmp_path_factory):
    from indomain.sampling.domain_model import load_domain_model

    model, clip, _ = base
    other = make_domain_unet(model, clip, tmp_path_factory.mktemp("stack") / "other.safetensors", seed=1, perturb=0.08)
    return load_domain_model(model, domain_file), load_domain_model(model, other)


@pytest.mark.parametrize("w_c", [2.5, 0.0])
def test_two_apply_domain_guidance_nodes_in_a_row_add_both_terms(comfy, base, two_domains, w_c):
    from indomain.sampling.guider import ADDITIONAL_MODELS_KEY
    from indomain.nodes.patch import patch_model_for_domain_guidance

    samplers = importlib.import_module("comfy.samplers")
    model, clip, _ = base
    d1_model, d2_model = two_domains
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    w1, w2 = 2.0, -0.7
    sigmas = torch.tensor([1.0, 0.0])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(6))

    once = patch_model_for_domain_guidance(model, d1_model, w1)
    twice = patch_model_for_domain_guidance(once, d2_model, w2, start_percent=0.0, end_percent=1.0)
    # both domain models load with the base (the second patch used to replace the first's additional model)
    loaded = twice.get_additional_models_with_key(ADDITIONAL_MODELS_KEY)
    assert {id(p.model) for p in loaded} == {id(d1_model.model), id(d2_model.model)}
    assert len(twice.model_options["sampler_pre_cfg_function"]) == 1  # one hook evaluates both terms
    guider = samplers.CFGGuider(twice)
    guider.set_conds(pos, neg)
    guider.set_cfg(w_c)
    calls = {1: 0, 2: 0}
    hooks = [d.model.diffusion_model.register_forward_hook(lambda m, i, o, k=k: calls.__setitem__(k, calls[k] + 1))
             for k, d in ((1, d1_model), (2, d2_model))]
    try:
        x, out = x0_at_one_step(guider, noise, sigmas)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {1: 1, 2: 1}

    def alone(m, conds):
        x_here, o = core_x0(m, conds, noise, sigmas)
        assert torch.equal(x_here, x)
        return o

    u, g = alone(model, neg), alone(model, pos)
    d1, d2 = alone(d1_model, neg), alone(d2_model, neg)
    expected = u + w1 * (d1 - u) + w2 * (d2 - u) + w_c * (g - u)
    assert (d1 - d2).abs().max() > 1e-3 and (d2 - u).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the first patch alone is unchanged by the second (clones)
    assert len(once.get_attachment("indomain.domain_pass").terms) == 1


def test_a_patched_model_is_refused_by_the_guiders(comfy, base, two_domains):
    from indomain.sampling.guider import DecoupledGuider, Term, domain_guider
    from indomain.nodes.patch import patch_model_for_domain_guidance

    model, clip, _ = base
    d1_model, d2_model = two_domains
    pos, neg = _encode(clip, "a square"), _encode(clip, "")
    patched = patch_model_for_domain_guidance(model, d1_model, 2.0)
    fix = r"'model' input comes from 'Apply Domain Guidance'.*Connect the unpatched base MODEL"
    with pytest.raises(ValueError, match=fix):
        domain_guider(patched, d2_model, pos, neg, 2.5, 2.0)
    with pytest.raises(ValueError, match=fix):  # the same domain model twice: the term would run twice
        domain_guider(patched, d1_model, pos, neg, 2.5, 0.0)
    with pytest.raises(ValueError, match=fix):
        DecoupledGuider(patched, neg, [Term(d2_model, neg, 1.0)])
    for node_id in ("InDomainKSampler", "InDomainGuider"):  # through the nodes as ComfyUI loaded them
        node = comfy.node(node_id)
        with pytest.raises(ValueError, match=fix):
            if node_id == "InDomainKSampler":
                node.execute(patched, d1_model, 0, 1, 2.5, 2.0, "euler", "normal", pos, neg,
                             {"samples": torch.zeros(1, 4, 8, 8)}, 1.0)
            else:
                node.execute(patched, d1_model, pos, neg, 2.5, 2.0)
    # a weight-0 patch adds nothing and marks nothing: accepted
    domain_guider(patch_model_for_domain_guidance(model, d1_model, 0.0), d2_model, pos, neg, 2.5, 2.0)


def test_two_copies_of_one_domain_model_with_different_patches_are_refused(comfy, base, two_domains):
    from indomain.sampling.guider import DecoupledGuider, Term
    from indomain.nodes.patch import patch_model_for_domain_guidance

    model, clip, _ = base
    d1_model, _ = two_domains
    neg = _encode(clip, "")
    key = next(k for k in d1_model.model_state_dict() if k.endswith(".weight") and "diffusion_model" in k)
    patched_copy = d1_model.clone()
    patched_copy.add_patches({key: (torch.zeros_like(d1_model.model_state_dict()[key]),)}, 1.0)
    same_copy = d1_model.clone()
    fix = r"copy of .* with different patches.*another 'Load Domain UNet' node"
    with pytest.raises(ValueError, match=fix):
        DecoupledGuider(model, neg, [Term(d1_model, neg, 1.0), Term(patched_copy, neg, 1.0)])
    with pytest.raises(ValueError, match=fix):
        patch_model_for_domain_guidance(patch_model_for_domain_guidance(model, d1_model, 1.0), patched_copy, 1.0)
    # copies with the same patches are one model: accepted
    DecoupledGuider(model, neg, [Term(d1_model, neg, 1.0), Term(same_copy, neg, 1.0)])
    patch_model_for_domain_guidance(patch_model_for_domain_guidance(model, d1_model, 1.0), same_copy, 1.0)
