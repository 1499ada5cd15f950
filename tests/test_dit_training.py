"""Training a text-free LoRA-form domain model for the flow-matching DiT families through the pack's trainer
(tiny random models from core's classes, devkit/tiny_families.py; CPU float32; a procedural latent-space domain,
devkit/dit_training.py: a colour cast in latent space).

- The flow objective (training/objective.py) against ComfyUI's own model_sampling: the shift map, x_t, the
  model's timestep, the denoised mapping; sigma histograms follow the family's shift (a Kolmogorov-Smirnov
  bound with a fixed seed, and far from the unshifted law), also for logit-normal sampling.
- One batch of the trainer's own micro-batch: its x_t / timestep equal core's noise_scaling / timestep at
  sigmas recomputed by core's percent_to_sigma, and the trainer's velocity-space loss equals the x0-space
  error of core's BaseModel.apply_model (through a CFGGuider at cfg 1) divided by sigma^2, per sample.
- Per family: the loss falls over 40 steps; the file is core's LoRA key format (core's load_lora_for_models
  loads every key); decoupled samples (Domain Guider with the empty prompt, domain weight 2, cfg 0) move toward
  the domain by the domain statistic (the cast), against the base's samples (domain weight 0).
- Resume equals an uninterrupted run (1e-6) for Wan 2.1 (5-D single-frame clips).
- Wan 2.1 / 2.2 from an image folder: each picture a single-frame clip through a video VAE (stand-in), buckets,
  the latent cache, sizes from the VAE's ratio (Wan 2.2's 16x).
- Refusals by name: Wan I2V (concat latents), reference latents, no text input, a form other than lora,
  a preview prompt without a text encoder.
- Previews (Wan 2.1, SD3): the EMA LoRA sampled through the pack's decoupled guider and decoded by the VAE (a
  video VAE one single-frame clip at a time) equal an independent Domain Guider sample of the saved file.
- The node trains a DiT from a LATENT input and the encoded empty prompt (no CLIP, no VAE); the command line
  from --diffusion-model / --latents / --empty-prompt files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from indomain.devkit import tiny_families as tf
from indomain.devkit.dit_training import domain_latents, domain_score

# Flux.2 (its 512 padded text tokens make it the slowest tiny family: ~40 s here) is covered by the objective and
# loss tests above; Chroma stands for the Flux class in training
TRAINED = ["sd3", "chroma", "lumina2", "zimage", "wan21", "wan22", "qwen_image"]
FLOW = [n for n in tf.FAMILIES]
STEPS, LR, RANK = 40, 1e-3, 4


@pytest.fixture(scope="module")
def host():
    from indomain.devkit.host import import_comfy

    import_comfy()


def _need(name):
    ok, why = tf.available(name)
    if not ok:
        pytest.skip(f"{name}: {why}")


def _cfg(**kw):
    from indomain.training.config import TrainConfig

    base = dict(steps=STEPS, lr=LR, batch_size=4, form="lora", lora_rank=RANK, hflip=0.0, ema_decay=0.9,
                save_every=0, resolution=64, seed=3, save_precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def _latents(name, domain=True, n=8, seed=1, sign=1.0):
    return domain_latents(tf.latent_channels(name), n, 8, 8, seed=seed, domain=domain, sign=sign)


# ----------------------------------------------------------------------------- the objective vs model_sampling


@pytest.mark.parametrize("name", FLOW)
def test_objective_matches_the_models_model_sampling(host, name):
    _need(name)
    from indomain.training.batches import flow_objective

    ms = tf.build(name).get_model_object("model_sampling")
    obj = flow_objective(ms)
    assert obj is not None and obj.shift > 0
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(0.0, 1.0, 11)
    ours = obj.draw_sigmas  # (the map itself below)
    from indomain.training.objective import shift_sigma

    for ti in t.tolist():
        core = float(ms.percent_to_sigma(1.0 - ti))  # core: percent p -> sigma(1 - p), the sampler's schedule
        assert shift_sigma(torch.tensor(ti, dtype=torch.float64), obj.shift).item() == pytest.approx(core, abs=1e-6)
    sigma = ours(4, gen)
    x0, noise = torch.randn(4, 16, 8, 8, generator=gen), torch.randn(4, 16, 8, 8, generator=gen)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(obj.noisy(x0, noise, sigma), ms.noise_scaling(s, noise, x0), rtol=0, atol=1e-6)
    torch.testing.assert_close(ms.calculate_input(s, obj.noisy(x0, noise, sigma)), obj.noisy(x0, noise, sigma))
    torch.testing.assert_close(obj.timestep(sigma), ms.timestep(sigma).float(), rtol=1e-6, atol=1e-5)
    v = torch.randn(4, 16, 8, 8, generator=gen)
    x_t = obj.noisy(x0, noise, sigma)
    torch.testing.assert_close(obj.denoised(x_t, v, sigma), ms.calculate_denoised(s, v, x_t), rtol=0, atol=1e-6)
    # the true velocity denoises to x0 exactly
    torch.testing.assert_close(ms.calculate_denoised(s, obj.target(x0, noise), x_t), x0, rtol=0, atol=1e-5)


def _ks(sample: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(sample.double())
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    lo = torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum((hi - f).abs(), (f - lo).abs()).max())


@pytest.mark.parametrize("name,sampling", [("sd3", "uniform"), ("wan21", "uniform"), ("flux2", "uniform"),
                                           ("sd3", "logit_normal"), ("qwen_image", "logit_normal")])
def test_sigma_histogram_follows_the_shift(host, name, sampling):
    """KS distance of 20000 drawn sigmas to the law of shift(t), t ~ U(0,1) (or sigmoid(N(0,1))): below the 1%
    critical value; and far from the unshifted law, so the test fails if the shift is dropped."""
    _need(name)
    from indomain.training.batches import flow_objective

    obj = flow_objective(tf.build(name).get_model_object("model_sampling"), sampling)
    assert obj.shift != pytest.approx(1.0)
    n = 20000
    sig = obj.draw_sigmas(n, torch.Generator().manual_seed(1234))

    def t_of(s, shift):  # inverse of sigma = shift t / (1 + (shift - 1) t)
        return s / (shift - (shift - 1.0) * s)

    def law(shift):
        if sampling == "uniform":
            return lambda s: t_of(s, shift).clamp(0, 1)
        normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
        return lambda s: normal.cdf(torch.logit(t_of(s, shift).clamp(1e-12, 1 - 1e-12)))

    critical = 1.63 / math.sqrt(n)
    d = _ks(sig, law(obj.shift))
    assert d < critical, (name, sampling, d, critical)
    assert _ks(sig, law(1.0)) > 10 * critical
    # and the model's sampler really spends its steps there: the median sigma is the shifted median
    t_med = 0.5
    assert float(sig.median()) == pytest.approx(obj.shift * t_med / (1 + (obj.shift - 1) * t_med), abs=0.02)


# ----------------------------------------------------------------------------- one batch, independently


def _core_denoised(model, cond, x_t, sigma):
    """BaseModel.apply_model's denoised output for a batch at per-sample sigmas, through core's CFGGuider at
    cfg 1 (its conds encoded by core for this batch)."""
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(cond, cond)
    g.set_cfg(1.0)
    seen = {}

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["out"] = model_k(x_t, sigma, **(extra_args or {}))
        return x

    g.sample(torch.zeros_like(x_t), torch.zeros_like(x_t), comfy.samplers.KSAMPLER(one_call),
             torch.tensor([1.0, 0.0]), seed=0)
    return seen["out"].float()


@pytest.mark.parametrize("name", ["sd3", "chroma", "flux2", "lumina2", "wan21", "qwen_image"])
def test_flow_loss_equals_core_x0_error_over_sigma_squared(host, name):
    _need(name)
    from indomain.forms.model import dit_empty_prompt
    from indomain.training.batches import TrainingData
    from indomain.training.sources import step_generator

    mp = tf.build(name)
    cfg = _cfg()
    data = TrainingData.prepare(mp, _latents(name), None, cfg, None)
    xc, t, target = data.micro_batch(cfg, 0, 0, 1, torch.device("cpu"))
    # independently: the same generator stream, sigmas from core's percent_to_sigma, x_t from core's noise_scaling
    ms = mp.get_model_object("model_sampling")
    gen = step_generator(cfg.seed, "batch", 0, 0)
    x0 = data.latent_format.process_in(data.model_latents(data.source.micro_batch(cfg.seed, 0, 0, 4, 1, gen, 0.0)))
    u = torch.rand((4,), generator=gen, dtype=torch.float64).float()
    sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - float(ui))) for ui in u])
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    x_t = ms.noise_scaling(s, noise, x0)
    torch.testing.assert_close(xc, x_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(t, ms.timestep(sigma).float(), rtol=1e-5, atol=1e-4)
    assert xc.ndim == (5 if name in ("wan21", "qwen_image") else 4)
    # the trainer's forward (its module is the base's diffusion model, run as its loop runs it) and its loss
    prompt = dit_empty_prompt(mp, tf.empty_cond(name), data.size_hw)
    with torch.no_grad():
        pred = mp.model.diffusion_model(xc, t, **prompt.expand(4, torch.device("cpu"), torch.float32)).float()
    ours = ((pred - target) ** 2).flatten(1).mean(1)
    denoised = _core_denoised(mp, tf.empty_cond(name), x_t, sigma)
    independent = ((denoised - x0) ** 2).flatten(1).mean(1) / sigma.double().pow(2).float()
    torch.testing.assert_close(ours, independent, rtol=2e-4, atol=1e-6)
    # the comparison is not vacuous: the x0-space loss (core's Train LoRA node's) is a different number
    x0_space = ((denoised - x0) ** 2).flatten(1).mean(1)
    assert not torch.allclose(x0_space, independent, rtol=1e-2)


# ----------------------------------------------------------------------------- training per family


def _train(name, out=None, latents=None, **kw):
    from indomain.training.trainer import train_on_latents

    mp = tf.build(name)
    lat = _latents(name) if latents is None else latents
    return mp, train_on_latents(mp, tf.empty_cond(name), lat, _cfg(**kw), out)


def _decoupled(base, domain, name, weight, seed=11):
    import comfy.samplers

    from indomain.sampling.guider import domain_guider

    empty = tf.empty_cond(name)
    g = domain_guider(base, domain, empty, empty, 0.0, weight, empty_prompt=empty)
    lat = tf.latent(name, batch=4, seed=seed)["samples"]
    noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(seed))
    return g.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                    tf.family_sigmas(base, 8), disable_pbar=True, seed=seed).detach().float()


@pytest.mark.parametrize("name", TRAINED)
def test_training_lowers_the_loss_writes_core_lora_keys_and_moves_samples_to_the_domain(host, name, tmp_path, caplog):
    _need(name)
    import comfy.sd
    import comfy.utils

    from indomain.guidance.checkpoint import read_domain_checkpoint
    from indomain.sampling.domain_model import load_domain_model

    out = tmp_path / f"{name}_domain.safetensors"
    # the domain's cast points away from where the untrained base's own samples lie (a random tiny model may
    # already sample with some cast): moving there is the domain model's doing
    with torch.no_grad():
        untrained = tf.build(name)
        empty = tf.empty_cond(name)
        base_score = float(domain_score(tf.sample(untrained, empty, empty, tf.latent(name, batch=4, seed=11), steps=8,
                                                  cfg=1.0, seed=11)).mean())
    sign = -1.0 if base_score > 0 else 1.0
    base, result = _train(name, out, latents=_latents(name, sign=sign))
    losses = result.losses
    k = 8
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.85 * first, (name, first, last)
    # core's LoRA key format, every key read by core's LoRA loader
    sd = comfy.utils.load_torch_file(str(out), safe_load=True)
    assert sd and all(k.startswith("diffusion_model.") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
                      for k in sd), sorted(sd)[:5]
    _, meta = read_domain_checkpoint(out)
    assert meta.form == "lora" and meta.training["objective"]["target"].startswith("velocity")
    with caplog.at_level(logging.WARNING):
        merged, _ = comfy.sd.load_lora_for_models(tf.build(name), None, sd, 1.0, 0.0)
    assert "lora key not loaded" not in caplog.text
    layers = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_up.weight")}
    assert len(merged.patches) == len(layers), (len(merged.patches), len(layers))
    # decoupled samples: the domain model (Domain Guider, the empty prompt as its text) vs the base alone
    domain = load_domain_model(base, out)
    with torch.no_grad():
        ref = _decoupled(base, domain, name, 0.0)
        moved = _decoupled(base, domain, name, 2.0)
    before, after = sign * float(domain_score(ref).mean()), sign * float(domain_score(moved).mean())
    data_score = sign * float(domain_score(_latents(name, sign=sign)).mean())  # ~1: the cast's amplitude
    assert after - before > 0.5 * data_score, (name, before, after, data_score)


@pytest.mark.parametrize("name", ["wan21"])
def test_resume_equals_an_uninterrupted_run(host, name, tmp_path):
    _need(name)
    _, straight = _train(name, tmp_path / "a.safetensors", steps=12)
    _, half = _train(name, tmp_path / "b.safetensors", steps=6)
    assert half.steps_done == 6
    from indomain.training.trainer import train_on_latents

    resumed = train_on_latents(tf.build(name), tf.empty_cond(name), _latents(name), _cfg(steps=12),
                               tmp_path / "b.safetensors", resume=True)
    assert resumed.steps_done == 12
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    worst = max(float((straight.state_dict[k] - resumed.state_dict[k]).abs().max()) for k in straight.state_dict)
    assert worst <= 1e-6, worst
    # and training did change the adapter (a resume of nothing would pass trivially)
    assert max(float(v.abs().max()) for k, v in straight.state_dict.items() if k.endswith("lora_up.weight")) > 1e-4


# ----------------------------------------------------------------------------- refusals


def test_refusals_by_name(host):
    from indomain.training.data import TrainingInputError
    from indomain.training.trainer import train_on_latents

    if tf.available("wan21_i2v")[0]:
        with pytest.raises(TrainingInputError, match="Wan 2.1 I2V|concat latents"):
            train_on_latents(tf.build("wan21_i2v"), tf.empty_cond("wan21_i2v"), _latents("wan21_i2v"), _cfg(steps=1))
    ref = tf.reference_cond("qwen_image", tf.empty_cond("qwen_image"))
    with pytest.raises(TrainingInputError, match="reference latents.*Qwen-Image-Edit"):
        train_on_latents(tf.build("qwen_image"), ref, _latents("qwen_image"), _cfg(steps=1))
    with pytest.raises(TrainingInputError, match="empty_prompt"):
        train_on_latents(tf.build("sd3"), None, _latents("sd3"), _cfg(steps=1))
    with pytest.raises(TrainingInputError, match="form 'lora'"):
        train_on_latents(tf.build("sd3"), tf.empty_cond("sd3"), _latents("sd3"), _cfg(steps=1, form="full"))
    # a preview prompt needs a text encoder: the encoded empty prompt alone cannot encode it
    with pytest.raises(TrainingInputError, match="preview_prompt needs a text encoder"):
        train_on_latents(tf.build("sd3"), tf.empty_cond("sd3"), _latents("sd3"),
                         _cfg(steps=1, preview_every=1, preview_prompt="a cat"), vae=standin_vae("sd3"))


# ----------------------------------------------------------------------------- previews


def standin_vae(family):
    """The test-only stand-in VAE (tests/standins: deterministic pixels <-> latents with the family's channels and
    compression; for Wan / Qwen-Image a video VAE as core's: a batch of pictures is ONE clip)."""
    import importlib
    from pathlib import Path

    root = str(Path(__file__).parent / "standins")
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("indomain_test_standins").StandInVAE(family)


@pytest.mark.parametrize("name", ["wan21", "sd3"])
def test_previews_are_decoupled_samples_of_the_ema_lora(host, name, tmp_path):
    """Previews for a DiT's LoRA form: at steps 3 and 6 (the end) a picture per preview is saved and handed to
    on_preview; the last one IS the decoupled sample (Domain Guider, the empty prompt, cfg 0, domain weight 1,
    euler / normal, preview_steps) of the saved file, decoded by the VAE (Wan: a video VAE, one single-frame clip
    at a time); previews do not change the trained weights; the two previews differ (training moved them)."""
    _need(name)
    import comfy.samplers
    import comfy.sample
    from PIL import Image

    from indomain.forms.model import model_latent_shape
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider
    from indomain.training.data import decode_pictures
    from indomain.training.preview import latents_to_pil
    from indomain.training.trainer import train_on_latents

    vae = standin_vae(name)
    seen = []
    out = tmp_path / f"{name}_prev.safetensors"
    cfg = _cfg(steps=6, preview_every=3, preview_steps=4)
    mp = tf.build(name)
    res = train_on_latents(mp, tf.empty_cond(name), _latents(name), cfg, out, vae=vae,
                           on_preview=lambda step, total, pics: seen.append((step, total, pics)))
    assert [(s, t, [lab for lab, _ in p]) for s, t, p in seen] == [(3, 6, ["domain"]), (6, 6, ["domain"])]
    assert sorted(p.name for p in res.preview_paths) == ["step_000003_domain.png", "step_000006_domain.png"]
    last = np.asarray(Image.open(res.preview_paths[-1]).convert("RGB"), dtype=np.int16)
    assert last.shape == (64, 64, 3)
    first = np.asarray(Image.open(res.preview_paths[0]).convert("RGB"), dtype=np.int16)
    assert np.abs(first - last).max() > 0
    # independently: the saved file through the pack's Domain Guider, as Domain KSampler samples it
    domain = load_domain_model(mp, out)
    empty = tf.empty_cond(name)
    with torch.no_grad():
        g = domain_guider(mp, domain, empty, empty, 0.0, 1.0, empty_prompt=empty)
        latent = torch.zeros(model_latent_shape(mp, (8, 8)))
        noise = comfy.sample.prepare_noise(latent, cfg.seed)
        sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), "normal", 4)
        x = g.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=cfg.seed)
        pixels = decode_pictures(vae, x.float())
    assert pixels.shape == (1, 64, 64, 3)
    ref = np.asarray(latents_to_pil(pixels)[0], dtype=np.int16)
    assert np.abs(ref - last).max() <= 1
    # the run's randomness is untouched: the same weights as without previews
    plain = train_on_latents(tf.build(name), tf.empty_cond(name), _latents(name), _cfg(steps=6))
    assert all(torch.equal(plain.state_dict[k], res.state_dict[k]) for k in plain.state_dict)


def test_auto_learning_rate_is_the_lora_forms_1e4_for_a_dit(host):
    """lr left to the form ("auto": None on the config, 0 on the node) trains a DiT's LoRA at 1e-4 (the LoRA form's
    DEFAULT_LR, not the full form's 1e-5): recorded in the file's training info, and the first AdamW step moves
    each adapter weight by about lr (Adam's first step is lr * sign(grad))."""
    from indomain.training.trainer import train_on_latents

    name = "sd3"
    _need(name)
    a = train_on_latents(tf.build(name), tf.empty_cond(name), _latents(name), _cfg(steps=1, lr=None, ema_decay=0.0))
    assert a.meta.training["lr"] == pytest.approx(1e-4)
    b = train_on_latents(tf.build(name), tf.empty_cond(name), _latents(name), _cfg(steps=1, lr=1e-5, ema_decay=0.0))
    assert b.meta.training["lr"] == pytest.approx(1e-5)
    # the adapters start at up = 0: after one step |up| is about lr (weight decay and clipping aside)
    up_a = max(float(v.abs().max()) for k, v in a.state_dict.items() if k.endswith("lora_up.weight"))
    up_b = max(float(v.abs().max()) for k, v in b.state_dict.items() if k.endswith("lora_up.weight"))
    assert up_a == pytest.approx(1e-4, rel=0.05) and up_b == pytest.approx(1e-5, rel=0.05), (up_a, up_b)


# ----------------------------------------------------------------------------- Wan: images as single-frame clips


def _non_square_images(folder, n, size, seed=0):
    """`n` striped-disc pictures, some landscape (1.5:1), some portrait, some square."""
    from PIL import Image

    from indomain.devkit.images import draw_images

    src = draw_images(folder.with_name(folder.name + "_src"), n, size=size, seed=seed, style="discs")
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted(src.iterdir())):
        w, h = [(size * 3 // 2, size), (size, size * 3 // 2), (size, size)][i % 3]
        Image.open(p).convert("RGB").resize((w, h)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("name,resolution,buckets", [("wan21", 64, True), ("wan22", 128, True), ("wan22", 128, False)])
def test_wan_trains_on_an_image_folder_as_single_frame_clips_with_buckets_and_the_latent_cache(
        host, name, resolution, buckets, tmp_path):
    """A folder of pictures trains a Wan LoRA: the video VAE (core's kind: a batch of pictures is ONE clip) encodes
    each picture alone as a single-frame clip (plain and mirrored latents are mirror images of each other, not two
    frames of one clip), sizes follow the VAE's ratio (Wan 2.2: 16 px per cell, not 8), buckets keep the pictures'
    shapes, and a second run reads every latent from the cache and trains the same weights."""
    _need(name)
    from safetensors.torch import load_file

    from indomain.training.trainer import train

    folder = _non_square_images(tmp_path / "imgs", 6, resolution)
    vae = standin_vae(name)
    ratio = vae.downscale_ratio[-1]
    assert ratio == (16 if name == "wan22" else 8)
    cache = tmp_path / "cache"
    cfg = _cfg(steps=4, batch_size=2, resolution=resolution, buckets=buckets, cache_dir=str(cache))
    runs = [train(tf.build(name), tf.empty_cond(name), vae, folder, cfg, tmp_path / f"out{i}.safetensors")
            for i in range(2)]
    first, second = runs
    assert first.summary["latent_cache_hits"] == 0 and second.summary["latent_cache_hits"] == 6
    assert first.losses == second.losses and all(math.isfinite(x) for x in first.losses)
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    entries = [load_file(str(p)) for p in sorted(cache.glob("*.safetensors"))]
    assert len(entries) == 6
    shapes = set()
    for e in entries:
        lat, flip = e["latent"], e["latent_flip"]
        assert lat.ndim == 3 and lat.shape[0] == tf.latent_channels(name), lat.shape  # one frame, [C, h, w]
        torch.testing.assert_close(flip, lat.flip(-1), rtol=0, atol=1e-5)
        shapes.add(tuple(lat.shape[-2:]))
    if buckets:
        assert len(shapes) >= 2 and first.summary["buckets"], shapes  # the pictures kept (about) their shapes
        area = (resolution // ratio) ** 2
        assert all(0.6 * area <= h * w <= 1.5 * area for h, w in shapes), (shapes, area)
    else:
        assert shapes == {(resolution // ratio,) * 2}
        assert first.summary["latent_size"] == [resolution // ratio] * 2


# ----------------------------------------------------------------------------- node and command line


def test_node_trains_a_dit_from_latents_and_the_empty_prompt(comfy, tmp_path):
    from indomain.forms import domain_info
    from indomain.nodes.train_node import TrainDomainUNet

    name = "wan21"
    mp = tf.build(name)
    lat = {"samples": _latents(name).unsqueeze(2)}  # a LATENT of single-frame clips, as Wan's VAE gives them
    # clip and vae unconnected: the server leaves them out of the call (defaults None)
    out = TrainDomainUNet.execute(model=[mp], image_folder=[""], steps=[6], learning_rate=[1e-3],
                                  batch_size=[2], resolution=[64], save_name=["dit_node_test"], seed=[0],
                                  overwrite=[True], save_every=[0], hflip=[0.0], form=["lora"], rank=[4],
                                  empty_prompt=[tf.empty_cond(name)], latents=[lat],
                                  timestep_sampling=["logit_normal"])
    domain, file_name, _loss = out.result if hasattr(out, "result") else out
    assert file_name == "dit_node_test.safetensors"
    assert domain_info(domain).form.name == "lora"
    assert domain_info(domain).meta.training["objective"]["timestep_sampling"] == "logit_normal"


@pytest.mark.slow
def _sd3_cli_files(tmp_path):
    """The command line's inputs for the tiny SD3: its model file, domain.latent (core's latent file format) and
    empty.safetensors (the encoded empty prompt). Returns the model file."""
    import safetensors.torch

    name = "sd3"
    model_file = tf.save(name, tmp_path / "tiny_sd3.safetensors")
    safetensors.torch.save_file({"latent_tensor": _latents(name), "latent_format_version_0": torch.tensor([])},
                                str(tmp_path / "domain.latent"))
    cond = tf.empty_cond(name)
    safetensors.torch.save_file({"cross_attn": cond[0][0].contiguous(),
                                 "pooled_output": cond[0][1]["pooled_output"].contiguous()},
                                str(tmp_path / "empty.safetensors"))
    return model_file


def test_cli_trains_a_dit_from_files(host, tmp_path):
    name = "sd3"
    model_file = _sd3_cli_files(tmp_path)
    out = tmp_path / "out" / "sd3_domain.safetensors"
    summary = tmp_path / "s.json"
    r = subprocess.run([sys.executable, "-m", "indomain.training", "--diffusion-model", str(model_file),
                        "--latents", str(tmp_path / "domain.latent"), "--empty-prompt", str(tmp_path / "empty.safetensors"),
                        "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-3", "--steps", "3",
                        "--cpu", "--form", "lora", "--rank", "4", "--summary-json", str(summary)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads(summary.read_text())
    assert s["steps_done"] == 3 and s["objective"]["shift"] == pytest.approx(3.0)
    assert out.is_file()
    # without any text input: refused by name, exit 2, before any work
    r = subprocess.run([sys.executable, "-m", "indomain.training", "--diffusion-model", str(model_file),
                        "--latents", str(tmp_path / "domain.latent"), "--out", str(tmp_path / "x.safetensors"),
                        "--cpu", "--form", "lora"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "--empty-prompt" in r.stderr


@pytest.mark.slow
def test_cli_trains_a_dit_under_torchrun_two_processes(host, tmp_path):
    """Data-parallel DiT LoRA training (gloo on CPU, as the SD path): two ranks, one file written by rank 0,
    both ranks end with the same weights (their digests are gathered in the summary), and the file is the
    LoRA form in core's key format with the flow objective recorded."""
    import safetensors.torch

    from indomain.devkit.host import free_port

    name = "sd3"
    _need(name)
    model_file = _sd3_cli_files(tmp_path)
    out = tmp_path / "ddp" / "sd3_ddp.safetensors"
    summary = tmp_path / "ddp.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "-m", "indomain.training", "--diffusion-model", str(model_file),
                        "--latents", str(tmp_path / "domain.latent"), "--empty-prompt", str(tmp_path / "empty.safetensors"),
                        "--out", str(out), "--resolution", "64", "--batch-size", "2", "--lr", "1e-3", "--steps", "3",
                        "--cpu", "--form", "lora", "--rank", "4", "--summary-json", str(summary)],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                       timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    s = json.loads(summary.read_text())
    assert s["world_size"] == 2 and s["steps_done"] == 3
    assert len(s["rank_weight_digests"]) == 2 and s["rank_weight_digests"][0] == s["rank_weight_digests"][1]
    assert sorted(p.name for p in out.parent.iterdir() if p.suffix == ".safetensors") == ["sd3_ddp.safetensors"]
    sd = safetensors.torch.load_file(str(out))
    assert sd and all(k.endswith((".lora_up.weight", ".lora_down.weight", ".alpha")) for k in sd), sorted(sd)[:5]
    assert any(float(v.abs().max()) > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
