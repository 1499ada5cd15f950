"""Host synchronisations and dynamo recompiles of the LoRA form's per-row injection, over a 10-step Domain KSampler.

A host sync is a point where Python needs a tensor's VALUE (on a GPU: the host waits for the device to drain its
queue): `.item()`, `.tolist()`, `float(t)` / `int(t)` / `bool(t)` (so `if t > 0:`), indexing a Python sequence with
a tensor, `nonzero` (its output shape depends on the data) and the like. They are counted here on the CPU, where
they cost nothing, by what asks for them: a TorchFunctionMode records the Python-level calls (`Tensor.item`,
`Tensor.tolist`, `Tensor.__bool__`, `torch.nonzero`, ...) and a TorchDispatchMode the aten ops that read a value
(`aten._local_scalar_dense`, `aten.nonzero`, `aten.is_nonzero`, `aten.equal`, ...) that no recorded Python call
accounts for. Each sync is counted once, with where it came from.

Figures, each from this one run:
- syncs per decoupled step (inside DecoupledGuider.predict_noise: u, the text term and the domain rows in one
  batched forward with the adapter injected), per step, for the tiny SD1.5 UNet (devkit/tiny_models.py; null-text
  constants on its transformer blocks) and the tiny Flux (devkit/tiny_families.py; adapter only);
- the same for the whole sampler step (core's sampler loop included: its own syncs are core's, listed by place);
- under core's TorchCompileModel (backend 'eager': dynamo's tracing, guards and graph breaks exactly, without code
  generation): dynamo's unique graphs after each step, graph breaks, and whether compiled == eager.

    python -m indomain.bench.syncs            # both models, 10 steps (a few minutes on 2 CPU cores, compile included)
    python -m indomain.bench.syncs --fast     # 3 steps, SD1.5 only, no compile
"""
from __future__ import annotations

import asyncio
import collections
import inspect
import os
import sys
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from . import common

# Python-level calls that need a tensor's value on the host
SYNC_FUNCTIONS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "nonzero",
                  "argwhere", "numpy", "equal", "allclose", "is_nonzero", "unique", "unique_consecutive",
                  "masked_select", "nonzero_static"}
# aten ops that read a value on the host (or size their output by the data)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "unique_dim_consecutive", "repeat_interleave", "argwhere"}
_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(torch.__file__)


def _place() -> str:
    """The innermost stack frame outside torch and this file: where a sync was asked for."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = os.path.abspath(frame.filename)
        if not f.startswith(_TORCH) and not f.startswith(_HERE) and "contextlib" not in f:
            parts = Path(f).parts
            return f"{'/'.join(parts[-2:])}:{frame.lineno} ({frame.name})"
    return "?"


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: "SyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and self.owner._depth == 0:
            if name != "repeat_interleave" or "output_size" not in (kwargs or {}):
                self.owner._record(f"aten.{name}")
        return func(*args, **(kwargs or {}))


class SyncCounter(TorchFunctionMode):
    """Counts host syncs while active: `with SyncCounter() as c: ...; c.count, c.places`. Not under torch.compile
    (dynamo runs eagerly while a dispatch mode is active): count an eager run."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.places: collections.Counter = collections.Counter()
        self._depth = 0
        self._dispatch = _Dispatch(self)

    def _record(self, what: str) -> None:
        self.count += 1
        self.places[f"{what} at {_place()}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNC_FUNCTIONS:
            self._record(name)
            self._depth += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self._depth -= 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)


@contextmanager
def per_call_syncs(cls, method: str = "predict_noise"):
    """Count the syncs of every call of `cls.method` (each call its own counter): yields the list of counters."""
    calls: list[SyncCounter] = []
    real = getattr(cls, method)

    def counted(self, *args, **kwargs):
        with SyncCounter() as c:
            out = real(self, *args, **kwargs)
        calls.append(c)
        return out

    setattr(cls, method, counted)
    try:
        yield calls
    finally:
        setattr(cls, method, real)


def call_node(node_cls, **kw):
    """Run a V3 node's execute as the executor would; returns its outputs."""
    out = node_cls.execute(**kw)
    if inspect.iscoroutine(out):
        out = asyncio.run(out)
    return tuple(out.result) if hasattr(out, "result") else tuple(out)


# ----------------------------------------------------------------------------- the two tiny models


def sd15_setting(tmp: Path) -> dict:
    """Tiny SD1.5 checkpoint + a LoRA-form domain file (random adapter + calibrated constants)."""
    from ..devkit import tiny_models
    from ..devkit.domain import load_checkpoint, make_domain_lora_pair
    from ..sampling.domain_model import load_domain_model

    model, clip, _vae = load_checkpoint(tiny_models.tiny_checkpoint(0))
    lora, _full = make_domain_lora_pair(model, clip, tmp / "sd15_lora.safetensors", tmp / "sd15_full.safetensors")

    def enc(text):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    return dict(name="SD1.5 (tiny UNet, constants)", model=model, domain=load_domain_model(model, lora),
                positive=enc("a red circle"), negative=enc(""), latent={"samples": torch.zeros(1, 4, 8, 8)},
                empty_prompt=None)


def flux_setting(tmp: Path) -> dict | None:
    from ..devkit import tiny_families as tf
    from ..devkit.domain import make_family_domain_lora
    from ..sampling.domain_model import load_domain_model

    ok, why = tf.available("flux_dev")
    if not ok:
        print(f"flux_dev: skipped ({why})")
        return None
    model = tf.build("flux_dev", 0)
    path = make_family_domain_lora(model, tmp / "flux_lora.safetensors", seed=1)
    neg = tf.text_cond("flux_dev", seed=2)
    return dict(name="Flux (tiny, adapter only)", model=model, domain=load_domain_model(model, path),
                positive=tf.text_cond("flux_dev", seed=1), negative=neg, latent=tf.latent("flux_dev", seed=0),
                empty_prompt=tf.empty_cond("flux_dev"))


def domain_ksampler(setting: dict, steps: int, model=None) -> torch.Tensor:
    from ..devkit.host import import_comfy

    import_comfy()
    import nodes

    ks = nodes.NODE_CLASS_MAPPINGS["InDomainKSampler"]
    kw = dict(model=model or setting["model"], domain_model=setting["domain"], seed=0, steps=steps, cfg=3.0,
              domain_weight=setting.get("domain_weight", 2.0), sampler_name="euler", scheduler="normal", positive=setting["positive"],
              negative=setting["negative"], latent_image=setting["latent"], denoise=1.0)
    if setting["empty_prompt"] is not None:
        kw["empty_prompt"] = setting["empty_prompt"]
    return call_node(ks, **kw)[0]["samples"]


def node_guider_class():
    """The DecoupledGuider the Domain KSampler node runs (ComfyUI imports the pack under its folder's path, so the
    node's modules are not this package's)."""
    import nodes

    package = nodes.NODE_CLASS_MAPPINGS["InDomainKSampler"].__module__.rsplit(".nodes.", 1)[0]
    return sys.modules[f"{package}.sampling.guider"].DecoupledGuider


def count_syncs(setting: dict, steps: int) -> dict:
    """Syncs per decoupled step (DecoupledGuider.predict_noise) and per whole sample."""
    with per_call_syncs(node_guider_class()) as calls, SyncCounter() as whole:
        domain_ksampler(setting, steps)
    return {**_per_call(calls), "whole_sample": whole.count, "whole_places": dict(whole.places)}


def count_patch_syncs(setting: dict, steps: int, patched: bool = True, **patch_kw) -> dict:
    """Syncs per guider call (core CFGGuider.predict_noise) of core KSampler on the base, with Apply Domain
    Guidance's patch (`patched`) or without it (core CFG: the baseline the patch must not add to)."""
    import comfy.samplers
    import nodes

    model = setting["model"]
    if patched:
        apply = nodes.NODE_CLASS_MAPPINGS["InDomainApplyGuidance"]
        kw = dict(model=model, domain_model=setting["domain"], domain_weight=2.0, **patch_kw)
        if setting["empty_prompt"] is not None:
            kw["empty_prompt"] = setting["empty_prompt"]
        model = call_node(apply, **kw)[0]
    with per_call_syncs(comfy.samplers.CFGGuider) as calls:
        nodes.common_ksampler(model, 0, steps, 3.0, "euler", "normal", setting["positive"], setting["negative"],
                              setting["latent"], denoise=1.0)
    return _per_call(calls)


def _per_call(calls: list) -> dict:
    """The syncs of each counted call, and where they were, summed over the calls."""
    places = collections.Counter()
    for c in calls:
        places.update(c.places)
    return {"per_step": [c.count for c in calls], "places": dict(places)}


def with_sdpa(model):
    """A clone of `model` whose attention is PyTorch's SDPA (what ComfyUI picks on a GPU; on the CPU it picks the
    sub-quadratic attention, which asks psutil for the free memory inside the forward: a graph break, and a
    recompile whenever that number changes), through core's `optimized_attention_override` transformer option."""
    m = model.clone()
    m.model_options = dict(m.model_options)
    opts = m.model_options["transformer_options"] = dict(m.model_options.get("transformer_options", {}))
    opts["optimized_attention_override"] = sdpa_override
    return m


def sdpa_override(func, *args, **kwargs):
    from comfy.ldm.modules.attention import attention_pytorch

    return attention_pytorch(*args, **kwargs)


def compile_figures(setting: dict, steps: int) -> dict:
    """TorchCompileModel (backend 'eager') + Domain KSampler, attention SDPA: dynamo's unique graphs after each step,
    graph breaks, and compiled == eager (the same model uncompiled)."""
    import latent_preview
    import nodes
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = with_sdpa(setting["model"])
    compiled = call_node(nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"], model=base, backend="eager")[0]
    graphs = []
    real = latent_preview.prepare_callback

    def prepare(*args, **kwargs):
        inner = real(*args, **kwargs)

        def callback(step, *a, **k):
            graphs.append(counters["stats"]["unique_graphs"])
            return inner(step, *a, **k)
        return callback

    latent_preview.prepare_callback = prepare
    try:
        got = domain_ksampler(setting, steps, model=compiled)
    finally:
        latent_preview.prepare_callback = real
    breaks = dict(counters["graph_break"])
    eager = domain_ksampler(setting, steps, model=base)
    return {"graphs_per_step": graphs, "graph_breaks": sum(breaks.values()), "graph_break_reasons": breaks,
            "recompiles_after_step_1": graphs[-1] - graphs[0] if graphs else None,
            "compiled_equals_eager": bool(torch.equal(got, eager)),
            "max_abs_diff": float((got - eager).abs().max())}


def main(argv=None) -> int:
    p = common.parser("syncs", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="skip the TorchCompileModel figures")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..devkit.host import InProcessComfy

    InProcessComfy()
    steps = 3 if args.fast else args.steps
    results = {"environment": common.environment(), "steps": steps, "models": {}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = [sd15_setting(Path(tmp))]
        if not args.fast:
            settings.append(flux_setting(Path(tmp)))
        for s in settings:
            if s is None:
                continue
            r = count_syncs(s, steps)
            if not (args.fast or args.no_compile):
                r["compile"] = compile_figures(s, steps)
            results["models"][s["name"]] = r
            after = r["per_step"][1:]
            c = r.get("compile", {})
            rows.append([s["name"], r["per_step"][0], max(after) if after else "-", r["whole_sample"],
                         c.get("graphs_per_step", "-"), c.get("recompiles_after_step_1", "-"), c.get("graph_breaks", "-"),
                         c.get("compiled_equals_eager", "-")])
            print(f"\n{s['name']}: syncs per decoupled step {r['per_step']}")
            for place, n in sorted(r["places"].items(), key=lambda kv: -kv[1]):
                print(f"  {n:4d}  {place}")
            print(f"  whole sample (core's sampler loop included): {r['whole_sample']}")
            for place, n in sorted(r["whole_places"].items(), key=lambda kv: -kv[1]):
                if place not in r["places"]:
                    print(f"  {n:4d}  {place}  (outside the decoupled step)")
            if c:
                print(f"  compile: {c}")
    print()
    print(common.table(["model", "syncs step 1", f"syncs per step 2..{steps} (max)", f"whole {steps}-step sample",
                        "dynamo graphs after each step", "new graphs after step 1", "graph breaks",
                        "compiled == eager"], rows, title=f"LoRA form, Domain KSampler, euler, {steps} steps"))
    common.write_json(args.out, results)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
