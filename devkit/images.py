"""Small procedural image folders for training tests (coloured shapes drawn with PIL)."""
from __future__ import annotations

import random
from pathlib import Path

COLOURS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 40), (200, 60, 200), (40, 200, 200)]


def make_image_folder(folder: Path, count: int = 12, size: int = 64, seed: int = 0, nested: bool = True) -> Path:
    """`count` RGB images of coloured circles/squares on a light background, some in a subfolder and
    with upper-case extensions (the trainer must find them all). Deterministic from `seed`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("PNG", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("JPEG", "JPEG")]
    for i in range(count):
        w = size + (8 * rng.randint(0, 2) if i % 3 == 0 else 0)  # a few non-square images
        im = Image.new("RGB", (w, size), (235, 235, 225))
        d = ImageDraw.Draw(im)
        c = COLOURS[rng.randrange(len(COLOURS))]
        r = rng.randint(size // 6, size // 3)
        cx, cy = rng.randint(r, w - r), rng.randint(r, size - r)
        (d.ellipse if i % 2 == 0 else d.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=c)
        ext, fmt = formats[i % len(formats)]
        sub = folder / "more" if (nested and i % 4 == 3) else folder
        sub.mkdir(exist_ok=True)
        im.save(sub / f"img_{i:03d}.{ext}", fmt)
    return folder


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
