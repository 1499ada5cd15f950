"""The toy benchmark's pictures: the Pareto plot (drawn with PIL: matplotlib is not a dependency), the sample
grid and the ControlNet grid.

The Pareto plot: two panels side by side, x = domain score in both: control accuracy (left) and the Fréchet
distance to the domain on a log scale (right). One polyline per series, each point labelled.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import C_CFGS, CFGS, CNET_CFGS, DOMAIN_WEIGHTS, HEADLINE

PALETTE = [(90, 90, 90), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (23, 190, 207)]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def pareto_png(series: list[dict], path: Path, title: str, fd_floor: float | None = None) -> Path:
    """series: [{"label", "points": [{"x", "y", "fd", "tag"}], "line": bool}] -> PNG at path."""
    from PIL import Image, ImageDraw

    W, H, M = 760, 560, 64  # one panel
    img = Image.new("RGB", (2 * W, H + 150), "white")
    d = ImageDraw.Draw(img)
    f, fs = _font(15), _font(11)
    d.text((M, 10), title, fill="black", font=_font(18))
    fds = [p["fd"] for s in series for p in s["points"] if p.get("fd") and p["fd"] > 0]
    if fd_floor:
        fds.append(fd_floor)
    lo = math.floor(math.log10(min(fds))) if fds else 0
    hi = math.ceil(math.log10(max(fds))) if fds else 1
    hi = max(hi, lo + 1)

    def frame(ox, ylabel, yticks):
        x0, y0, x1, y1 = ox + M, 64, ox + W - 20, H - 40
        d.rectangle([x0, y0, x1, y1], outline="black")
        for v in (0, 0.25, 0.5, 0.75, 1.0):
            x = x0 + v * (x1 - x0)
            d.line([x, y1, x, y1 + 5], fill="black")
            d.text((x - 12, y1 + 8), f"{v:.2f}", fill="black", font=fs)
        for frac, text in yticks:
            y = y1 - frac * (y1 - y0)
            d.line([x0 - 5, y, x0, y], fill="black")
            d.line([x0, y, x1, y], fill=(235, 235, 235))
            d.text((x0 - 48, y - 6), text, fill="black", font=fs)
        d.text(((x0 + x1) // 2 - 60, y1 + 24), "domain score (P(domain style))", fill="black", font=f)
        d.text((ox + 4, y0 - 22), ylabel, fill="black", font=f)
        return x0, y0, x1, y1

    panels = [
        (0, "control accuracy (shape and colour as asked)", [(v, f"{v:.2f}") for v in (0, .25, .5, .75, 1)],
         lambda p: p["y"]),
        (W, "FD to the domain (log scale)", [((e - lo) / (hi - lo), f"1e{e}") for e in range(lo, hi + 1)],
         lambda p: (math.log10(p["fd"]) - lo) / (hi - lo) if p.get("fd") and p["fd"] > 0 else None),
    ]
    for ox, ylabel, ticks, yval in panels:
        x0, y0, x1, y1 = frame(ox, ylabel, ticks)
        if ox and fd_floor:
            y = y1 - (math.log10(fd_floor) - lo) / (hi - lo) * (y1 - y0)
            d.line([x0, y, x1, y], fill=(150, 150, 150), width=1)
            d.text((x0 + 4, y - 14), "real vs real floor", fill=(120, 120, 120), font=fs)
        for i, s in enumerate(series):
            col = PALETTE[i % len(PALETTE)]
            pts = []
            for p in s["points"]:
                yv = yval(p)
                if yv is None:
                    continue
                x, y = x0 + p["x"] * (x1 - x0), y1 - min(max(yv, 0), 1) * (y1 - y0)
                pts.append((x, y, p.get("tag", "")))
                if p.get("xerr"):  # ± sd over seeds
                    d.line([x - p["xerr"] * (x1 - x0), y, x + p["xerr"] * (x1 - x0), y], fill=col, width=1)
                if p.get("yerr") and not ox:
                    d.line([x, y - p["yerr"] * (y1 - y0), x, y + p["yerr"] * (y1 - y0)], fill=col, width=1)
            if s.get("line") and len(pts) > 1:
                d.line([(x, y) for x, y, _ in pts], fill=col, width=2)
            for x, y, tag in pts:
                r = 5
                d.ellipse([x - r, y - r, x + r, y + r], fill=col, outline="black")
                if tag:
                    d.text((x + 6, y - 12), tag, fill=col, font=fs)
    # legend
    ly = H + 10
    for i, s in enumerate(series):
        col = PALETTE[i % len(PALETTE)]
        x = M + (i % 2) * W
        y = ly + (i // 2) * 22
        d.rectangle([x, y + 3, x + 14, y + 15], fill=col, outline="black")
        d.text((x + 20, y), s["label"], fill="black", font=f)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.png")
    img.save(tmp, optimize=True)
    tmp.replace(path)
    return path


def sweep_series(payload: dict) -> list[dict]:
    """The sweep's points; where the spread covers a point, its means over seeds with ± sd bars."""
    rows = payload["points"]
    sweep = [rows[i] for i in payload["results"]["sweep"]]
    spread = payload["derived"].get("spread") or {}

    def pts(sel, tag):
        out = []
        for r in sel:
            st = spread.get(r["family"])
            if st and st["control"]["n"] > 1:
                out.append({"x": st["domain_score"]["mean"], "y": st["control"]["mean"], "fd": st["fd"]["mean"],
                            "xerr": st["domain_score"]["sd"], "yerr": st["control"]["sd"], "tag": tag(r)})
            else:
                out.append({"x": r["domain_score"], "y": r["control"], "fd": r["fd"], "tag": tag(r)})
        return out

    full = [r for r in sweep if r["schedule"] == [0.0, 1.0]]
    series = [{"label": "(a) base + CFG, cfg " + "/".join(f"{c:g}" for c in CFGS), "line": True,
               "points": pts([r for r in full if r["method"] == "a"], lambda r: f"{r['cfg']:g}")},
              {"label": "(b) naive fine-tune + CFG, cfg " + "/".join(f"{c:g}" for c in CFGS), "line": True,
               "points": pts([r for r in full if r["method"] == "b"], lambda r: f"{r['cfg']:g}")}]
    for c in C_CFGS:
        series.append({"label": f"(c) decoupled, cfg {c:g}, w_d " + "/".join(f"{w:g}" for w in DOMAIN_WEIGHTS),
                       "line": True, "points": pts([r for r in full if r["method"] == "c" and r["cfg"] == c],
                                                   lambda r: f"{r['domain_weight']:g}")})
    series.append({"label": "(c) domain term on half the schedule (1st / 2nd)", "line": False,
                   "points": pts([r for r in sweep if r["method"] == "c" and r["schedule"] != [0.0, 1.0]],
                                 lambda r: f"{'1st' if r['schedule'][0] == 0 else '2nd'} {r['domain_weight']:g}/{r['cfg']:g}")})
    series.append({"label": "(d) Domain LoRA (w_d/cfg)", "line": False,
                   "points": pts([r for r in full if r["method"] == "d"],
                                 lambda r: f"{r['domain_weight']:g}/{r['cfg']:g}")})
    return series


def write_pareto(payload: dict, path: Path) -> Path:
    spread = payload["derived"].get("spread") or {}
    seeds = max((v["control"]["n"] for v in spread.values()), default=1)
    title = (f"Toy world, {payload['coverage']} coverage: control vs domain score (left), FD to the domain (right); "
             f"{payload['config']['samples_per_prompt']} samples x {len(payload['world']['prompts'])} prompts per point"
             + (f"; means over {seeds} seeds, bars ± sd" if seeds > 1 else ""))
    return pareto_png(sweep_series(payload), path, title, payload["references"]["fd_real_domain_vs_real_domain"])


def write_grid(payload: dict, samples: dict, metrics, prompts: list[str], n: int, path: Path) -> None:
    """Rows: real domain images of the asked content, then one row per method at a headline point."""
    from ...devkit import toy_world as world

    pick = torch.arange(min(8, len(prompts)))  # the first sample of the first 8 prompts
    rows = [("real domain images", metrics.ref[pick])]
    (wd, c), labels = HEADLINE[0], []
    for pid in (f"a cfg={c:g} seed=0", f"b cfg={c:g} seed=0", f"c cfg={c:g} wd={wd:g} seed=0",
                f"d cfg={c:g} wd={wd:g} seed=0"):
        if pid in samples:
            rows.append((pid, samples[pid][pick]))
            labels.append(pid)
    world.grid_png(rows, path)
    path.with_suffix(".grid.json").write_text(json.dumps(
        {"rows": [r[0] for r in rows], "columns": prompts[:len(pick)], "note": "first sample of each prompt"}, indent=2))


def write_controlnet_grid(samples: dict, metrics, prompts: list[str], path: Path) -> None:
    """The ControlNet experiment, seed 0, the first sample of the first 8 prompts: the hint, then per point its
    samples and, below them, the masks the IoU reads from them (white = shape)."""
    from ...devkit import toy_world as world

    def as_latent(masks):  # a mask drawn as a latent: white on black under to_rgb
        m = masks.float()[:, None] * 2.4 - 1.2
        return torch.cat([m, m, m, torch.zeros_like(m)], 1)

    pick = torch.arange(min(8, len(prompts)))
    rows, labels = [("hint", as_latent(metrics.hint_masks[pick]))], ["hint"]
    for pid in [f"a cfg={CNET_CFGS[0]:g} seed=0"] + [pid for pid in samples if pid.endswith(" seed=0") and " +cn" in pid]:
        if pid in samples:
            rows += [(pid, samples[pid][pick]), (pid + " mask", as_latent(world.detect_mask(samples[pid][pick])))]
            labels += [pid, pid + " (mask read)"]
    world.grid_png(rows, path)
    path.with_suffix(".grid.json").write_text(json.dumps(
        {"rows": labels, "columns": prompts[:len(pick)], "note": "first sample of each prompt"}, indent=2))

