"""The benchmark's tables, printed from its JSON payload."""
from __future__ import annotations

import json

from .. import common


COLUMN = {"control": "control", "domain_score": "domain score", "fd": "FD", "texture_ratio": "texture ratio",
          "control_in_content": "control, domain content", "control_beyond_content": "control, beyond the content"}


def mean_sd_text(stat: dict) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.3g} ± {stat['sd']:.2g}"


def report(payload: dict) -> str:
    rows = payload["points"]
    keys = ["control", "domain_score", "fd", "texture_ratio"]
    if payload["coverage"] == "partial":
        keys += ["control_in_content", "control_beyond_content"]
    head = ["point", *(COLUMN[k] for k in keys)]
    out = []
    reading = payload.get("reading")
    if reading and not reading.get("calibrated"):
        out.append(f"READING NOT CALIBRATED: {reading.get('status')}")
    for exp, ids in payload["results"].items():
        table_rows = []
        spatial = exp == "controlnet"
        for pid in ids:
            r = rows[pid]
            table_rows.append([pid, *(r.get(k) for k in keys), *([r["iou"], r["iou_ge_half"]] if spatial else [])])
        out.append(common.table(head + (["IoU with hint", "IoU >= 0.5"] if spatial else []), table_rows,
                                f"{exp} ({payload['coverage']} coverage)"))
    sp = payload["derived"].get("spread")
    if sp:
        keys = list(next(iter(sp.values())))
        out.append(common.table(["point", *(COLUMN[k] for k in keys)],
                                [[f] + [mean_sd_text(v[k]) for k in keys] for f, v in sp.items()],
                                f"spread over {payload['config']['seeds']} seeds (mean ± sd)"))
    cache = payload["derived"].get("cache")
    if cache:
        keys = ("control", "domain_score", "fd", "texture_ratio")
        out.append(common.table(["point", *keys, "within the uncached spread"],
                                [[f] + [f"{v['cached'][k]['mean']:.3g} ± {v['cached'][k]['sd']:.2g} (uncached "
                                        f"{v['uncached'][k]['mean']:.3g} ± {v['uncached'][k]['sd']:.2g})" for k in keys]
                                 + ["all" if v["all_within"] else
                                    "no: " + ", ".join(k for k in keys if not v["within_uncached_spread"][k])]
                                 for f, v in cache.items()],
                                f"domain caching against the uncached sampler over {payload['config']['seeds']} seeds "
                                "(mean ± sd)"))
    cn = payload["derived"].get("controlnet")
    if cn:
        keys = ("iou", "iou_ge_half", "mask_area_ratio", "control", "domain_score", "fd", "tint_ratio")
        out.append(common.table(["point", "IoU with hint", "IoU >= 0.5", "mask area / hint's", "control",
                                 "domain score", "FD", "tint ratio"],
                                [[f] + [f"{v[k]['mean']:.3g} ± {v[k]['sd']:.2g}" for k in keys] for f, v in cn.items()],
                                f"ControlNet experiment over {payload['config']['seeds']} seeds (mean ± sd)"))
        ref = payload["references"]
        out.append(f"IoU references: real plain / domain images at the hint: {ref['iou_real_plain_at_hint']:.3g} / "
                   f"{ref['iou_real_domain_at_hint']:.3g}; the asked shape at a random position (chance): "
                   f"{ref['iou_asked_shape_random_position']:.3g}")
    diag = payload["derived"].get("diagnosis")
    if diag:
        for fam, steps in diag.items():
            out.append(common.table(["sigma", "|D - u|", "|B(c) - u|", "|D - u| / |B(c) - u|", "cosine", "|u|"],
                                    [[d["sigma"], d["norm_d_minus_u"], d["norm_c_minus_u"],
                                      d["norm_d_minus_u"] / max(d["norm_c_minus_u"], 1e-12), d["cosine"], d["norm_u"]]
                                     for d in steps], f"diagnosis along ({fam}) trajectories, x0 space, batch means"))
    consts = payload["derived"].get("constants")
    if consts:
        out.append(common.table(["sigma", "|B(c) - u| / |u|", "one constant: |D0 - u| / |u|", "/ |B(c) - u|",
                                 "per-level constants: |D0 - u| / |u|", "/ |B(c) - u|"],
                                [[r["sigma"], r["norm_c_minus_u"] / max(r["norm_u"], 1e-12), r["single_err_over_u"],
                                  r["single_err_over_c_minus_u"], r["per_level_err_over_u"],
                                  r["per_level_err_over_c_minus_u"]] for r in consts],
                                "the untrained null-text UNet D0 against the base's u, per noise level (batch means)"))
    over = payload["derived"].get("claim_over_seeds")
    if over:
        out.append(common.table(["front point (means over seeds)", "control", "domain score"],
                                [[f["family"], mean_sd_text(f["control"]), mean_sd_text(f["domain_score"])]
                                 for f in over["front"]],
                                f"the front of (a)-(d) read from the means over {payload['config']['seeds']} seeds "
                                "(mean ± sd)"))
        out.append("claim over seeds: " + json.dumps(over["claim"], indent=1, default=float))
    claim = payload["derived"].get("claim")
    if claim:
        out.append("claim (seed 0): " + json.dumps(claim, indent=1, default=float))
    ref = payload["references"]
    out.append(f"FD floor (real domain vs real domain, same count): {ref['fd_real_domain_vs_real_domain']:.3g}; "
               f"plain vs domain: {ref['fd_real_plain_vs_real_domain']:.3g}; evaluator accuracy "
               f"{ref['evaluator_accuracy_on_fresh_real_data']}; timings {json.dumps(payload['timings_s'], default=float)}")
    return "\n\n".join(out)
