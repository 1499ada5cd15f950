"""The toy benchmark's cost per precision on this machine: the base's training step and a sampling call, fp32
against bf16 autocast, measured in one run (the ratio is the figure; the seconds depend on the machine).

    python -m indomain.bench.toy.precision_speed --threads 2

Training: the benchmark's own loop (`train_base`: batch 16, AdamW, clipping) for --steps steps per precision; the
median step time after the first (no set-up: prompt encoding and the UNet's copy are outside it).
Sampling: one call of the benchmark's size (16 prompts x 3 samples, Euler, --sample-steps steps, cfg 3) through
the benchmark's own sampler (core CheckpointLoaderSimple + KSampler). The precisions alternate, --repeats
times each; the figure is the median. The weights are the tiny base's deterministic init: speed does not depend
on them. On a CPU without native bf16 (AVX512-BF16 / AMX) autocast is emulated and the ratio says so."""
from __future__ import annotations

import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .. import common
from .config import PRECISIONS, ToyConfig, log


def main(argv=None) -> dict:
    p = common.parser("toy_precision_speed", __doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per measurement (default 30; --fast 2)")
    p.add_argument("--sample-steps", type=int, default=None, help="sampling steps per call (default 16; --fast 1)")
    p.add_argument("--repeats", type=int, default=None, help="measurements per precision (default 3; --fast 1)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    steps = max(2, args.steps or (2 if args.fast else 30))  # a step time needs two step ends
    sample_steps = args.sample_steps or (1 if args.fast else 16)
    repeats = args.repeats or (1 if args.fast else 3)

    from ...devkit import host, tiny_models
    from ...devkit.domain import load_checkpoint
    from ...training.optim import cpu_has_native_bf16
    from . import world
    from .experiments import Point, ToySampler
    from .models import train_base

    host.import_comfy()
    import comfy.model_management

    base = ToyConfig(base_steps=steps, sample_steps=sample_steps)
    prompts = [world.prompt(s, c) for s, c in world.asked_combos(base)]
    times = {p_: {"train_step_s": [], "sample_call_s": []} for p_ in PRECISIONS}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        (models / "checkpoints").mkdir(parents=True)
        shutil.copy(tiny_models.tiny_checkpoint(0), models / "checkpoints" / "toy_speed_base.safetensors")
        runner = host.InProcessComfy(models_dir=models, default_dirs=False)
        for r in range(repeats):
            for precision in PRECISIONS:
                cfg = dataclasses.replace(base, precision=precision)
                model, clip, _ = load_checkpoint(tiny_models.tiny_checkpoint(0))
                ends: list[float] = []
                train_base(cfg, model, clip, step_ends=ends)
                # the median step after the first (the first carries one-off allocation)
                times[precision]["train_step_s"].append(statistics.median(b - a for a, b in zip(ends[:-1], ends[1:])))
                del model, clip
                comfy.model_management.unload_all_models()
                sampler = ToySampler(runner, cfg, "toy_speed_base.safetensors", prompts)
                sampler.sample(Point("a", 3.0), {})  # warm: the model's first load is not sampling
                t = time.perf_counter()
                sampler.sample(Point("a", 3.0), {})
                times[precision]["sample_call_s"].append(time.perf_counter() - t)
                sampler.release()
                log(f"repeat {r + 1}/{repeats} {precision}: train {times[precision]['train_step_s'][-1]:.3f} s/step, "
                    f"sample {times[precision]['sample_call_s'][-1]:.2f} s/call")
    med = {p_: {k: statistics.median(v) for k, v in t_.items()} for p_, t_ in times.items()}
    payload = {"bench": "toy_precision_speed", "fast": args.fast, "environment": common.environment(),
               "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads(),
               "settings": {"train_batch": base.base_batch, "train_steps": steps, "samples": len(prompts) * base.samples_per_prompt,
                            "sample_steps": sample_steps, "repeats": repeats},
               "median": med, "runs": times,
               "bf16_speedup": {k: med["fp32"][k] / med["bf16"][k] for k in ("train_step_s", "sample_call_s")}}
    common.write_json(args.out, payload)
    print(common.table(["", "fp32", "bf16", "fp32 / bf16"],
                       [["base training, s / step", med["fp32"]["train_step_s"], med["bf16"]["train_step_s"],
                         payload["bf16_speedup"]["train_step_s"]],
                        [f"sampling, s / call ({payload['settings']['samples']} samples, {sample_steps} steps, cfg 3)",
                         med["fp32"]["sample_call_s"], med["bf16"]["sample_call_s"], payload["bf16_speedup"]["sample_call_s"]]],
                       f"toy benchmark per precision, median of {repeats}, {payload['threads']} thread(s), native bf16: "
                       f"{'yes' if payload['native_bf16'] else 'no (emulated)'}"))
    print(f"\nJSON: {args.out}")
    return payload


if __name__ == "__main__":
    main(sys.argv[1:])
