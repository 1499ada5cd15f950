"""The per-step training loss as a picture and as core's LOSS_MAP.

The trainer writes `NAME.loss.png` next to the checkpoint at every save: the raw per-step loss
(light) and its trailing moving average (dark), because a diffusion loss is dominated by the
random noise level of each step and only its average shows the trend. PIL only; no plotting
library.

`loss_map(losses)` is the shape core's training nodes pass between them (`{"loss": [floats]}`,
the LOSS_MAP type read by core's "Plot Loss Graph" node in ComfyUI 0.3.75 and 0.33).
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

LOSS_CURVE_SUFFIX = ".loss.png"


def loss_curve_path(out_path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + LOSS_CURVE_SUFFIX)


def loss_map(losses) -> dict:
    """Core's LOSS_MAP value: {"loss": [one float per optimizer step]}."""
    return {"loss": [float(x) for x in losses]}


def default_window(count: int) -> int:
    """About a tenth of the run, between 1 and 100 steps."""
    return max(1, min(100, count // 10))


def moving_average(values, window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    if window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    out, total = [], 0.0
    values = [float(v) for v in values]
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def draw_loss_curve(losses, window: int | None = None, first_step: int = 1, size=(800, 480)):
    """A PIL image of the loss per step with its moving average, labelled axes and value range."""
    from PIL import Image, ImageDraw, ImageFont

    values = [float(v) for v in losses if math.isfinite(float(v))]
    width, height = size
    left, right, top, bottom = 64, 16, 28, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(120, 120, 120))
    if not values:
        draw.text((left + 8, top + 8), "no loss values yet", fill="black", font=font)
        return img
    window = window or default_window(len(values))
    avg = moving_average(values, window)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * max(abs(lo), 1e-3), hi + 0.5 * max(abs(hi), 1e-3)
    n = len(values)

    def point(i, v):
        x = left + (plot_w * i / (n - 1) if n > 1 else plot_w / 2)
        y = top + plot_h * (1.0 - (v - lo) / (hi - lo))
        return (x, y)

    if n == 1:
        x, y = point(0, values[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(40, 70, 200))
    else:
        draw.line([point(i, v) for i, v in enumerate(values)], fill=(170, 190, 235), width=1)
        draw.line([point(i, v) for i, v in enumerate(avg)], fill=(20, 40, 150), width=2)
    last = first_step + n - 1
    draw.text((left, 8), f"training loss, steps {first_step}-{last}; dark: mean of the last {window} step(s)",
              fill="black", font=font)
    draw.text((4, top - 4), _fmt(hi), fill="black", font=font)
    draw.text((4, top + plot_h - 8), _fmt(lo), fill="black", font=font)
    draw.text((left, top + plot_h + 6), str(first_step), fill="black", font=font)
    draw.text((left + plot_w - 6 * len(str(last)), top + plot_h + 6), str(last), fill="black", font=font)
    draw.text((left + plot_w // 2 - 12, top + plot_h + 18), "step", fill="black", font=font)
    draw.text((left + 6, top + plot_h - 16), f"last average {_fmt(avg[-1])}", fill=(20, 40, 150), font=font)
    return img


def save_png_atomic(img, path) -> Path:
    """Write a PIL image as PNG through a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return path


def write_loss_curve(losses, path, window: int | None = None) -> Path:
    return save_png_atomic(draw_loss_curve(losses, window), path)
