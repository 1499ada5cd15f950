"""The instrument's gates (issue 21): checked and printed before any reading.

A reading of the toy benchmark (control vs domain for (a), (b), (c), (d)) means something only if the instrument
can tell a good method from a bad one. Each gate measures one part of that and returns
{"gate", "what", "figures", "threshold", "pass", "why"}; the run prints them, the JSON carries them, and a failed
gate stops the run ("instrument not calibrated: ...", `"reading": null`) unless `--gates report`.

  G1 evaluator: >= 0.95 accuracy on shape, colour and style for perturbed real images (noise, amplitude 0.7-1.5x,
     blur); P(domain) <= 0.05 on perturbed plain images; off-data images (noise, saturated) detected and rejected
     (>= 0.95 of them) with P(domain) <= 0.05. Style and P(domain) are the domain-marks rule's
     (toy_world.domain_marks) with the style head's off-data class; the style head's own P(domain) is reported.
  G2 base control >= 0.6 at its best cfg, shape and colour each >= 0.7.
  G3 base quality: FD of base samples to plain real images <= 3x the plain real-vs-real floor at the same sample
     count, at cfg 1 and at the operating cfg, with >= 4x the feature dimension in samples.
  G4 base domain score <= 0.05 at every cfg used.
  G5 naive fine-tune: domain score >= 0.85, texture (overshoot) ratio in 0.8-1.2, and a converged loss. Read on
     the fine-tune's own samples without a prompt at cfg 1 (did the training reach the domain?); what (b) keeps of
     the domain with a prompt at the operating cfg is the method's property, reported beside it, not gated.
  G6 the domain is visible to the FD: plain-vs-domain FD >= 20x the domain-vs-domain floor, and noise and
     saturated images farther from the domain than plain images are (issue 21: "above the FD of noise or saturated
     images", read as: the FD must not call noise closer to the domain than real plain images, the amplitude
     reading it found).
  G7 sampler: N and 2N steps agree within the noise (control and domain score) for (a), (b), (c) at the largest w_d.
  G8 fairness: >= 2 fine-tune seeds; every core remedy given to (c) (RescaleCFG, APG) is given to (b) too; the
     guider-only remedies ((c)'s bound, its schedule) are kept off the comparison front; every method's cfg grid
     holds the operating cfg (the base's best).

G1, G6 and G8 need no diffusion model (cheap, run first); G2-G5 and G7 sample the base and the fine-tunes at
`gate_samples` per prompt.
"""
from __future__ import annotations

import math

import torch

from . import world

GATES = ("G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8")
CHEAP = ("G1", "G6", "G8")

EVALUATOR_ACCURACY = 0.95
EVALUATOR_P_DOMAIN = 0.05
OFF_DATA_REJECTED = 0.95
BASE_CONTROL, BASE_SHAPE, BASE_COLOUR = 0.6, 0.7, 0.7
BASE_FD_OVER_FLOOR = 3.0
SAMPLES_PER_FEATURE = 4
BASE_DOMAIN = 0.05
NAIVE_DOMAIN, NAIVE_TEXTURE = 0.85, (0.8, 1.2)
CONVERGED_REL = 0.05
FD_VISIBLE_OVER_FLOOR = 20.0
SAMPLER_SIGMAS = 2.0
MIN_SEEDS = 2
CORE_REMEDIES = ("rescale", "apg")   # model patches: apply to (b)'s model as to the base
GUIDER_REMEDIES = ("bound1", "bound0.5", "schedule")  # the domain term's own: no (b) counterpart


def gate(name: str, what: str, figures: dict, threshold: str, ok: bool, why: str = "") -> dict:
    return {"gate": name, "what": what, "figures": figures, "threshold": threshold, "pass": bool(ok),
            "why": "" if ok else why}


def _f(x: float) -> str:
    return f"{x:.3g}"


# ----------------------------------------------------------------------------- G1, G6, G8 (no diffusion model)


@torch.no_grad()
def g1_evaluator(net, seed: int = 0, n: int = 512) -> dict:
    """The evaluator on perturbed real images of both styles and on off-data images (noise, saturated)."""
    gen = torch.Generator().manual_seed(seed + 5000)
    b = world.sample_batch(n, gen)
    ev = world.evaluate(net, world.perturb(b.latents, gen), b.shape, b.colour)
    plain = b.style == 0
    figs = {"shape_acc": float(ev["shape_ok"].mean()), "colour_acc": float(ev["colour_ok"].mean()),
            "style_acc": float((ev["style_pred"] == b.style).float().mean()),
            "p_domain_perturbed_plain": float(ev["p_domain"][plain].mean()), "n_real": n,
            "style_head_p_domain_perturbed_plain": float(ev["p_domain_style_head"][plain].mean())}
    for kind in world.OFF_DATA_KINDS:
        off = world.off_data_images(n // 2, gen, kind)
        e = world.evaluate(net, off, torch.zeros(len(off), dtype=torch.long), torch.zeros(len(off), dtype=torch.long))
        figs[f"rejected_{kind}"] = float(e["off_data"].float().mean())
        figs[f"p_domain_{kind}"] = float(e["p_domain"].mean())
    why = []
    for k in ("shape_acc", "colour_acc", "style_acc"):
        if figs[k] < EVALUATOR_ACCURACY:
            why.append(f"{k} {_f(figs[k])} < {EVALUATOR_ACCURACY}")
    for k in ["p_domain_perturbed_plain"] + [f"p_domain_{k}" for k in world.OFF_DATA_KINDS]:
        if figs[k] > EVALUATOR_P_DOMAIN:
            why.append(f"{k} {_f(figs[k])} > {EVALUATOR_P_DOMAIN}")
    for kind in world.OFF_DATA_KINDS:
        if figs[f"rejected_{kind}"] < OFF_DATA_REJECTED:
            why.append(f"{kind} rejected {_f(figs[f'rejected_{kind}'])} < {OFF_DATA_REJECTED}")
    return gate("G1", "evaluator on perturbed real images and off-data images", figs,
                f"accuracy >= {EVALUATOR_ACCURACY} (shape, colour, style); P(domain) <= {EVALUATOR_P_DOMAIN} on "
                f"perturbed plain, noise, saturated; off-data rejected >= {OFF_DATA_REJECTED}", not why, "; ".join(why))


@torch.no_grad()
def references(net, combos: list[tuple[str, str]], seed: int) -> dict:
    """Real reference sets of the asked content at the gates' sample count (len(combos)), their features, and
    the FD floors and distances G3 and G6 read: plain vs plain, domain vs domain, plain / noise / saturated vs
    domain. Off-data sets are as many images as the others."""
    gen = torch.Generator().manual_seed(seed + 6000)
    sets = {"domain": world.render_list(combos, gen, "domain"), "domain_2": world.render_list(combos, gen, "domain"),
            "plain": world.render_list(combos, gen, "plain"), "plain_2": world.render_list(combos, gen, "plain")}
    for kind in world.OFF_DATA_KINDS:
        sets[kind] = world.off_data_images(len(combos), gen, kind)
    feats = {k: net.features(v) for k, v in sets.items()}
    fd = world.frechet_distance
    figs = {"n": len(combos), "feature_dim": world.FEATURE_DIM,
            "fd_plain_vs_plain": fd(feats["plain_2"], feats["plain"]),
            "fd_domain_vs_domain": fd(feats["domain_2"], feats["domain"]),
            "fd_plain_vs_domain": fd(feats["plain"], feats["domain"]),
            "kid_plain_vs_plain": world.kid(feats["plain_2"], feats["plain"]),
            "kid_domain_vs_domain": world.kid(feats["domain_2"], feats["domain"]),
            "kid_plain_vs_domain": world.kid(feats["plain"], feats["domain"])}
    for kind in world.OFF_DATA_KINDS:
        figs[f"fd_{kind}_vs_domain"] = fd(feats[kind], feats["domain"])
    return {"figures": figs, "plain_features": feats["plain"]}


def g6_fd_sees_domain(refs: dict) -> dict:
    f = refs
    floor = max(f["fd_domain_vs_domain"], 1e-12)
    figs = {"fd_plain_vs_domain": f["fd_plain_vs_domain"], "fd_domain_vs_domain_floor": f["fd_domain_vs_domain"],
            "ratio_to_floor": f["fd_plain_vs_domain"] / floor, "n": f["n"],
            **{f"fd_{k}_vs_domain": f[f"fd_{k}_vs_domain"] for k in world.OFF_DATA_KINDS}}
    why = []
    if figs["ratio_to_floor"] < FD_VISIBLE_OVER_FLOOR:
        why.append(f"plain-vs-domain FD {_f(figs['fd_plain_vs_domain'])} is {_f(figs['ratio_to_floor'])}x the floor "
                   f"< {FD_VISIBLE_OVER_FLOOR:g}x")
    for k in world.OFF_DATA_KINDS:
        if f[f"fd_{k}_vs_domain"] <= f["fd_plain_vs_domain"]:
            why.append(f"{k} is closer to the domain (FD {_f(f[f'fd_{k}_vs_domain'])}) than plain images "
                       f"({_f(f['fd_plain_vs_domain'])})")
    return gate("G6", "the domain is visible to the FD", figs,
                f"plain-vs-domain FD >= {FD_VISIBLE_OVER_FLOOR:g}x the domain-vs-domain floor (same count); noise and "
                "saturated images farther from the domain than plain images", not why, "; ".join(why))


def g8_fairness(cfg, points: dict, operating_cfg: float | None, grids: dict) -> dict:
    """The plan's fairness: seeds, matched remedies, the operating cfg in every method's grid."""
    pts = [p for ps in points.values() for p in ps]
    c_rem = sorted({p.remedy for p in pts if p.method == "c" and p.remedy})
    b_rem = sorted({p.remedy for p in pts if p.method == "b" and p.remedy})
    unmatched = [r for r in c_rem if r in CORE_REMEDIES and r not in b_rem]
    c_only = [r for r in c_rem if r not in CORE_REMEDIES] + (
        ["schedule"] if any(p.method == "c" and (p.start, p.end) != (0.0, 1.0) for p in pts) else [])
    figs = {"seeds": cfg.seeds, "remedies_c": c_rem, "remedies_b": b_rem, "unmatched_core_remedies": unmatched,
            "c_only_remedies_off_the_front": c_only, "operating_cfg": operating_cfg,
            "cfg_grids": {m: list(g) for m, g in grids.items()}}
    why = []
    if cfg.seeds < MIN_SEEDS:
        why.append(f"{cfg.seeds} fine-tune seed(s) < {MIN_SEEDS}")
    if unmatched:
        why.append(f"remedies given to (c) but not (b): {', '.join(unmatched)}")
    if operating_cfg is not None:
        missing = [m for m, g in grids.items() if not any(abs(c - operating_cfg) < 1e-9 for c in g)]
        figs["methods_without_operating_cfg"] = missing
        if missing:
            why.append(f"the operating cfg {operating_cfg:g} is not in the cfg grid of {', '.join(missing)}")
    return gate("G8", "fairness of the plan", figs,
                f">= {MIN_SEEDS} seeds; core remedies matched for (b); guider-only remedies off the front; the "
                "operating cfg in every method's grid", not why, "; ".join(why))


# ----------------------------------------------------------------------------- G2-G5, G7 (sampled readings)


def g2_base_control(readings: dict) -> tuple[dict, float]:
    """readings: {cfg: row} for (a). Returns the gate and the operating cfg (the best control)."""
    best = max(readings, key=lambda c: (readings[c]["control"], -c))
    r = readings[best]
    figs = {"best_cfg": best, "control": r["control"], "shape_acc": r["shape_acc"], "colour_acc": r["colour_acc"],
            "control_by_cfg": {f"{c:g}": readings[c]["control"] for c in sorted(readings)}, "samples": r["samples"]}
    why = [f"{k} {_f(r[k])} < {t}" for k, t in (("control", BASE_CONTROL), ("shape_acc", BASE_SHAPE),
                                                ("colour_acc", BASE_COLOUR)) if r[k] < t]
    return gate("G2", "base control at its best cfg", figs,
                f"control >= {BASE_CONTROL}, shape >= {BASE_SHAPE}, colour >= {BASE_COLOUR}", not why,
                f"at cfg {best:g}: " + "; ".join(why)), best


def g3_base_quality(fd_by_cfg: dict, floor: float, n: int, dim: int) -> dict:
    """fd_by_cfg: {cfg: FD of base samples to plain real images}, floor: plain vs plain at the same count n."""
    figs = {"fd_to_plain_by_cfg": {f"{c:g}": v for c, v in fd_by_cfg.items()}, "floor_plain_vs_plain": floor,
            "ratio_by_cfg": {f"{c:g}": v / max(floor, 1e-12) for c, v in fd_by_cfg.items()}, "n": n, "feature_dim": dim}
    why = []
    if n < SAMPLES_PER_FEATURE * dim:
        why.append(f"{n} samples < {SAMPLES_PER_FEATURE}x the feature dimension {dim}")
    why += [f"cfg {c:g}: FD {_f(v)} > {BASE_FD_OVER_FLOOR:g}x the floor {_f(floor)}"
            for c, v in fd_by_cfg.items() if v > BASE_FD_OVER_FLOOR * floor]
    return gate("G3", "base quality: FD to plain real images (cfg 1 and the operating cfg)", figs,
                f"FD <= {BASE_FD_OVER_FLOOR:g}x the plain real-vs-real floor at the same count; "
                f"n >= {SAMPLES_PER_FEATURE}x the feature dimension", not why, "; ".join(why))


def g4_base_domain(readings: dict) -> dict:
    figs = {"domain_score_by_cfg": {f"{c:g}": r["domain_score"] for c, r in sorted(readings.items())},
            "off_data_by_cfg": {f"{c:g}": r.get("off_data") for c, r in sorted(readings.items())}}
    bad = [(c, r["domain_score"]) for c, r in sorted(readings.items()) if r["domain_score"] > BASE_DOMAIN]
    return gate("G4", "base domain score at every cfg used", figs, f"<= {BASE_DOMAIN} at every cfg", not bad,
                "; ".join(f"cfg {c:g}: {_f(v)} > {BASE_DOMAIN}" for c, v in bad))


def converged(losses: list[float]) -> tuple[bool, dict]:
    """The loss's last fifth against the fifth before it: converged when the mean moved by less than
    CONVERGED_REL of it or within 2 standard errors (the diffusion loss is noisy: it depends on the drawn sigma)."""
    if not losses or len(losses) < 10:
        return False, {"steps": len(losses or [])}
    q = len(losses) // 5
    last, prev = losses[-q:], losses[-2 * q:-q]
    m1, m0 = sum(last) / q, sum(prev) / q
    sd = lambda xs, m: math.sqrt(sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1))  # noqa: E731
    se = math.sqrt(sd(last, m1) ** 2 / q + sd(prev, m0) ** 2 / q)
    ok = (m0 - m1) <= max(CONVERGED_REL * m0, 2 * se)
    return ok, {"steps": len(losses), "mean_last_fifth": m1, "mean_previous_fifth": m0, "se_difference": se}


def g5_naive(row: dict, losses: list[float] | None, prompted: dict | None = None) -> dict:
    """row: the naive fine-tune's samples without a prompt at cfg 1; prompted (reported, not gated): (b) at the
    operating cfg with the asked prompts."""
    ok_loss, loss_figs = converged(losses or [])
    figs = {"point": row.get("id"), "domain_score": row["domain_score"], "texture_ratio": row["texture_ratio"],
            "tint_ratio": row.get("tint_ratio"), "loss": loss_figs, "loss_converged": ok_loss}
    if prompted:
        figs["with_prompt_not_gated"] = {k: prompted.get(k) for k in ("id", "control", "domain_score", "texture_ratio",
                                                                      "tint_ratio")}
    why = []
    if row["domain_score"] < NAIVE_DOMAIN:
        why.append(f"domain score {_f(row['domain_score'])} < {NAIVE_DOMAIN}")
    lo, hi = NAIVE_TEXTURE
    if not lo <= row["texture_ratio"] <= hi:
        why.append(f"texture ratio {_f(row['texture_ratio'])} outside {lo}-{hi}")
    if not ok_loss:
        why.append("loss not converged" + ("" if losses else " (no loss record)"))
    return gate("G5", "naive fine-tune reaches the domain (no prompt, cfg 1), converged", figs,
                f"domain score >= {NAIVE_DOMAIN}, texture ratio in {lo}-{hi}, loss converged", not why, "; ".join(why))


def _se_mean(values: torch.Tensor) -> float:
    n = values.numel()
    return float(values.float().std() / math.sqrt(n)) if n > 1 else float("inf")


def g7_sampler(pairs: dict) -> dict:
    """pairs: {label: (reading at N steps, reading at 2N steps)}; each reading carries `per_sample` tensors
    (control, p_domain). Agreement: |difference| <= SAMPLER_SIGMAS x the standard error of the difference."""
    figs, why = {}, []
    for label, (r1, r2) in pairs.items():
        f = {}
        for key, name in (("control", "control"), ("p_domain", "domain_score")):
            a, b = r1["per_sample"][key], r2["per_sample"][key]
            diff = float(b.float().mean() - a.float().mean())
            se = math.sqrt(_se_mean(a) ** 2 + _se_mean(b) ** 2)
            if key == "control":  # a binomial: use p(1 - p) where the samples agree exactly
                p = float((a.float().mean() + b.float().mean()) / 2)
                se = max(se, math.sqrt(max(p * (1 - p), 1e-12) * 2 / a.numel()))
            f[name] = {"N": float(a.float().mean()), "2N": float(b.float().mean()), "diff": diff, "se": se}
            if abs(diff) > SAMPLER_SIGMAS * se:
                why.append(f"{label} {name} {_f(f[name]['N'])} at N vs {_f(f[name]['2N'])} at 2N "
                           f"(|diff| > {SAMPLER_SIGMAS:g} se {_f(se)})")
        figs[label] = f
    return gate("G7", "sampler: N and 2N steps agree", figs,
                f"|reading(2N) - reading(N)| <= {SAMPLER_SIGMAS:g} standard errors (control, domain score)",
                not why, "; ".join(why))


# ----------------------------------------------------------------------------- the verdict


def verdict(gates: list[dict]) -> str:
    """'' when every gate passed; else the refusal line."""
    failed = [g for g in gates if not g["pass"]]
    if not failed:
        return ""
    return "instrument not calibrated: " + "; ".join(f"{g['gate']} ({g['why']})" for g in failed)


def print_gates(gates: list[dict]) -> None:
    for g in gates:
        print(f"[gate {g['gate']}] {'PASS' if g['pass'] else 'FAIL'}: {g['what']} | threshold: {g['threshold']}"
              + (f" | {g['why']}" if g["why"] else ""), flush=True)
