"""The evaluator's reading of a point (control, domain score, FD, texture and tint ratios, IoU with a hint)
against references of the same asked content and count; the spread and the claim's questions."""
from __future__ import annotations

import statistics

import torch

class Metrics:
    """Evaluator + the references every point is measured against (same asked content, same count)."""

    def __init__(self, evaluator, combos_asked: list[tuple[str, str]], coverage: str, seed: int,
                 hint_offsets: torch.Tensor | None = None):
        from ...devkit import toy_world as world

        self.world, self.net = world, evaluator
        self.combos = combos_asked
        gen = torch.Generator().manual_seed(seed + 200)
        self.ref = world.render_list(combos_asked, gen, "domain")
        ref2 = world.render_list(combos_asked, gen, "domain")
        plain = world.render_list(combos_asked, gen, "plain")
        self.ask_shape = torch.tensor([world.SHAPES.index(s) for s, _ in combos_asked])
        self.ask_colour = torch.tensor([world.COLOURS.index(c) for _, c in combos_asked])
        content = world.coverage_combos(coverage)
        self.in_content = torch.tensor([c in content for c in combos_asked])
        with torch.no_grad():
            self.ref_feat = evaluator.features(self.ref)
        self.ref_texture = float(world.texture_level(self.ref).mean())
        self.ref_tint = float(world.tint_level(self.ref).mean())
        self.references = {"fd_real_domain_vs_real_domain": self.fd(ref2), "fd_real_plain_vs_real_domain": self.fd(plain),
                           "kid_real_domain_vs_real_domain": self.kid(ref2), "kid_real_plain_vs_real_domain": self.kid(plain),
                           "texture_ratio_real_plain": float(world.texture_level(plain).mean()) / self.ref_texture,
                           "texture_ratio_real_domain_second_set": float(world.texture_level(ref2).mean()) / self.ref_texture}
        self.hint_masks = None
        if hint_offsets is not None:
            # the ControlNet experiment's hints: sample k's hint is the asked shape's mask at hint_offsets[k]
            at = [(s, c, int(o[0]), int(o[1])) for (s, c), o in zip(combos_asked, hint_offsets)]
            self.hint_masks = torch.stack([world.shape_mask(s, dx, dy) for s, _, dx, dy in at])
            real = {style: torch.stack([world.render(s, c, style, dx, dy, gen) for s, c, dx, dy in at])
                    for style in ("plain", "domain")}
            # agreement by chance: the asked shape at independent random positions (mean of 32 draws)
            rnd = torch.randint(0, world.MAX_OFFSET + 1, (32, len(at), 2), generator=gen)
            chance = [float(world.iou(torch.stack([world.shape_mask(s, int(o[0]), int(o[1]))
                                                   for (s, _c), o in zip(combos_asked, offs)]), self.hint_masks).mean())
                      for offs in rnd]
            self.references.update({
                "iou_real_plain_at_hint": float(world.iou(world.detect_mask(real["plain"]), self.hint_masks).mean()),
                "iou_real_domain_at_hint": float(world.iou(world.detect_mask(real["domain"]), self.hint_masks).mean()),
                "iou_asked_shape_random_position": statistics.fmean(chance)})

    def spatial(self, lat: torch.Tensor) -> dict:
        """Agreement of each sample's shape mask (toy_world.detect_mask) with its hint: mean IoU, the fraction
        of samples with IoU >= 0.5, and the detected area over the hint's (below 1: shapes missing or small;
        above 1: background read as shape)."""
        found = self.world.detect_mask(lat)
        v = self.world.iou(found, self.hint_masks)
        area = found.flatten(1).sum(1).float() / self.hint_masks.flatten(1).sum(1)
        return {"iou": float(v.mean()), "iou_ge_half": float((v >= 0.5).float().mean()),
                "mask_area_ratio": float(area.mean())}

    def fd(self, x: torch.Tensor) -> float:
        with torch.no_grad():
            return self.world.frechet_distance(self.net.features(x), self.ref_feat)

    def kid(self, x: torch.Tensor) -> float:
        with torch.no_grad():
            return self.world.kid(self.net.features(x), self.ref_feat)

    def per_sample(self, lat: torch.Tensor) -> dict:
        """Per sample: control (asked shape and colour, 0 for a rejected off-data sample) and P(domain)."""
        ev = self.world.evaluate(self.net, lat, self.ask_shape, self.ask_colour)
        return {"control": ev["shape_ok"] * ev["colour_ok"], "p_domain": ev["p_domain"]}

    def __call__(self, lat: torch.Tensor) -> dict:
        """The reading of one point. A sample the evaluator rejects as off the data (noise, saturated) counts as
        showing neither the asked shape nor colour, and `off_data` counts them."""
        ev = self.world.evaluate(self.net, lat, self.ask_shape, self.ask_colour)
        both = ev["shape_ok"] * ev["colour_ok"]
        row = {"samples": len(lat), "control": float(both.mean()),
               "shape_acc": float(ev["shape_ok"].mean()), "colour_acc": float(ev["colour_ok"].mean()),
               "domain_score": float(ev["p_domain"].mean()), "off_data": float(ev["off_data"].float().mean()),
               "fd": self.fd(lat), "kid": self.kid(lat),
               "texture_ratio": float(self.world.texture_level(lat).mean()) / self.ref_texture,
               "tint_ratio": float(self.world.tint_level(lat).mean()) / self.ref_tint}
        if not bool(self.in_content.all()):
            row["control_in_content"] = float(both[self.in_content].mean()) if self.in_content.any() else None
            row["control_beyond_content"] = float(both[~self.in_content].mean())
        return row


def mean_sd(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:  # e.g. control on the domain's content when no asked prompt lies inside it
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def dominates(p: dict, q: dict) -> bool:
    return (p["control"] >= q["control"] and p["domain_score"] >= q["domain_score"]
            and (p["control"] > q["control"] or p["domain_score"] > q["domain_score"]))


def summarise(rows: dict, sweep_ids: list[str]) -> dict:
    """The claim's questions, answered from the sweep's rows (one seed's points, or per-family means)."""
    sw = {i: rows[i] for i in sweep_ids}
    by = {m: [r for r in sw.values() if r["method"] == m and r["schedule"] == [0.0, 1.0]] for m in "abcd"}
    if not (by["a"] and by["b"] and by["c"]):
        return {}
    best_a = max(by["a"], key=lambda r: r["control"])
    per_b = []
    for rb in by["b"]:
        dom = [r for r in by["c"] if dominates(r, rb)]
        reach = [r for r in by["c"] if r["domain_score"] >= rb["domain_score"]]
        best = max(reach, key=lambda r: r["control"]) if reach else None
        per_b.append({"b": rb["id"], "dominated_by_c": [r["id"] for r in dom],
                      "best_c_at_b_domain_score": best and best["id"],
                      "control_gap_to_best_a": best and best_a["control"] - best["control"],
                      "c_control_minus_b": best and best["control"] - rb["control"],
                      "fd_c_over_fd_b": best and best["fd"] / rb["fd"]})
    c_dominated = [r["id"] for r in by["c"] if any(dominates(rb, r) for rb in by["b"])]
    return {"best_a": {"id": best_a["id"], "control": best_a["control"], "domain_score": best_a["domain_score"]},
            "c_pareto_dominates_b": all(x["dominated_by_c"] for x in per_b), "per_b_point": per_b,
            "c_points_dominated_by_some_b": c_dominated}


def front(rows: list[dict]) -> list[dict]:
    """The rows no other row dominates (control and domain score), by descending control."""
    return sorted([r for r in rows if not any(dominates(q, r) for q in rows)], key=lambda r: -r["control"])


def summarise_over_seeds(stats: dict, rows: dict, ids: list[str]) -> dict:
    """The claim's questions answered from the means over seeds (`stats`: family -> key -> mean_sd), and the front
    of every method together (full schedule, no remedy) with each point's mean ± sd: a front point whose sd
    reaches its neighbour's mean is not separated from it."""
    first = {}
    for pid in ids:
        first.setdefault(rows[pid]["family"], rows[pid])
    mean_rows = {f: {"id": f, "method": r["method"], "schedule": r["schedule"],
                     **{k: stats[f][k]["mean"] for k in ("control", "domain_score", "fd")}}
                 for f, r in first.items()}
    full = [r for r in mean_rows.values() if r["schedule"] == [0.0, 1.0]]
    return {"claim": summarise(mean_rows, list(mean_rows)),
            "front": [{"family": r["id"], "method": r["method"],
                       **{k: stats[r["id"]][k] for k in ("control", "domain_score")}} for r in front(full)]}
