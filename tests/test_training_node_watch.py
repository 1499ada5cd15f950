"""Train Domain UNet with data from core's own image nodes, in a real ComfyUI graph (in-process executor):
a list of differently sized images from core's dataset loader trained in aspect-ratio buckets, with the
loss going to core's Plot Loss Graph; a Load Image batch; and the new inputs' place in the schema."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indomain.forms import domain_info
from indomain.guidance.checkpoint import read_domain_checkpoint
from indomain.training.loss_curve import loss_curve_path

SIZES = [(64, 64), (64, 64), (112, 64), (104, 56), (64, 112), (56, 104)]  # (w, h): square, wide, tall


@pytest.fixture(scope="module")
def input_dir(comfy, session_dir):
    """ComfyUI's input folder for this module: a subfolder of mixed-size pictures and one top-level picture."""
    folder_paths = importlib.import_module("folder_paths")
    before = folder_paths.get_input_directory()
    d = session_dir / "watch_input"
    sub = d / "watch_mixed"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate(SIZES):
        arr = np.full((h, w, 3), 230, dtype=np.uint8)
        arr[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(sub / f"pic_{i}.png")
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3))).save(d / "one.png")
    folder_paths.set_input_directory(str(d))
    yield d
    folder_paths.set_input_directory(before)


def train_node(images_link, save_name, steps=3, **extra):
    return {"class_type": "InDomainTrainDomainUNet", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image_folder": "", "steps": steps,
        "learning_rate": 1e-4, "batch_size": 2, "resolution": 64, "save_name": save_name, "save_every": 0,
        "images": images_link, **extra}}


def test_new_inputs_are_appended_in_the_agreed_order_with_tooltips(comfy):
    schema = comfy.node("InDomainTrainDomainUNet").GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    mine = ["preview_every", "preview_prompt", "preview_steps", "buckets", "images"]
    assert ids.index("grad_checkpointing") < ids.index(mine[0])
    assert [ids.index(n) for n in mine] == sorted(ids.index(n) for n in mine)
    assert all(i.tooltip for i in schema.inputs if i.id in mine)
    assert [o.display_name for o in schema.outputs][:3] == ["domain_model", "file_name", "loss"]
    assert schema.outputs[2].get_io_type() == "LOSS_MAP"  # core's loss type (Plot Loss Graph reads it)


def test_dataset_list_of_mixed_sizes_trains_in_buckets_and_feeds_core_loss_graph(comfy, models_dir, input_dir,
                                                                                    session_dir):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "9": {"class_type": "LoadImageDataSetFromFolder", "inputs": {"folder": "watch_mixed"}},
        "2": train_node(["9", 0], "watch_buckets", buckets=True),
        "10": {"class_type": "LossGraphNode", "inputs": {"loss": ["2", 2], "filename_prefix": "watch_loss"}},
    }
    run = comfy.run(graph, outputs=["2"])
    assert run.output("2", 1) == "watch_buckets.safetensors"
    losses = run.output("2", 2)["loss"]
    assert len(losses) == 3 and all(np.isfinite(losses))
    out = models_dir / "domain_unets" / "watch_buckets.safetensors"
    _, meta = read_domain_checkpoint(out)
    assert meta.training["images"] == 6 and meta.training["steps"] == 3
    buckets = meta.training["buckets"]
    assert sum(buckets.values()) == 6 and len(buckets) == 3, buckets  # square, wide and tall shapes
    assert loss_curve_path(out).is_file()
    saved = run.history["outputs"]["10"]["images"]  # core's Plot Loss Graph drew our loss
    folder_paths = importlib.import_module("folder_paths")
    where = folder_paths.get_directory_by_type(saved[0]["type"])
    assert len(saved) == 1 and (Path(where) / saved[0]["subfolder"] / saved[0]["filename"]).is_file()


def test_load_image_batch_trains(comfy, models_dir, input_dir):
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "9": {"class_type": "LoadImage", "inputs": {"image": "one.png"}},
        "2": train_node(["9", 0], "watch_load_image", steps=2, batch_size=1),
    }
    run = comfy.run(graph, outputs=["2"])
    _, meta = read_domain_checkpoint(models_dir / "domain_unets" / "watch_load_image.safetensors")
    assert meta.training["images"] == 1 and meta.training["steps"] == 2
    assert domain_info(run.output("2", 0)).meta.training["steps"] == 2  # the MODEL output is the trained one


def test_no_folder_and_no_images_is_named(comfy, base):
    node = comfy.node("InDomainTrainDomainUNet")
    model, clip, vae = base
    # ComfyUI loads the pack under its folder's name, so the error class is the loaded pack's own
    with pytest.raises(ValueError, match="no training images.*connect an IMAGE") as e:
        node.execute([model], [clip], [vae], [""], [2], [1e-4], [1], [64], ["watch_none"])
    assert type(e.value).__name__ == "TrainingInputError"
