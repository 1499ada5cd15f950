"""The shared workflows (templates in example_workflows/, API twins in workflows/api/) against the REAL ComfyUI
server: live /object_info, the template listing, real runs of every twin, and the presets' own checks."""
from __future__ import annotations

import json

import pytest

from indomain.client import ComfyClient, apply_overrides
from indomain.devkit import workflow_check as check
from indomain.devkit import workflows as specs

# The flow-matching DiT workflows (specs.DIT_WORKFLOWS) need their own models and loader stand-ins: validated and run
# by tests/test_dit_workflows.py; here they only count as templates (listing, thumbnails).
ALL_FILES = specs.workflow_files()
FILES = [f for f in ALL_FILES if f[0] not in specs.DIT_WORKFLOWS and f[0] not in specs.DIT_TRAIN_WORKFLOWS]
EXPECTED = {"indomain_1_unconditional", "indomain_2_text_guided", "indomain_3_controlnet", "indomain_4_img2img",
            "indomain_5_multi_guidance", "indomain_6_train_and_sample", "indomain_7_domain_guidance",
            "indomain_8_weight_grid"}


@pytest.fixture(scope="module")
def client(server, session_dir):
    """A client for the real server, with the images the workflows' LoadImage nodes name uploaded and the Domain
    Guidance preset's fine-tune (a second tiny checkpoint) in its checkpoints folder."""
    finetuned = server.base / "models" / "checkpoints" / specs.TINY_FINETUNED
    if not finetuned.exists():
        finetuned.symlink_to(specs.tiny_finetuned_checkpoint())
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
    names = {name for name, _, _ in ALL_FILES}
    assert EXPECTED <= names, f"missing workflows: {EXPECTED - names}"
    for name, ui, api in ALL_FILES:
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


def test_example_workflows_are_the_templates_with_thumbnails(server):
    """/workflow_templates lists exactly example_workflows/*.json for the pack (the API twins are not offered),
    and each template's same-name .jpg thumbnail (from the real frontend's screenshot) is served beside it."""
    from PIL import Image

    templates = server.get_json("/workflow_templates")
    assert "indomain" in templates, templates
    on_disk = {p.stem for p in specs.TEMPLATES_DIR.glob("*.json")}
    assert sorted(templates["indomain"]) == sorted(on_disk) and EXPECTED <= on_disk
    assert not list((specs.PACK_ROOT / "workflows").glob("*.json"))  # would be listed too (ComfyUI reads workflows/)
    served = json.loads(server.get_bytes("/api/workflow_templates/indomain/indomain_2_text_guided.json"))
    assert served["nodes"] and served["links"]
    for name in sorted(on_disk):
        thumb = specs.thumbnail_path(name)
        assert thumb.is_file(), f"{name} has no thumbnail (run the browser test with INDOMAIN_UPDATE_SCREENSHOTS=1)"
        assert server.get_bytes(f"/api/workflow_templates/indomain/{thumb.name}") == thumb.read_bytes()
        with Image.open(thumb) as im:
            assert im.format == "JPEG" and im.width >= 320 and im.width > im.height


@pytest.mark.parametrize("name,api_path", [(f[0], f[2]) for f in FILES], ids=[f[0] for f in FILES])
def test_api_twin_runs_on_real_server(name, api_path, client, server, tmp_path):
    wf = _tiny(json.loads(api_path.read_text()))
    if "_train_" in name:
        # a real (tiny) training run on the server: 4 drawn images, 2 steps, 64 px
        # the node reads only subfolders of the server's input folder
        folder = specs.write_train_images(server.base / "input" / f"wf_{tmp_path.name}", count=4, size=64)
        apply_overrides(wf, steps=2, sets=[("InDomainTrainDomainUNet", "image_folder", folder.name),
                                          ("InDomainTrainDomainUNet", "batch_size", 2),
                                          ("InDomainTrainDomainUNet", "resolution", 64),
                                          ("InDomainTrainDomainUNet", "save_every", 0),
                                          ("InDomainTrainDomainUNet", "save_name", f"wf_test_{tmp_path.name}")])
    if name.endswith("weight_grid"):
        apply_overrides(wf, sets=[("InDomainWeightGrid", "domain_weights", "0, 2"),
                                  ("InDomainWeightGrid", "cfgs", "2.5")])  # 2 cells keep it short on CPU
    size = {"width": 64, "height": 64, "batch_size": 1} if "EmptyLatentImage" in json.dumps(wf) else {}
    apply_overrides(wf, seed=3, steps=2, filename_prefix=f"test_{name}", **size)  # img2img: the 64 px upload
    result = client.run(wf, out_dir=tmp_path, timeout=300)
    assert result.images, f"{name}: no images in /history outputs"
    from PIL import Image

    for p in result.images:
        with Image.open(p) as im:
            if name.endswith("weight_grid"):  # one labelled grid: 2 rows x 1 column of 64 px cells plus headers
                assert im.width > 64 and im.height > 2 * 64
            else:
                assert im.size == (64, 64)


def _pixels(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_weight_grid_cells_equal_domain_ksampler_runs(client, tmp_path):
    """Every cell of the grid is the Domain KSampler's picture for that (w_d, cfg) with the same seed: checked
    against separate runs of the text-guided twin (an independent path through the server)."""
    import numpy as np

    grid_wf = _tiny(json.loads((specs.API_DIR / "indomain_8_weight_grid.json").read_text()))
    apply_overrides(grid_wf, seed=5, steps=2, width=64, height=64, filename_prefix="grid_check",
                    sets=[("InDomainWeightGrid", "domain_weights", "0, 2"), ("InDomainWeightGrid", "cfgs", "2.5, 4")])
    entry = client.run(grid_wf, timeout=600).history
    cells_node = next(nid for nid, n in grid_wf.items() if n["class_type"] == "PreviewImage")
    cells = [_pixels(client.download(img, tmp_path / "cells")) for img in entry["outputs"][cells_node]["images"]]
    assert len(cells) == 4
    # Same maths, separate runs: equal (measured: identical bytes on CPU; one level allowed for rounding), while a
    # different (w_d, cfg) moves pixels by more.
    refs = []
    for i, (w_d, cfg) in enumerate([(0.0, 2.5), (0.0, 4.0), (2.0, 2.5), (2.0, 4.0)]):
        wf = _tiny(json.loads((specs.API_DIR / "indomain_2_text_guided.json").read_text()))
        apply_overrides(wf, seed=5, steps=2, width=64, height=64, cfg=cfg, domain_weight=w_d, negative="",
                        prompt="a cat wearing a hat, sitting on a chair", filename_prefix=f"grid_ref_{i}")
        (ref,) = client.run(wf, out_dir=tmp_path / f"ref_{i}", timeout=300).images
        refs.append(_pixels(ref))
    for i in range(4):
        same = np.abs(cells[i] - refs[i])
        others = min(np.abs(cells[i] - refs[j]).mean() for j in range(4) if j != i)
        assert same.max() <= 1, f"cell {i} differs from its Domain KSampler run"
        assert others > 0.5, f"cell {i} is as close to another cell's run"


def test_domain_guidance_preset_uses_the_finetune_against_pretrained_u(client, tmp_path):
    """The preset's weight matters, and with the fine-tune replaced by the pretrained model it is plain CFG
    (core KSampler, same seed/steps/sampler) - so the fine-tune really is the term and u the pretrained model."""
    import numpy as np

    def preset(weight, finetune, tag):
        wf = _tiny(json.loads((specs.API_DIR / "indomain_7_domain_guidance.json").read_text()))
        apply_overrides(wf, seed=6, steps=3, width=64, height=64, filename_prefix=f"dg_{tag}",
                        sets=[("InDomainGuidanceTerm", "weight", weight),
                              ("Fine-tuned checkpoint (your domain)", "ckpt_name", finetune)])
        (path,) = client.run(wf, out_dir=tmp_path / tag, timeout=300).images
        return _pixels(path)

    tuned, same_model = preset(5.0, specs.TINY_FINETUNED, "tuned"), preset(5.0, "tiny_sd15.safetensors", "base")
    assert np.abs(tuned - same_model).mean() > 0.5
    core = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat sitting on a chair", "clip": ["1", 1]}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 6, "steps": 3, "cfg": 5.0,
                                                        "sampler_name": specs.SAMPLER, "scheduler": specs.SCHEDULER,
                                                        "positive": ["2", 0], "negative": ["3", 0],
                                                        "latent_image": ["4", 0], "denoise": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "dg_core"}}}
    (core_path,) = client.run(core, out_dir=tmp_path / "core", timeout=300).images
    assert np.abs(same_model - _pixels(core_path)).max() <= 1


def _pack_nodes(object_info: dict) -> dict:
    return {k: v for k, v in object_info.items() if k.startswith("InDomain")}


def test_every_node_has_a_help_page_naming_each_input(server, object_info):
    """web/docs/<NodeId>.md exists for every node of the pack, names every input the live schema has, its pictures
    exist, and the server serves it where the frontend's help panel looks (/extensions/<folder>/docs/)."""
    import re

    pack = _pack_nodes(object_info)
    assert len(pack) >= 8
    docs = specs.PACK_ROOT / "web" / "docs"
    for node_id, info in pack.items():
        page = docs / f"{node_id}.md"
        assert page.is_file(), f"{node_id} has no help page {page}"
        text = page.read_text()
        assert text.startswith(f"# {info['display_name']}\n")
        missing = [name for name, _, _ in check.ordered_inputs(info) if f"`{name}`" not in text]
        assert not missing, f"{page.name} does not describe {missing}"
        for picture in re.findall(r"\]\((images/[^)]+)\)", text):
            assert (docs / picture).is_file(), f"{page.name}: {picture} is missing"
        assert server.get_bytes(f"/extensions/indomain/docs/{node_id}.md") == page.read_bytes()


def test_search_aliases_where_the_host_supports_them(comfy, object_info):
    """Hosts whose io.Schema has `search_aliases` (ComfyUI 0.33) list ours in /object_info; older hosts (0.3.75,
    whose frontend searches names only) load the nodes without them."""
    from indomain.nodes.search import ALIASES, host_supports_aliases

    pack = _pack_nodes(object_info)
    assert set(pack) == set(ALIASES)
    for phrase in ("domain guidance", "decoupled cfg", "null text"):
        assert sum(phrase in words for words in ALIASES.values()) >= 2
    if host_supports_aliases():
        assert {k: v.get("search_aliases") for k, v in pack.items()} == ALIASES
    else:
        assert not any(v.get("search_aliases") for v in pack.values())
