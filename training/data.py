"""Training data: a folder of unlabelled images -> cached VAE latents.

Images are found recursively (jpg, jpeg, png, webp, bmp; any case; symlinked folders are
followed once, so a link loop cannot make the scan endless), turned upright by their EXIF
orientation (as ComfyUI's Load Image does), transparent pixels composited on a white
background (`ALPHA_BACKGROUND`), 16-bit greyscale scaled to 8 bits (not clipped), converted to
RGB and resized so the short side equals the training resolution. Each image is encoded once by the
checkpoint's VAE, plain and mirrored (so horizontal flips are exact, not a flip of the latent),
and cached on disk as safetensors keyed by (file content, resolution, crop mode, VAE weights):
a changed image, resolution, crop or VAE is a new cache entry. With centre crop the cached
latent is exactly the training size; with random crop the whole resized image is cached and
crops are cut on the latent grid (8-pixel steps) at training time.

No ComfyUI import here: the VAE is passed in (anything with `.encode(pixels BHWC 0..1)`).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..guidance.checkpoint import save_safetensors_atomic

log = logging.getLogger("indomain.training")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CACHE_VERSION = 3  # 2: EXIF orientation, alpha on ALPHA_BACKGROUND, 16-bit greyscale scaled (v1 latents differ);
                   # 3: video VAEs (Wan) encode each picture as a single-frame clip (v2 read a plain+mirror pair as 2 frames)
# Transparent pixels are composited on this colour: what sits under alpha 0 is arbitrary (often black or
# leftover colours), so without a stated background the model would learn noise from it.
ALPHA_BACKGROUND = (255, 255, 255)


def display_name(path) -> str:
    """A file name that can always be printed or stored as UTF-8 (non-UTF-8 bytes become \\xNN escapes)."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


class TrainingInputError(ValueError):
    """Bad training input (folder, resolution, output path). The message names the fix."""


@dataclass
class ImageScan:
    folder: Path
    usable: list[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored_other: int = 0          # files with other extensions (captions etc.), not counted as skipped

    @property
    def count(self) -> int:
        return len(self.usable)


def check_resolution(resolution: int, factor: int = 8) -> None:
    if not isinstance(resolution, int) or resolution <= 0:
        raise TrainingInputError(f"resolution must be a positive whole number of pixels, got {resolution!r}.")
    if resolution % factor:
        lower = max(factor, resolution // factor * factor)
        raise TrainingInputError(
            f"resolution {resolution} is not a multiple of {factor} (this model needs multiples of {factor}: "
            f"the VAE and the UNet downsample by that much). Use {lower} or {lower + factor}.")


def min_image_side(resolution: int) -> int:
    """Images whose short side is below this are 'tiny': upscaling them more than 2x only adds blur."""
    return max(8, resolution // 2)


def is_within(path, root: str) -> bool:
    """Whether `path`, resolved (links followed), is `root` or inside it (`root` already resolved)."""
    real = os.path.realpath(path)
    try:
        return os.path.commonpath((root, real)) == root
    except ValueError:  # different drives on Windows
        return False


def find_image_files(folder: Path, within=None, outside: list | None = None) -> tuple[list[Path], int]:
    """Image files under `folder` (sorted) and the count of other files. Symlinked folders are followed, but
    each real folder is visited once: a link to a parent (a loop) would otherwise make the walk endless.

    `within` (a folder): every folder and file is resolved, links included, and whatever resolves outside
    `within` is neither entered nor read (a link `input/dom/sub -> /elsewhere` on a server that reads only
    its input folder); those paths are appended to `outside`."""
    files, other = [], 0
    root_limit = None if within is None else os.path.realpath(within)

    def allowed(path) -> bool:
        if root_limit is None or is_within(path, root_limit):
            return True
        if outside is not None:
            outside.append(Path(path))
        return False

    if not allowed(folder):
        return [], 0
    seen: set[tuple[int, int]] = set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)  # follows links: the identity of the real folder
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        # skip hidden folders (caches, .git), and (with `within`) links out of the allowed folder before entering
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and allowed(os.path.join(root, d)))
        for name in sorted(names):
            if name.startswith("."):
                continue
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_EXTENSIONS:
                if allowed(p):
                    files.append(p)
            else:
                other += 1
    return sorted(files), other


def _probe(path: Path, min_side: int) -> str | None:
    """None if the file is a usable image, else the reason it is skipped."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # structure check without decoding everything
        with Image.open(path) as im:
            w, h = im.size
            im.load()    # full decode: catches truncated data that verify() lets through
    except Exception as e:  # PIL raises many types for broken files
        return f"unreadable ({type(e).__name__}: {display_name(str(e)[:80])})"
    if min(w, h) < min_side:
        return f"too small ({w}x{h}; the short side must be at least {min_side} px at this resolution)"
    return None


def scan_images(folder, resolution: int, within=None) -> ImageScan:
    """Find usable images; skip unreadable or tiny ones with one warning each. Raises when none is usable.
    `within`: read nothing that resolves outside this folder (see find_image_files); such links are skipped."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise TrainingInputError(f"image folder not found: {folder}. Point it at a folder of domain images "
                                 "(jpg, png, webp or bmp; subfolders are searched too).")
    outside: list[Path] = []
    candidates, other = find_image_files(folder, within, outside)
    scan = ImageScan(folder, [], [], other)
    for p in outside:
        reason = f"a link to a place outside {within} (not read: this server reads training images only there)"
        scan.skipped.append((p, reason))
        log.warning("InDomain training: skipping %s: %s", display_name(p), reason)
    min_side = min_image_side(resolution)
    for p in candidates:
        reason = _probe(p, min_side)
        if reason is None:
            scan.usable.append(p)
        else:
            scan.skipped.append((p, reason))
            log.warning("InDomain training: skipping %s: %s", display_name(p), reason)
    if not scan.usable:
        if not candidates and outside:
            what = f"it holds only links to places outside {within} ({display_name(outside[0])}, ...)"
        elif not candidates:
            what = ("it is empty" if other == 0 else
                    f"it has {other} file(s) but none with an image extension ({', '.join(IMAGE_EXTENSIONS)})")
        else:
            what = f"all {len(candidates)} image file(s) were skipped (first: {display_name(scan.skipped[0][0].name)}: {scan.skipped[0][1]})"
        raise TrainingInputError(f"no usable training image in {folder}: {what}. Add at least one readable RGB image "
                                 f"whose short side is at least {min_side} px (a few hundred images are typical).")
    return scan


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_rgb(im):
    """An upright 8-bit RGB PIL image from any mode Pillow opens: EXIF orientation applied, transparency
    composited on ALPHA_BACKGROUND, 16-bit greyscale scaled (a plain convert("RGB") clips it to white)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        import numpy as np

        # 16-bit PNGs open as I;16 or I (32-bit ints holding 0..65535), like ComfyUI's Load Image assumes
        values = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(values * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
    has_alpha = im.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def fit_to_size(im, size: tuple[int, int], crop: str, grid: int = 8):
    """Resize a PIL image to cover (w, h) (aspect kept), then centre-crop to exactly (w, h); with crop
    'random' keep the whole covering image on the VAE's latent grid (`grid` px: 8, or 16 for Wan 2.2's VAE;
    crops are cut from the latent)."""
    from PIL import Image

    bw, bh = size
    w, h = im.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if crop == "random":
        nw, nh = max(bw, nw // grid * grid), max(bh, nh // grid * grid)
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    if crop == "center":
        left, top = (nw - bw) // 2, (nh - bh) // 2
        im = im.crop((left, top, left + bw, top + bh))
    return im


def load_resized(path: Path, resolution: int, crop: str, grid: int = 8):
    """RGB PIL image (see to_rgb), short side = resolution; centre-cropped to a square when crop == 'center'."""
    from PIL import Image

    with Image.open(path) as im:
        im = to_rgb(im)
    return fit_to_size(im, (resolution, resolution), crop, grid)


def to_pixels(im) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)  # H W 3 in 0..1


def cache_key(digest: str, resolution: int, crop: str, vae_fingerprint: str) -> str:
    return hashlib.sha256(f"v{CACHE_VERSION}|{digest}|{resolution}|{crop}|{vae_fingerprint}".encode()).hexdigest()[:40]


def _load_cached(path: Path):
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
        return sd["latent"], sd["latent_flip"]
    except Exception:  # a corrupt entry is re-encoded, never trusted
        return None


@dataclass
class EncodedImages:
    latents: list[torch.Tensor]        # per image [C, h, w], unprocessed VAE latents
    flipped: list[torch.Tensor]        # encodings of the mirrored images
    digests: list[str]
    cache_hits: int = 0

    @property
    def fingerprint(self) -> str:
        """Identity of the data set (order-independent), for resume checks."""
        return hashlib.sha256("\n".join(sorted(self.digests)).encode()).hexdigest()


def vae_spatial_ratio(vae, default: int = 8) -> int:
    """Pixels per latent cell of a VAE: core's `downscale_ratio` is an int (SD, Flux.2's 16) or, for video VAEs,
    (frames function, height ratio, width ratio) (Wan 2.1: 8, Wan 2.2: 16)."""
    r = getattr(vae, "downscale_ratio", default)
    if isinstance(r, (tuple, list)) and r:
        r = r[-1]
    return int(r) if isinstance(r, (int, float)) and not isinstance(r, bool) and r >= 1 else default


def vae_encodes_video(vae) -> bool:
    """Whether the VAE reads a batch of pictures as the frames of ONE clip (core's video VAEs: Wan, Qwen-Image),
    so that training pictures must go through it one at a time, each a single-frame clip."""
    return getattr(vae, "latent_dim", 2) == 3 and not getattr(vae, "not_video", False)


def encode_pictures(vae, pixels: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] pictures -> [N, C, h, w] latents. A video VAE encodes each picture as a single-frame clip
    ([1, C, 1, h, w]; the frame axis is dropped here and restored by the trainer for the model)."""
    if vae_encodes_video(vae):
        lat = torch.cat([vae.encode(pixels[i:i + 1]).float().cpu() for i in range(pixels.shape[0])])
    else:
        lat = vae.encode(pixels).float().cpu()
    if lat.ndim == 5 and lat.shape[2] == 1:
        lat = lat[:, :, 0]
    if lat.ndim != 4 or lat.shape[0] != pixels.shape[0]:
        raise TrainingInputError(f"the VAE encoded {pixels.shape[0]} pictures to latents of shape {tuple(lat.shape)}; "
                                 "expected one [C, h, w] latent per picture.")
    return lat


def decode_pictures(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] or single-frame clips [B, C, 1, h, w] -> pictures [B', H, W, 3] (every frame). A video
    VAE decodes one clip at a time."""
    if vae_encodes_video(vae) and latents.ndim == 5:
        out = [vae.decode(latents[i:i + 1]) for i in range(latents.shape[0])]
    else:
        out = [vae.decode(latents)]
    return torch.cat([o.reshape(-1, *o.shape[-3:]) for o in out])


def encode_with_cache(vae, load_image, cpath: Path | None, metadata: dict) -> tuple[tuple, bool]:
    """((latent, mirrored latent), cache hit) of one image: read from the cache file `cpath` when it is
    there and sound, else `load_image()` encoded by the VAE (plain and mirrored) and written to `cpath`."""
    entry = _load_cached(cpath) if cpath is not None and cpath.is_file() else None
    if entry is not None:
        return entry, True
    from PIL import ImageOps

    im = load_image()
    pixels = torch.stack([to_pixels(im), to_pixels(ImageOps.mirror(im))])
    with torch.inference_mode(False), torch.no_grad():
        lat = encode_pictures(vae, pixels).clone()
    entry = (lat[0], lat[1])
    if cpath is not None:
        try:
            save_safetensors_atomic({"latent": entry[0], "latent_flip": entry[1]}, cpath, metadata)
        except OSError as e:  # a read-only cache must not stop training
            log.warning("InDomain training: cannot write latent cache %s (%s); continuing without it", cpath, e)
    return entry, False


def encode_images(vae, scan: ImageScan, resolution: int, crop: str, cache_dir: Path | None, vae_fingerprint: str,
                  progress=None) -> EncodedImages:
    """Encode every usable image (plain and mirrored) with the VAE, through the on-disk cache."""
    out = EncodedImages([], [], [])
    for i, path in enumerate(scan.usable):
        digest = file_digest(path)
        cpath = None if cache_dir is None else \
            Path(cache_dir) / f"{cache_key(digest, resolution, crop, vae_fingerprint)}.safetensors"
        entry, hit = encode_with_cache(vae, lambda: load_resized(path, resolution, crop, vae_spatial_ratio(vae)), cpath,
                                       {"source": display_name(path.name), "resolution": str(resolution), "crop": crop})
        out.cache_hits += hit
        out.latents.append(entry[0].float().clone())
        out.flipped.append(entry[1].float().clone())
        out.digests.append(digest)
        if progress is not None:
            progress(i + 1, len(scan.usable))
    return out
