"""The benchmark scripts keep working: their --fast variants run and write well-formed JSON.

Figures from --fast runs are meaningless (tiny sizes, a loaded CI machine); these tests check
structure and sanity (finite, positive, self-consistent), never timing targets.
"""
from __future__ import annotations

import json
import math

import pytest


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_sampling_bench_fast(comfy, tmp_path):
    from indomain.bench import sampling

    out = tmp_path / "sampling.json"
    sampling.main(["--fast", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "sampling" and data["mode"] == "fast"
    assert set(data["results"]) == {"cfg", "text", "uncond", "partial"}
    for case in data["results"].values():
        assert _finite_positive(case["step_s"]) and _finite_positive(case["ratio_to_cfg"])
        assert math.isfinite(case["overhead_fraction_of_step"])
    assert data["results"]["cfg"]["ratio_to_cfg"] == 1.0
    # the domain UNet runs once per step when its term is on, never for plain CFG
    steps = data["settings"]["steps"]
    assert data["results"]["text"]["domain_evaluations"] == steps
    assert data["results"]["uncond"]["domain_evaluations"] == steps
    assert 0 < data["results"]["partial"]["domain_evaluations"] < steps
    assert data["results"]["cfg"]["domain_evaluations"] == 0
    assert all(_finite_positive(v) for v in data["passes_s"].values())
    assert data["floor_text"] > 1.0
    mem = data["memory"]
    assert mem["weights_unchanged_in_place"] is True
    assert 0 < mem["domain_to_base_size"] < 1.0  # no cross-attention in the domain UNet
    assert len(mem["loaded_models_after_decoupled_sampling"]) == 2


def test_sampling_bench_full_is_skipped_without_cuda(comfy, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: --full would really run")
    from indomain.bench import sampling

    out = tmp_path / "full.json"
    sampling.main(["--full", "--out", str(out)])
    data = json.loads(out.read_text())
    assert "skipped" in data and "CUDA" in data["skipped"]


def test_training_bench_fast(comfy, tmp_path):
    from indomain.bench import training

    out = tmp_path / "training.json"
    training.main(["--fast", "--inline", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "training" and data["memory_isolated"] is False
    for variant in ("plain", "null_text"):
        v = data[variant]
        assert _finite_positive(v["step_s"])
        assert all(math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]) for r in v["runs"])
    # the null-text UNet drops every cross-attention's weights
    assert data["null_text"]["weights_numel"] < data["plain"]["weights_numel"]
    assert _finite_positive(data["time_ratio"])


def test_toy_bench_fast(comfy, tmp_path):
    from indomain.bench import toy

    out = tmp_path / "toy.json"
    toy.main(["--fast", "--samples-per-prompt", "1", "--sample-steps", "2", "--evaluator-steps", "5",
              "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "toy" and data["fast"] is True
    assert set(data["results"]) == set(toy.METHODS)
    n_prompts = 16
    for m in ("base_cfg", "naive_cfg", "decoupled"):
        r = data["results"][m]
        assert r["samples"] == n_prompts
        for k in ("control_all", "control_domain_prompts", "control_held_out_prompts", "domain_score_all"):
            assert 0.0 <= r[k] <= 1.0
        assert math.isfinite(r["fd_domain_prompts"]) and r["fd_domain_prompts"] >= 0
    assert data["sampled_through"]["decoupled"].startswith("InDomainLoadDomainUNet")
    assert data["models"]["fine_tunes"]["domain"]["steps"] == data["config"]["domain_steps"]
    assert out.with_suffix(".png").stat().st_size > 0
