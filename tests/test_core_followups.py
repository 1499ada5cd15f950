"""What current ComfyUI core added around guiders, on the Domain Guider: CFGOverride (changes guider.cfg per
step), a text-free negative ([[None, {}]], what core's DualModelGuider uses when its negative is unconnected),
core's DualModelGuider as a special case of the decoupled combination, and multi-GPU clones. Nodes that only
newer cores have are skipped with the reason on ComfyUI 0.3.75."""
from __future__ import annotations

import pytest
import torch

from indomain.devkit.graphs import decoupled_forms

CKPT, DOMAIN = "tiny_sd15.safetensors", "tiny_domain.safetensors"


def _need_core_node(comfy, node_id: str):
    from indomain.devkit.host import comfyui_version

    if node_id not in comfy.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip(f"core node {node_id} does not exist in ComfyUI {comfyui_version()} (added in newer cores; "
                    "CI's second pass runs this on 0.33.0)")


def _encode(clip, text):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _sample(guider, model, steps=4, seed=5):
    import comfy.samplers as samplers

    ms = model.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(ms, "normal", steps)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, torch.zeros(1, 4, 8, 8), samplers.sampler_object("euler"), sigmas, seed=seed)


def _node(comfy, node_id, **inputs):
    return comfy.node(node_id).execute(**inputs).result[0]


@pytest.fixture(scope="module")
def models(comfy, base, domain_file):
    model, clip, _ = base
    domain = _node(comfy, "InDomainLoadDomainUNet", model=model, domain_unet_name=DOMAIN)
    return model, clip, domain


def test_cfg_override_changes_the_domain_guider_over_its_range(comfy, domain_file):
    """Core's CFGOverride sets guider.cfg per step through a PREDICT_NOISE wrapper. The Domain Guider reads its
    control weight from self.cfg each step, so the override applies to all three decoupled forms: over the
    whole range it equals building them with that cfg, over part of the range it gives a third result."""
    _need_core_node(comfy, "CFGOverride")
    forms = ("ksampler", "guider", "patch")
    graph, outs = decoupled_forms(CKPT, DOMAIN, cfg=2.5, domain_weight=2.0, steps=4, forms=forms)
    ref_graph, ref_outs = decoupled_forms(CKPT, DOMAIN, cfg=6.0, domain_weight=2.0, steps=4, forms=forms)
    plain = comfy.run(graph, outputs=list(outs.values()))
    at_six = comfy.run(ref_graph, outputs=list(ref_outs.values()))

    def overridden(start, end):
        g = {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in graph.items()}
        g["60"] = {"class_type": "CFGOverride", "inputs": {"model": ["1", 0], "cfg": 6.0, "start_percent": start,
                                                           "end_percent": end}}
        for node in ("30", "31", "36"):  # Domain KSampler, Domain Guider, Apply Domain Guidance take the MODEL
            g[node]["inputs"]["model"] = ["60", 0]
        return comfy.run(g, outputs=list(outs.values()))

    full, part = overridden(0.0, 1.0), overridden(0.5, 1.0)
    for form, node in outs.items():
        p, f, h = plain.output(node)["samples"], full.output(node)["samples"], part.output(node)["samples"]
        six = at_six.output(ref_outs[form])["samples"]
        torch.testing.assert_close(f, six, rtol=0, atol=1e-5, msg=f"{form}: CFGOverride over 0-1 != cfg 6")
        assert (f - p).abs().max() > 1e-3, f"{form}: CFGOverride had no effect"
        assert (h - p).abs().max() > 1e-4 and (h - f).abs().max() > 1e-4, f"{form}: the override's range was ignored"


def test_text_free_negative_is_accepted(comfy, models):
    """A text-free negative ([[None, {}]]) is the base's unconditional from a zeroed text embedding (what core's
    ConditioningZeroOut gives) and the domain UNet's pass as it is (it ignores text)."""
    model, clip, domain = models
    pos = _encode(clip, "a red circle")
    zeroed = [[torch.zeros_like(pos[0][0]), {"pooled_output": torch.zeros_like(pos[0][1]["pooled_output"])}]]
    kw = dict(model=model, domain_model=domain, positive=pos, cfg=2.5, domain_weight=2.0)
    text_free = _sample(_node(comfy, "InDomainGuider", negative=[[None, {}]], **kw), model)
    with_zeros = _sample(_node(comfy, "InDomainGuider", negative=zeroed, **kw), model)
    with_empty = _sample(_node(comfy, "InDomainGuider", negative=_encode(clip, ""), **kw), model)
    assert torch.isfinite(text_free).all()
    torch.testing.assert_close(text_free, with_zeros, rtol=0, atol=1e-5)
    assert (text_free - with_empty).abs().max() > 1e-4  # a zeroed embedding is not CLIP's empty prompt


def test_core_dual_model_guider_is_a_special_case(comfy, models):
    """Core's DualModelGuider with the domain UNet as its negative model computes D + s (B(c) - D), i.e.
    u + w_d (D - u) + w_c (B(c) - u) with w_c = s, w_d = 1 - s: the same numbers from the Domain Guider."""
    _need_core_node(comfy, "DualModelGuider")
    model, clip, domain = models
    pos = _encode(clip, "a red circle")
    s = 2.5
    dual = _sample(_node(comfy, "DualModelGuider", model=model, model_negative=domain, positive=pos, cfg=s), model)
    ours = _sample(_node(comfy, "InDomainGuider", model=model, domain_model=domain, positive=pos,
                         negative=[[None, {}]], cfg=s, domain_weight=1.0 - s), model)
    # the same combination reached through different float arithmetic (u enters with coefficient 0)
    torch.testing.assert_close(ours, dual, rtol=1e-5, atol=1e-4)
    usual = _sample(_node(comfy, "InDomainGuider", model=model, domain_model=domain, positive=pos,
                          negative=_encode(clip, ""), cfg=s, domain_weight=2.0), model)
    assert (usual - dual).abs().max() > 1e-3  # the usual weights express something else


def test_domain_model_patcher_is_built_like_the_base(comfy, models):
    """The domain model's patcher is the class current loaders use (CoreModelPatcher where the host has it,
    which is ModelPatcherDynamic on GPUs with dynamic VRAM); on this CPU host both are plain ModelPatchers."""
    import comfy.model_patcher as mp

    model, _, domain = models
    assert type(domain) is type(model)
    expected = getattr(mp, "CoreModelPatcher", mp.ModelPatcher)
    assert isinstance(domain, expected)


def test_multigpu_copies_are_refused_with_a_clear_error(comfy, models):
    """A base with per-GPU copies (what MultiGPU Work Units attaches; built by hand here, this machine has no
    second GPU) is refused by every node form, and ComfyUI's request to re-create the domain model for a
    per-GPU copy gets the same advice instead of core's generic loader error."""
    model, clip, domain = models
    multi = model.clone()
    multi.set_additional_models("multigpu", [model.clone()])
    pos, neg = _encode(clip, "x"), _encode(clip, "")
    with pytest.raises(ValueError, match="MultiGPU Work Units"):
        _node(comfy, "InDomainGuider", model=multi, domain_model=domain, positive=pos, negative=neg, cfg=2.5,
              domain_weight=2.0)
    with pytest.raises(ValueError, match="MultiGPU Work Units"):
        _node(comfy, "InDomainApplyGuidance", model=multi, domain_model=domain, domain_weight=2.0)
    if hasattr(domain, "deepclone_multigpu"):  # newer cores
        with pytest.raises(ValueError, match="re-create the InDomain domain model"):
            domain.deepclone_multigpu(new_load_device=torch.device("cpu"))
