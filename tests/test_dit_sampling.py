"""Decoupled guidance on the flow-matching DiT families: tiny random models built from core's own classes
(devkit/tiny_families.py), CPU float32, a LoRA-form domain model on the base's own weights, text-free by the
encoded empty prompt.

Per family:
- domain_weight 0 reproduces core CFG bit for bit (Domain Guider / KSampler guider, Apply Domain Guidance on core's
  CFGGuider, a Guidance Term chain);
- on the active path one step equals an independent computation from separate core passes (CFGGuider at cfg 1 on
  each condition; the domain prediction from the base with the same adapter MERGED into its weights by core's own
  LoRA loader, on the empty prompt's text plus the negative's non-text inputs, built by hand here), for the one
  batched forward, the two-call path, the Apply Domain Guidance patch and the Guidance Term chain;
- a whole sample of the LoRA form equals the merged adapter's (<= 1e-4);
- reference latents (Qwen-Image-Edit / Kontext / Flux.2) and Wan I2V's concat latent reach u and D (the step is
  also checked to differ from the same formula with them dropped);
- Flux dev (guidance-distilled) at cfg 1: u is still computed and every pass gets its conditioning's guidance value;
- a DiT domain model without the empty prompt is refused by name; plain LoRA files (core's key format, no InDomain
  metadata) load as domain models, and ones that do not fit the base are refused by name.
"""
from __future__ import annotations

import logging

import pytest
import torch

from indomain.devkit import tiny_families as tf

FAMILIES = list(tf.FAMILIES)
W_C, W_D, STEPS = 3.0, 2.0, 3
REFERENCE = {"flux_dev", "flux2", "qwen_image"}
I2V = {"wan21_i2v"}


@pytest.fixture(scope="module")
def host():
    from indomain.devkit.host import import_comfy

    import_comfy()


_CACHE: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _drop_models():
    yield
    _CACHE.clear()  # release the models while ComfyUI is still importable (else noise at interpreter exit)


def family(name, tmp_path_factory):
    """(base, LoRA-form domain model, core-merged model, conds) for one family, built once per module."""
    ok, why = tf.available(name)
    if not ok:
        pytest.skip(f"{name}: {why}")
    if name in _CACHE:
        return _CACHE[name]
    from indomain.devkit.domain import make_family_domain_lora, merged_lora_model
    from indomain.sampling.domain_model import load_domain_model

    base = tf.build(name, 0)
    path = make_family_domain_lora(base, tmp_path_factory.mktemp(name) / f"{name}_domain.safetensors", seed=1)
    domain = load_domain_model(base, path)
    # core's LoRA loader reads the same file; merged into a BaseModel of its own (same seed: same weights), so the
    # two can also run in one sampling run
    merged = merged_lora_model(tf.build(name, 0), path)
    pos, neg, empty = tf.text_cond(name, seed=1), tf.text_cond(name, seed=2), tf.empty_cond(name)
    non_text = {}  # what the negative carries besides text: it must reach u and D
    if name in REFERENCE:
        pos, neg = tf.reference_cond(name, pos, seed=3), tf.reference_cond(name, neg, seed=3)
        non_text["reference_latents"] = neg[0][1]["reference_latents"]
    if name in I2V:
        pos, neg = tf.i2v_cond(name, pos, seed=4), tf.i2v_cond(name, neg, seed=4)
        non_text.update({k: neg[0][1][k] for k in ("concat_latent_image", "concat_mask")})
    if tf.guidance_distilled(name):
        neg = [[neg[0][0], dict(neg[0][1], guidance=2.0)]]  # u and D use the negative's value, c the positive's
        non_text["guidance"] = 2.0
    # the domain pass's conditioning, by hand: the empty prompt's text, the negative's non-text inputs
    domain_cond = [[empty[0][0], dict(empty[0][1], **non_text)]]
    lat = tf.latent(name, seed=0)["samples"]
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(7))
    setup = dict(base=base, domain=domain, merged=merged, path=path, pos=pos, neg=neg, empty=empty,
                 domain_cond=domain_cond, non_text=non_text, noise=noise, sigmas=tf.family_sigmas(base, STEPS))
    _CACHE[name] = setup
    return setup


def _sample(guider, s):
    import comfy.samplers

    return guider.sample(s["noise"], torch.zeros_like(s["noise"]), comfy.samplers.sampler_object("euler"),
                         s["sigmas"], disable_pbar=True, seed=0).detach()


def _core(model, pos, neg, cfg):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


def _forms(s, cfg, w_d):
    """The pack's sampling forms on one family: name -> guider."""
    from indomain.sampling.guider import DecoupledGuider, Term, domain_guider
    from indomain.nodes.patch import patch_model_for_domain_guidance

    base, domain = s["base"], s["domain"]
    out = {}
    for one_forward in (True, False):
        g = domain_guider(base, domain, s["pos"], s["neg"], cfg, w_d, empty_prompt=s["empty"])
        g.one_forward = one_forward
        out[f"guider{'' if one_forward else '_two_calls'}"] = g
    out["patch"] = _core(patch_model_for_domain_guidance(base, domain, w_d, empty_prompt=s["empty"]), s["pos"],
                         s["neg"], cfg)
    # Guidance Term chain: the domain term's conditioning is the empty prompt (the negative adds its non-text inputs)
    out["terms"] = DecoupledGuider(base, s["neg"], [Term(base, s["pos"], cfg), Term(domain, s["empty"], w_d)])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_domain_weight_zero_is_core_cfg_bit_for_bit(host, tmp_path_factory, name):
    s = family(name, tmp_path_factory)
    ref = _sample(_core(s["base"], s["pos"], s["neg"], W_C), s)
    for form, guider in _forms(s, W_C, 0.0).items():
        assert torch.equal(_sample(guider, s), ref), f"{name} {form}: domain_weight 0 is not core CFG"


def _x0(model, cond, s):
    from indomain.devkit.domain import core_x0

    return core_x0(model, cond, s["noise"], s["sigmas"])[1].detach()


def _step(guider, s):
    from indomain.devkit.domain import x0_at_one_step

    return x0_at_one_step(guider, s["noise"], s["sigmas"])[1].detach()


def _close(out, ref, what):
    scale = float(ref.abs().max())
    diff = float((out - ref).abs().max())
    assert diff <= 2e-5 * max(1.0, scale), f"{what}: max diff {diff:.3g} at scale {scale:.3g}"
    return diff


@pytest.mark.parametrize("name", FAMILIES)
def test_active_step_equals_separate_core_passes(host, tmp_path_factory, name):
    s = family(name, tmp_path_factory)
    u, c = _x0(s["base"], s["neg"], s), _x0(s["base"], s["pos"], s)
    d = _x0(s["merged"], s["domain_cond"], s)  # the adapter merged by core's LoRA loader
    ref = u + W_D * (d - u) + W_C * (c - u)
    assert float((d - _x0(s["base"], s["domain_cond"], s)).abs().max()) > 1e-2, "the adapter changes nothing"
    assert float((ref - (u + W_C * (c - u))).abs().max()) > 1e-2, "the domain term has no effect"
    for form, guider in _forms(s, W_C, W_D).items():
        _close(_step(guider, s), ref, f"{name} {form}")


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_form_sample_equals_merged_adapter(host, tmp_path_factory, name):
    """A whole sample (3 Euler steps down to sigma 0) of the LoRA-form domain model vs the same adapter merged into
    the weights by core's LoRA loader, evaluated as a model of its own on the hand-built domain conditioning."""
    from indomain.sampling.guider import DecoupledGuider, Term, domain_guider

    s = family(name, tmp_path_factory)
    lora = _sample(domain_guider(s["base"], s["domain"], s["pos"], s["neg"], W_C, W_D, empty_prompt=s["empty"]), s)
    merged = _sample(DecoupledGuider(s["base"], s["neg"], [Term(s["base"], s["pos"], W_C),
                                                           Term(s["merged"], s["domain_cond"], W_D)]), s)
    core = _sample(_core(s["base"], s["pos"], s["neg"], W_C), s)
    assert float((merged - core).abs().max()) > 1e-2, "the domain term had no effect"
    diff = float((lora - merged).abs().max())
    assert diff <= 1e-4, f"{name}: max |LoRA - merged| {diff:.3g} at sample scale {float(merged.abs().max()):.3g}"


@pytest.mark.parametrize("name", sorted(REFERENCE | I2V))
def test_non_text_conditioning_reaches_u_and_d(host, tmp_path_factory, name):
    """Reference latents / I2V concat latents stay in u and in D: the guided step equals the formula with them and
    differs from the formula with them dropped from D, or from u."""
    s = family(name, tmp_path_factory)
    keys = [k for k in s["non_text"] if k != "guidance"]
    strip = lambda cond: [[cond[0][0], {k: v for k, v in cond[0][1].items() if k not in keys}]]  # noqa: E731
    u, c = _x0(s["base"], s["neg"], s), _x0(s["base"], s["pos"], s)
    d = _x0(s["merged"], s["domain_cond"], s)
    u_bare, d_bare = _x0(s["base"], strip(s["neg"]), s), _x0(s["merged"], strip(s["domain_cond"]), s)
    assert float((d - d_bare).abs().max()) > 1e-2 and float((u - u_bare).abs().max()) > 1e-2, \
        f"{name}: the model ignores {keys}; the test could not see them dropped"
    step = _step(_forms(s, W_C, W_D)["guider"], s)
    _close(step, u + W_D * (d - u) + W_C * (c - u), f"{name} with {keys}")
    for what, (uu, dd) in {"D": (u, d_bare), "u": (u_bare, d)}.items():
        wrong = uu + W_D * (dd - uu) + W_C * (c - uu)
        assert float((step - wrong).abs().max()) > 1e-3, f"{name}: the step does not depend on {keys} in {what}"
    patched = _step(_forms(s, W_C, W_D)["patch"], s)
    _close(patched, u + W_D * (d - u) + W_C * (c - u), f"{name} patch with {keys}")


@pytest.mark.parametrize("form", ["guider", "guider_two_calls", "patch", "terms"])
def test_guidance_distilled_base_at_cfg_one(host, tmp_path_factory, form):
    """Flux dev (guidance embed), cfg 1 as its users run it: core skips u at cfg 1, the pack computes it when the
    domain term is on: out = B(c, g_pos) + w_d (D(∅, g_neg) - B(∅, g_neg)), each pass with its conditioning's
    guidance value (the negative's for u and D); w_d 0 stays exactly core's cfg-1 sample."""
    s = family("flux_dev", tmp_path_factory)
    assert tf.guidance_distilled("flux_dev") and s["pos"][0][1]["guidance"] != s["neg"][0][1]["guidance"]
    u, c = _x0(s["base"], s["neg"], s), _x0(s["base"], s["pos"], s)
    d = _x0(s["merged"], s["domain_cond"], s)
    _close(_step(_forms(s, 1.0, W_D)[form], s), c + W_D * (d - u), f"flux_dev cfg 1 {form}")
    # the guidance value matters here: D at the positive's value would give another result
    d_pos_g = _x0(s["merged"], [[s["domain_cond"][0][0], dict(s["domain_cond"][0][1], guidance=3.5)]], s)
    assert float((d_pos_g - d).abs().max()) > 1e-3
    ref = _sample(_core(s["base"], s["pos"], s["neg"], 1.0), s)
    assert torch.equal(_sample(_forms(s, 1.0, 0.0)[form], s), ref)


@pytest.mark.parametrize("name", ["sd3", "wan21"])
def test_dit_domain_without_empty_prompt_is_refused_by_name(host, tmp_path_factory, name):
    from indomain.nodes.guidance_nodes import ApplyDomainGuidance, DomainGuider, DomainKSampler

    s = family(name, tmp_path_factory)
    base, domain = s["base"], s["domain"]
    calls = {
        "Domain Guider": lambda: DomainGuider.execute(base, domain, s["pos"], s["neg"], W_C, W_D),
        "Domain KSampler": lambda: DomainKSampler.execute(base, domain, 0, 2, W_C, W_D, "euler", "simple", s["pos"],
                                                          s["neg"], tf.latent(name), 1.0),
        "Apply Domain Guidance": lambda: ApplyDomainGuidance.execute(base, domain, W_D),
    }
    for node, call in calls.items():
        with pytest.raises(ValueError, match=f"{node}.*EMPTY PROMPT.*empty_prompt"):
            call()
    out = DomainGuider.execute(base, domain, s["pos"], s["neg"], W_C, W_D, empty_prompt=s["empty"])
    assert out is not None  # and with it connected the node runs


@pytest.mark.parametrize("name", ["sd3", "qwen_image"])
def test_plain_lora_file_loads_as_domain_model(host, tmp_path_factory, caplog, name):
    """A LoRA in core's key format without InDomain metadata (what core's Train LoRA node writes) is a domain model
    for its base: the same samples as the InDomain-format file, and a warning that nothing marks it text-free."""
    from indomain.devkit.domain import make_family_domain_lora
    from indomain.forms import domain_info
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider

    s = family(name, tmp_path_factory)
    path = make_family_domain_lora(s["base"], tmp_path_factory.mktemp("plain") / "core_lora.safetensors", seed=1,
                                   core_format=True)
    with caplog.at_level(logging.WARNING, logger="indomain"):
        plain = load_domain_model(s["base"], path)
    assert "core_lora.safetensors carries no text-free marker" in caplog.text
    assert domain_info(plain).form.name == "lora" and plain.model is s["base"].model
    a = _sample(domain_guider(s["base"], plain, s["pos"], s["neg"], W_C, W_D, empty_prompt=s["empty"]), s)
    b = _sample(domain_guider(s["base"], s["domain"], s["pos"], s["neg"], W_C, W_D, empty_prompt=s["empty"]), s)
    assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max())), float((a - b).abs().max())


def test_lora_of_another_base_is_refused_by_name(host, tmp_path_factory):
    from indomain.devkit.domain import make_family_domain_lora
    from indomain.guidance.checkpoint import DomainCheckpointError
    from indomain.sampling.domain_model import load_domain_model

    sd3, flux = family("sd3", tmp_path_factory), family("flux_dev", tmp_path_factory)
    folder = tmp_path_factory.mktemp("other")
    plain = make_family_domain_lora(flux["base"], folder / "flux_lora.safetensors", seed=1, core_format=True)
    with pytest.raises(DomainCheckpointError, match="flux_lora.safetensors is not a LoRA of the connected SD3 base"):
        load_domain_model(sd3["base"], plain)
    ours = make_family_domain_lora(flux["base"], folder / "flux_domain.safetensors", seed=1)
    with pytest.raises(DomainCheckpointError, match="flux_domain.safetensors was trained from a Flux"):
        load_domain_model(sd3["base"], ours)
    # same family, other size: the shapes do not fit
    import safetensors.torch

    sd = safetensors.torch.load_file(str(plain))
    key = next(k for k in sd if k.endswith("lora_down.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
    safetensors.torch.save_file(sd, str(folder / "bad_shape.safetensors"))
    with pytest.raises(DomainCheckpointError, match="bad_shape.safetensors does not fit"):
        load_domain_model(flux["base"], folder / "bad_shape.safetensors")


@pytest.mark.parametrize("name", ["sd3", "flux_dev", "wan21"])
def test_lora_written_by_core_train_lora_node_is_a_domain_model(host, tmp_path_factory, caplog, name):
    """A LoRA written by core's own Train LoRA node (TrainLoraNode, empty caption) on the tiny family model, saved
    as core saves it (tensors only, its key format incl. `.diff` / `.diff_b` for norms and biases), loads through
    Load Domain UNet's loader as a domain model and samples: one step equals the separate core passes with the same
    file merged by core's LoRA loader. Without a text-free marker the loader warns (a LoRA trained with a caption
    has the same keys: it cannot be told from the file); with `indomain.text_free` = empty_prompt it does not."""
    from indomain.devkit.domain import merged_lora_model
    from indomain.guidance.checkpoint import save_safetensors_atomic
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider

    s = family(name, tmp_path_factory)
    sd = tf.core_trained_lora(name, steps=4, learning_rate=1e-2)
    assert any(k.endswith(".lora_up.weight") for k in sd) and all(k.startswith("diffusion_model.") for k in sd)
    folder = tmp_path_factory.mktemp("core_trained")
    path = save_safetensors_atomic(sd, folder / f"{name}_core_lora.safetensors")
    marked = save_safetensors_atomic(sd, folder / f"{name}_marked.safetensors", {"indomain.text_free": "empty_prompt"})
    with caplog.at_level(logging.WARNING, logger="indomain"):
        domain = load_domain_model(s["base"], path)
    assert f"{name}_core_lora.safetensors carries no text-free marker" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="indomain"):
        load_domain_model(s["base"], marked)
    assert "text-free marker" not in caplog.text
    merged = merged_lora_model(tf.build(name, 0), path)
    u, c = _x0(s["base"], s["neg"], s), _x0(s["base"], s["pos"], s)
    d = _x0(merged, s["domain_cond"], s)
    assert float((d - _x0(s["base"], s["domain_cond"], s)).abs().max()) > 1e-4, "the trained LoRA changes nothing"
    for one_forward in (True, False):
        g = domain_guider(s["base"], domain, s["pos"], s["neg"], W_C, W_D, empty_prompt=s["empty"])
        g.one_forward = one_forward
        _close(_step(g, s), u + W_D * (d - u) + W_C * (c - u), f"{name} core-trained LoRA")
