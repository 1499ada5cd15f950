"""Domain caching (guidance/domain_cache.py) on the real ComfyUI host: off is exactly the uncached sampler; every N
calls the domain model on every N-th model call (counted, not timed) and the cached steps leave the domain rows out
of the batch; a cached step is the independent formula u + w_c (B(c) - u) + w_d (D - u)|eval * sigma / sigma_eval;
the adaptive rule re-evaluates when u moves; the full form, the LoRA form, a ControlNet on the domain term, the
per-term schedule and the three node forms; no state carried from one sample to the next."""
from __future__ import annotations

import math

import pytest
import torch

from indomain.devkit.graphs import decoupled_forms
from indomain.guidance.domain_cache import DomainCache, relative_change

CKPT, DOMAIN, CN = "tiny_sd15.safetensors", "tiny_domain.safetensors", "tiny_controlnet.safetensors"
LORA, MERGED = "tiny_domain_lora_cache.safetensors", "tiny_domain_lora_cache_merged.safetensors"
FORMS = ("ksampler", "guider", "patch")


def _encode(clip, text):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def _run_forms(comfy, domain=DOMAIN, forms=FORMS, **kw):
    graph, outs = decoupled_forms(CKPT, domain, forms=forms, **kw)
    res = comfy.run(graph, outputs=list(outs.values()))
    return {form: res.output(node)["samples"] for form, node in outs.items()}


@pytest.fixture(scope="module")
def parts(comfy, base, domain_file):
    from indomain.sampling.domain_model import load_domain_model

    model, clip, _ = base
    return dict(model=model, domain=load_domain_model(model, domain_file), pos=_encode(clip, "a blue square"),
                neg=_encode(clip, ""))


@pytest.fixture(scope="module")
def lora_pair(comfy, base, models_dir):
    from indomain.devkit.domain import make_domain_lora_pair

    model, clip, _ = base
    folder = models_dir / "domain_unets"
    return make_domain_lora_pair(model, clip, folder / LORA, folder / MERGED, seed=1)


class Calls:
    """Counts forward calls of a module (and the batch size of each)."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_hook(lambda m, i, o: self.batches.append(i[0].shape[0]))

    def __len__(self):
        return len(self.batches)

    def close(self):
        self.handle.remove()


def _sample(guider, model, steps, sampler="euler", batch=1, seed=0):
    from indomain.sampling.guider import sample_with_guider

    return sample_with_guider(guider, model, seed, steps, sampler, "normal",
                              {"samples": torch.zeros(batch, 4, 8, 8)})["samples"]


def _count_calls(guider):
    """Wraps the guider's predict_noise to count model calls (one per sampler evaluation)."""
    calls = []
    real = guider.predict_noise

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    guider.predict_noise = counted
    return calls


# ----------------------------------------------------------------------------- the maths alone


def test_state_rules_every_n_adaptive_and_reset():
    u = torch.ones(1, 4, 2, 2)
    c = DomainCache("every 3")
    pattern = []
    for i in range(7):
        sigma = 10.0 - i
        if c.wants("d", sigma, u.shape):
            c.store("d", sigma, u, u + 1.0)
            pattern.append("E")
        else:
            r = c.reuse("d", sigma, u)
            torch.testing.assert_close(r, u + sigma / c._entries["d"].sigma)
            pattern.append("r")
    assert "".join(pattern) == "ErrErrE"
    assert c.wants("d", 20.0, u.shape)  # the noise level went up (restart sampler): evaluate
    assert c.wants("d", 1.0, (2, 4, 2, 2))  # another batch: evaluate
    c.reset()
    assert c.wants("d", 0.5, u.shape) and c.evaluations == 0  # a new run has nothing cached
    assert DomainCache("off").wants("d", 1.0, u.shape)
    with pytest.raises(ValueError, match="domain_cache must be one of"):
        DomainCache("every 4")
    with pytest.raises(ValueError, match="domain_cache_threshold"):
        DomainCache("adaptive", float("nan"))
    assert relative_change(2 * u, u) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- on the host


def test_off_is_exactly_the_uncached_sampler(comfy, domain_file):
    kw = dict(cfg=2.5, domain_weight=2.0, steps=4, sampler="dpmpp_2m", scheduler="karras")
    default = _run_forms(comfy, **kw)
    off = _run_forms(comfy, domain_cache="off", domain_cache_threshold=0.1, **kw)
    for form in FORMS:
        assert torch.equal(off[form], default[form]), form


@pytest.mark.parametrize("mode,n", [("every 2", 2), ("every 3", 3)])
@pytest.mark.parametrize("sampler,steps", [("euler", 7), ("heun", 4), ("dpmpp_2m", 6)])
def test_every_n_calls_the_domain_model_on_every_nth_call(comfy, parts, mode, n, sampler, steps):
    from indomain.sampling.guider import domain_guider

    p = parts
    results = {}
    for m in ("off", mode):
        guider = domain_guider(p["model"], p["domain"], p["pos"], p["neg"], 2.5, 2.0, domain_cache=m)
        calls = _count_calls(guider)
        dom = Calls(p["domain"].model.diffusion_model)
        try:
            results[m] = _sample(guider, p["model"], steps, sampler)
        finally:
            dom.close()
        results[m, "calls"], results[m, "domain"] = len(calls), len(dom)
        assert guider.model_calls == len(dom)
    total = results["off", "calls"]
    assert total == results[mode, "calls"] and results["off", "domain"] == total
    assert results[mode, "domain"] == math.ceil(total / n)
    assert torch.isfinite(results[mode]).all()
    assert (results[mode] - results["off"]).abs().max() > 0  # reuse is an approximation: it does change the sample


def test_a_cached_step_is_the_independent_formula(comfy, parts):
    """Two calls of every 2: the second reuses the first's D - u scaled by sigma / sigma_eval, against u and B(c)
    computed afresh; written out here from three apply_model calls per step."""
    import comfy.samplers as samplers

    from indomain.sampling.guider import domain_guider

    p = parts
    model, domain = p["model"], p["domain"]
    w_c, w_d = 2.5, 2.0
    points = [(1.0, 3), (0.6, 4)]  # (sigma, noise seed) of the two calls: mid-schedule, well conditioned
    xs = [torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s)) for _, s in points]

    def two_calls(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        outs = [model_k(xi, torch.tensor([s]), **(extra_args or {})) for xi, (s, _) in zip(xs, points)]
        seen.extend(outs)
        return x

    got = {}
    for mode in ("every 2", "off"):
        seen = []
        guider = domain_guider(model, domain, p["pos"], p["neg"], w_c, w_d, domain_cache=mode)
        guider.sample(xs[0], torch.zeros(1, 4, 8, 8), samplers.KSAMPLER(two_calls), torch.tensor([1.0, 0.0]), seed=0)
        got[mode] = seen

    def preds(x, s):
        sig = torch.tensor([s])
        with torch.no_grad():
            return (model.model.apply_model(x, sig, c_crossattn=p["neg"][0][0]).float(),
                    model.model.apply_model(x, sig, c_crossattn=p["pos"][0][0]).float(),
                    domain.model.apply_model(x, sig, c_crossattn=p["neg"][0][0]).float())

    (s1, _), (s2, _) = points
    u1, g1, d1 = preds(xs[0], s1)
    u2, g2, d2 = preds(xs[1], s2)
    cached = u2 + w_c * (g2 - u2) + w_d * (d1 - u1) * (s2 / s1)
    fresh = u2 + w_c * (g2 - u2) + w_d * (d2 - u2)
    assert (cached - fresh).abs().max() > 1e-3  # the two differ: the check below tells them apart
    torch.testing.assert_close(got["every 2"][0].float(), u1 + w_c * (g1 - u1) + w_d * (d1 - u1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["every 2"][1].float(), cached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["off"][1].float(), fresh, rtol=1e-5, atol=1e-5)


def test_adaptive_re_evaluates_when_u_moves(comfy, parts):
    """Calls 0-3 on nearly the same x (u barely moves), then x jumps at call 3: u of call 3 is far from u at the
    evaluation, so call 4 evaluates again (the rule reads the previous call's u: D's rows join u's forward)."""
    import comfy.samplers as samplers

    from indomain.sampling.guider import domain_guider

    p = parts
    a = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    b = 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    plan = [(a, 1.0), (a, 0.99), (a, 0.98), (b, 0.97), (b, 0.96), (b, 0.95)]

    def run(threshold):
        evaluated = []
        dom = Calls(p["domain"].model.diffusion_model)

        def calls(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            for xi, s in plan:
                before = len(dom)
                model_k(xi, torch.tensor([s]), **(extra_args or {}))
                evaluated.append(len(dom) > before)
            return x

        guider = domain_guider(p["model"], p["domain"], p["pos"], p["neg"], 2.5, 2.0, domain_cache="adaptive",
                               domain_cache_threshold=threshold)
        try:
            guider.sample(a, torch.zeros_like(a), samplers.KSAMPLER(calls), torch.tensor([1.0, 0.0]), seed=0)
        finally:
            dom.close()
        return evaluated

    assert run(0.25) == [True, False, False, False, True, False]
    assert run(100.0) == [True, False, False, False, False, False]  # u never moved that far: never again


def test_three_node_forms_agree_with_caching_and_the_cn_on_the_domain_term(comfy, domain_file):
    for extra, modes in (({}, ("every 3",)), ({"controlnet": CN, "domain_on_controlnet": True}, ("every 2", "adaptive"))):
        kw = dict(cfg=2.5, domain_weight=2.0, steps=5, batch=2, **extra)
        for mode in modes:
            lat = _run_forms(comfy, domain_cache=mode, forms=FORMS + ("core_ksampler",), **kw)
            for form in ("guider", "patch"):
                torch.testing.assert_close(lat[form], lat["ksampler"], rtol=0, atol=1e-5)
            assert (lat["ksampler"] - lat["core_ksampler"]).abs().max() > 1e-3  # the domain term acted
    # the ControlNet on the domain term acts on the evaluated steps, so on the cached ones too
    on = _run_forms(comfy, domain_cache="every 2", controlnet=CN, domain_on_controlnet=True, steps=5, forms=("ksampler",))
    off = _run_forms(comfy, domain_cache="every 2", controlnet=CN, domain_on_controlnet=False, steps=5, forms=("ksampler",))
    assert (on["ksampler"] - off["ksampler"]).abs().max() > 1e-3


def test_patch_calls_the_domain_model_less_and_keeps_no_state_between_samples(comfy, parts):
    from indomain.nodes.patch import patch_model_for_domain_guidance

    p = parts
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    steps = 6
    counts, outs = {}, {}
    for mode in ("off", "every 3"):
        patched = patch_model_for_domain_guidance(p["model"], p["domain"], 2.0, domain_cache=mode)
        for run in (0, 1):
            dom = Calls(p["domain"].model.diffusion_model)
            try:
                outs[mode, run] = comfy.node("KSampler")().sample(patched, 1, steps, 2.5, "euler", "normal", p["pos"],
                                                                  p["neg"], latent)[0]["samples"]
            finally:
                dom.close()
            counts[mode, run] = len(dom)
    assert counts["off", 0] == counts["off", 1] == steps
    assert counts["every 3", 0] == counts["every 3", 1] == math.ceil(steps / 3)
    assert torch.equal(outs["every 3", 0], outs["every 3", 1])  # the second sample starts from nothing cached


def test_guider_keeps_no_state_between_samples(comfy, parts):
    from indomain.sampling.guider import domain_guider

    p = parts
    guider = domain_guider(p["model"], p["domain"], p["pos"], p["neg"], 2.5, 2.0, domain_cache="adaptive")
    first, n_first = _sample(guider, p["model"], 6), guider.domain_cache.evaluations
    second = _sample(guider, p["model"], 6)
    assert torch.equal(first, second) and guider.domain_cache.evaluations == n_first
    # another batch size on the same guider: a run of its own, nothing reused across
    assert _sample(guider, p["model"], 6, batch=2).shape == (2, 4, 8, 8)


def test_per_term_schedule_first_active_call_evaluates(comfy, parts):
    import comfy.samplers as samplers

    from indomain.sampling.guider import domain_guider

    p = parts
    steps = 8
    guider = domain_guider(p["model"], p["domain"], p["pos"], p["neg"], 2.5, 2.0, start_percent=0.4,
                           domain_cache="every 2")
    dom = Calls(p["domain"].model.diffusion_model)
    try:
        _sample(guider, p["model"], steps)
    finally:
        dom.close()
    ms = p["model"].get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(ms, "normal", steps)[:-1]
    active = int((sigmas <= float(ms.percent_to_sigma(0.4))).sum())
    assert 2 < active < steps
    assert len(dom) == math.ceil(active / 2)


def test_lora_form_leaves_the_domain_rows_out_and_matches_the_merged_full_form(comfy, base, lora_pair):
    """LoRA form (D's rows in u's batched forward): a cached step runs the base at batch 2 instead of 3; and the
    cached samples equal the merged full form's, cached the same way (three node forms, ControlNet on the domain)."""
    from indomain.sampling.domain_model import load_domain_model
    from indomain.sampling.guider import domain_guider

    model, clip, _ = base
    lora_path, merged_path = lora_pair
    domain = load_domain_model(model, lora_path)
    pos, neg = _encode(clip, "a blue square"), _encode(clip, "")
    fwd = Calls(model.model.diffusion_model)
    try:
        guider = domain_guider(model, domain, pos, neg, 2.5, 2.0, domain_cache="every 2")
        _sample(guider, model, 5)
    finally:
        fwd.close()
    assert fwd.batches == [3, 2, 3, 2, 3] and guider.model_calls == 3
    for extra, mode in (({}, "adaptive"), ({"controlnet": CN, "domain_on_controlnet": True}, "every 3")):
        kw = dict(cfg=2.5, domain_weight=2.0, steps=4, domain_cache=mode, **extra)
        lo = _run_forms(comfy, domain=lora_path.name, forms=FORMS + ("core_ksampler",), **kw)
        full = _run_forms(comfy, domain=merged_path.name, **kw)
        for form in FORMS:
            scale = float(full[form].abs().max())
            tol = 1e-5 * max(1.0, scale)  # float32 rounding of injected vs merged (tests/test_lora_sampling.py)
            assert float((lo[form] - full[form]).abs().max()) <= tol, (extra, mode, form)
            assert float((lo[form] - lo["core_ksampler"]).abs().max()) >= 100 * tol


@pytest.mark.parametrize("node_id", ["InDomainKSampler", "InDomainGuider", "InDomainApplyGuidance",
                                     "InDomainMultiGuider"])
def test_a_bad_domain_cache_value_is_refused_when_queued(comfy, node_id):
    """ComfyUI 0.3.75 does not check a V3 node's combo values, so each node checks domain_cache in validate_inputs
    (the workflow fuzz found a bad value reaching execution)."""
    node = comfy.node(node_id)
    assert node.validate_inputs(domain_cache="every 2") is True and node.validate_inputs() is True
    for bad in (5, "every 4", ""):
        why = node.validate_inputs(domain_cache=bad)
        assert isinstance(why, str) and why.startswith("domain_cache ") and "'every 3'" in why
