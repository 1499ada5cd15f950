"""The toy benchmark's --precision bf16 and the trainer's CPU bf16 rule: bf16 is honoured only where the CPU has
native bf16, every training and sampling call of a bf16 run computes in bf16, its models are other models (own
cache keys) and its pictures never replace the published fp32 ones."""
from __future__ import annotations

import json
import logging

import pytest
import torch


def test_trainer_cpu_bf16_rule(monkeypatch, caplog):
    """auto stays fp32 on the CPU; an explicit bf16 autocasts where the CPU has native bf16 and falls back to fp32
    with a warning where it does not; fp16 is never autocast on the CPU."""
    from indomain.training import optim

    cpu = torch.device("cpu")
    assert isinstance(optim.cpu_has_native_bf16(), bool)
    for native in (True, False):
        monkeypatch.setattr(optim, "cpu_has_native_bf16", lambda native=native: native)
        assert optim.autocast_dtype("auto", cpu) is None and optim.autocast_dtype("no", cpu) is None
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="indomain.training"):
            got = optim.autocast_dtype("bf16", cpu)
        assert got == (torch.bfloat16 if native else None)
        assert ("no native bf16" in caplog.text) is (not native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="indomain.training"):
            assert optim.autocast_dtype("fp16", cpu) is None
        assert "no native fp16" in caplog.text


def test_toy_precision_keys():
    """fp32 models keep the cache keys they had before the setting existed; bf16 models get their own."""
    import dataclasses

    from indomain.bench.toy.config import BASE_FIELDS, CNET_FIELDS, ToyConfig
    from indomain.bench.toy.models import finetune_name

    fp32, bf16 = ToyConfig(), dataclasses.replace(ToyConfig(), precision="bf16")
    # the keys of the models the published readings were measured with (docs/claim.md)
    assert fp32.key(*BASE_FIELDS) == "afda23af57a1" and fp32.key(*CNET_FIELDS) == "558fc2f2b837"
    assert finetune_name(fp32, "domain", 0, 480) == "toy_domain_e8b7026b7eaf.safetensors"
    assert bf16.key(*BASE_FIELDS) != fp32.key(*BASE_FIELDS) and bf16.key(*CNET_FIELDS) != fp32.key(*CNET_FIELDS)
    assert finetune_name(bf16, "domain", 0, 480) != finetune_name(fp32, "domain", 0, 480)


def test_toy_precision_bf16_refused_without_native_bf16(monkeypatch, capsys):
    """--precision bf16 on a CPU that emulates bf16 stops with the fix; an unknown precision is refused."""
    from indomain.bench.toy import run

    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit):
        run.parse_args(["--fast", "--precision", "bf16"])
    assert "leave --precision at fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--fast", "--precision", "fp16"])
    assert "--precision must be one of fp32, bf16" in capsys.readouterr().err
    args, cfg, _ = run.parse_args(["--fast"])
    assert cfg.precision == "fp32" and args.out.name == "toy_full_fast.json"
    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: True)
    args, cfg, _ = run.parse_args(["--fast", "--precision", "bf16"])
    assert cfg.precision == "bf16" and args.out.name == "toy_full_fast_bf16.json"


def _record_unet_dtypes(seen: set):
    """A global forward hook: the output dtypes of every ComfyUI diffusion-model block."""
    def hook(module, _inputs, output):
        if type(module).__module__.startswith("comfy.ldm") and isinstance(output, torch.Tensor) and output.is_floating_point():
            seen.add(output.dtype)
    return torch.nn.modules.module.register_module_forward_hook(hook)


def test_toy_base_training_and_sampling_compute_in_the_asked_precision(comfy, tmp_path):
    """The base's training loop and a sampling call of the base ((a): no fine-tune, whose own precision rules would
    mix in) compute in bf16 under --precision bf16 and never at fp32: observed on the UNet's blocks, not read from
    the config. The trained weights stay fp32 either way."""
    import dataclasses
    import shutil

    from indomain.bench.toy import world
    from indomain.bench.toy.config import PRECISIONS, ToyConfig
    from indomain.bench.toy.experiments import Point, ToySampler
    from indomain.bench.toy.models import train_base
    from indomain.devkit import host, tiny_models
    from indomain.devkit.domain import load_checkpoint

    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_models.tiny_checkpoint(0), models / "checkpoints" / "toy_precision_base.safetensors")
    runner = host.InProcessComfy(models_dir=models, default_dirs=False)
    for precision in PRECISIONS:
        cfg = dataclasses.replace(ToyConfig.fast(), base_steps=2, sample_steps=1, precision=precision)
        model, clip, _ = load_checkpoint(tiny_models.tiny_checkpoint(0))
        trained, sampled = set(), set()
        handle = _record_unet_dtypes(trained)
        try:
            sd, losses = train_base(cfg, model, clip)
        finally:
            handle.remove()
        assert len(losses) == 2 and all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
        sampler = ToySampler(runner, cfg, "toy_precision_base.safetensors",
                             [world.prompt(s, c) for s, c in world.asked_combos(cfg)])
        handle = _record_unet_dtypes(sampled)
        try:
            out = sampler.sample(Point("a", 3.0), {})
        finally:
            handle.remove()
            sampler.release()
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        # under autocast some blocks (the group norms) still return fp32: bf16 must appear, and never at fp32
        for seen in (trained, sampled):
            assert seen and (torch.bfloat16 in seen) is (precision == "bf16"), (precision, trained, sampled)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_toy_run_records_its_precision(comfy, tmp_path, monkeypatch, precision):
    """A --fast run (the sweep) under each precision: the JSON records it, the full-form and naive fine-tunes
    record bf16 autocast exactly when it was asked for and the CPU has it natively (the LoRA form's half-precision
    frozen base computes in half precision at either setting), and --fast writes no picture into docs."""
    from safetensors import safe_open

    from indomain.bench.toy import run
    from indomain.training.optim import cpu_has_native_bf16

    monkeypatch.setenv("INDOMAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run, "cpu_has_native_bf16", lambda: True)  # autocast runs anywhere, only slower
    docs = tmp_path / "docs"
    out = tmp_path / "toy.json"
    data = run.main(["--fast", "--gates", "report", "--evaluator-steps", "5", "--experiments", "sweep",
                     "--precision", precision, "--docs", str(docs), "--out", str(out)])
    assert data["config"]["precision"] == precision and json.loads(out.read_text())["complete"] is True
    trained_bf16 = precision == "bf16" and cpu_has_native_bf16()
    models = tmp_path / "cache" / "toy" / "models"
    files = [*(models / "domain_unets").glob("toy_domain_*.safetensors"), *(models / "diffusion_models").glob("toy_naive_*.safetensors")]
    assert len(files) == 2
    for f in files:
        if f.parent.name == "domain_unets":
            info = json.loads(safe_open(str(f), "pt").metadata()["indomain.training"])
            assert info["mixed_precision"] == ("bfloat16" if trained_bf16 else "fp32"), f.name
    fine_tunes = {k: v for k, v in data["models"]["fine_tunes"].items() if not k.startswith("lora")}
    assert fine_tunes and all(v["file"] in {f.name for f in files} for v in fine_tunes.values())
    assert not list(docs.glob("*.png"))  # --fast never publishes


def test_toy_publishes_only_full_size_fp32_runs():
    from indomain.bench.toy.run import publishes

    assert publishes(False, "fp32") and not publishes(False, "bf16") and not publishes(True, "fp32")


def test_toy_precision_speed_bench_fast(comfy, tmp_path):
    """The precision speed bench runs both precisions through the benchmark's own training loop and sampler and
    reports each ratio from the medians it measured."""
    from indomain.bench.toy.precision_speed import main as speed_main

    out = tmp_path / "speed.json"
    data = speed_main(["--fast", "--out", str(out)])
    assert json.loads(out.read_text())["bench"] == "toy_precision_speed"
    for precision in ("fp32", "bf16"):
        for k in ("train_step_s", "sample_call_s"):
            assert len(data["runs"][precision][k]) == 1 and data["median"][precision][k] > 0
    for k in ("train_step_s", "sample_call_s"):
        assert data["bf16_speedup"][k] == pytest.approx(data["median"]["fp32"][k] / data["median"]["bf16"][k])
    assert isinstance(data["native_bf16"], bool)
