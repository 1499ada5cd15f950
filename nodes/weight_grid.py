"""Domain Weight Grid: one prompt, one seed, a labelled grid over domain weight x cfg, to pick weights by looking.
Wiring only: each cell is the Domain KSampler's own guider and sampling call."""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import torch
from comfy_api.latest import io

from .guidance_nodes import TIP_BASE, TIP_CFG, TIP_DOMAIN, TIP_DOMAIN_WEIGHT
from ..sampling.guider import domain_guider, sample_with_guider
from .search import search_aliases
from .validation import combo_problem, first_problem

MAX_VALUES = 8  # per axis: a grid of at most 64 samplings


def parse_values(text: str, what: str, low: float, high: float) -> list[float]:
    """'0, 1.5, 2' -> [0.0, 1.5, 2.0]; refuses empty lists, non-numbers, values out of range and too many values."""
    parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"Domain Weight Grid: {what} must be numbers separated by commas (e.g. '0, 1, 2, 3'), "
                         f"got {text!r}") from None
    if not values:
        raise ValueError(f"Domain Weight Grid: {what} is empty; give at least one number (e.g. '2.0').")
    if len(values) > MAX_VALUES:
        raise ValueError(f"Domain Weight Grid: {what} has {len(values)} values; at most {MAX_VALUES} per axis.")
    bad = [v for v in values if not (low <= v <= high)]
    if bad:
        raise ValueError(f"Domain Weight Grid: {what} value(s) {bad} outside [{low}, {high}].")
    return values


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def label_grid(cells: list[list[torch.Tensor]], rows: list[float], cols: list[float]) -> torch.Tensor:
    """cells[r][c]: (H, W, 3) images in [0, 1] -> one (1, H', W', 3) IMAGE with a header row (cfg) and a header
    column (domain weight)."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[:2]
    font_px = max(10, min(h, w) // 8)
    head_h, head_w, gap = font_px * 2, font_px * 5, max(1, min(h, w) // 64)
    grid = Image.new("RGB", (head_w + len(cols) * (w + gap), head_h + len(rows) * (h + gap)), (255, 255, 255))
    draw, font = ImageDraw.Draw(grid), _font(font_px)
    for c, cfg in enumerate(cols):
        draw.text((head_w + c * (w + gap) + w // 2, head_h // 2), f"cfg {cfg:g}", fill=(0, 0, 0), font=font,
                  anchor="mm")
    for r, weight in enumerate(rows):
        y = head_h + r * (h + gap)
        draw.text((head_w // 2, y + h // 2), f"w_d {weight:g}", fill=(0, 0, 0), font=font, anchor="mm")
        for c in range(len(cols)):
            pixels = (cells[r][c].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
            grid.paste(Image.fromarray(pixels[..., :3]), (head_w + c * (w + gap), y))
    return torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0).unsqueeze(0)


class DomainWeightGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InDomainWeightGrid", **search_aliases("InDomainWeightGrid"),
            display_name="Domain Weight Grid",
            category="InDomain",
            description="Samples one prompt with one seed for every domain weight x cfg pair (the same noise in every "
                        "cell) and returns a labelled grid, so you can pick the two weights by looking. Costs one "
                        "Domain KSampler run per cell.",
            inputs=[
                io.Model.Input("model", tooltip=TIP_BASE),
                io.Model.Input("domain_model", tooltip=TIP_DOMAIN),
                io.Vae.Input("vae", tooltip="The base checkpoint's VAE: decodes every cell."),
                io.Conditioning.Input("positive", tooltip="Text prompt (optionally with a ControlNet): the control condition c."),
                io.Conditioning.Input("negative", tooltip="Empty prompt or your negative prompt: the unconditional ∅."),
                io.Latent.Input("latent_image", tooltip="Empty latent (size of each cell). Only the first image of a "
                                "batch is shown in the grid."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the initial noise, the same in every cell."),
                io.Int.Input("steps", default=25, min=1, max=10000, tooltip="Denoising steps per cell."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="dpmpp_2m",
                               tooltip="Sampling algorithm (as in KSampler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="karras",
                               tooltip="Noise schedule (as in KSampler)."),
                io.String.Input("domain_weights", default="0, 1, 2, 3",
                                tooltip="Rows: domain weights w_d, comma-separated (at most 8). " + TIP_DOMAIN_WEIGHT),
                io.String.Input("cfgs", default="1.5, 2.5, 4", tooltip="Columns: control weights (cfg), "
                                "comma-separated (at most 8). " + TIP_CFG),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="The labelled grid (rows w_d, columns cfg)."),
                     io.Image.Output(display_name="cells", tooltip="Every cell's image, row by row, unlabelled.")],
        )

    @classmethod
    def validate_inputs(cls, sampler_name=None, scheduler=None, domain_weights=None, cfgs=None) -> bool | str:
        """ComfyUI 0.3.75 does not check a V3 node's combo values; the value lists are checked here too, so a
        bad prompt is refused at POST /prompt instead of failing after some cells have run."""
        problems = [combo_problem("sampler_name", sampler_name, comfy.samplers.SAMPLER_NAMES),
                    combo_problem("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES)]
        for text, name, low, high in ((domain_weights, "domain_weights", -10.0, 30.0), (cfgs, "cfgs", 0.0, 100.0)):
            if isinstance(text, str):
                try:
                    parse_values(text, name, low, high)
                except ValueError as e:
                    problems.append(str(e))
        return first_problem(*problems)

    @classmethod
    def execute(cls, model, domain_model, vae, positive, negative, latent_image, seed, steps, sampler_name, scheduler,
                domain_weights, cfgs) -> io.NodeOutput:
        rows = parse_values(domain_weights, "domain_weights", -10.0, 30.0)
        cols = parse_values(cfgs, "cfgs", 0.0, 100.0)
        cells = []
        for weight in rows:
            row = []
            for cfg in cols:
                comfy.model_management.throw_exception_if_processing_interrupted()
                guider = domain_guider(model, domain_model, positive, negative, cfg, weight)
                latent = sample_with_guider(guider, model, seed, steps, sampler_name, scheduler, latent_image)
                row.append(vae.decode(latent["samples"][:1])[0])
            cells.append(row)
        flat = torch.stack([img for row in cells for img in row])
        return io.NodeOutput(label_grid(cells, rows, cols), flat)
