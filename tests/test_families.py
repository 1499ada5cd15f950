"""Tiny flow-matching DiT families (devkit/tiny_families.py) on the real ComfyUI host.

Every family is built from core's own supported_models class; each test runs per family and
skips with `available()`'s reason where the host lacks the class.
"""
from __future__ import annotations

import pytest
import torch

from indomain.devkit import tiny_families as tf
from indomain.devkit.host import import_comfy


@pytest.fixture(scope="module", autouse=True)
def _comfy():
    import_comfy()


def _need(name):
    ok, why = tf.available(name)
    if not ok:
        pytest.skip(why)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name, seed=0):
        if (name, seed) not in cache:
            cache[(name, seed)] = tf.build(name, seed)
        return cache[(name, seed)]

    return get


def _sample(mp, name, positive=None, negative=None, lat=None, seed=0):
    positive = tf.text_cond(name) if positive is None else positive
    negative = tf.empty_cond(name) if negative is None else negative
    lat = tf.latent(name) if lat is None else lat
    return tf.sample(mp, positive, negative, lat, steps=4, cfg=3.0, seed=seed)


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_builds_deterministic_finite_cpu_float32(name, models):
    _need(name)
    import comfy.model_sampling
    import comfy.supported_models as sm

    mp = models(name)
    cls = getattr(sm, tf._SPECS[name]["cls"])
    assert type(mp.model.model_config) is cls
    assert mp.load_device == torch.device("cpu") and mp.offload_device == torch.device("cpu")
    sd = mp.model.diffusion_model.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"non-finite weights/buffers: {bad[:5]}"
    n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    assert 3e5 < n_params < 4e6, n_params
    # flow matching with the class's own shift
    ms = mp.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.CONST)
    want_shift = cls.sampling_settings.get("shift", 1.15)  # Flux-class ModelSamplingFlux defaults to 1.15
    assert abs(float(ms.shift) - want_shift) < 1e-6
    # deterministic per seed: the same seed rebuilds the same weights, another seed differs
    again = tf.build(name, 0).model.diffusion_model.state_dict()
    other = tf.build(name, 1).model.diffusion_model.state_dict()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    assert any(not torch.equal(sd[k], other[k]) for k in sd if sd[k].ndim >= 2)


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_latent_matches_the_model(name, models):
    _need(name)
    mp = models(name)
    lat = tf.latent(name, batch=2, height=8, width=6)["samples"]
    assert lat.shape[1] == mp.model.latent_format.latent_channels
    assert lat.ndim == (5 if name in ("wan21", "wan21_i2v", "wan22", "qwen_image") else 4)
    assert lat.shape[0] == 2 and lat.shape[-2:] == (8, 6)
    assert torch.equal(lat, tf.latent(name, batch=2, height=8, width=6)["samples"])


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_conds_have_the_family_text_width_and_differ(name, models):
    _need(name)
    pos, neg = tf.text_cond(name, tokens=5, batch=2), tf.empty_cond(name, batch=2)
    assert pos[0][0].shape == (2, 5, tf.text_dim(name))
    assert neg[0][0].shape == (2, 4, tf.text_dim(name))
    assert torch.equal(tf.text_cond(name)[0][0], tf.text_cond(name)[0][0])
    assert not torch.equal(tf.text_cond(name)[0][0], tf.empty_cond(name)[0][0])
    assert not torch.equal(tf.text_cond(name, seed=0)[0][0], tf.text_cond(name, seed=1)[0][0])
    assert torch.equal(tf.empty_cond(name)[0][0], tf.empty_cond(name)[0][0])


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_four_step_core_cfg_sample_is_finite(name, models):
    _need(name)
    mp = models(name)
    lat = tf.latent(name)
    out = _sample(mp, name, lat=lat)
    assert out.shape == lat["samples"].shape
    assert torch.isfinite(out).all()
    assert 0.05 < out.float().std().item() < 20
    # the text reaches the model: the empty prompt as positive gives another result
    out_empty = _sample(mp, name, positive=tf.empty_cond(name), lat=lat)
    assert (out - out_empty).abs().max() > 1e-4


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_save_and_core_loader_round_trip(name, models, tmp_path):
    _need(name)
    import comfy.sd
    import comfy.utils

    mp = models(name)
    path = tf.save(name, tmp_path / f"{name}.safetensors")
    sd = comfy.utils.load_torch_file(str(path))
    ref = mp.model.diffusion_model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    if not tf.loads_by_detection(name):
        # honest flag: core's detection does not rebuild this tiny model on this host
        try:
            loaded = comfy.sd.load_diffusion_model(str(path))
        except Exception:
            return
        assert loaded.model.model_config.unet_config != mp.model.model_config.unet_config, \
            f"{name} now loads by detection: flip loads_by_detection"
        return
    loaded = comfy.sd.load_diffusion_model(str(path))
    assert type(loaded.model) is type(mp.model)
    assert type(loaded.model.model_config) is type(mp.model.model_config)
    assert float(loaded.get_model_object("model_sampling").shift) == float(mp.get_model_object("model_sampling").shift)
    got = _sample(loaded, name)
    want = _sample(mp, name)
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("name", sorted(tf._REFERENCE_FAMILIES))
def test_reference_latents_are_consumed(name, models):
    _need(name)
    mp = models(name)
    pos, neg = tf.text_cond(name), tf.empty_cond(name)
    with_ref = (tf.reference_cond(name, pos, seed=0), tf.reference_cond(name, neg, seed=0))
    assert with_ref[0][0][1]["reference_latents"][0].shape == tf.latent(name)["samples"].shape
    base = _sample(mp, name, pos, neg)
    out = _sample(mp, name, *with_ref)
    other = _sample(mp, name, tf.reference_cond(name, pos, seed=1), tf.reference_cond(name, neg, seed=1))
    assert torch.isfinite(out).all() and out.shape == base.shape
    assert (out - base).abs().max() > 1e-4
    assert (out - other).abs().max() > 1e-4
    assert "reference_latents" not in pos[0][1]  # the input cond is not modified


def test_i2v_concat_is_consumed(models):
    name = "wan21_i2v"
    _need(name)
    mp = models(name)
    lat = tf.latent(name, frames=2)
    pos, neg = tf.text_cond(name), tf.empty_cond(name)
    a = _sample(mp, name, tf.i2v_cond(name, pos, 0, frames=2), tf.i2v_cond(name, neg, 0, frames=2), lat)
    b = _sample(mp, name, tf.i2v_cond(name, pos, 1, frames=2), tf.i2v_cond(name, neg, 1, frames=2), lat)
    assert torch.isfinite(a).all() and a.shape == lat["samples"].shape
    assert (a - b).abs().max() > 1e-4
    c = pos[0][1]
    assert "concat_latent_image" not in c
    extra = tf.i2v_cond(name, pos, 0, frames=2)[0][1]
    assert extra["concat_latent_image"].shape == (1, 16, 2, 8, 8)
    assert extra["concat_mask"].shape == (1, 1, 2, 8, 8) and extra["concat_mask"][:, :, 0].sum() == 0


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_guidance_distilled_matches_the_architecture(name, models):
    _need(name)
    mp = models(name)
    has_guidance_in = any(k.startswith("guidance_in.") for k in mp.model.diffusion_model.state_dict())
    assert tf.guidance_distilled(name) == has_guidance_in


def test_unknown_family():
    assert tf.available("nope")[0] is False
    with pytest.raises(ValueError):
        tf.text_cond("nope")


@pytest.fixture(scope="module")
def trained_loras():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tf.core_trained_lora(name, steps=4, seed=0)
        return cache[name]

    return get


@pytest.mark.parametrize("name", tf.FAMILIES)
def test_core_train_lora_maps_every_key_onto_the_tiny_model(name, models, trained_loras, caplog):
    """core's Train LoRA node, empty prompt, 4 steps: core's key format, every key loads, and it acts."""
    _need(name)
    import logging

    import comfy.lora
    import comfy.sd

    lora = trained_loras(name)
    suffixes = (".lora_up.weight", ".lora_down.weight", ".alpha", ".diff", ".diff_b")
    assert lora and all(k.startswith("diffusion_model.") and k.endswith(suffixes) for k in lora), \
        sorted(k for k in lora if not k.endswith(suffixes))[:5]
    ups = {k[: -len(".lora_up.weight")] for k in lora if k.endswith(".lora_up.weight")}
    assert ups and ups == {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
    assert ups <= {k[: -len(".alpha")] for k in lora if k.endswith(".alpha")}
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in lora}

    mp = models(name)
    key_map = comfy.lora.model_lora_keys_unet(mp.model, {})
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(lora, key_map)
    not_loaded = [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]
    assert not not_loaded, not_loaded[:5]
    # one weight patch per module (+ one bias patch where the trainer wrote .diff_b)
    n_bias = sum(1 for k in lora if k.endswith(".diff_b"))
    assert len(patches) == len(modules) + n_bias

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    lat = tf.latent(name)
    base = _sample(mp, name, lat=lat)
    out = _sample(patched, name, lat=lat)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3
    # the LoRA did not leak into the shared base patcher
    assert torch.equal(_sample(mp, name, lat=lat), base)
