"""The toy benchmark's Pareto plot, drawn with PIL (matplotlib is not a dependency).

Two panels side by side, x = domain score in both: control accuracy (left) and the Fréchet
distance to the domain on a log scale (right). One polyline per series, each point labelled.
"""
from __future__ import annotations

import math
from pathlib import Path

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
                pts.append((x0 + p["x"] * (x1 - x0), y1 - min(max(yv, 0), 1) * (y1 - y0), p.get("tag", "")))
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
