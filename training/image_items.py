"""Training images from any source -> VAE latents at a chosen size per image, through the latent cache.

Two sources:
- files found in an image folder (`folder_items`, from data.scan_images);
- ComfyUI IMAGE tensors (`tensor_items`): one batch [B, H, W, C] in 0..1 from Load Image or any
  image node, or a list of them (core's dataset loaders output one tensor per image, so images of
  different sizes arrive as a list).

Each image is keyed by its content (file bytes, or the tensor's shape and values), so the on-disk
latent cache works for tensors as well: the same pixels at the same size, crop and VAE are
encoded once. Used for IMAGE inputs and for aspect-ratio buckets (each image at its bucket's
size); square training from a folder keeps data.encode_images.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import (EncodedImages, TrainingInputError, cache_key, display_name, encode_with_cache, file_digest,
                   fit_to_size, min_image_side, vae_spatial_ratio)

log = logging.getLogger("indomain.training")

_EXIF_ORIENTATION = 274
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class TrainingImage:
    name: str                           # for messages
    digest: str                         # content identity: cache key and data fingerprint
    size: tuple[int, int]               # upright (width, height) in pixels
    load: Callable[[], object]          # -> upright RGB PIL image


def _open_rgb(path: Path):
    from PIL import Image

    from .data import to_rgb  # the folder path's loading rules: EXIF, alpha on the stated background, 16-bit

    with Image.open(path) as im:
        return to_rgb(im)


def _upright_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            rotated = im.getexif().get(_EXIF_ORIENTATION) in _ROTATED
        except Exception:  # a broken EXIF block: the picture itself is still usable
            rotated = False
    return (h, w) if rotated else (w, h)


def folder_items(scan) -> list[TrainingImage]:
    return [TrainingImage(p.name, file_digest(p), _upright_size(p), lambda p=p: _open_rgb(p)) for p in scan.usable]


def tensor_items(images, resolution: int) -> tuple[list[TrainingImage], list[str]]:
    """Items from an IMAGE batch or a list of IMAGE batches; (usable, skipped reasons). Raises on a value that
    is not an image batch at all."""
    import numpy as np
    from PIL import Image

    batches = images if isinstance(images, (list, tuple)) else [images]
    items, skipped = [], []
    min_side = min_image_side(resolution)
    for b, batch in enumerate(batches):
        if batch is None:
            continue
        if not isinstance(batch, torch.Tensor) or batch.ndim not in (3, 4) or batch.shape[-1] not in (1, 3, 4):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise TrainingInputError(f"the 'images' input must be an IMAGE batch [batch, height, width, channels] "
                                     f"(from Load Image or another image node); got {shape}.")
        if batch.ndim == 3:
            batch = batch.unsqueeze(0)
        for i in range(batch.shape[0]):
            name = f"images[{b}][{i}]" if len(batches) > 1 else f"images[{i}]"
            img = batch[i].detach().float().cpu()
            h, w = int(img.shape[0]), int(img.shape[1])
            if not torch.isfinite(img).all():
                skipped.append(f"{name}: has NaN/inf pixel values")
                continue
            if min(w, h) < min_side:
                skipped.append(f"{name}: too small ({w}x{h}; the short side must be at least {min_side} px at "
                               "this resolution)")
                continue
            if img.shape[-1] == 1:
                img = img.expand(h, w, 3)
            img = img[..., :3].contiguous()  # an alpha channel (if any) is dropped, as VAE Encode does
            digest = hashlib.sha256(f"IMAGE|{h}x{w}|".encode() + img.numpy().tobytes()).hexdigest()
            pixels = (img.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
            items.append(TrainingImage(name, digest, (w, h),
                                       lambda a=pixels: Image.fromarray(np.ascontiguousarray(a), "RGB")))
    for reason in skipped:
        log.warning("InDomain training: skipping %s", reason)
    return items, skipped


def encode_items(vae, items: list[TrainingImage], sizes: list[tuple[int, int]], crop: str, cache_dir,
                 vae_fingerprint: str, progress=None) -> EncodedImages:
    """Encode each item (plain and mirrored) at its (width, height) through the on-disk cache."""
    out = EncodedImages([], [], [])
    grid = vae_spatial_ratio(vae)
    for i, (item, size) in enumerate(zip(items, sizes)):
        cpath = None if cache_dir is None else \
            Path(cache_dir) / f"{cache_key(item.digest, f'{size[0]}x{size[1]}', crop, vae_fingerprint)}.safetensors"
        entry, hit = encode_with_cache(vae, lambda: fit_to_size(item.load(), size, crop, grid), cpath,
                                       {"source": display_name(item.name), "size": f"{size[0]}x{size[1]}", "crop": crop})
        out.cache_hits += hit
        out.latents.append(entry[0].float().clone())
        out.flipped.append(entry[1].float().clone())
        out.digests.append(item.digest)
        if progress is not None:
            progress(i + 1, len(items))
    return out

