"""A Train Domain UNet run on the real ComfyUI server, watched the way the UI watches it: over the
websocket (aiohttp's client), the node's progress messages carry a preview picture at the configured
steps, and the run leaves a loss-curve image and the preview files beside the checkpoint."""
from __future__ import annotations

import asyncio
import io
import struct

import numpy as np
import pytest
from PIL import Image

from indomain.devkit.host import run_and_watch

pytestmark = pytest.mark.slow

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE (protocol.py, 0.3.75 and 0.33)
JPEG = 1


def test_server_progress_carries_previews_at_the_configured_steps_and_a_loss_curve_is_written(server):
    sub = server.base / "input" / "watch_server"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(11)
    for i in range(4):
        arr = np.full((64, 64, 3), 225, dtype=np.uint8)
        arr[8 + 4 * i: 40 + 4 * i, 16:48] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(sub / f"p{i}.png")
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "9": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "watch_server"}},
        "2": {"class_type": "InDomainTrainDomainUNet", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image_folder": "", "steps": 4,
            "learning_rate": 1e-4, "batch_size": 2, "resolution": 64, "save_name": "watch_server", "save_every": 0,
            "preview_every": 2, "preview_steps": 2, "images": ["9", 0]}},
    }
    prompt_id, events = asyncio.run(run_and_watch(server, graph))
    kinds = [m["type"] for k, m in events if k == "json"]
    assert "execution_error" not in kinds, [m for k, m in events if k == "json" and m["type"] == "execution_error"]

    # each preview is a binary frame right after the training node's progress message of that step
    previews = []
    last_progress = None
    for kind, item in events:
        if kind == "json" and item["type"] == "progress" and item["data"].get("node") == "2":
            last_progress = (item["data"]["value"], item["data"]["max"])
        elif kind == "binary":
            event, image_type = struct.unpack(">II", item[:8])
            assert (event, image_type) == (PREVIEW_IMAGE, JPEG)
            previews.append((last_progress, Image.open(io.BytesIO(item[8:]))))
    assert [p for p, _ in previews] == [(2, 4), (4, 4)], [p for p, _ in previews]
    for _, im in previews:
        # the domain sample (square; the server scales previews to 512 px), not a blank
        assert im.size == (512, 512) and np.asarray(im).std() > 0
    steps_seen = [m["data"]["value"] for k, m in events
                  if k == "json" and m["type"] == "progress" and m["data"].get("node") == "2"]
    assert steps_seen[-1] == 4

    folder = server.base / "models" / "domain_unets"
    curve = folder / "watch_server.loss.png"
    assert curve.is_file() and Image.open(curve).size == (800, 480)
    assert sorted(p.name for p in (folder / "watch_server.previews").iterdir()) == [
        "step_000002_domain.png", "step_000004_domain.png"]
    history = server.get_json(f"/history/{prompt_id}")[prompt_id]
    assert history["status"]["status_str"] == "success"
