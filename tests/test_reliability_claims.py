"""Issue 13, defect 11: claims the older tests made without checking them.

- The saved weights are the EMA of the live weights (checked step by step against an EMA computed
  here from the live weights in the resume state and the base UNet the run started from), and they
  moved away from that start.
- The *active* path of Apply Domain Guidance (its pre-CFG hook inside core's CFGGuider) equals the
  formula computed here from separate core passes of each model, with ControlNet and at batch 2 —
  not only the w_d = 0 leg, which drops the term before any maths.
"""
from __future__ import annotations

import pytest
import torch

from indomain.devkit.domain import core_x0, x0_at_one_step

from indomain.devkit.images import make_image_folder
from indomain.training.optim import ema_decay_at
from indomain.training.resume import read_resume_state
from indomain.training.trainer import TrainConfig, resume_path_for, train


def test_saved_weights_are_the_ema_and_moved_away_from_the_start(comfy, base, session_dir, tmp_path):
    model, clip, vae = base
    images = make_image_folder(tmp_path / "imgs", 4, 64, seed=11, nested=False)
    out = tmp_path / "ema.safetensors"
    resume = resume_path_for(out)
    seen = {}

    def progress(step, total, loss, ips):
        if step == 2:  # the step-1 checkpoint has landed: live weights and EMA after one step
            seen["state1"], _ = read_resume_state(resume)

    decay = 0.9999
    config = TrainConfig(steps=2, lr=2e-4, batch_size=2, resolution=64, seed=5, save_every=1, ema_decay=decay,
                         save_precision="fp32",  # compared at 1e-6 with the EMA computed here (fp16 files round)
                         cache_dir=str(session_dir / "latent_cache"))
    result = train(model, clip, vae, images, config, out, progress=progress)
    state2, info = read_resume_state(resume)
    assert info["step"] == 2
    from safetensors.torch import load_file

    saved = load_file(str(out))
    start = {k: v.detach().float() for k, v in model.model.diffusion_model.state_dict().items()}
    names = sorted(k[len("ema/"):] for k in state2 if k.startswith("ema/"))
    assert len(names) > 20
    d1, d2 = ema_decay_at(1, decay), ema_decay_at(2, decay)
    assert d1 < d2 < decay  # warm-up: the EMA is not simply the live weights, nor the start
    moved = trailing = 0.0
    for n in names:
        s0 = start[n]
        live1, live2 = seen["state1"][f"model/{n}"].float(), state2[f"model/{n}"].float()
        ema1 = s0 + (1 - d1) * (live1 - s0)            # EMA starts at the calibrated start = the base weights
        ema2 = ema1 + (1 - d2) * (live2 - ema1)
        torch.testing.assert_close(seen["state1"][f"ema/{n}"].float(), ema1, rtol=0, atol=1e-6)
        torch.testing.assert_close(saved[n].float(), ema2, rtol=0, atol=1e-6)
        assert torch.equal(result.state_dict[n], saved[n].float())
        moved = max(moved, float((saved[n].float() - s0).abs().max()))
        trailing = max(trailing, float((saved[n].float() - live2).abs().max()))
    assert moved > 1e-4, "the saved weights did not move away from the start"
    assert trailing > 1e-5, "the saved weights equal the live weights: not an EMA"


def _encode(clip, text):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@pytest.mark.parametrize("domain_on_control", [False, True])
def test_apply_domain_guidance_active_path_with_controlnet_at_batch_two(comfy, base, domain_file, tiny_files,
                                                                       domain_on_control):
    import importlib

    from indomain.sampling.domain_model import load_domain_model
    from indomain.nodes.patch import patch_model_for_domain_guidance

    samplers = importlib.import_module("comfy.samplers")  # `import comfy.x` would shadow the fixture
    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    cn = importlib.import_module("comfy.controlnet").load_controlnet(str(tiny_files["controlnet"]))
    hint = torch.zeros(1, 64, 64, 3)
    hint[:, 16:48, 16:48, :] = 1.0
    pos_plain, neg_plain = _encode(clip, "a blue square"), _encode(clip, "")
    pos, neg = comfy.node("ControlNetApplyAdvanced")().apply_controlnet(pos_plain, neg_plain, cn, hint, 1.0, 0.0, 1.0)
    w_c, w_d = 2.5, 2.0
    sigmas = torch.tensor([1.0, 0.0])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    patched = patch_model_for_domain_guidance(model, domain, w_d, domain_on_control=domain_on_control)
    guider = samplers.CFGGuider(patched)
    guider.set_conds(pos, neg)
    guider.set_cfg(w_c)
    calls = []
    hook = domain.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        x, out = x0_at_one_step(guider, noise, sigmas)
    finally:
        hook.remove()
    assert len(calls) == 1  # the active path ran: one domain pass

    def alone(m, conds):  # one model, one condition, through core (cfg 1 evaluates the positive only)
        x_here, o = core_x0(m, conds, noise, sigmas)
        assert torch.equal(x_here, x)
        return o

    u = alone(model, neg)                 # unconditional from the base, with the ControlNet as core applies it
    g = alone(model, pos)                 # control term: text + ControlNet
    d = alone(domain, neg if domain_on_control else neg_plain)  # the domain model, hint only if asked
    expected = u + w_d * (d - u) + w_c * (g - u)
    assert out.shape == (2, 4, 8, 8)
    assert (d - u).abs().max() > 1e-3 and (g - u).abs().max() > 1e-3
    assert (out[0] - out[1]).abs().max() > 1e-3  # two different samples
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # and the hint really reached the domain pass only when asked
    d_other = alone(domain, neg_plain if domain_on_control else neg)
    assert (d_other - d).abs().max() > 1e-4


def test_the_domain_bound_on_the_active_path_equals_the_formula_from_separate_passes(comfy, base, domain_file):
    """Domain Guider with domain_max_ratio set: w_d (D - u) is scaled per sample to at most ratio x |w_c (B(c) - u)|;
    checked against separate core passes and the bound computed here, at a ratio that binds one sample only."""
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider

    model, clip, _ = base
    domain = load_domain_model(model, domain_file)
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    w_c, w_d = 2.5, 2.0
    sigmas = torch.tensor([1.0, 0.0])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def alone(m, conds):
        return core_x0(m, conds, noise, sigmas)[1]

    u, g, d = alone(model, neg), alone(model, pos), alone(domain, neg)
    text, dom = w_c * (g - u), w_d * (d - u)
    ratios = [float(dom[i].norm() / text[i].norm()) for i in range(2)]
    ratio = (ratios[0] + ratios[1]) / 2  # between the two: the bound binds one sample, not the other
    assert abs(ratios[0] - ratios[1]) > 0.01 * ratio, ratios
    guider = domain_guider(model, domain, pos, neg, w_c, w_d)
    guider.domain_max_ratio = ratio
    _x, out = x0_at_one_step(guider, noise, sigmas)
    expected = []
    for i in range(2):
        scale = min(1.0, ratio * float(text[i].norm()) / float(dom[i].norm()))
        expected.append(u[i] + scale * dom[i] + text[i])
    torch.testing.assert_close(out, torch.stack(expected), rtol=1e-5, atol=1e-5)
    unbounded = x0_at_one_step(domain_guider(model, domain, pos, neg, w_c, w_d), noise, sigmas)[1]
    torch.testing.assert_close(unbounded, u + dom + text, rtol=1e-5, atol=1e-5)
    bound_hit = 0 if ratios[0] > ratio else 1
    assert (out[bound_hit] - unbounded[bound_hit]).abs().max() > 1e-3   # the bound acted on that sample
    assert torch.equal(out[1 - bound_hit], unbounded[1 - bound_hit]) or \
        (out[1 - bound_hit] - unbounded[1 - bound_hit]).abs().max() < 1e-6  # and left the other alone
