"""Procedural image folders (drawn with PIL, deterministic from a seed): the one image generator for
tests (coloured shapes, mixed files), the demo's built-in domain (sunset stripes) and the shared
workflows' training folder (striped discs)."""
from __future__ import annotations

import random
from pathlib import Path

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200), (40, 200, 200)]
MIXED_FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("PNG", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("JPEG", "JPEG")]


def _shapes(d, rng, w, h, i):
    """A coloured circle (even i) or square (odd i) on a light ground."""
    c = COLOURS[rng.randrange(len(COLOURS))]
    r = rng.randint(h // 6, h // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    (d.ellipse if i % 2 == 0 else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=c)


def _sunset(d, rng, w, h, i):
    """Horizontal warm bands over a dark violet ground with one teal disc: a style no text prompt of
    the base model asks for."""
    band = max(2, h // rng.choice([8, 10, 12]))
    offset = rng.randint(0, band)
    for y in range(-band + offset, h, 2 * band):
        warm = (240, rng.randint(90, 170), rng.randint(20, 60))
        d.rectangle([0, y, w, y + band - 1], fill=warm)
    r = rng.randint(h // 8, h // 4)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(20, 200, 190), outline=(250, 250, 250))


def _discs(d, rng, w, h, i):
    """Warm striped discs on a dark ground."""
    step = max(1, h // 16)
    r = rng.randint(h // 5, h // 3)
    cx, cy = rng.randint(r, w - r), rng.randint(r, h - r)
    for k in range(r, 0, -step):
        shade = 255 - 20 * ((r - k) // step % 2)
        d.ellipse([cx - k, cy - k, cx + k, cy + k], fill=(shade, 120 + rng.randint(0, 60), 40))


# style -> (painter, background, file name prefix)
STYLES = {"shapes": (_shapes, (235, 235, 225), "img"), "sunset": (_sunset, (40, 16, 60), "sunset"),
          "discs": (_discs, (20, 24, 40), "domain")}


def draw_images(folder: Path, count: int, size: int = 64, seed: int = 0, style: str = "shapes",
                mixed_files: bool = False, nested: bool = False) -> Path:
    """`count` RGB images of one style in `folder`. `mixed_files`: a few non-square images and every
    format/extension case the trainer must find; `nested`: every fourth image in a subfolder."""
    from PIL import Image, ImageDraw

    paint, background, prefix = STYLES[style]
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w = size + (8 * rng.randint(0, 2) if mixed_files and i % 3 == 0 else 0)
        im = Image.new("RGB", (w, size), background)
        paint(ImageDraw.Draw(im), rng, w, size, i)
        ext, fmt = MIXED_FORMATS[i % len(MIXED_FORMATS)] if mixed_files else ("png", "PNG")
        sub = folder / "more" if (nested and i % 4 == 3) else folder
        sub.mkdir(exist_ok=True)
        im.save(sub / f"{prefix}_{i:03d}.{ext}", fmt)
    return folder


def make_image_folder(folder: Path, count: int = 12, size: int = 64, seed: int = 0, nested: bool = True) -> Path:
    """The tests' folder: coloured circles/squares, some in a subfolder and with upper-case extensions
    (the trainer must find them all)."""
    return draw_images(folder, count, size, seed, "shapes", mixed_files=True, nested=nested)


def add_bad_files(folder: Path) -> list[str]:
    """One truncated PNG, one 'image' that is text, one tiny image: all must be skipped (and counted)."""
    from PIL import Image

    folder = Path(folder)
    good = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")[0].read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 3])
    (folder / "notes.JPG").write_text("not an image")
    Image.new("RGB", (6, 6), (0, 0, 0)).save(folder / "tiny.png")
    (folder / "captions.txt").write_text("captions are neither needed nor read")
    return ["broken.png", "notes.JPG", "tiny.png"]
