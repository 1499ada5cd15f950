"""The LoRA form's plain-torch pieces on ComfyUI's real UNetModel (tiny SD15 layout): injection
against an independently merged full-form UNet, per-row injection, SVD extraction, and the key
layout read by ComfyUI's own LoRA loader."""
from __future__ import annotations

import copy

import pytest
import torch

from indomain.devkit import tiny_models
from indomain.devkit.host import import_comfy
from indomain.guidance.lora import (DomainLoRA, LayerAdapter, LoRAFormatError, adapted_modules,
                                    adapted_names_from_state, extract, merge_into)
from indomain.guidance.lora_modules import DomainInjection, add_lora_layers, collect_adapter
from indomain.guidance.nulltext import convert_to_null_text, cross_attention_blocks


def _unet(config=None, seed=0):
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    m = UNetModel(**(config or tiny_models.SD15_TINY_UNET), operations=comfy.ops.disable_weight_init)
    tiny_models.init_weights_(m, seed)
    return m.float().eval()


@pytest.fixture(scope="module")
def base_unet():
    return _unet()


def random_adapter(unet, rank=4, alpha=2.0, seed=1, bias=True) -> DomainLoRA:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in adapted_modules(unet):
        w = m.weight
        kernel = tuple(w.shape[2:])
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.05
        up = torch.randn(w.shape[0], rank, *([1] * len(kernel)), generator=g) * 0.05
        db = torch.randn(w.shape[0], generator=g) * 0.01 if (bias and m.bias is not None) else None
        layers[name] = LayerAdapter(down, up, alpha, db)
    constants = {name: torch.randn(b.norm2.weight.shape[0], generator=g) for name, b in cross_attention_blocks(unet)}
    return DomainLoRA(layers, constants, rank, alpha)


def merged_full_form(base_unet, lora):
    """The independent computation: a null-text copy of the base with the adapter merged into its weights."""
    full = convert_to_null_text(copy.deepcopy(base_unet))
    full.load_state_dict(merge_into(full.state_dict(), lora), strict=True)
    return full


def _inputs(batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.linspace(900, 100, batch),
            torch.randn(batch, 77, 768, generator=g))


def test_adapted_layers_are_every_linear_and_conv_outside_cross_attention(base_unet):
    names = [n for n, _ in adapted_modules(base_unet)]
    assert not [n for n in names if ".attn2." in n]
    assert any(".attn1.to_q" in n for n in names) and any(n.endswith("in_layers.2") for n in names)
    assert any(n.startswith("time_embed") for n in names) and "input_blocks.0.0" in names  # Linear and Conv
    assert any(".proj_in" in n for n in names)
    assert sorted(adapted_names_from_state(base_unet.state_dict())) == sorted(names)  # the file-only view agrees


@torch.no_grad()
def test_injection_equals_merged_full_form(base_unet):
    lora = random_adapter(base_unet)
    full = merged_full_form(base_unet, lora)
    x, t, ctx = _inputs(2)
    ref = full(x, t, context=ctx)
    before = {k: v.clone() for k, v in base_unet.state_dict().items()}
    with DomainInjection(lora).applied(base_unet):
        got = base_unet(x, t, context=ctx)
    assert (ref - base_unet(x, t, context=ctx)).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    after = base_unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched, injection removed
    assert not any(h for m in base_unet.modules() for h in m._forward_hooks.values())


@torch.no_grad()
def test_injection_on_some_rows_leaves_the_other_rows_base(base_unet):
    lora = random_adapter(base_unet, seed=5)
    full = merged_full_form(base_unet, lora)
    x, t, ctx = _inputs(3)
    with DomainInjection(lora).applied(base_unet, rows=torch.tensor([1])):
        mixed = base_unet(x, t, context=ctx)
    base_out = base_unet(x, t, context=ctx)
    dom = full(x[1:2], t[1:2], context=ctx[1:2])
    torch.testing.assert_close(mixed[[0, 2]], base_out[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1:2], dom, rtol=0, atol=1e-4)


@torch.no_grad()
def test_training_layers_match_merge_and_start_at_the_null_text_base(base_unet):
    null = convert_to_null_text(copy.deepcopy(base_unet))
    wrapped = copy.deepcopy(null)
    names = add_lora_layers(wrapped, rank=3, alpha=6.0, seed=0)
    x, t, ctx = _inputs(1)
    torch.testing.assert_close(wrapped(x, t, context=ctx), null(x, t, context=ctx), rtol=0, atol=0)  # up = 0
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(0)
    for m in wrapped.modules():
        if hasattr(m, "lora_up"):
            m.lora_up.copy_(torch.randn(m.lora_up.shape, generator=g) * 0.05)
    lora = collect_adapter(wrapped)
    assert sorted(lora.layers) == sorted(names) and lora.rank == 3 and lora.alpha == 6.0
    torch.testing.assert_close(merged_full_form(base_unet, lora)(x, t, context=ctx), wrapped(x, t, context=ctx),
                               rtol=0, atol=1e-4)


@torch.no_grad()
def test_extraction_recovers_a_low_rank_difference_and_reports_error_per_rank(base_unet):
    lora = random_adapter(base_unet, rank=4, alpha=4.0, seed=7)
    null = convert_to_null_text(copy.deepcopy(base_unet))
    domain_sd = merge_into(null.state_dict(), lora)
    names = [n for n, _ in adapted_modules(base_unet)]
    ex = extract(base_unet.state_dict(), domain_sd, names, rank=4, report_ranks=[1, 2, 8])
    assert ex.relative_error[4] < 1e-5 and ex.relative_error[8] < 1e-5
    assert ex.relative_error[1] > ex.relative_error[2] > 1e-3
    # independent: each layer's best rank-2 approximation from its own SVD (Eckart-Young: the top two singular
    # triplets of the weight difference) is what extraction at rank 2 writes (up @ down * alpha / rank), and
    # the reported rank-2 error is the Frobenius norm of what those leave out, over all layers
    ex2 = extract(base_unet.state_dict(), domain_sd, names, rank=2, alpha=1.0)
    base_sd, left, whole, compared = base_unet.state_dict(), 0.0, 0.0, 0
    for name in names:
        diff = (domain_sd[f"{name}.weight"] - base_sd[f"{name}.weight"]).double().flatten(1)
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        best2 = (u[:, :2] * s[:2]) @ vh[:2]
        if s[1] > 1.01 * s[2]:  # a unique rank-2 optimum (a near tie makes any mix of the two directions optimal)
            got = ex2.lora.layers[name].delta_weight(domain_sd[f"{name}.weight"].shape).double().flatten(1)
            torch.testing.assert_close(got, best2, rtol=0, atol=1e-5 * float(s[0]), msg=name)
            compared += 1
        left += float(((diff - best2) ** 2).sum())
        whole += float((diff ** 2).sum())
    assert compared >= 0.8 * len(names), (compared, len(names))
    assert ex.relative_error[2] == pytest.approx((left / whole) ** 0.5, rel=1e-4)
    assert ex2.relative_error[2] == pytest.approx((left / whole) ** 0.5, rel=1e-4)
    assert ex.not_carried < 1e-6 and ex.not_carried_keys == []
    back = merge_into(null.state_dict(), ex.lora)
    for k, v in domain_sd.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=1e-5)
    # a difference in a norm layer is not carried by the LoRA form, and is reported
    domain_sd["out.0.weight"] = domain_sd["out.0.weight"] + 0.1
    ex2 = extract(base_unet.state_dict(), domain_sd, names, rank=4)
    assert ex2.not_carried_keys == ["out.0.weight"] and ex2.not_carried > 0


def test_extraction_error_matches_an_independent_svd():
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(6, 5, generator=g), "a.bias": torch.zeros(6),
            "b.attn2.constant": torch.ones(3)}
    dom = {k: v.clone() for k, v in base.items()}
    dom["a.weight"] += torch.randn(6, 5, generator=g)
    ex = extract(base, dom, ["a"], rank=2, report_ranks=[1])
    s = torch.linalg.svdvals(dom["a.weight"] - base["a.weight"])
    assert ex.relative_error[2] == pytest.approx(float((s[2:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-5)
    assert ex.relative_error[1] == pytest.approx(float((s[1:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt()), rel=1e-5)


@torch.no_grad()
def test_comfyui_lora_loader_reads_the_key_layout_and_merges_the_same_weights(base_unet):
    import comfy.lora
    import comfy.model_base  # noqa: F401

    lora = random_adapter(base_unet, rank=2, alpha=1.0, seed=9)
    sd = lora.to_state_dict()
    weights = {f"diffusion_model.{k}": v for k, v in base_unet.state_dict().items()}
    key_map = {}
    for k in weights:
        if k.endswith(".weight"):
            key_map[k[:-len(".weight")]] = k  # the generic layout comfy.lora.model_lora_keys_unet adds
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    assert len(patches) == len(lora.layers) + sum(a.diff_b is not None for a in lora.layers.values())
    for name in list(lora.layers)[:: max(1, len(lora.layers) // 8)]:
        key = f"diffusion_model.{name}.weight"
        merged = comfy.lora.calculate_weight([(1.0, patches[key], 1.0, None, None)], weights[key].clone(), key)
        a = lora.layers[name]
        ours = merge_into({f"{name}.weight": weights[key]}, DomainLoRA({name: LayerAdapter(a.down, a.up, a.alpha)}, {}))
        torch.testing.assert_close(merged, ours[f"{name}.weight"], rtol=0, atol=1e-6)


def test_round_trip_and_bad_files(base_unet):
    lora = random_adapter(base_unet, rank=2, alpha=1.0, seed=2)
    back = DomainLoRA.from_state_dict(lora.to_state_dict(), "f")
    assert back.rank == 2 and back.alpha == 1.0 and sorted(back.layers) == sorted(lora.layers)
    back.check_fits(base_unet, "f")
    sd = lora.to_state_dict()
    del sd[next(k for k in sd if k.endswith("lora_up.weight"))]
    with pytest.raises(LoRAFormatError, match="lacks lora_down or lora_up"):
        DomainLoRA.from_state_dict(sd, "f")
    other = _unet(dict(tiny_models.SD15_TINY_UNET, context_dim=1024, num_heads=-1, num_head_channels=64,
                       use_linear_in_transformer=True))
    with pytest.raises(LoRAFormatError, match="does not fit the connected base"):
        back.check_fits(other, "f")
