"""Issue 13, training inputs: image files the scanner and loader must not damage or choke on (EXIF
orientation, transparency, 16-bit greyscale, non-UTF-8 names, symlink loops), the CLI's log level,
and what the Train node may read and write on a shared server (input/ subfolders only, unless the
owner opts in; no drive-relative save names)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from indomain.client import ComfyValidationError
import torch
from PIL import Image

from indomain.devkit.images import make_image_folder
from indomain.training.data import (ALPHA_BACKGROUND, TrainingInputError, encode_images, find_image_files,
                                    load_resized, scan_images)

NON_UTF8 = os.fsdecode(b"caf\xe9_\xff.png")  # Latin-1 bytes: a valid POSIX file name, not valid UTF-8


def pixels(im) -> np.ndarray:
    return np.asarray(im, dtype=np.int32)


# ----------------------------------------------------------------------------- defect 3: image loading


def test_exif_orientation_is_applied_like_load_image(tmp_path):
    """A phone photo stored landscape with EXIF 'rotate 90° clockwise' (orientation 6) trains upright."""
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (32, 0, 64, 32))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, "JPEG", exif=exif.tobytes(), quality=95)
    im = load_resized(path, 32, "center")
    assert im.size == (32, 32)
    p = pixels(im)
    # shown upright it is 32 wide, 64 tall: the stored left (red) is on top, the right (blue) at the bottom
    top, bottom = p[:12].reshape(-1, 3).mean(0), p[-12:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_transparency_is_composited_on_the_stated_background(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 1] = 255                        # green under the alpha: must not reach the model
    rgba[:, 16:, :] = (200, 0, 0, 255)        # right half: opaque red
    rgba[:, :16, 3] = 0                       # left half: fully transparent
    rgba[:8, :16, :] = (0, 0, 255, 128)       # top-left: half-transparent blue
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    p = pixels(load_resized(path, 32, "center"))
    assert tuple(p[20, 4]) == ALPHA_BACKGROUND            # transparent -> background, not green
    assert tuple(p[20, 24]) == (200, 0, 0)                  # opaque unchanged
    blended = np.round(np.array((0, 0, 255)) * 128 / 255 + np.array(ALPHA_BACKGROUND) * (1 - 128 / 255))
    assert np.abs(p[2, 4] - blended).max() <= 2, (p[2, 4], blended)
    # a palette image with a transparent index too
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    assert tuple(pixels(load_resized(tmp_path / "pal.png", 32, "center"))[5, 5]) == ALPHA_BACKGROUND


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 32).round().astype(np.uint16)
    grey = np.tile(ramp, (32, 1))
    path = tmp_path / "scan16.png"
    Image.fromarray(grey).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    p = pixels(load_resized(path, 32, "center"))
    expected = np.round(ramp / 65535 * 255)
    assert np.abs(p[16, :, 0] - expected).max() <= 3, (p[16, :, 0], expected)  # LANCZOS ringing at most
    assert (p[..., 0] == p[..., 1]).all() and (p[..., 1] == p[..., 2]).all()
    assert p[16, 16, 0] < 200  # mid-grey stays mid-grey (the old convert("RGB") clipped it to 255)


# ----------------------------------------------------------------------------- defect 10: symlink loops


def test_symlink_loop_in_the_image_folder_is_visited_once(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", 3, 64, seed=2, nested=False)
    sub = folder / "sub"
    sub.mkdir()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(sub / "deep.png")
    (sub / "back_to_top").symlink_to(folder, target_is_directory=True)   # a loop
    (folder / "again").symlink_to(sub, target_is_directory=True)         # a second way into sub
    files, _ = find_image_files(folder)
    assert sorted(p.name for p in files) == sorted([p.name for p in folder.glob("img_*")] + ["deep.png"])
    assert scan_images(folder, 64).count == 4
    # a folder reached only through a link is still followed
    linked = make_image_folder(tmp_path / "elsewhere", 2, 64, seed=3, nested=False)
    (folder / "linked").symlink_to(linked, target_is_directory=True)
    assert scan_images(folder, 64).count == 6


# ----------------------------------------------------------------------------- defect 2: non-UTF-8 names


def test_non_utf8_file_name_is_encoded_and_cached(comfy, base, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", 1, 64, seed=4, nested=False)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(folder / NON_UTF8, "PNG")
    scan = scan_images(folder, 64)
    assert scan.count == 2 and NON_UTF8 in {p.name for p in scan.usable}
    _, _, vae = base
    cache = tmp_path / "cache"
    encoded = encode_images(vae, scan, 64, "center", cache, "vae-fp")
    assert len(encoded.latents) == 2
    from safetensors import safe_open

    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 2  # both cached (the write used to fail with UnicodeEncodeError)
    sources = set()
    for e in entries:
        with safe_open(str(e), "pt") as f:
            sources.add(f.metadata()["source"])
    assert "caf\\xe9_\\xff.png" in sources
    again = encode_images(vae, scan, 64, "center", cache, "vae-fp")
    assert again.cache_hits == 2


# ----------------------------------------------------------------------------- the Train node on a shared server


@pytest.fixture
def input_images(comfy):
    """A uniquely named image folder inside ComfyUI's input/ (removed afterwards)."""
    import folder_paths

    name = f"indomain_test_{uuid.uuid4().hex[:8]}"
    folder = Path(folder_paths.get_input_directory()) / name
    make_image_folder(folder, 2, 64, seed=6, nested=False)
    yield name, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_train_node_lists_input_subfolders_and_fingerprints_non_utf8_names(comfy, input_images):
    name, folder = input_images
    node = comfy.node("InDomainTrainDomainUNet")
    schema_input = next(i for i in node.GET_SCHEMA().inputs if i.id == "image_folder")
    assert name in schema_input.options  # listed like core's dataset nodes
    assert node.validate_inputs(image_folder=name) is True
    before = node.fingerprint_inputs(image_folder=name)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / NON_UTF8, "PNG")
    after = node.fingerprint_inputs(image_folder=name)  # used to raise UnicodeEncodeError
    assert after != before


def test_train_node_refuses_folders_outside_input_unless_opted_in(comfy, base, input_images, tmp_path, monkeypatch):
    from indomain.nodes.paths import ALLOW_ABSOLUTE_ENV

    name, folder = input_images
    node = comfy.node("InDomainTrainDomainUNet")
    outside = make_image_folder(tmp_path / "private", 2, 64, seed=7, nested=False)
    monkeypatch.delenv(ALLOW_ABSOLUTE_ENV, raising=False)
    escape = os.path.relpath(outside, folder.parent)  # '../../...' from input/
    (folder / "leak").symlink_to(outside, target_is_directory=True)
    for bad in (escape, f"{name}/../../", str(outside), f"{name}/leak", "..", "C:private"):
        msg = node.validate_inputs(image_folder=bad)
        assert isinstance(msg, str) and "input folder" in msg, (bad, msg)
        assert ALLOW_ABSOLUTE_ENV in msg or "choose" in msg, msg
        with pytest.raises(ValueError, match="input folder"):  # TrainingInputError of the pack as ComfyUI loaded it
            node.execute(*base, bad, 1, 1e-4, 1, 64, f"never_{uuid.uuid4().hex[:6]}")
    # empty = no folder: valid (the 'images' input may carry the pictures), but with nothing connected the run is
    # refused before any work, naming both ways to give images
    assert node.validate_inputs(image_folder="", images=None) is True  # 'images' linked (a link arrives as None)
    msg = node.validate_inputs(image_folder="")  # nothing connected: refused at validation (found by the fuzz)
    assert isinstance(msg, str) and "no training images" in msg and "connect an IMAGE" in msg
    with pytest.raises(ValueError, match="no training images.*connect an IMAGE"):
        node.execute(*base, "", 1, 1e-4, 1, 64, f"never_{uuid.uuid4().hex[:6]}")
    # the opt-in allows absolute paths (relative ones must still stay inside input/)
    monkeypatch.setenv(ALLOW_ABSOLUTE_ENV, "1")
    assert node.validate_inputs(image_folder=str(outside)) is True
    assert isinstance(node.validate_inputs(image_folder=escape), str)


@pytest.mark.parametrize("bad", ["C:x", "C:/x", "D:\\evil", "a:stream", "../up", "/abs/x", "\\\\server\\share\\x"])
def test_save_name_refuses_names_that_leave_the_models_folder(comfy, bad):
    from indomain.nodes.train_node import domain_unet_output_path

    with pytest.raises(ValueError, match="must stay inside models/domain_unets"):
        domain_unet_output_path(bad)
    path, name = domain_unet_output_path("faces/v1")
    assert name == "faces/v1.safetensors" and path.parent.name == "faces"


def test_train_node_refuses_outside_folders_through_the_real_server(server, tmp_path):
    """Validation on POST /prompt: a '../' and an absolute folder never reach execution."""
    outside = make_image_folder(tmp_path / "secret", 1, 64, seed=8, nested=False)
    for bad in ("../../" + str(outside).lstrip("/"), str(outside)):
        graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
                 "2": {"class_type": "InDomainTrainDomainUNet", "inputs": {
                     "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image_folder": bad, "steps": 1,
                     "learning_rate": 1e-4, "batch_size": 1, "resolution": 64, "save_name": "never_written"}}}
        with pytest.raises(ComfyValidationError) as err:  # POST /prompt answered 400
            server.client.submit(graph)
        assert "input folder" in str(err.value), str(err.value)[:2000]
    assert not list((server.base / "models" / "domain_unets").glob("never_written*"))
