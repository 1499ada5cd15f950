"""Issue 24: the LoRA form's per-row injection on a GPU's terms, measured on the CPU (bench/syncs.py).

- host syncs (a tensor's value read on the host: .item(), .tolist(), bool/float of a tensor, nonzero, ...) counted
  by bench/syncs.py's SyncCounter inside every decoupled step (DecoupledGuider.predict_noise) of a Domain KSampler
  sample: 0 per step, on the tiny SD1.5 UNet (constants on its transformer blocks) and the tiny Flux (adapter only);
- the counter itself counts (a deliberate .item(), bool(), nonzero), so the 0 above can fail;
- core's TorchCompileModel (backend 'eager': dynamo's tracing and guards, no code generation) + Domain KSampler,
  attention SDPA: a graph is compiled in step 1 and none after it (no recompile per step), with no graph break,
  and the compiled result equals the eager one exactly (the adapter is inside the compiled graph);
- a second injection inside the first is refused by name (NestedInjectionError).
"""
from __future__ import annotations

import pytest
import torch

from indomain.bench import syncs as S

STEPS = 4


@pytest.fixture(scope="module")
def settings(comfy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("syncs")
    return {"sd15": S.sd15_setting(tmp), "flux": S.flux_setting(tmp)}


def _setting(settings, name):
    s = settings[name]
    if s is None:
        pytest.skip(f"{name}: the tiny model is not available on this host")
    return s


def test_counter_counts_syncs():
    t = torch.tensor([0.0, 2.0, 3.0])
    with S.SyncCounter() as c:
        t[1].item()
        if t[0] > 0:
            pass
        t.nonzero()
        t.tolist()
        float(t[2])
        _ = t * 2 + 1  # no sync
    assert c.count == 5, c.places
    assert any(p.startswith("item at tests/test_syncs.py") for p in c.places), c.places
    with S.SyncCounter() as none:
        _ = (t * 2).sum()
    assert none.count == 0, none.places


def test_counter_sees_a_sync_inside_an_injected_forward(settings):
    """The per-step count is taken through the same wrapper as below: a deliberate .item() in a forward on the
    sampling path is counted there."""
    import sys

    s = _setting(settings, "sd15")
    # the pack is loaded twice in this process (as `indomain` and, by ComfyUI, under its folder's path): patch both
    names = {"indomain.guidance.lora_modules",
             S.node_guider_class().__module__.rsplit(".sampling.", 1)[0] + ".guidance.lora_modules"}
    classes = [sys.modules[n]._LayerState for n in names if n in sys.modules]
    saved = [c.apply for c in classes]

    def with_a_sync(real):
        def apply(self, module, inputs, kwargs, output):
            inputs[0].sum().item()
            return real(self, module, inputs, kwargs, output)
        return apply

    for c, real in zip(classes, saved):
        c.apply = with_a_sync(real)
    try:
        r = S.count_syncs(s, 2)
    finally:
        for c, real in zip(classes, saved):
            c.apply = real
    assert min(r["per_step"]) > 0, r


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_no_host_sync_per_decoupled_step(settings, name, record_property):
    s = _setting(settings, name)
    r = S.count_syncs(s, STEPS)
    record_property("outcome", f"syncs per step {r['per_step']}")
    assert len(r["per_step"]) == STEPS
    assert r["per_step"][1:] == [0] * (STEPS - 1), r["places"]
    assert r["per_step"][0] == 0, r["places"]


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_apply_domain_guidance_adds_no_host_sync_to_core_ksampler(settings, name, record_property):
    """Apply Domain Guidance + the plain core KSampler: per step, the patch's pre-CFG function adds no sync to core
    CFG's own count; a partial interval (which needs sigma's value) costs exactly the one read it needs."""
    s = _setting(settings, name)
    core = S.count_patch_syncs(s, STEPS, patched=False)
    full = S.count_patch_syncs(s, STEPS)
    record_property("outcome", f"syncs per step: core CFG {core['per_step']}, patched {full['per_step']}")
    assert len(full["per_step"]) == len(core["per_step"]) == STEPS
    assert full["per_step"] == core["per_step"], (full["places"], core["places"])
    partial = S.count_patch_syncs(s, STEPS, domain_start_percent=0.0, domain_end_percent=0.5)
    assert [p - c for p, c in zip(partial["per_step"], core["per_step"])] == [1] * STEPS, partial["places"]


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_torch_compile_one_graph_no_recompile_and_equals_eager(comfy, settings, name, record_property):
    if "TorchCompileModel" not in comfy.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("n/a: core node TorchCompileModel does not exist on this host")
    s = _setting(settings, name)
    c = S.compile_figures(s, STEPS)
    record_property("outcome", f"graphs per step {c['graphs_per_step']}, graph breaks {c['graph_breaks']}")
    graphs = c["graphs_per_step"]
    assert len(graphs) == STEPS and graphs[0] > 0, "nothing was compiled"
    assert graphs[-1] == graphs[0], f"dynamo compiled new graphs after step 1: {graphs} ({c['graph_break_reasons']})"
    assert c["graph_breaks"] == 0, c["graph_break_reasons"]
    assert c["compiled_equals_eager"], f"compiled differs from eager by {c['max_abs_diff']:.3g}"


def test_the_adapter_acts_in_the_compiled_graph(comfy, settings):
    """compiled == eager above means something only if the adapter changes the result: the same compiled sample
    with domain weight 0 differs."""
    s = _setting(settings, "sd15")
    base = S.with_sdpa(s["model"])
    with_domain = S.domain_ksampler(s, 2, model=base)
    without = S.domain_ksampler(dict(s, domain_weight=0.0), 2, model=base)
    assert (with_domain - without).abs().max() > 1e-3


def test_nested_injection_is_refused_by_name(settings):
    from indomain.forms import domain_info
    from indomain.forms.lora import INJECTION_ATTACHMENT
    from indomain.guidance.lora_modules import NestedInjectionError

    s = _setting(settings, "sd15")
    injection = s["domain"].get_attachment(INJECTION_ATTACHMENT)
    assert domain_info(s["domain"]) is not None
    unet = s["model"].model.diffusion_model
    with injection.applied(unet, [1], 2):
        with pytest.raises(NestedInjectionError, match="already applied"):
            with injection.applied(unet, [0], 2):
                pass
    # put back: the layers are the base's again
    assert not any(type(m).__name__.startswith("InDomainAdapted") for m in unet.modules())
    injection.clear_cache()
