"""A procedural toy world that lives in latent space (see ../shared/DESIGN.md, "A toy world").

"Images" are 4-channel 8x8 latents in the model's own space (what the UNet sees after
`latent_format.process_in`): a shape painted with a colour vector into channels 0-2 and its
mask into channel 3. Two styles:

- plain: flat background, flat colour (the base model's world, every shape x colour);
- domain: a tinted background with a checkerboard texture in channel 3 (its phase drawn per image:
  the texture has no fixed position) and a shifted palette (the "unlabelled domain images"), drawn
  only for the coverage's content in the training set, but renderable for any shape/colour so the
  evaluators know what a held-out combination looks like in the domain style.

Also the evaluators trained inside the benchmark: a small CNN with shape / colour / style
heads (style: plain, domain or off-data) whose penultimate layer is the feature space of the Fréchet
distance and of KID, trained on perturbed real images (`perturb`) and off-data images (`off_data_images`);
the domain itself is read by a fixed rule from its two known marks (`domain_marks`: texture and
background tint), since the style head called imperfect plain samples "domain" (docs/claim.md, G4);
and, for spatial control, a fixed rule that reads a latent's shape mask (`detect_mask`), the IoU of two
masks and the ControlNet hint image of a mask (`hint_image`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

SHAPES = ("square", "ring", "cross", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
DOMAIN_SHAPES = ("square", "ring")
DOMAIN_COLOURS = ("red", "blue")
SIZE = 8
SHAPE_SIZE = 5
MAX_OFFSET = SIZE - SHAPE_SIZE  # top-left corner in 0..MAX_OFFSET

COLOUR_VECTORS = {
    "red": (1.0, -0.6, -0.6),
    "green": (-0.6, 1.0, -0.6),
    "blue": (-0.6, -0.6, 1.0),
    "yellow": (0.9, 0.9, -0.8),
}
# domain palette: every colour pulled towards a warm tint; background tinted, textured
DOMAIN_TINT = torch.tensor([0.35, 0.15, -0.35])
DOMAIN_PALETTE_MIX = 0.75
DOMAIN_TEXTURE_AMPLITUDE = 0.7
# 2: the checker's phase is drawn per image (1: one fixed phase, which a conv UNet can only place from the image's
#    borders); the texture and tint statistics read the background, wherever the texture's phase
DOMAIN_WORLD_VERSION = 2
PLAIN_MASK_LEVEL = 0.8
PLAIN_BACKGROUND_CH3 = -0.8


def _masks() -> dict[str, torch.Tensor]:
    n = SHAPE_SIZE
    square = torch.ones(n, n)
    ring = torch.ones(n, n)
    ring[1:-1, 1:-1] = 0
    cross = torch.zeros(n, n)
    cross[n // 2, :] = 1
    cross[:, n // 2] = 1
    tri = torch.tril(torch.ones(n, n))
    return {"square": square, "ring": ring, "cross": cross, "triangle": tri}


MASKS = _masks()


def prompt(shape: str, colour: str) -> str:
    return f"a {colour} {shape}"


def all_combos() -> list[tuple[str, str]]:
    return [(s, c) for s in SHAPES for c in COLOURS]


def domain_combos() -> list[tuple[str, str]]:
    return [(s, c) for s in DOMAIN_SHAPES for c in DOMAIN_COLOURS]


def in_domain(shape: str, colour: str) -> bool:
    return shape in DOMAIN_SHAPES and colour in DOMAIN_COLOURS


COVERAGES = ("full", "partial")


def coverage_combos(coverage: str) -> list[tuple[str, str]]:
    """The content of the domain's training images: "full" every shape x colour (the paper's
    setting: the domain holds what the prompts ask for, unlabelled), "partial" 2 shapes x 2 colours
    (prompts beyond the domain's content)."""
    if coverage == "full":
        return all_combos()
    if coverage == "partial":
        return domain_combos()
    raise ValueError(f"coverage must be one of {', '.join(COVERAGES)} (got {coverage!r})")


def _checker(phase: int = 0) -> torch.Tensor:
    ii, jj = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    return ((ii + jj + phase) % 2).float() * 2 - 1


def background_colour(latents: torch.Tensor) -> torch.Tensor:
    """(N, 3, 1, 1): each image's background colour, the per-channel median of channels 0-2. The shape covers at
    most 25 of the 64 pixels, so the median is a background pixel's colour whatever its level."""
    return latents[:, :3].float().flatten(2).median(dim=2).values[..., None, None]


def colour_mask(latents: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
    """(N, 8, 8) bool: the pixels whose colour lies farther than `threshold` (default MASK_COLOUR_THRESHOLD) from
    the background's."""
    threshold = MASK_COLOUR_THRESHOLD if threshold is None else threshold
    return (latents[:, :3].float() - background_colour(latents)).norm(dim=1) > threshold


# Background pixels for the texture: colour within 0.5 of the background's. Looser than the shape rule's 0.4, so that
# noise of sd 0.25 (G1's perturbations) still leaves whole 2x2 windows of background; every palette colour lies 0.83
# or more from its style's background.
TEXTURE_BACKGROUND_THRESHOLD = 0.5


def texture_level(latents: torch.Tensor) -> torch.Tensor:
    """Per image, the domain's texture: over every 2x2 window of background pixels (colour within
    TEXTURE_BACKGROUND_THRESHOLD of the background's), the mean
    |checker component| of channel 3, (a - b - c + d) / 4 for the window [[a, b], [c, d]]. It reads a checker of
    either phase, or patches of both, at its amplitude: real domain images about DOMAIN_TEXTURE_AMPLITUDE, plain
    images about 0.02 (their noise). A sample's level over real domain images' level is the overshoot ratio
    (1.0 = right, above 1 = exaggerated); 0 where no window is background."""
    x = latents[:, 3].float()
    component = (x[:, :-1, :-1] - x[:, :-1, 1:] - x[:, 1:, :-1] + x[:, 1:, 1:]).abs() / 4
    bg = ~colour_mask(latents, TEXTURE_BACKGROUND_THRESHOLD)
    window = bg[:, :-1, :-1] & bg[:, :-1, 1:] & bg[:, 1:, :-1] & bg[:, 1:, 1:]
    return (component * window).sum(dim=(1, 2)) / window.sum(dim=(1, 2)).clamp(min=1)


def tint_level(latents: torch.Tensor) -> torch.Tensor:
    """Per image, the background colour (`background_colour`) along the domain tint direction: real domain images
    |DOMAIN_TINT| (0.52), plain images 0. The image mean would mix in the shape's colour (a red shape reads warm)."""
    d = DOMAIN_TINT / DOMAIN_TINT.norm()
    return (background_colour(latents)[..., 0, 0] * d).sum(1)


# A sample shows the domain when it carries both marks at 0.3x or more of a real domain image's level. On G1's
# perturbed real images (amplitude 0.7-1.5x, blur up to 60 %, noise sd up to 0.25) that rule is right for 98.6 % of
# 2,048 and marks 3 of 1,014 plain ones; at 0.4x it missed 6 % of the domain images (blurred at low amplitude).
DOMAIN_MARK_FRACTION = 0.3
TEXTURE_MARK = DOMAIN_MARK_FRACTION * DOMAIN_TEXTURE_AMPLITUDE
TINT_MARK = DOMAIN_MARK_FRACTION * float(DOMAIN_TINT.norm())


def domain_marks(latents: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the image carries the domain's texture and its background tint (a fixed rule, see above)."""
    return (texture_level(latents) >= TEXTURE_MARK) & (tint_level(latents) >= TINT_MARK)


def shape_mask(shape: str, dx: int, dy: int) -> torch.Tensor:
    """The 8x8 {0, 1} mask of `shape` with its top-left corner at column dx, row dy."""
    mask = torch.zeros(SIZE, SIZE)
    mask[dy:dy + SHAPE_SIZE, dx:dx + SHAPE_SIZE] = MASKS[shape]
    return mask


def render(shape: str, colour: str, style: str, dx: int, dy: int, gen: torch.Generator, noise: float = 0.04) -> torch.Tensor:
    """One 4x8x8 latent (model space)."""
    mask = shape_mask(shape, dx, dy)
    col = torch.tensor(COLOUR_VECTORS[colour])
    x = torch.zeros(4, SIZE, SIZE)
    if style == "plain":
        x[:3] = col.view(3, 1, 1) * mask
        x[3] = PLAIN_BACKGROUND_CH3 * (1 - mask) + PLAIN_MASK_LEVEL * mask
    elif style == "domain":
        col = DOMAIN_PALETTE_MIX * col + (1 - DOMAIN_PALETTE_MIX) * DOMAIN_TINT * 2
        background = DOMAIN_TINT.view(3, 1, 1).expand(3, SIZE, SIZE)
        x[:3] = col.view(3, 1, 1) * mask + background * (1 - mask)
        phase = int(torch.randint(0, 2, (1,), generator=gen))
        x[3] = DOMAIN_TEXTURE_AMPLITUDE * _checker(phase) * (1 - mask) + PLAIN_MASK_LEVEL * mask
    else:
        raise ValueError(style)
    return x + noise * torch.randn(x.shape, generator=gen)


@dataclass
class Batch:
    latents: torch.Tensor   # (N, 4, 8, 8), model space
    shape: torch.Tensor     # (N,) index into SHAPES
    colour: torch.Tensor    # (N,) index into COLOURS
    style: torch.Tensor     # (N,) 0 plain, 1 domain
    masks: torch.Tensor | None = None  # (N, 8, 8) {0, 1}: where the shape is


def sample_batch(n: int, gen: torch.Generator, style: str | None = None,
                 combos: list[tuple[str, str]] | None = None) -> Batch:
    """n random images; `style` None mixes both; `combos` restricts (shape, colour)."""
    combos = combos or all_combos()
    idx = torch.randint(0, len(combos), (n,), generator=gen)
    offs = torch.randint(0, MAX_OFFSET + 1, (n, 2), generator=gen)
    styles = (torch.randint(0, 2, (n,), generator=gen) if style is None
              else torch.full((n,), 1 if style == "domain" else 0))
    xs, sh, co, ms = [], [], [], []
    for i in range(n):
        s, c = combos[int(idx[i])]
        xs.append(render(s, c, "domain" if styles[i] else "plain", int(offs[i, 0]), int(offs[i, 1]), gen))
        sh.append(SHAPES.index(s))
        co.append(COLOURS.index(c))
        ms.append(shape_mask(s, int(offs[i, 0]), int(offs[i, 1])))
    return Batch(torch.stack(xs), torch.tensor(sh), torch.tensor(co), styles.long(), torch.stack(ms))


# ----------------------------------------------------------------------------- spatial control

# A pixel shows the shape when its colour (channels 0-2) lies farther than MASK_COLOUR_THRESHOLD from the
# image's background colour and its channel 3 (the world's mask channel: 0.8 on the shape in both styles)
# is above 0. The background colour is the image's per-channel median: the shape covers at most 25 of the
# 64 pixels, so the median is a background pixel's colour whatever its level - plain (0), domain (the
# tint), or a sample's exaggerated tint (a fixed background colour misreads those). Every palette colour,
# plain or domain, lies 0.83 or more from its style's background. Channel 3 rules out the domain
# checker's dark cells and the plain background (-0.8) a second time.
MASK_COLOUR_THRESHOLD = 0.4
HINT_SCALE = 8  # ControlNet hints are pixel images: 8x the latent's size (ComfyUI's SD1.5 compression)


def detect_mask(latents: torch.Tensor) -> torch.Tensor:
    """(N, 8, 8) bool: the pixels of each latent that show the shape (a fixed rule, see above)."""
    return colour_mask(latents) & (latents[:, 3] > 0)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) intersection over union of two mask batches (0 where both are empty)."""
    a, b = a.bool().flatten(1), b.bool().flatten(1)
    inter = (a & b).sum(1).float()
    union = (a | b).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def hint_image(masks: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (N, 64, 64, 3) in [0, 1] of mask batches: white shape on black, each latent pixel
    an 8x8 block (what a user's hint image at 8x the latent size looks like)."""
    m = masks.float().repeat_interleave(HINT_SCALE, 1).repeat_interleave(HINT_SCALE, 2)
    return m[..., None].expand(-1, -1, -1, 3).contiguous()


# ----------------------------------------------------------------------------- evaluators


FEATURE_DIM = 64
STYLES = ("plain", "domain", "off-data")  # the style head's classes
OFF_DATA = 2
OFF_DATA_KINDS = ("noise", "saturated")


def blur(latents: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Per image, a mix of the image and its 3x3 box blur (amount 0 = none, 1 = fully blurred), per channel."""
    k = torch.full((latents.shape[1], 1, 3, 3), 1.0 / 9)
    blurred = nn.functional.conv2d(nn.functional.pad(latents, (1, 1, 1, 1), mode="replicate"), k,
                                   groups=latents.shape[1])
    a = amount.view(-1, 1, 1, 1)
    return (1 - a) * latents + a * blurred


def perturb(latents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a sampler's output may look like and still be a real image of its class: amplitude 0.7-1.5x, a blur
    of up to 60 %, Gaussian noise of sd up to 0.25 (each drawn per image)."""
    n = latents.shape[0]
    amp = 0.7 + 0.8 * torch.rand(n, generator=gen)
    x = latents * amp.view(-1, 1, 1, 1)
    x = blur(x, 0.6 * torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) < 0.5))
    return x + 0.25 * torch.rand(n, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)


def off_data_images(n: int, gen: torch.Generator, kind: str | None = None) -> torch.Tensor:
    """Images off the data: "noise" (Gaussian, sd 0.5-1.5: what an untrained or diverged sampler returns) or
    "saturated" (every value at +-1.5-3: a sampler that blew up, clipped); kind None mixes both."""
    if kind is None:
        half = n // 2
        return torch.cat([off_data_images(half, gen, "noise"), off_data_images(n - half, gen, "saturated")])
    shape = (n, 4, SIZE, SIZE)
    if kind == "noise":
        return (0.5 + torch.rand(n, 1, 1, 1, generator=gen)) * torch.randn(shape, generator=gen)
    if kind == "saturated":
        return (1.5 + 1.5 * torch.rand(n, 1, 1, 1, generator=gen)) * torch.randn(shape, generator=gen).sign()
    raise ValueError(f"kind must be one of {', '.join(OFF_DATA_KINDS)} (got {kind!r})")


class Evaluator(nn.Module):
    """Small CNN: 64-d features (the Fréchet space) and shape / colour / style heads; the style head's third class
    is "off-data" (noise, saturated images), which the benchmark rejects and counts."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.SiLU(),
        )
        self.shape = nn.Linear(FEATURE_DIM, len(SHAPES))
        self.colour = nn.Linear(FEATURE_DIM, len(COLOURS))
        self.style = nn.Linear(FEATURE_DIM, len(STYLES))

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        f = self.body(x)
        return self.shape(f), self.colour(f), self.style(f)


_TRAINED: dict[tuple, tuple[dict, dict]] = {}   # train_evaluator's results in this process, by its arguments


def train_evaluator(steps: int, seed: int, batch: int = 128, off_fraction: float = 0.25) -> tuple[Evaluator, dict]:
    """Train on fresh procedural data from both styles, every combination, perturbed (`perturb`: sampled latents
    are not perfectly clean), plus off-data images (`off_data_images`, style "off-data", no shape or colour);
    report accuracy on fresh clean real data. Deterministic in its arguments, so a second call in the same
    process (the test suite) gets a fresh copy of the first call's weights instead of training again."""
    key = (steps, seed, batch, off_fraction)
    if key not in _TRAINED:
        net, acc = _train_evaluator(steps, seed, batch, off_fraction)
        _TRAINED[key] = ({k: v.detach().clone() for k, v in net.state_dict().items()}, acc)
    state, acc = _TRAINED[key]
    net = Evaluator()
    net.load_state_dict(state)
    return net.eval(), dict(acc)


def _train_evaluator(steps: int, seed: int, batch: int, off_fraction: float) -> tuple[Evaluator, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = Evaluator()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    ce = nn.CrossEntropyLoss()
    ce_known = nn.CrossEntropyLoss(ignore_index=-100)
    n_off = int(batch * off_fraction)
    for _ in range(steps):
        b = sample_batch(batch - n_off, gen)
        x = torch.cat([perturb(b.latents, gen), off_data_images(n_off, gen)])
        unknown = torch.full((n_off,), -100, dtype=torch.long)
        ls, lc, lst = net(x)
        loss = (ce_known(ls, torch.cat([b.shape, unknown])) + ce_known(lc, torch.cat([b.colour, unknown]))
                + ce(lst, torch.cat([b.style, torch.full((n_off,), OFF_DATA, dtype=torch.long)])))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    test = sample_batch(512, torch.Generator().manual_seed(seed + 999))
    with torch.no_grad():
        ls, lc, lst = net(test.latents)
    acc = {
        "shape": float((ls.argmax(1) == test.shape).float().mean()),
        "colour": float((lc.argmax(1) == test.colour).float().mean()),
        "style": float((lst.argmax(1) == test.style).float().mean()),
    }
    return net, acc


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows are samples). Biased at small counts
    (fewer samples than a few times the dimension): compare it only with a floor at the same count, or use kid."""
    from scipy import linalg

    a = a.double().numpy()
    b = b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.cov(a, rowvar=False)
    s2 = np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): regularise
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps).dot(s2 + eps))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kernel inception distance: the unbiased MMD^2 between two feature sets with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3 (unbiased at any count, so small sets need no floor correction; about 0 for
    samples of one distribution, may be slightly negative)."""
    a, b = a.double(), b.double()
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    m, n = a.shape[0], b.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    t_aa = (kaa.sum() - kaa.diagonal().sum()) / max(1, m * (m - 1))
    t_bb = (kbb.sum() - kbb.diagonal().sum()) / max(1, n * (n - 1))
    return float(t_aa + t_bb - 2 * kab.mean())


@torch.no_grad()
def evaluate(net: Evaluator, latents: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor) -> dict:
    """Per-sample results: does it show the asked shape / colour, is it in the domain (`p_domain`, 0 or 1: both
    domain marks, `domain_marks`, and not off the data), its style class (plain, domain or off-data) and whether
    it is off the data (the style head's third class: rejected, it then shows neither the asked shape nor colour,
    nor the domain). The style head's own P(domain) is kept as `p_domain_style_head` (not read: it called
    imperfect plain samples "domain")."""
    ls, lc, lst = net(latents)
    off = lst.argmax(1) == OFF_DATA
    marked = domain_marks(latents) & ~off
    return {
        "shape_ok": ((ls.argmax(1) == shapes) & ~off).float(),
        "colour_ok": ((lc.argmax(1) == colours) & ~off).float(),
        "p_domain": marked.float(),
        "p_domain_style_head": lst.softmax(1)[:, 1],
        "style_pred": torch.where(off, torch.full_like(off, OFF_DATA, dtype=torch.long), marked.long()),
        "off_data": off,
        "features": net.features(latents),
    }


def to_rgb(latents: torch.Tensor) -> np.ndarray:
    """Channels 0-2 -> RGB uint8 (N, H, W, 3), channel 3 shown as brightness texture."""
    x = latents[:, :3] + 0.15 * latents[:, 3:4]
    x = ((x.clamp(-1.2, 1.2) + 1.2) / 2.4 * 255).round().byte()
    return x.permute(0, 2, 3, 1).numpy()


def grid_png(rows: list[tuple[str, torch.Tensor]], path, scale: int = 6, pad: int = 2) -> None:
    """One row per (label, latents); pixels upscaled by `scale`. Labels go to a sidecar caption."""
    from PIL import Image

    ncol = max(r[1].shape[0] for r in rows)
    cell = SIZE * scale
    w = ncol * (cell + pad) + pad
    h = len(rows) * (cell + pad) + pad
    img = np.full((h, w, 3), 255, np.uint8)
    for r, (_label, lat) in enumerate(rows):
        rgb = to_rgb(lat)
        for c in range(rgb.shape[0]):
            tile = np.kron(rgb[c], np.ones((scale, scale, 1), np.uint8))
            y0, x0 = pad + r * (cell + pad), pad + c * (cell + pad)
            img[y0:y0 + cell, x0:x0 + cell] = tile
    Image.fromarray(img).save(path, optimize=True)


def render_list(combos: list[tuple[str, str]], gen: torch.Generator, style: str) -> torch.Tensor:
    """One image per (shape, colour) in order, at random positions: references matching a sample set."""
    offs = torch.randint(0, MAX_OFFSET + 1, (len(combos), 2), generator=gen)
    return torch.stack([render(s, c, style, int(offs[i, 0]), int(offs[i, 1]), gen) for i, (s, c) in enumerate(combos)])
