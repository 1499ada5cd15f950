"""Train Domain UNet inside a real ComfyUI graph (in-process executor), feeding Domain KSampler in
the same graph; and ComfyUI's interrupt saves a checkpoint before stopping."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from indomain.devkit.graphs import sample_with_domain
from indomain.devkit.images import make_image_folder
from indomain.guidance.checkpoint import read_domain_checkpoint


@pytest.fixture(scope="module")
def images(comfy, session_dir):
    """The node reads only subfolders of ComfyUI's input folder: the images go there (removed afterwards)."""
    import shutil
    import uuid

    import folder_paths

    name = f"indomain_node_images_{uuid.uuid4().hex[:8]}"
    folder = Path(folder_paths.get_input_directory()) / name
    make_image_folder(folder, 6, 64, seed=5)
    yield name
    shutil.rmtree(folder, ignore_errors=True)


def train_inputs(images, save_name, steps=3, **extra):
    return {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "image_folder": images, "steps": steps,
            "learning_rate": 1e-4, "batch_size": 2, "resolution": 64, "save_name": save_name, **extra}


def test_schema_order_and_tooltips(comfy):
    schema = comfy.node("InDomainTrainDomainUNet").GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    assert ids[:9] == ["model", "clip", "vae", "image_folder", "steps", "learning_rate", "batch_size", "resolution",
                       "save_name"]
    assert schema.category == "InDomain" and all(i.tooltip for i in schema.inputs)


def test_node_trains_in_a_graph_and_feeds_domain_ksampler(comfy, models_dir, images):
    graph = sample_with_domain("tiny_sd15.safetensors", {"class_type": "InDomainTrainDomainUNet",
                                                          "inputs": train_inputs(images, "node_trained", seed=7)},
                               prompt="a blue square", seed=0, steps=2)
    run = comfy.run(graph, outputs=["2", "6"])
    assert run.output("2", 1) == "node_trained.safetensors"
    path = models_dir / "domain_unets" / "node_trained.safetensors"
    sd, meta = read_domain_checkpoint(path)
    assert meta.training["steps"] == 3 and meta.training["images"] == 6 and meta.training["seed"] == 7
    domain = run.output("2", 0)
    live = domain.model.diffusion_model.state_dict()
    assert all(torch.equal(live[k].float(), sd[k].float()) for k in sd)  # the MODEL output is the saved file
    samples = run.output("6")["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all()


def test_interrupt_saves_a_checkpoint_then_stops(comfy, base, models_dir, images):
    """ComfyUI's interrupt (the UI's Cancel) during training: checkpoint first, then the usual exception."""
    node = comfy.node("InDomainTrainDomainUNet")
    mm = importlib.import_module("comfy.model_management")  # `import comfy...` would shadow the fixture
    set_progress_bar_global_hook = importlib.import_module("comfy.utils").set_progress_bar_global_hook

    model, clip, vae = base

    interrupted_at = []  # ComfyUI 0.33 may throttle progress updates: the hook need not see step 2 itself

    def hook(value, total, preview, node_id=None):
        if value >= 2 and not interrupted_at:
            interrupted_at.append(value)
            mm.interrupt_current_processing(True)

    set_progress_bar_global_hook(hook)
    try:
        with torch.inference_mode():  # as the executor runs nodes
            with pytest.raises(mm.InterruptProcessingException):
                node.execute(model, clip, vae, images, 50, 1e-4, 2, 64, "node_interrupted", 0, False, 0)
    finally:
        set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    path = models_dir / "domain_unets" / "node_interrupted.safetensors"
    _, meta = read_domain_checkpoint(path)
    stopped = interrupted_at[0]  # the checkpoint holds the step the interrupt was requested at
    assert 2 <= stopped < 50
    assert meta.training["steps"] == stopped and meta.training["target_steps"] == 50
    assert (models_dir / "domain_unets" / "node_interrupted.resume").is_file()
    # resume from it through the node: continues to 2 more steps
    with torch.inference_mode():
        out = node.execute(model, clip, vae, images, stopped + 2, 1e-4, 2, 64, "node_interrupted", 0, True, 0)
    _, meta = read_domain_checkpoint(path)
    assert meta.training["steps"] == stopped + 2 and out.result[1] == "node_interrupted.safetensors"
