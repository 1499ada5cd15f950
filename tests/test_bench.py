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


def test_domain_cache_bench_fast(comfy, tmp_path):
    from indomain.bench import domain_cache

    out = tmp_path / "domain_cache.json"
    domain_cache.main(["--fast", "--setups", "flux_lora", "--out", str(out)])
    data = json.loads(out.read_text())
    if "flux_lora" in data["skipped"]:
        pytest.skip(data["skipped"]["flux_lora"])
    cases = data["results"]["flux_lora"]["cases"]
    steps = data["results"]["flux_lora"]["steps"]
    assert cases["core CFG"]["over_core_cfg"] == 1.0 and cases["decoupled, cache off"]["over_uncached"] == 1.0
    assert all(_finite_positive(c["seconds"]) for c in cases.values())
    # counted, not timed: the domain rows join the forward on every call uncached, every 2nd / 3rd call cached
    assert cases["decoupled, cache off"]["domain_evaluations"] == steps
    assert cases["decoupled, cache every 2"]["domain_evaluations"] == math.ceil(steps / 2)
    assert cases["decoupled, cache every 3"]["domain_evaluations"] == math.ceil(steps / 3)
    assert cases["decoupled, cache off"]["max_abs_diff_vs_uncached_rel"] == 0.0
    assert {"core CFG + EasyCache", "decoupled, cache every 2 + LazyCache"} <= set(cases)


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


def test_lora_vs_core_training_bench_fast(comfy, tmp_path):
    """Both variants in child processes on the tiny bf16 UNet; core's side where the host has its 0.33 node.
    The pack's run trains on the bf16 base with checkpointing; it holds no second copy of the base, so its peak
    memory stays under core's (which re-creates the model for its own copy)."""
    from indomain.bench import lora_vs_core_training as bench

    out = tmp_path / "lvc.json"
    bench.main(["--fast", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "lora_vs_core_training" and data["mode"] == "fast"
    pack = data["pack"]
    assert _finite_positive(pack["step_s"]) and pack["base_dtype"] == "bfloat16" and pack["grad_checkpointing"]
    assert all(math.isfinite(x) for x in pack["runs"][0]["losses"])
    assert data["settings"]["rank"] == 32 and data["settings"]["batch"] == 2
    if data["core"] is None:
        assert data["core_skipped"]
    else:
        assert _finite_positive(data["core"]["step_s"]) and _finite_positive(data["time_ratio"])
        assert data["core"]["peak_rss_mib"] > pack["peak_rss_mib"]


def test_gpu_memory_table_fast(comfy, tmp_path):
    from indomain.bench import gpu_memory

    out = tmp_path / "gpu.json"
    gpu_memory.main(["--fast", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["kind"] == "computed" and "activations excluded" in data["rule"]
    rows = {(r["family"], r["form"]): r for r in data["rows"]}
    assert 855e6 < rows[("SD1.5", "lora_half")]["base_params"] < 865e6  # SD1.5's UNet: 860M
    assert 2.5e9 < rows[("SDXL", "lora_half")]["base_params"] < 2.6e9   # SDXL's: 2.57B
    for fam in ("SD1.5", "SDXL"):
        half, fp32 = rows[(fam, "lora_half")], rows[(fam, "lora_fp32_base")]
        assert half["bytes"] < fp32["bytes"] and set(fp32["fits_gib"]) <= set(half["fits_gib"])
        assert rows[(fam, "full")]["bytes"] > fp32["bytes"]
    assert data["goal"]["sdxl_lora_fits_12gb"] and 12 in rows[("SDXL", "lora_half")]["fits_gib"]
    assert 12 not in rows[("SDXL", "lora_fp32_base")]["fits_gib"]


METRICS = ("control", "domain_score", "fd", "texture_ratio", "tint_ratio")


def _on_grid(x: float, n: int) -> bool:
    """x is a fraction of n samples (k / n)."""
    return abs(x * n - round(x * n)) < 1e-6


def _check_point(r: dict, samples: int) -> None:
    assert r["samples"] == samples
    assert 0.0 <= r["control"] <= 1.0 and 0.0 <= r["domain_score"] <= 1.0
    assert math.isfinite(r["fd"]) and r["fd"] >= 0
    assert math.isfinite(r["texture_ratio"]) and math.isfinite(r["tint_ratio"])
    # control counts the samples with the asked shape AND the asked colour: a fraction of the samples, within the
    # bounds its two parts set (at most either accuracy, at least their sum minus one)
    for k in ("control", "shape_acc", "colour_acc"):
        assert _on_grid(r[k], samples), (r["id"], k, r[k], samples)
    lo, hi = max(0.0, r["shape_acc"] + r["colour_acc"] - 1.0), min(r["shape_acc"], r["colour_acc"])
    assert lo - 1e-9 <= r["control"] <= hi + 1e-9, (r["id"], r["control"], r["shape_acc"], r["colour_acc"])
    if "iou_ge_half" in r:  # a mean IoU over samples of which a fraction g reach 0.5: between g/2 and g + (1-g)/2
        g = r["iou_ge_half"]
        assert _on_grid(g, samples) and g / 2 - 1e-9 <= r["iou"] <= g + (1 - g) / 2 + 1e-9, (r["id"], r["iou"], g)


def _check_family_stats(data: dict, experiment: str, derived: dict, keys) -> None:
    """A derived mean/sd per family, recomputed here from the points (family = the id without its seed)."""
    import numpy as np

    fams = {}
    for pid in data["results"][experiment]:
        fams.setdefault(pid.rsplit(" seed=", 1)[0], []).append(data["points"][pid])
    assert set(fams) == set(derived)
    for fam, rows in fams.items():
        for k in keys:
            xs = np.array([r[k] for r in rows], dtype=np.float64)
            got = derived[fam][k]
            assert got["n"] == len(xs), (fam, k)
            assert got["mean"] == pytest.approx(float(xs.mean()), rel=1e-9, abs=1e-12), (fam, k)
            assert got["sd"] == pytest.approx(float(xs.std(ddof=1)) if len(xs) > 1 else 0.0, rel=1e-9, abs=1e-12), (fam, k)


def _check_claim(data: dict) -> None:
    """The claim's answers, recomputed from the sweep's points: Pareto dominance of (c) over every (b) point,
    the best (a), and each (b) point's best (c) at at least its domain score."""
    pts = data["points"]
    sweep = [pts[i] for i in data["results"]["sweep"] if pts[i]["schedule"] == [0.0, 1.0]]
    by = {m: [r for r in sweep if r["method"] == m] for m in "abc"}

    def beats(p, q):
        return (p["control"] >= q["control"] and p["domain_score"] >= q["domain_score"]
                and (p["control"], p["domain_score"]) != (q["control"], q["domain_score"]))

    claim = data["derived"]["claim"]
    assert claim["best_a"]["control"] == max(r["control"] for r in by["a"])
    per_b = {x["b"]: x for x in claim["per_b_point"]}
    assert set(per_b) == {r["id"] for r in by["b"]}
    for rb in by["b"]:
        x = per_b[rb["id"]]
        assert sorted(x["dominated_by_c"]) == sorted(r["id"] for r in by["c"] if beats(r, rb)), rb["id"]
        reach = [r["control"] for r in by["c"] if r["domain_score"] >= rb["domain_score"]]
        if reach:
            assert x["c_control_minus_b"] == pytest.approx(max(reach) - rb["control"], abs=1e-12)
            assert x["control_gap_to_best_a"] == pytest.approx(claim["best_a"]["control"] - max(reach), abs=1e-12)
        else:
            assert x["best_c_at_b_domain_score"] is None
    assert claim["c_pareto_dominates_b"] == all(any(beats(r, rb) for r in by["c"]) for rb in by["b"])
    assert sorted(claim["c_points_dominated_by_some_b"]) == sorted(
        r["id"] for r in by["c"] if any(beats(rb, r) for rb in by["b"]))


def test_toy_bench_fast(comfy, tmp_path):
    """Every experiment of the full-coverage benchmark runs and every sweep point is in the JSON."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main

    out = tmp_path / "toy.json"
    toy_main(["--fast", "--gates", "report", "--evaluator-steps", "5", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["bench"] == "toy" and data["fast"] is True and data["coverage"] == "full"
    assert data["complete"] is True and data["experiments_done"] == list(toy.EXPERIMENTS)
    cfg = data["config"]
    samples = cfg["prompts"] * cfg["samples_per_prompt"]
    pts = data["points"]
    for pid in {i for ids in data["results"].values() for i in ids}:
        _check_point(pts[pid], samples)
        assert "control_beyond_content" not in pts[pid]  # full coverage: every prompt is inside the domain's content
    sweep = {(r["method"], r["cfg"], r["domain_weight"], tuple(r["schedule"])) for r in map(pts.get, data["results"]["sweep"])}
    expected = {(m, c, None, (0.0, 1.0)) for m in "ab" for c in toy.CFGS}
    expected |= {("c", c, w, (0.0, 1.0)) for c in toy.C_CFGS for w in toy.DOMAIN_WEIGHTS}
    expected |= {("c", c, w, (s, e)) for w, c in toy.HEADLINE for s, e, _ in toy.HALVES}
    expected |= {("d", c, w, (0.0, 1.0)) for w, _ in toy.HEADLINE for c in toy.C_CFGS}
    assert sweep == expected
    # the claim's questions are answered from the sweep
    claim = data["derived"]["claim"]
    assert isinstance(claim["c_pareto_dominates_b"], bool) and len(claim["per_b_point"]) == len(toy.CFGS)
    _check_claim(data)
    # spread: every headline family over every seed, with mean and sd (recomputed from the points)
    # spread: every sweep point over every seed, with mean and sd (recomputed from the points); the front and the
    # claim read from the means
    spread = data["derived"]["spread"]
    assert set(spread) == {pts[i]["family"] for i in data["results"]["sweep"]}
    assert all(v["control"]["n"] == cfg["seeds"] for v in spread.values())
    assert {pts[i]["seed"] for i in data["results"]["spread"]} == set(range(cfg["seeds"]))
    _check_family_stats(data, "spread", spread, ("control", "domain_score", "fd", "texture_ratio"))
    over = data["derived"]["claim_over_seeds"]
    assert over["front"] and all(f["control"] == spread[f["family"]]["control"] for f in over["front"])
    assert len(over["claim"]["per_b_point"]) == len(toy.CFGS)
    # forgetting: (b) and (c) at both fine-tuning lengths, the long one long_factor x the steps; each entry is its point
    forget = data["derived"]["forgetting"]
    assert {(f["family"].split()[0], f["length"]) for f in forget} == {(m, ln) for m in "bc" for ln in ("short", "long")}
    for f, pid in zip(forget, data["results"]["forgetting"]):
        assert f["steps"] == cfg["domain_steps"] * (cfg["long_factor"] if pts[pid]["length"] == "long" else 1)
        assert all(f[k] == pts[pid][k] for k in ("control", "domain_score", "fd", "texture_ratio")), pid
    ft = data["models"]["fine_tunes"]
    assert ft["naive seed=0 long"]["steps"] == cfg["domain_steps"] * cfg["long_factor"]
    assert ft["domain seed=0 short"]["steps"] == cfg["domain_steps"] and ft["lora seed=0 short"]["form"] == "lora"
    assert {pts[i]["remedy"] for i in data["results"]["remedies"]} == {"", *toy.REMEDIES}
    assert {(pts[i]["domain_weight"], pts[i]["cfg"], pts[i]["remedy"]) for i in data["results"]["remedies"]
            if pts[i]["method"] == "c"} == {
        (w, c, r) for w, c in toy.REMEDY_POINTS for r in ("", *toy.REMEDIES)}  # every remedy at every point
    # fairness (G8): the core remedies are given to (b) too, at (c)'s cfgs
    assert {(pts[i]["cfg"], pts[i]["remedy"]) for i in data["results"]["remedies"] if pts[i]["method"] == "b"} == {
        (c, r) for c in {c for _, c in toy.REMEDY_POINTS} for r in ("rescale", "apg")}
    # the gates: every one measured (reported, not enforced: --fast models are not calibrated), the reading marked
    assert set(data["gates"]) == {f"G{i}" for i in range(1, 9)} and data["gates_mode"] == "report"
    assert data["calibrated"] is False and data["reading"]["status"].startswith("UNCALIBRATED")
    assert data["sampled_through"]["c"].startswith("InDomainLoadDomainUNet")
    assert "controlnet" not in data["results"] and data["models"]["controlnet"] is None  # its own command
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pareto.png").stat().st_size > 0


def _check_controlnet(data: dict, toy) -> None:
    """The ControlNet experiment: every point over every seed, each with its IoU; the spread per family."""
    cfg, pts = data["config"], data["points"]
    got = {(r["method"], r["cfg"], r["domain_weight"], r["controlnet"], r["seed"])
           for r in map(pts.get, data["results"]["controlnet"])}
    fam = {("a", 3.0, None, "")} | {(m, c, None, "cn") for m in "ab" for c in toy.CNET_CFGS}
    fam |= {("c", c, w, mode) for w, c in toy.HEADLINE for mode in ("cn", "cn+domain")}
    assert got == {(*f, k) for f in fam for k in range(cfg["seeds"])}
    for pid in data["results"]["controlnet"]:
        assert 0.0 <= pts[pid]["iou"] <= 1.0 and 0.0 <= pts[pid]["iou_ge_half"] <= 1.0 and pts[pid]["mask_area_ratio"] >= 0
    spread = data["derived"]["controlnet"]
    assert len(spread) == len(fam) and all(v["iou"]["n"] == cfg["seeds"] for v in spread.values())
    _check_family_stats(data, "controlnet", spread, ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score"))
    ref = data["references"]
    assert ref["iou_real_plain_at_hint"] == 1.0 and ref["iou_real_domain_at_hint"] > 0.9  # the mask rule reads real images
    assert 0.0 < ref["iou_asked_shape_random_position"] < 0.6
    cn = data["models"]["controlnet"]
    assert cn["steps"] == cfg["cnet_steps"] and cn["file"].startswith("toy_controlnet_")
    assert "ControlNetApplyAdvanced" in data["sampled_through"]["controlnet"]


def test_toy_bench_fast_controlnet(comfy, tmp_path):
    """The ControlNet experiment alone: its ControlNet is trained (or cached) and loaded by core's loader, and
    every point over every seed lands in the JSON."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main

    out = tmp_path / "toy_cn.json"
    toy_main(["--fast", "--gates", "report", "--experiments", "controlnet", "--evaluator-steps", "5", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["experiments_done"] == ["controlnet"]
    samples = data["config"]["prompts"] * data["config"]["samples_per_prompt"]
    for pid in data["results"]["controlnet"]:
        _check_point(data["points"][pid], samples)
    _check_controlnet(data, toy)


def test_toy_bench_fast_partial(comfy, tmp_path):
    """The partial-coverage experiment reports control beyond the domain's content separately; the
    diagnosis records every step."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main

    out = tmp_path / "toy_partial.json"
    toy_main(["--fast", "--gates", "report", "--coverage", "partial", "--experiments", "remedies,diagnose,constants,cache",
              "--evaluator-steps", "5",
              "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["coverage"] == "partial" and data["experiments_done"] == ["remedies", "cache"]
    # domain caching (issue 24): every (c), (d) headline point cached three ways beside the same point uncached,
    # per seed; the verdict is recomputed here from the rows
    cache = data["derived"]["cache"]
    assert len(cache) == 2 * len(toy.HEADLINE) * len(toy.config.CACHE_MODES)
    moved = False
    for fam, v in cache.items():
        uncached_fam = fam.split(" +cache ", 1)[0]
        for key, stats in (("cached", v["cached"]), ("uncached", v["uncached"])):
            rows = [data["points"][pid] for pid in data["results"]["cache"]
                    if data["points"][pid]["family"] == (fam if key == "cached" else uncached_fam)]
            assert len(rows) == data["config"]["seeds"]
            assert stats["fd"]["mean"] == pytest.approx(sum(r["fd"] for r in rows) / len(rows))
        for k, ok in v["within_uncached_spread"].items():
            assert ok == (abs(v["cached"][k]["mean"] - v["uncached"][k]["mean"]) <= v["uncached"][k]["sd"])
        moved |= v["cached"]["fd"]["mean"] != v["uncached"]["fd"]["mean"]
    assert moved, "no cached point differs from its uncached twin: the cache setting did not reach the sampler"
    # the diagnosis: one row per sampling step along each (c) trajectory, D - u recovered from the guider's pair
    diag = data["derived"]["diagnosis"]
    assert len(diag) == len(toy.DIAGNOSE_POINTS)
    for steps in diag.values():
        assert len(steps) == data["config"]["sample_steps"]
        for d in steps:
            assert d["norm_d_minus_u"] > 0 and d["norm_c_minus_u"] > 0 and -1.0 <= d["cosine"] <= 1.0
    # the stand-in check: one row per noise level of the schedule, both constant variants measured
    consts = data["derived"]["constants"]
    assert len(consts) == data["config"]["sample_steps"]
    assert [r["sigma"] for r in consts] == sorted((r["sigma"] for r in consts), reverse=True)
    for r in consts:
        assert r["norm_u"] > 0 and r["norm_c_minus_u"] > 0
        assert r["single_err_over_u"] >= 0 and r["per_level_err_over_u"] >= 0
    # the diagnosis steps are the sampling schedule's noise levels, the same the stand-in check measured at
    levels = [r["sigma"] for r in consts]
    for steps in diag.values():
        assert [d["sigma"] for d in steps] == pytest.approx(levels, rel=1e-5)
    # control splits into prompts inside and beyond the domain's content: control is their weighted mean, with
    # the share of asked prompts the domain covers (from the JSON's own prompt and coverage lists)
    from indomain.devkit import toy_world as world

    covered = {world.prompt(s, c) for s, c in data["world"]["coverage_combos"]}
    share = sum(p in covered for p in data["world"]["prompts"]) / len(data["world"]["prompts"])
    samples = data["config"]["prompts"] * data["config"]["samples_per_prompt"]
    for pid in data["results"]["remedies"]:
        r = data["points"][pid]
        _check_point(r, samples)
        assert 0.0 <= r["control_beyond_content"] <= 1.0
        assert r["control_in_content"] is None or 0.0 <= r["control_in_content"] <= 1.0
        inside = 0.0 if r["control_in_content"] is None else share * r["control_in_content"]
        assert r["control"] == pytest.approx(inside + (1 - share) * r["control_beyond_content"], abs=1e-9), pid


def test_toy_spread_at_partial_coverage_splits_control(tmp_path, capsys):
    """At partial coverage the spread also reads control inside and beyond the domain's content, per family over
    its seeds; --replot recomputes it from the points (an older JSON gains the split) and prints both columns. A
    family whose prompts all lie beyond the content reads '-' inside it, not an error."""
    from indomain.bench.toy.run import main as toy_main

    def row(pid, control, inside, beyond):
        fam = pid.rsplit(" seed=", 1)[0]
        return {"id": pid, "family": fam, "method": pid[0], "schedule": [0.0, 1.0], "control": control,
                "domain_score": 1.0, "fd": 100.0 + control,
                "texture_ratio": 0.9, "control_in_content": inside, "control_beyond_content": beyond}

    vals = {"b cfg=3 seed=0": (0.75, 1.0, 0.5), "b cfg=3 seed=1": (0.5, 0.75, 0.25),
            "c cfg=5 wd=1 seed=0": (0.25, None, 0.25), "c cfg=5 wd=1 seed=1": (0.125, None, 0.125)}
    payload = {"coverage": "partial", "fast": True, "config": {"seeds": 2}, "timings_s": {},
               "points": {pid: row(pid, *v) for pid, v in vals.items()}, "results": {"spread": list(vals)},
               "derived": {"spread": {}},  # stale: written without the split
               "references": {"fd_real_domain_vs_real_domain": 1.0, "fd_real_plain_vs_real_domain": 2.0,
                              "evaluator_accuracy_on_fresh_real_data": 1.0}}
    src = tmp_path / "toy_partial.json"
    src.write_text(json.dumps(payload))
    got = toy_main(["--replot", str(src)])["derived"]["spread"]
    data = dict(payload, derived={"spread": got})
    _check_family_stats(data, "spread", got, ("control", "control_beyond_content"))
    assert got["b cfg=3"]["control_in_content"]["mean"] == pytest.approx(0.875)
    assert got["c cfg=5 wd=1"]["control_in_content"] == {"mean": None, "sd": None, "n": 0}
    printed = capsys.readouterr().out
    assert "control, beyond the content" in printed and "0.375 ± 0.18" in printed


def test_toy_claim_over_seeds_reads_the_means(tmp_path, capsys):
    """The front and the claim are read from the means over seeds, not from seed 0: here (c) beats (b) on the
    domain at seed 0 but (b) dominates it on the means; a half-schedule point stays off the front. Expected
    values worked out by hand below."""
    from indomain.bench.toy.run import main as toy_main

    seeds = {  # family: (method, schedule, [(control, domain score) per seed])
        "a cfg=3": ("a", [0.0, 1.0], [(1.0, 0.0), (1.0, 0.0)]),
        "b cfg=3": ("b", [0.0, 1.0], [(0.8, 0.9), (0.6, 0.9)]),
        "c cfg=5 wd=1": ("c", [0.0, 1.0], [(0.5, 0.95), (0.7, 0.85)]),
        "c cfg=3 wd=1.5 sched=0.5-1": ("c", [0.5, 1.0], [(1.0, 1.0), (1.0, 1.0)]),
        "d cfg=5 wd=1": ("d", [0.0, 1.0], [(0.9, 0.5), (0.9, 0.5)]),
    }
    points = {f"{fam} seed={k}": {"id": f"{fam} seed={k}", "family": fam, "method": m, "schedule": sch,
                                  "control": c, "domain_score": d, "fd": 100.0, "texture_ratio": 1.0}
              for fam, (m, sch, vals) in seeds.items() for k, (c, d) in enumerate(vals)}
    ids = list(points)
    payload = {"coverage": "full", "fast": True, "config": {"seeds": 2}, "timings_s": {}, "points": points,
               "results": {"spread": ids}, "derived": {},
               "references": {"fd_real_domain_vs_real_domain": 1.0, "fd_real_plain_vs_real_domain": 2.0,
                              "evaluator_accuracy_on_fresh_real_data": 1.0}}
    src = tmp_path / "toy_full.json"
    src.write_text(json.dumps(payload))
    over = toy_main(["--replot", str(src), "--docs", str(tmp_path / "docs")])["derived"]["claim_over_seeds"]
    # means: a (1.0, 0), b (0.7, 0.9), c (0.6, 0.9), d (0.9, 0.5); b dominates c; the half schedule is left out
    assert [f["family"] for f in over["front"]] == ["a cfg=3", "d cfg=5 wd=1", "b cfg=3"]
    b = next(f for f in over["front"] if f["family"] == "b cfg=3")
    assert b["control"]["mean"] == pytest.approx(0.7) and b["control"]["sd"] == pytest.approx(0.1414213562)
    assert over["claim"]["c_points_dominated_by_some_b"] == ["c cfg=5 wd=1"]
    assert over["claim"]["c_pareto_dominates_b"] is False
    assert over["claim"]["best_a"]["id"] == "a cfg=3"
    assert "the front of (a)-(d) read from the means over 2 seeds" in capsys.readouterr().out


def test_toy_texture_statistic():
    """The overshoot statistic: real domain images sit at their own level, plain images near 0."""
    import torch

    from indomain.devkit import toy_world as world

    gen = torch.Generator().manual_seed(0)
    dom = world.sample_batch(256, gen, style="domain").latents
    dom2 = world.sample_batch(256, gen, style="domain").latents
    plain = world.sample_batch(256, gen, style="plain").latents
    level = world.texture_level(dom).mean()
    assert abs(float(world.texture_level(dom2).mean() / level) - 1.0) < 0.05
    assert abs(float(world.texture_level(plain).mean() / level)) < 0.1
    assert float(world.texture_level(1.5 * dom).mean() / level) > 1.4  # exaggeration reads above 1


def test_toy_domain_marks_read_the_texture_at_any_phase():
    """The domain score's rule: real domain images carry both marks whatever their checker's phase, and so does a
    texture made of patches of both phases; plain images, exaggerated and noisy plain images (what a base's CFG
    samples look like) and a tint without texture carry none; evaluate's P(domain) is the rule."""
    import torch

    from indomain.devkit import toy_world as world

    gen = torch.Generator().manual_seed(3)
    dom = world.sample_batch(256, gen, style="domain")
    phases = torch.stack([(x[3] * world._checker(0)).sum() > 0 for x in dom.latents])
    assert 0.3 < float(phases.float().mean()) < 0.7  # both phases are drawn
    level = world.texture_level(dom.latents)
    for ph in (True, False):
        assert float(level[phases == ph].mean()) == pytest.approx(world.DOMAIN_TEXTURE_AMPLITUDE, rel=0.1)
    assert bool(world.domain_marks(dom.latents).all())

    patchy = world.render("square", "red", "domain", 0, 0, gen)
    patchy[3, :, 4:] = -patchy[3, :, 4:]            # the right half in the other phase (the square sits left)
    assert float(world.texture_level(patchy[None])) > 0.8 * world.DOMAIN_TEXTURE_AMPLITUDE
    assert bool(world.domain_marks(patchy[None]).all())

    plain = world.sample_batch(256, gen, style="plain").latents
    imperfect = 1.3 * plain + 0.1 * torch.randn(plain.shape, generator=gen)
    tint_only = dom.latents.clone()
    tint_only[:, 3] = torch.where(world.colour_mask(tint_only), tint_only[:, 3], torch.zeros(()))  # texture gone
    for x in (plain, imperfect, tint_only):
        assert not bool(world.domain_marks(x).any())
    assert float(world.texture_level(plain).mean()) < 0.05 and float(world.tint_level(plain).abs().mean()) < 0.05

    net = world.Evaluator().eval()   # P(domain) does not depend on the network's style head
    both = torch.cat([dom.latents[:8], plain[:8]])
    ev = world.evaluate(net, both, torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long))
    expect = world.domain_marks(both) & ~ev["off_data"]
    assert torch.equal(ev["p_domain"], expect.float())


def test_toy_mask_rule_and_hint():
    """Spatial control's reading: the mask rule finds the shape of real images of both styles (IoU 1 with
    the mask they were drawn with), IoU is 1 for equal masks and 0 for disjoint ones, and a hint image is the
    mask at 8x the latent's size."""
    import torch

    from indomain.devkit import toy_world as world

    gen = torch.Generator().manual_seed(0)
    for style in ("plain", "domain"):
        b = world.sample_batch(256, gen, style=style)
        assert b.masks.shape == (256, world.SIZE, world.SIZE)
        assert float(world.iou(world.detect_mask(b.latents), b.masks).min()) == 1.0
    # a sample's exaggerated background (tint doubled) is still background: the rule takes the image's own level
    x = b.latents.clone()
    x[:, :3] += world.DOMAIN_TINT.view(1, 3, 1, 1) * (1 - b.masks)[:, None]
    assert float(world.iou(world.detect_mask(x), b.masks).mean()) > 0.95
    a = world.shape_mask("square", 0, 0)[None]
    assert float(world.iou(a, a)[0]) == 1.0
    assert float(world.iou(a, 1 - a)[0]) == 0.0
    img = world.hint_image(b.masks[:2])
    assert img.shape == (2, world.SIZE * world.HINT_SCALE, world.SIZE * world.HINT_SCALE, 3)
    assert torch.equal(img[:, ::world.HINT_SCALE, ::world.HINT_SCALE, 0], b.masks[:2])


def test_toy_sampler_check_reads_each_candidate_at_n_and_2n_steps(comfy, tmp_path):
    """G7's diagnosis tool: per candidate, the readings at N and 2N steps, and G7's verdict on exactly that pair
    (checked here against the figures' own difference and standard error)."""
    from indomain.bench.toy import sampler_check

    out = tmp_path / "check.json"
    data = sampler_check.main(["--fast", "--candidates", "euler:1,heun:0.5", "--out", str(out)])
    assert json.loads(out.read_text())["candidates"].keys() == data["candidates"].keys() == {"euler:1", "heun:0.5"}
    n = data["sample_steps"]
    for key, cand in data["candidates"].items():
        assert set(cand["readings"]) == {str(n), str(2 * n)}
        (fig,) = cand["figures"].values()
        for name in ("control", "domain_score"):
            f = fig[name]
            assert f["N"] == pytest.approx(cand["readings"][str(n)][name])
            assert f["2N"] == pytest.approx(cand["readings"][str(2 * n)][name])
            assert f["diff"] == pytest.approx(f["2N"] - f["N"])
        assert cand["agree"] == all(abs(fig[k]["diff"]) <= 2 * fig[k]["se"] for k in ("control", "domain_score"))


def test_toy_demo_picture(comfy, tmp_path, monkeypatch):
    """`demo.sh --toy` renders the toy world from the benchmark's cached models; with none it exits 2
    naming the command that builds them."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main
    from indomain.demo import toy as demo_toy

    with monkeypatch.context() as m:
        m.setenv("INDOMAIN_CACHE", str(tmp_path / "empty"))
        assert demo_toy.main(["--fast", "--out", str(tmp_path / "none.png")]) == demo_toy.NO_CACHE
    if not (toy.cache_dir() / "latest_full_fast.json").is_file():
        toy_main(["--fast", "--gates", "report", "--experiments", "remedies", "--evaluator-steps", "5",
                  "--out", str(tmp_path / "t.json")])
    out = tmp_path / "toy_world.png"
    assert demo_toy.main(["--fast", "--out", str(out)]) == 0
    from PIL import Image

    w, h = Image.open(out).size
    assert h > len(demo_toy.PROMPTS) * 8 * 8 and w > 4 * 8 * 8  # a row per prompt, four columns


# ----------------------------------------------------------------------------- the toy benchmark's gates (issue 21)


@pytest.fixture(scope="module")
def toy_evaluator():
    """The benchmark's evaluator at its default training length (seed as the run's: 0 + 7)."""
    from indomain.bench.toy import ToyConfig
    from indomain.devkit import toy_world as world

    return world.train_evaluator(ToyConfig().evaluator_steps, 7)[0]


def test_toy_gates_pass_good_inputs_and_fail_bad_ones(toy_evaluator):
    """Each gate on a known-good input passes and on a known-bad one fails: real plain images stand in for a
    base that learned the world, real domain images for a fine-tune that reached the domain; noise for a broken
    sampler; an untrained network for a broken evaluator."""
    import torch

    from indomain.bench.toy import ToyConfig, experiment_points, gates
    from indomain.bench.toy.metrics import Metrics
    from indomain.devkit import toy_world as world

    untrained = world.Evaluator().eval()
    good, bad = gates.g1_evaluator(toy_evaluator, 0), gates.g1_evaluator(untrained, 0)
    assert good["pass"] and not bad["pass"] and "shape_acc" in bad["why"], (good, bad)
    assert good["figures"]["rejected_noise"] >= 0.95 and good["figures"]["p_domain_noise"] <= 0.05

    combos = world.all_combos() * 16                      # 256 samples: 4x the 64 feature dimensions
    refs = gates.references(toy_evaluator, combos, 0)
    assert gates.g6_fd_sees_domain(refs["figures"])["pass"]
    broken_fd = dict(refs["figures"], fd_noise_vs_domain=refs["figures"]["fd_plain_vs_domain"] / 2)
    assert not gates.g6_fd_sees_domain(broken_fd)["pass"]

    gen = torch.Generator().manual_seed(11)
    m = Metrics(toy_evaluator, combos, "full", 0)
    plain, domain = world.render_list(combos, gen, "plain"), world.render_list(combos, gen, "domain")
    noise = world.off_data_images(len(combos), gen, "noise")
    g2, op = gates.g2_base_control({1.0: m(noise), 3.0: m(plain)})
    assert g2["pass"] and op == 3.0
    assert not gates.g2_base_control({3.0: m(noise)})[0]["pass"]
    fd = lambda x: world.frechet_distance(toy_evaluator.features(x).detach(), refs["plain_features"])  # noqa: E731
    floor = refs["figures"]["fd_plain_vs_plain"]
    assert gates.g3_base_quality({1.0: fd(plain)}, floor, len(combos), world.FEATURE_DIM)["pass"]
    assert not gates.g3_base_quality({1.0: fd(domain)}, floor, len(combos), world.FEATURE_DIM)["pass"]
    assert not gates.g3_base_quality({1.0: fd(plain)}, floor, 48, world.FEATURE_DIM)["pass"]  # too few samples
    assert gates.g4_base_domain({3.0: m(plain)})["pass"] and not gates.g4_base_domain({3.0: m(domain)})["pass"]
    flat = [0.1 + 0.01 * ((i * 7) % 5) for i in range(100)]
    falling = [1.0 - i / 100 for i in range(100)]
    assert gates.g5_naive(m(domain), flat)["pass"]
    assert not gates.g5_naive(m(domain), falling)["pass"] and not gates.g5_naive(m(plain), flat)["pass"]
    same = {"per_sample": m.per_sample(plain)}
    assert gates.g7_sampler({"(a)": (same, same)})["pass"]
    assert not gates.g7_sampler({"(a)": (same, {"per_sample": m.per_sample(noise)})})["pass"]
    cfg = ToyConfig()
    plan = experiment_points(cfg, ["sweep", "remedies"])
    g8 = gates.g8_fairness(cfg, plan, 3.0, {"a": (1.5, 3.0), "b": (1.5, 3.0), "c": (3.0, 5.0)})
    assert g8["pass"], g8
    unfair = {"remedies": [p for p in plan["remedies"] if p.method == "c"]}  # (b) denied the core remedies
    assert not gates.g8_fairness(cfg, unfair, 3.0, {"a": (3.0,)})["pass"]
    assert not gates.g8_fairness(ToyConfig(seeds=1), plan, None, {})["pass"]
    assert gates.verdict([good]) == "" and gates.verdict([good, bad]).startswith("instrument not calibrated: G1 (")


def _refused(data: dict, gate: str, capsys) -> None:
    assert data["reading"] is None and data["calibrated"] is False
    assert data["verdict"].startswith("instrument not calibrated: ") and f"{gate} (" in data["verdict"]
    assert data["gates"][gate]["pass"] is False and "points" not in data
    assert "instrument not calibrated: " in capsys.readouterr().out


def test_toy_run_refuses_with_a_broken_evaluator(comfy, tmp_path, monkeypatch, capsys):
    """An untrained evaluator fails G1: the run stops before any model is trained, says why, reads nothing."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main

    monkeypatch.setenv("INDOMAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "toy.json"
    data = toy_main(["--fast", "--evaluator-steps", "0", "--out", str(out)])
    _refused(data, "G1", capsys)
    on_disk = json.loads(out.read_text())
    assert on_disk["reading"] is None and on_disk["verdict"] == data["verdict"]
    assert set(on_disk["gates"]) == {"G1", "G6", "G8"} and "not measured: G2" in on_disk["verdict"]
    toy_main(["--replot", str(out)])  # a refused run's JSON replots as its verdict, not a traceback
    assert "instrument not calibrated: G1" in capsys.readouterr().out
    assert not list((tmp_path / "cache" / "toy" / "models" / "checkpoints").glob("*.safetensors"))  # no base trained


def test_toy_run_refuses_with_an_untrained_base(comfy, tmp_path, monkeypatch, capsys, toy_evaluator):
    """A base that never trained fails G2 (control near chance) and G3; with a working evaluator (G1, G6 and G8
    pass) the run still refuses before any fine-tune, and `--gates report` reads anyway, marked uncalibrated."""
    from indomain.bench import toy
    from indomain.bench.toy.run import main as toy_main

    monkeypatch.setenv("INDOMAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "toy.json"
    args = ["--fast", "--base-steps", "0", "--evaluator-steps", str(toy.ToyConfig().evaluator_steps),
            "--gate-samples", "64", "--sample-steps", "1", "--out", str(out)]
    data = toy_main(args)
    _refused(data, "G2", capsys)
    assert all(data["gates"][g]["pass"] for g in ("G1", "G6", "G8")), data["gates"]
    assert not data["gates"]["G3"]["pass"] and data["gates"]["G3"]["figures"]["n"] == 256
    assert json.loads(out.read_text())["reading"] is None and not data["models"]["fine_tunes"]


def test_demo_sweep_bench_fast(comfy, tmp_path):
    """The demo's rows over control and domain weights: one row per setting, statistics in range, the per-colour
    control consistent with the overall figure (equal pictures per colour)."""
    from indomain.demo import sweep as demo_sweep

    out = tmp_path / "demo_sweep.json"
    settings = "base:2.5:0,decoupled:2.5:1,naive:2.5:0:0.5,decoupled:2.5:1:0.5"
    data = demo_sweep.main(["--fast", "--coverage", "full", "--settings", settings, "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == data["rows"]
    assert [(r["row"], r["cfg"], r["domain_weight"], r["domain_start_percent"]) for r in data["rows"]] == [
        ("base", 2.5, 0.0, 0.0), ("decoupled", 2.5, 1.0, 0.0), ("naive", 2.5, 0.0, 0.5), ("decoupled", 2.5, 1.0, 0.5)]
    for r in data["rows"]:
        assert r["pictures"] == 2 * 4 and 0.0 <= r["control"] <= 1.0 and math.isfinite(r["stripe"])
        assert r["control"] == pytest.approx(sum(r["control_by_colour"].values()) / len(r["control_by_colour"]))
    folder = tmp_path / "demo_sweep_full_fast"
    assert (folder / "domain_images_cream").is_dir()
    assert len(list((folder / "models" / "domain_unets").glob("naive_*_full_cream_*.png"))) == 4  # a picture per row
    for bad in ("nonsense:1:1", "decoupled:2.5:1:0.5:9"):
        with pytest.raises(SystemExit):
            demo_sweep.main(["--fast", "--settings", bad, "--out", str(out)])


def test_toy_base_ema_option(comfy):
    """The base's EMA option: off, the weights returned are the last ones; at decay 1 the average never moves from
    the initial weights; at 0.5 it lies between (neither); the raw last weights reach `raw_out` in every case."""
    import dataclasses

    import torch

    from indomain.bench.toy.config import ToyConfig
    from indomain.bench.toy.models import train_base
    from indomain.devkit import tiny_models
    from indomain.devkit.domain import load_checkpoint

    cfg = dataclasses.replace(ToyConfig.fast(), base_steps=3)
    model, clip, _ = load_checkpoint(tiny_models.tiny_checkpoint(cfg.seed))
    init = {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}
    out = {}
    for decay in (0.0, 1.0, 0.5):
        raw = {}
        sd, losses = train_base(dataclasses.replace(cfg, base_ema=decay), model, clip, raw_out=raw)
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        out[decay] = (sd, raw)
    key = next(k for k, v in init.items() if v.is_floating_point() and "weight" in k and v.dim() > 1)
    sd0, raw0 = out[0.0]
    assert torch.equal(sd0[key], raw0[key]) and not torch.equal(raw0[key], init[key])
    sd1, raw1 = out[1.0]
    assert torch.equal(sd1[key], init[key]) and torch.equal(raw1[key], raw0[key])  # same seed: same raw run
    sdh, _ = out[0.5]
    assert not torch.equal(sdh[key], init[key]) and not torch.equal(sdh[key], raw0[key])
