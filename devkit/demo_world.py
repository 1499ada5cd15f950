"""The demo's small world, built so that decoded latents are pictures (see demo/run.py).

A random tiny VAE decodes anything to coloured noise, so nothing on a picture would show what the
pack does. Here instead:

- **A linear VAE.** ComfyUI's loader only takes the full SD VAE layout, so its weights are set by hand
  to a fixed map: the encoder averages each 8x8 pixel block and maps RGB to 4 latent channels
  (R, G, B and their mean, scaled by 1 / 0.18215 so the model sees unit-scale latents); the decoder is
  the least-squares inverse, upsampled by nearest neighbour. Residual branches and attention are zeroed
  (identity blocks). The GroupNorm + SiLU at each end are made linear by carrying each signal as a
  (+s, -s) pair beside a large constant (+K, -K) pair: the group mean is exactly 0, its spread is fixed by K
  (signal-dependence ~1e-4 relative), and silu(s) - silu(-s) = s exactly. So a 64 px picture made of
  8x8-pixel cells encodes to its 8x8 latent exactly, and any latent decodes to a 64 px cell picture.
- **A "plain" world** for the base UNet: one disc (red, green, blue or yellow) on a cream ground,
  prompt "a <colour> disc". The base is trained here, briefly, from its deterministic init (cached).
- **The built-in domain, "sunset stripes"**: the same discs, in all four colours, on pink horizontal bands
  across the cream ground (bands 2 cells high, period 4 cells = 32 px), unlabelled. The pack's trainer
  fine-tunes the domain UNet on these pictures. The bands keep half the base's ground: over dark violet
  bands (`low=VIOLET`) the base's text direction does not carry onto the domain's ground and decoupled
  guidance loses the ask (docs/performance.md, "The demo").
- **The domain statistic**, `stripe_score`: the amplitude of the 32-px horizontal banding (mean over
  columns of the 2-cycles-per-64-px Fourier amplitude of luminance down the column) minus the same
  measured across rows (vertical banding). A disc alone is about isotropic and scores near 0; the
  domain's pictures score about 0.25; anything striped horizontally at the domain's period scores high.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .host import PACK_ROOT, import_comfy
from .tiny_models import SD_VAE_DDCONFIG, init_weights_, tiny_unet_state_dict

WORLD_VERSION = 2              # 2: pink bands, red/blue-only domain, cosine-decayed base
CACHE_DIR = Path(os.environ.get("INDOMAIN_CACHE", PACK_ROOT / ".cache")) / "models"

CELLS = 8                      # latent side; pictures are CELLS * 8 = 64 px
PX = CELLS * 8
LATENT_SCALE = 0.18215         # SD1.5's latent_format.scale_factor
CARRIER = 100.0                # the constant beside each signal in the linear VAE's GroupNorms

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
CREAM = (235, 232, 220)
VIOLET = (40, 16, 60)
WARM = (240, 120, 180)          # the bands' colour: a sunset pink, far from every disc colour (orange was close to yellow)
STRIPE_PERIOD = 4              # cells (2 warm, 2 of the low ground)
DOMAIN_LOW = CREAM             # the bands' other half: the base's own ground
PARTIAL_COLOURS = ("red", "blue")   # --coverage partial: a domain covering only part of what the base can be asked for
GROUNDS = {"cream": CREAM, "violet": VIOLET, "warm": WARM}
MIN_DISC_CELLS = 4             # the control rule: the asked colour covers at least this many cells ...
MIN_GROUND_CELLS = 32          # ... on a ground covering at least half the picture

# model-space latent = RGB_MIX @ pixel (pixel in [-1, 1]); the decoder uses its pseudo-inverse
RGB_MIX = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3]])


def prompt(colour: str) -> str:
    return f"a {colour} disc"


# ----------------------------------------------------------------------------- the linear VAE


def _zero_(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".norm" in f".{name}" or name.startswith("norm"):  # GroupNorms: identity affine
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.zero_()


def _identity_(conv: torch.nn.Module) -> None:
    """A conv (1x1 or 3x3, padding 1) that copies input channel i to output channel i."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        n = min(conv.weight.shape[0], conv.weight.shape[1])
        conv.weight[torch.arange(n), torch.arange(n), k, k] = 1.0


def _carrier_norm_(norm: torch.nn.GroupNorm, n_pairs: int) -> None:
    """GroupNorm over channels laid out as (+s_c, -s_c, +K, -K) for c < n_pairs: affine that undoes the
    (K-fixed) spread on the signal channels and zeroes the carriers."""
    per_group = norm.num_channels // norm.num_groups
    with torch.no_grad():
        norm.weight.zero_()
        norm.bias.zero_()
        for c in range(n_pairs):
            g = (4 * c) // per_group
            carriers_in_group = sum(2 for c2 in range(n_pairs) if (4 * c2) // per_group == g)
            std = CARRIER * math.sqrt(carriers_in_group / per_group)
            norm.weight[4 * c] = std
            norm.weight[4 * c + 1] = std


def linear_vae_state_dict() -> dict[str, torch.Tensor]:
    """The SD VAE (ComfyUI's loader layout) set to the fixed block-average / nearest-upsample map."""
    import_comfy()
    import comfy.ldm.models.autoencoder

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
    _zero_(vae)
    enc, dec = vae.encoder, vae.decoder
    mix = RGB_MIX / LATENT_SCALE                                # (4, 3): pixel -> VAE latent
    unmix = torch.linalg.pinv(RGB_MIX) * LATENT_SCALE           # (3, 4): VAE latent -> pixel
    with torch.no_grad():
        # encoder: RGB in as (+p, -p, +K, -K) quadruples
        w, b = enc.conv_in.weight, enc.conv_in.bias
        for c in range(3):
            w[4 * c, c, 1, 1], w[4 * c + 1, c, 1, 1] = 1.0, -1.0
            b[4 * c + 2], b[4 * c + 3] = CARRIER, -CARRIER
        for level in enc.down:
            for block in level.block:
                if hasattr(block, "nin_shortcut"):
                    _identity_(block.nin_shortcut)
            if hasattr(level, "downsample"):
                ds = level.downsample.conv.weight                # stride-2 3x3 on right/bottom padding: 2x2 mean
                n = ds.shape[0]
                ds[torch.arange(n), torch.arange(n), 0:2, 0:2] = 0.25
        _carrier_norm_(enc.norm_out, 3)
        w = enc.conv_out.weight                                   # 512 -> 8 (mean, logvar); silu(+)-silu(-) = p
        for k in range(4):
            for c in range(3):
                w[k, 4 * c, 1, 1] = mix[k, c]
                w[k, 4 * c + 1, 1, 1] = -mix[k, c]
        _identity_(vae.quant_conv)
        # decoder: latent -> (+p, -p, +K, -K) quadruples, identity blocks, nearest upsampling
        _identity_(vae.post_quant_conv)
        w, b = dec.conv_in.weight, dec.conv_in.bias
        for c in range(3):
            for k in range(4):
                w[4 * c, k, 1, 1] = unmix[c, k]
                w[4 * c + 1, k, 1, 1] = -unmix[c, k]
            b[4 * c + 2], b[4 * c + 3] = CARRIER, -CARRIER
        for level in dec.up:
            for block in level.block:
                if hasattr(block, "nin_shortcut"):
                    _identity_(block.nin_shortcut)
            if hasattr(level, "upsample"):
                _identity_(level.upsample.conv)
        _carrier_norm_(dec.norm_out, 3)
        w = dec.conv_out.weight
        for c in range(3):
            w[c, 4 * c, 1, 1], w[c, 4 * c + 1, 1, 1] = 1.0, -1.0
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}


def cells_to_latent(cells: torch.Tensor) -> torch.Tensor:
    """(N, 3, 8, 8) RGB in [0, 1] -> (N, 4, 8, 8) model-space latents (what the linear VAE + process_in give)."""
    return torch.einsum("kc,nchw->nkhw", RGB_MIX, cells * 2 - 1)


def latent_to_cells(latent: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> RGB cells in [0, 1] (what VAEDecode shows, before 8x upsampling)."""
    return ((torch.einsum("ck,nkhw->nchw", torch.linalg.pinv(RGB_MIX), latent) + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------- the worlds


def _rgb(c) -> torch.Tensor:
    return torch.tensor(c, dtype=torch.float32) / 255


def render(colour: str, style: str, cx: float, cy: float, radius: float, phase: int = 0,
           warm: tuple | None = None, low: tuple = DOMAIN_LOW) -> torch.Tensor:
    """One picture as (3, 8, 8) RGB cells in [0, 1]: a disc of `colour` on the style's ground."""
    ii, jj = torch.meshgrid(torch.arange(CELLS, dtype=torch.float32), torch.arange(CELLS, dtype=torch.float32),
                            indexing="ij")
    disc = (((ii + 0.5 - cy) ** 2 + (jj + 0.5 - cx) ** 2) <= radius ** 2).float()
    if style == "plain":
        ground = _rgb(CREAM).view(3, 1, 1).expand(3, CELLS, CELLS)
    elif style == "sunset":
        band = (((ii + phase) % STRIPE_PERIOD) < STRIPE_PERIOD // 2).float()
        ground = band * _rgb(warm or WARM).view(3, 1, 1) + (1 - band) * _rgb(low).view(3, 1, 1)
    else:
        raise ValueError(f"unknown style {style!r}")
    return disc * _rgb(COLOURS[colour]).view(3, 1, 1) + (1 - disc) * ground


def random_pictures(n: int, style: str, gen: torch.Generator,
                    colours=None, low: tuple = DOMAIN_LOW) -> tuple[torch.Tensor, list[str]]:
    """n random pictures of a style as (n, 3, 8, 8) cells, and the colour of each disc (drawn from `colours`,
    default all four)."""
    names = list(colours or COLOURS)
    cells, colours = [], []
    for _ in range(n):
        colour = names[int(torch.randint(0, len(names), (1,), generator=gen))]
        r = 1.6 + 0.9 * float(torch.rand((), generator=gen))
        cx, cy = (r + (CELLS - 2 * r) * torch.rand(2, generator=gen)).tolist()
        phase = int(torch.randint(0, STRIPE_PERIOD, (1,), generator=gen))
        warm = (WARM[0], WARM[1] - 20 + int(torch.randint(0, 40, (1,), generator=gen)),
                WARM[2] - 20 + int(torch.randint(0, 40, (1,), generator=gen)))
        cells.append(render(colour, style, cx, cy, r, phase, warm, low))
        colours.append(colour)
    return torch.stack(cells), colours


def to_pixels(cells: torch.Tensor) -> np.ndarray:
    """(N, 3, 8, 8) cells -> (N, 64, 64, 3) uint8 pictures (each cell an 8x8 block)."""
    up = cells.repeat_interleave(PX // CELLS, dim=2).repeat_interleave(PX // CELLS, dim=3)
    return (up.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def write_pictures(folder: Path, cells: torch.Tensor, prefix: str) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, px in enumerate(to_pixels(cells)):
        tmp = folder / f".{prefix}_{i:03d}.partial.png"
        Image.fromarray(px).save(tmp)
        tmp.replace(folder / f"{prefix}_{i:03d}.png")
    return folder


def draw_domain_pictures(folder: Path, count: int, seed: int = 0, colours=None, low: tuple = DOMAIN_LOW) -> Path:
    """The built-in domain ('sunset stripes'), `count` unlabelled 64 px PNGs: discs of every colour (or of
    `colours`) on pink bands over `low`."""
    cells, _ = random_pictures(count, "sunset", torch.Generator().manual_seed(seed), colours, low)
    return write_pictures(folder, cells, "sunset")


# ----------------------------------------------------------------------------- the domain statistic


def stripe_score(pictures: np.ndarray) -> np.ndarray:
    """Per picture: horizontal banding at the domain's period minus vertical banding at the same period.

    `pictures`: (N, H, W, 3) uint8 or float in [0, 1] (any H divisible by the period's pixel length).
    Luminance Y; amplitude of the Fourier component with H / (STRIPE_PERIOD * 8) cycles per picture height,
    along every column (averaged over columns) minus the same along every row. Pure horizontal square-wave
    bands of luminance contrast dY score about (4 / pi) * dY / 2; an isotropic blob scores near 0.
    """
    x = np.asarray(pictures, dtype=np.float64)
    if x.max() > 1.5:
        x = x / 255.0
    y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114   # (N, H, W)
    n, h, w = y.shape
    k = h // (STRIPE_PERIOD * (h // CELLS))
    down = np.abs(np.fft.rfft(y, axis=1)[:, k, :]) * 2 / h             # along columns: (N, W)
    across = np.abs(np.fft.rfft(y, axis=2)[:, :, k]) * 2 / w           # along rows: (N, H)
    return down.mean(axis=1) - across.mean(axis=1)


def cell_classes(pictures: np.ndarray) -> np.ndarray:
    """Per picture and 8x8-pixel cell, the nearest palette colour (RGB distance of the cell's mean):
    indices into PALETTE = the four disc colours, then the grounds (cream, violet, warm). (N, 8, 8) ints."""
    x = np.asarray(pictures, dtype=np.float64)
    if x.max() <= 1.5:
        x = x * 255.0
    n, h, w, _ = x.shape
    cells = x.reshape(n, CELLS, h // CELLS, CELLS, w // CELLS, 3).mean(axis=(2, 4))       # (N, 8, 8, 3)
    palette = np.array([COLOURS[c] for c in COLOURS] + list(GROUNDS.values()), dtype=np.float64)
    return np.argmin(((cells[..., None, :] - palette) ** 2).sum(-1), axis=-1)


PALETTE = list(COLOURS) + list(GROUNDS)


def follows_ask(pictures: np.ndarray, asked: list[str]) -> np.ndarray:
    """The control rule (fixed, not learned), per picture: True when the asked disc colour covers at least
    MIN_DISC_CELLS cells, more than any other disc colour, and the grounds cover at least MIN_GROUND_CELLS
    (so a picture flooded with the colour, or blotches of every colour, does not count)."""
    cls = cell_classes(pictures).reshape(len(asked), -1)
    counts = np.stack([(cls == i).sum(axis=1) for i in range(len(PALETTE))], axis=1)   # (N, palette)
    discs = counts[:, :len(COLOURS)]
    out = []
    for row, d, colour in zip(counts, discs, asked):
        k = list(COLOURS).index(colour)
        others = np.delete(d, k)
        out.append(bool(d[k] >= MIN_DISC_CELLS and d[k] > others.max() and row[len(COLOURS):].sum() >= MIN_GROUND_CELLS))
    return np.array(out)


def control_score(pictures: np.ndarray, asked: list[str]) -> float:
    """The fraction of pictures that follow the ask (follows_ask)."""
    return float(follows_ask(pictures, asked).mean())


def load_pictures(paths) -> np.ndarray:
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB").resize((PX, PX), Image.NEAREST)))
    return np.stack(out)


# ----------------------------------------------------------------------------- the base checkpoint


def _encode(clip, text: str) -> torch.Tensor:
    cond, _pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return cond.detach().float().cpu()


def base_lr_at(lr: float, step: int, steps: int, warmup: int = 30) -> float:
    """The base's learning rate: linear warm-up, then a cosine decay to 0 at `steps` (a constant rate left
    the loss stalling and the pictures blotchy; the toy benchmark found the same)."""
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(1, steps)))


def train_base_unet(steps: int, batch: int, lr: float, seed: int = 0, p_uncond: float = 0.15, log=print):
    """The tiny SD15-layout UNet trained from its deterministic init on the plain world (text-conditioned
    on the checkpoint's own CLIP-L, with empty-prompt dropout so CFG has an unconditional)."""
    import_comfy()
    import comfy.model_management
    import comfy.sd

    from ..forms.model import detached_unet_copy, native_target, noisy_inputs, sample_sigmas

    model = comfy.sd.load_diffusion_model_state_dict(tiny_unet_state_dict(seed), model_options={"dtype": torch.float32})
    clip = comfy.sd.CLIP(model.model.model_config.clip_target(), model_options={"dtype": torch.float32})
    init_weights_(clip.cond_stage_model, seed + 1)   # the same text encoder as devkit's tiny checkpoints
    ms = model.get_model_object("model_sampling")
    names = list(COLOURS)
    contexts = torch.cat([_encode(clip, prompt(c)) for c in names])
    empty = _encode(clip, "")
    unet = detached_unet_copy(model)
    for p in unet.parameters():
        p.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    # Adam's second moments of tiny gradients can go subnormal; subnormal arithmetic is slow on CPU
    # (a guard; not measured here)
    flush = torch.set_flush_denormal(True)
    with torch.inference_mode(False), torch.enable_grad():
        for step in range(steps):
            cells, colours = random_pictures(batch, "plain", gen)
            x0 = cells_to_latent(cells)
            ctx = contexts[torch.tensor([names.index(c) for c in colours])].clone()
            ctx[torch.rand(batch, generator=gen) < p_uncond] = empty
            sigma = sample_sigmas(ms, batch, gen)
            noise = torch.randn(x0.shape, generator=gen)
            xc, t, x_noisy = noisy_inputs(ms, x0, sigma, noise)
            for g in opt.param_groups:
                g["lr"] = base_lr_at(lr, step, steps)
            loss = torch.nn.functional.mse_loss(unet(xc, t, context=ctx), native_target(ms, sigma, x0, noise, x_noisy))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if (step + 1) % max(1, steps // 8) == 0 or step == 0 or step + 1 == steps:
                log(f"    base step {step + 1}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}  "
                    f"{(time.perf_counter() - t0) / (step + 1):.2f} s/step")
    if flush:
        torch.set_flush_denormal(False)
    sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    del unet, opt, model
    comfy.model_management.unload_all_models()
    return sd, clip



def demo_checkpoint(steps: int = 200, batch: int = 16, lr: float = 8e-4, seed: int = 0, log=print) -> Path:
    """The demo's base checkpoint (cached under .cache/models by its settings): the briefly trained tiny
    UNet, the deterministic random CLIP-L of the tiny checkpoints and the linear VAE."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"demo_base_w{WORLD_VERSION}_s{seed}_n{steps}_b{batch}_lr{lr:g}.safetensors"
    if path.exists():
        log(f"    cached: {path}")
        return path
    import_comfy()
    import comfy.model_management
    import comfy.sd

    from ..guidance.checkpoint import save_safetensors_atomic

    log(f"    training the base UNet on the plain world ({steps} steps, batch {batch}, lr {lr:g}; cached after)")
    unet_sd, clip = train_base_unet(steps, batch, lr, seed, log=log)
    model = comfy.sd.load_diffusion_model_state_dict(dict(unet_sd), model_options={"dtype": torch.float32})
    vae = comfy.sd.VAE(sd=linear_vae_state_dict())
    comfy.model_management.load_models_gpu([model, clip.load_model()], force_patch_weights=True)
    if hasattr(model, "state_dict_for_saving"):
        sd = model.state_dict_for_saving(clip.state_dict_for_saving(), vae.get_sd(), None)
    else:  # 0.3.75
        sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    # fp32 for the VAE (its carriers and exact 0.25 / +-1 weights are exact in fp16 too, but the UNet
    # and CLIP don't need more than fp16)
    sd = {k: (v.float() if k.startswith("first_stage_model.") else v.half()) if v.is_floating_point() else v
          for k, v in sd.items()}
    save_safetensors_atomic(sd, path, {"indomain.tiny": "demo-base", "steps": str(steps), "seed": str(seed)})
    comfy.model_management.unload_all_models()
    return path
