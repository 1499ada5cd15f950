"""The shared workflows in workflows/ against the REAL ComfyUI server (live /object_info, real runs)."""
from __future__ import annotations

import json

import pytest

from indomain.client import ComfyClient, apply_overrides
from indomain.devkit import workflow_check as check
from indomain.devkit import workflows as specs

FILES = specs.workflow_files()
EXPECTED = {"indomain_1_unconditional", "indomain_2_text_guided", "indomain_3_controlnet", "indomain_4_img2img",
            "indomain_5_multi_guidance"}


@pytest.fixture(scope="module")
def client(server, session_dir):
    """A client for the real server, with the images the workflows' LoadImage nodes name uploaded."""
    c = ComfyClient(server.url)
    # the training workflow's image_folder names a subfolder of the server's input folder
    specs.write_train_images(server.base / "input" / specs.TRAIN_FOLDER, count=4, size=64)
    for path in specs.write_test_images(session_dir / "wf_images").values():
        c.upload_image(path)
    return c


@pytest.fixture(scope="module")
def object_info(server, client):
    return server.get_json("/object_info")  # after the uploads, so LoadImage lists them


def _tiny(obj):
    return specs.substitute(obj, specs.tiny_model_names())


def test_every_workflow_is_there_with_its_api_twin():
    names = {name for name, _, _ in FILES}
    assert EXPECTED <= names, f"missing workflows: {EXPECTED - names}"
    for name, ui, api in FILES:
        assert api.is_file(), f"{ui.name} has no API twin at {api}"
    assert not list(specs.API_DIR.glob("*.json")) or {p.stem for p in specs.API_DIR.glob("*.json")} == names


@pytest.mark.parametrize("name,ui_path,api_path", FILES, ids=[f[0] for f in FILES])
def test_workflow_matches_live_object_info(name, ui_path, api_path, object_info, client):
    ui = json.loads(ui_path.read_text())
    api = json.loads(api_path.read_text())
    # Structure and types with the shipped placeholders; values strictly once models/images are the server's.
    assert check.check_ui(ui, object_info, check_values=False) == []
    assert check.check_ui(_tiny(ui), object_info) == []
    assert check.check_api(_tiny(api), object_info) == []
    # The UI file and its API twin describe the same graph.
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert check.ui_to_api(ui, object_info) == twin
    # Every node is grouped (the graph reads in labelled blocks), and the weights are written in titles/notes.
    grouped_or_note = [n for n in ui["nodes"] if n["type"] in check.FRONTEND_ONLY or _inside_a_group(n, ui["groups"])]
    assert len(grouped_or_note) == len(ui["nodes"])
    notes = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
    assert "2.0" in notes and "25 steps" in notes


def _inside_a_group(node, groups) -> bool:
    x, y = node["pos"]
    return any(g["bounding"][0] <= x <= g["bounding"][0] + g["bounding"][2] and
               g["bounding"][1] <= y <= g["bounding"][1] + g["bounding"][3] for g in groups)


def test_checker_catches_broken_files(object_info):
    """The checks above can fail: a wrong type, an unknown node, a bad widget value, a mislabelled link."""
    _, ui_path, api_path = next(f for f in FILES if f[0] == "indomain_2_text_guided")
    ui = _tiny(json.loads(ui_path.read_text()))
    sampler = next(n for n in ui["nodes"] if n["type"] == "InDomainKSampler")
    bad = json.loads(json.dumps(ui))
    next(n for n in bad["nodes"] if n["id"] == sampler["id"])["widgets_values"][3] = 1000.0  # cfg above max
    assert any("above the maximum" in p for p in check.check_ui(bad, object_info))
    bad = json.loads(json.dumps(ui))
    next(n for n in bad["nodes"] if n["id"] == sampler["id"])["type"] = "InDomainNoSuchNode"
    assert any("unknown node type" in p for p in check.check_ui(bad, object_info))
    bad = json.loads(json.dumps(ui))
    # re-point the sampler's "model" link at the checkpoint's CLIP output
    model_link = next(i["link"] for i in sampler["inputs"] if i["name"] == "model")
    link = next(l for l in bad["links"] if l[0] == model_link)
    link[2] = 1
    assert any("types differ" in p for p in check.check_ui(bad, object_info))
    bad = json.loads(json.dumps(ui))
    next(n for n in bad["nodes"] if n["id"] == sampler["id"])["widgets_values"].pop()
    assert any("widget values" in p for p in check.check_ui(bad, object_info))


def test_workflows_are_served_as_templates(server):
    templates = server.get_json("/workflow_templates")
    assert "indomain" in templates, templates
    names = {name for name, _, _ in FILES}
    assert set(templates["indomain"]) == names  # API twins (workflows/api/) are not offered as templates
    served = json.loads(server.get_bytes("/api/workflow_templates/indomain/indomain_2_text_guided.json"))
    assert served["nodes"] and served["links"]


@pytest.mark.parametrize("name,api_path", [(f[0], f[2]) for f in FILES], ids=[f[0] for f in FILES])
def test_api_twin_runs_on_real_server(name, api_path, client, server, tmp_path):
    wf = _tiny(json.loads(api_path.read_text()))
    if name.endswith("train_and_sample"):
        # a real (tiny) training run on the server: 4 drawn images, 2 steps, 64 px
        # the node reads only subfolders of the server's input folder
        folder = specs.write_train_images(server.base / "input" / f"wf_{tmp_path.name}", count=4, size=64)
        apply_overrides(wf, steps=2, sets=[("InDomainTrainDomainUNet", "image_folder", folder.name),
                                          ("InDomainTrainDomainUNet", "batch_size", 2),
                                          ("InDomainTrainDomainUNet", "resolution", 64),
                                          ("InDomainTrainDomainUNet", "save_every", 0),
                                          ("InDomainTrainDomainUNet", "save_name", f"wf_test_{tmp_path.name}")])
    size = {"width": 64, "height": 64, "batch_size": 1} if "EmptyLatentImage" in json.dumps(wf) else {}
    apply_overrides(wf, seed=3, steps=2, filename_prefix=f"test_{name}", **size)  # img2img: the 64 px upload
    result = client.run(wf, out_dir=tmp_path, timeout=300)
    assert result.images, f"{name}: no images in /history outputs"
    from PIL import Image

    for p in result.images:
        with Image.open(p) as im:
            assert im.size == (64, 64)
