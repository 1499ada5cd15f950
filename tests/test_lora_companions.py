"""Issue 22, defects 1, 2, 3 and 9: the LoRA-form domain model next to what users chain with it, on a real ComfyUI.

What D is (forms/lora.py, module text): the base AS SAMPLED (its weights and its model_options patches, applied
before or after Load Domain UNet) plus the adapter, every cross-attention replaced by its constant.

1. An attn2 "replace" patch (what IP-Adapter sets, `set_model_attn2_replace`) on the base, before or after Load
   Domain UNet: all three sampling forms run and equal the same adapter merged into a full-form domain UNet,
   whose separate UNet never sees the base's patches (the patch is an image prompt on the text branch: u and the
   control term get it, D does not). The test patch indexes its per-chunk settings by `cond_or_uncond` as
   IP-Adapter does, so it also checks that the patch is handed a batch consistent with its `cond_or_uncond`.
2. A core LoRA (LoraLoaderModelOnly) on the LoRA-form domain MODEL is refused by name in all three forms; the
   same LoRA on the base reaches D (equals the full form with the LoRA on the base and on its domain UNet).
3. A forward patch on the base (an attn1 output patch), before or after loading: the one-forward path (Domain
   KSampler, Domain Guider) and the two-call path (Apply Domain Guidance; `one_forward = False`) compute the same
   D, and equal the full form with the patch on the base and on its domain UNet (an independent computation).
9. A bf16 forward of the injection leaves the loaded file's adapter (shared by ComfyUI's cached loader output)
   untouched: same tensors, float32, and fp32 results before and after are identical.
"""
from __future__ import annotations

import copy

import pytest
import torch

from indomain.devkit.graphs import decoupled_forms

CKPT = "tiny_sd15.safetensors"
LORA, FULL = "companion_domain_lora.safetensors", "companion_domain_lora_merged.safetensors"
CORE_LORA = "companion_style_lora.safetensors"
FORMS = ("ksampler", "guider", "patch")
SHARED = {"1", "2", "3", "4", "8", "9", "10", "32", "33", "34", "50", "52"}  # loaders, prompts, base patches

ATTN2_NODE, ATTN1_NODE = "IndomainTestAttn2Replace", "IndomainTestAttn1OutputPatch"


# ----------------------------------------------------------------------------- companions as custom nodes


def transformer_blocks(diffusion_model):
    """(block_name, number, transformer_index) of every transformer block, as core's UNet names them for
    patches_replace (input_blocks[i] -> ("input", i), middle -> ("middle", 0), output_blocks[i] -> ("output", i))."""
    from comfy.ldm.modules.attention import SpatialTransformer

    out = []
    for name, blocks in (("input", diffusion_model.input_blocks), ("output", diffusion_model.output_blocks)):
        for i, blk in enumerate(blocks):
            for m in blk:
                if isinstance(m, SpatialTransformer):
                    out += [(name, i, t) for t in range(len(m.transformer_blocks))]
    for m in diffusion_model.middle_block or []:
        if isinstance(m, SpatialTransformer):
            out += [("middle", 0, t) for t in range(len(m.transformer_blocks))]
    return out


def ip_adapter_like(q, k, v, extra_options):
    """Cross-attention plus an 'image prompt' term whose strength depends on cond (0) / uncond (1), read per chunk
    from cond_or_uncond the way IP-Adapter does (an index >= 2, or a batch that does not match, fails)."""
    import comfy.ldm.modules.attention as attention

    out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
    chunks = extra_options["cond_or_uncond"]
    per = q.shape[0] // len(chunks)
    assert per * len(chunks) == q.shape[0], (q.shape, chunks)
    strength = torch.cat([torch.full((per,), (0.6, 0.2)[c]) for c in chunks]).to(q)
    return out + strength.view(-1, 1, 1) * torch.tanh(q)


class Attn2ReplaceNode:
    """An IP-Adapter-style node: set_model_attn2_replace on every transformer block."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        m = model.clone()
        for block, number, index in transformer_blocks(m.model.diffusion_model):
            m.set_model_attn2_replace(ip_adapter_like, block, number, index)
        return (m,)


def attn1_output(n, extra_options):
    return n * 1.25 + 0.05


class Attn1OutputPatchNode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        m = model.clone()
        m.set_model_attn1_output_patch(attn1_output)
        return (m,)


@pytest.fixture(scope="module")
def companion_nodes(comfy):
    mapping = comfy.nodes.NODE_CLASS_MAPPINGS
    mapping[ATTN2_NODE], mapping[ATTN1_NODE] = Attn2ReplaceNode, Attn1OutputPatchNode
    yield
    mapping.pop(ATTN2_NODE, None)
    mapping.pop(ATTN1_NODE, None)


# ----------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def lora_pair(comfy, base, models_dir):
    from indomain.devkit.domain import make_domain_lora_pair

    model, clip, _ = base
    folder = models_dir / "domain_unets"
    return make_domain_lora_pair(model, clip, folder / LORA, folder / FULL, seed=2)


@pytest.fixture(scope="module")
def core_lora(comfy, base, models_dir):
    """A core-format LoRA of the base UNet (diffusion_model.<module>.lora_down/up/alpha) as a style LoRA would be."""
    import safetensors.torch

    from indomain.guidance.lora import DomainLoRA, LayerAdapter, adapted_modules

    model, _clip, _ = base
    gen = torch.Generator().manual_seed(11)
    layers = {}
    for name, m in adapted_modules(model.model.diffusion_model):
        w = m.weight
        layers[name] = LayerAdapter(torch.randn(2, *w.shape[1:], generator=gen) * 0.05,
                                    torch.randn(w.shape[0], 2, *([1] * (w.ndim - 2)), generator=gen) * 0.05, 2.0)
    path = models_dir / "loras" / CORE_LORA
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(DomainLoRA(layers, {}, 2, 2.0).to_state_dict(), str(path))
    return path


# ----------------------------------------------------------------------------- graphs


def _retarget(g: dict, old: list, new: list, skip=()) -> None:
    for nid, node in g.items():
        if nid in skip:
            continue
        for k, v in node["inputs"].items():
            if v == old:
                node["inputs"][k] = list(new)


def patched_forms(domain: str, base_patch: str | None = None, where: str = "after", domain_patch: dict | None = None,
                  **kw) -> tuple[dict, dict]:
    """decoupled_forms with a node on the base MODEL ("50": before Load Domain UNet, feeding it too, or after it,
    feeding the samplers only) and/or a node on the domain MODEL ("51"). "6" is a core KSampler on the unpatched
    base (to check that the patch acted)."""
    g, outs = decoupled_forms(CKPT, domain, forms=("core_ksampler",) + FORMS, **kw)
    g["6"] = copy.deepcopy(g["5"])
    if base_patch is not None:
        g["50"] = {"class_type": base_patch, "inputs": {"model": ["1", 0]}}
        _retarget(g, ["1", 0], ["50", 0], skip={"50", "6"} | ({"20"} if where == "after" else set()))
    if domain_patch is not None:
        g["51"] = dict(domain_patch, inputs=dict(domain_patch["inputs"], model=["20", 0]))
        _retarget(g, ["20", 0], ["51", 0], skip={"51"})
    outs["core_unpatched"] = "6"
    return g, outs


def run_variants(comfy, variants: dict) -> dict:
    """Several patched_forms graphs as one prompt (shared loaders, prompts and base patches): {variant: {form: LATENT}}."""
    graph, outs = {}, {}
    for n, (name, (g, o)) in enumerate(variants.items()):
        prefix = f"{n + 1}0"

        def rename(v):
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] in g and v[0] not in SHARED:
                return [prefix + v[0], v[1]]
            return v

        for nid, node in g.items():
            key = nid if nid in SHARED else prefix + nid
            graph[key] = {"class_type": node["class_type"], "inputs": {k: rename(v) for k, v in node["inputs"].items()}}
        outs.update({(name, f): (nid if nid in SHARED else prefix + nid) for f, nid in o.items()})
    res = comfy.run(graph, outputs=list(outs.values()))
    lat = {}
    for (name, f), nid in outs.items():
        lat.setdefault(name, {})[f] = res.output(nid)["samples"]
    return lat


def assert_close_at_scale(a, b, what, rel=2e-5):
    # float32 rounding of merged against injected weights, carried through 3 Euler steps from sigma_max on this
    # random tiny model (|latent| reaches ~300): the bound of test_lora_sampling.py's parity tests
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    assert diff <= rel * max(1.0, scale), f"{what}: max diff {diff:.3g} at sample scale {scale:.3g}"


KW = dict(cfg=2.5, domain_weight=2.0, steps=3)


# ----------------------------------------------------------------------------- defect 1: attn2 replace (IP-Adapter)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("where", ["before", "after"])
def test_attn2_replace_patch_on_the_base_runs_in_all_three_forms_and_equals_the_full_form(
        comfy, companion_nodes, lora_pair, where, batch):
    lat = run_variants(comfy, {
        "lora": patched_forms(LORA, ATTN2_NODE, where, batch=batch, **KW),
        "full": patched_forms(FULL, ATTN2_NODE, where, batch=batch, **KW),
    })
    lora, full = lat["lora"], lat["full"]
    assert (full["core_ksampler"] - full["core_unpatched"]).abs().max() > 1e-2, "the attn2 patch did not act"
    assert (full["ksampler"] - full["core_ksampler"]).abs().max() > 1e-2, "the domain term had no effect"
    for form in FORMS:
        assert lora[form].shape == (batch, 4, 8, 8)
        assert_close_at_scale(lora[form], full[form], f"{where}/{form}: LoRA form vs merged full form")


def test_attn2_replace_patch_sees_only_the_text_rows_in_one_forward(comfy, base, lora_pair):
    """In the one-forward path the patch is handed the u and control rows with their cond_or_uncond (never a
    domain row), and with the domain pass alone (two calls) it is not run at all."""
    import comfy.samplers as samplers

    from indomain.nodes.domain_model import load_domain_model
    from indomain.nodes.guider import domain_guider

    model, clip, _ = base
    domain = load_domain_model(model, lora_pair[0])
    seen = []

    def recording(q, k, v, extra_options):
        seen.append((q.shape[0], tuple(extra_options["cond_or_uncond"])))
        return ip_adapter_like(q, k, v, extra_options)

    patched = model.clone()
    for block, number, index in transformer_blocks(patched.model.diffusion_model):
        patched.set_model_attn2_replace(recording, block, number, index)
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    n_blocks = len(transformer_blocks(model.model.diffusion_model))
    for one_forward in (True, False):
        seen.clear()
        guider = domain_guider(patched, domain, pos, neg, 2.5, 2.0)
        guider.one_forward = one_forward
        guider.sample(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.zeros(2, 4, 8, 8),
                      samplers.sampler_object("euler"), sigmas, seed=0)
        assert len(seen) == 2 * n_blocks  # once per block per step: only the base's rows
        assert all(rows == 4 and sorted(chunks) == [0, 1] for rows, chunks in seen), seen[:3]


# ----------------------------------------------------------------------------- defect 2: a core LoRA on the domain MODEL


@pytest.mark.parametrize("form", FORMS)
def test_core_lora_on_the_lora_form_domain_model_is_refused_by_name(comfy, lora_pair, core_lora, form):
    lora_node = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": CORE_LORA, "strength_model": 1.0}}
    g, outs = patched_forms(LORA, domain_patch=lora_node, **KW)
    keep = {outs[form]}
    graph = {nid: n for nid, n in g.items() if nid not in set(outs.values()) - keep}
    with pytest.raises(RuntimeError, match="LoraLoaderModelOnly") as err:
        comfy.run(graph, outputs=[outs[form]])
    assert "base MODEL" in str(err.value)


def test_core_lora_on_the_base_reaches_the_lora_form_domain_model(comfy, lora_pair, core_lora):
    """The alternative the refusal names: the LoRA on the base (after loading) reaches D; equal to the full form
    with the LoRA on the base and on its domain UNet."""
    lora_node = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": CORE_LORA, "strength_model": 1.0}}

    def with_base_lora(domain, on_domain):
        g, outs = patched_forms(domain, domain_patch=lora_node if on_domain else None, **KW)
        g["52"] = {"class_type": "LoraLoaderModelOnly", "inputs": dict(lora_node["inputs"], model=["1", 0])}
        _retarget(g, ["1", 0], ["52", 0], skip={"52", "6", "20"})
        return g, outs

    lat = run_variants(comfy, {"lora": with_base_lora(LORA, False), "full": with_base_lora(FULL, True),
                               "full_base_only": with_base_lora(FULL, False)})
    lora, full = lat["lora"], lat["full"]
    assert (full["core_ksampler"] - full["core_unpatched"]).abs().max() > 1e-2, "the LoRA did not act"
    for form in FORMS:
        assert_close_at_scale(lora[form], full[form], f"{form}: LoRA form + base LoRA vs full form + LoRA on both")
        # the LoRA on D matters: without it the full form is measurably elsewhere
        assert (lat["full_base_only"][form] - full[form]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- defect 3: one forward vs two calls


@pytest.mark.parametrize("where", ["before", "after"])
def test_forward_patch_on_the_base_gives_one_d_in_all_three_forms(comfy, companion_nodes, lora_pair, where):
    """Domain KSampler and Domain Guider run D in the batched forward, Apply Domain Guidance in a call of its own;
    all equal the full form with the patch on the base and on its domain UNet."""
    patch_d = {"class_type": ATTN1_NODE, "inputs": {}}
    lat = run_variants(comfy, {
        "lora": patched_forms(LORA, ATTN1_NODE, where, **KW),
        "full": patched_forms(FULL, ATTN1_NODE, where, domain_patch=patch_d, **KW),
        "full_base_only": patched_forms(FULL, ATTN1_NODE, where, **KW),
    })
    lora, full = lat["lora"], lat["full"]
    assert (full["core_ksampler"] - full["core_unpatched"]).abs().max() > 1e-2, "the attn1 patch did not act"
    for form in FORMS:
        assert_close_at_scale(lora[form], full[form], f"{where}/{form}: LoRA form vs full form patched on both")
        # the patch on D matters: a D without it (full form, patch on the base only) is measurably elsewhere
        assert (lat["full_base_only"][form] - full[form]).abs().max() > 1e-2


def test_one_batched_forward_equals_two_calls_with_a_patch_added_after_loading(comfy, base, lora_pair):
    import comfy.samplers as samplers

    from indomain.nodes.domain_model import load_domain_model
    from indomain.nodes.guider import domain_guider

    model, clip, _ = base
    domain = load_domain_model(model, lora_pair[0])  # loaded from the unpatched base
    full = load_domain_model(model, lora_pair[1]).clone()
    full.set_model_attn1_output_patch(attn1_output)
    patched = model.clone()
    patched.set_model_attn1_output_patch(attn1_output)
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    sigmas = samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)

    def sample(d, one_forward=True):
        guider = domain_guider(patched, d, pos, neg, 2.5, 2.0)
        guider.one_forward = one_forward
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return guider.sample(noise, torch.zeros(2, 4, 8, 8), samplers.sampler_object("euler"), sigmas, seed=0)

    one, two, reference = sample(domain, True), sample(domain, False), sample(full)
    assert_close_at_scale(one, two, "one batched forward vs two calls")
    assert_close_at_scale(one, reference, "one forward vs the full form patched on both")
    assert_close_at_scale(two, reference, "two calls vs the full form patched on both")


# ----------------------------------------------------------------------------- defect 9: the shared adapter's dtype


def test_a_bf16_forward_leaves_the_loaded_adapter_untouched(comfy, base, lora_pair):
    from indomain.forms.lora import INJECTION_ATTACHMENT
    from indomain.nodes.domain_model import load_domain_model

    model, _clip, _ = base
    domain = load_domain_model(model, lora_pair[0])
    injection = domain.get_attachment(INJECTION_ATTACHMENT)
    name, adapter = next(iter(injection.lora.layers.items()))
    before = {k: (t, t.clone()) for k, t in (("down", adapter.down), ("up", adapter.up))}
    unet32 = model.model.diffusion_model
    unet16 = copy.deepcopy(unet32).to(torch.bfloat16)
    layer32, layer16 = dict(unet32.named_modules())[name], dict(unet16.named_modules())[name]
    x = torch.randn(3, layer32.weight.shape[1], *([5] * (layer32.weight.ndim - 2)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with injection.applied(unet32):
            first = layer32(x)
        with injection.applied(unet16):
            half = layer16(x.to(torch.bfloat16))
        injection.clear_cache()  # the end of the bf16 run
        with injection.applied(unet32):
            again = layer32(x)
    injection.clear_cache()
    assert half.dtype == torch.bfloat16
    for k, (t, value) in before.items():
        now = getattr(adapter, k)
        assert now is t and now.dtype == torch.float32 and torch.equal(now, value), f"the file's {k} changed"
    assert torch.equal(first, again)


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]
