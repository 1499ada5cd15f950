"""The flow-matching DiT workflows (issue 19: Qwen-Image, Qwen-Image-Edit, Wan 2.1 T2V / I2V, Wan 2.2 two experts,
Z-Image / Lumina 2, SD3.5, Flux.2 Klein base) against a REAL ComfyUI server:

(a) each UI file and its API twin validate against the live /object_info (node types exist, widget counts and values
    fit, links join matching types, the UI file is its twin) on every host where all their node types exist; a
    workflow with a node type the host lacks is skipped naming it;
(b) each API twin RUNS on the 0.33 server with tiny models: the diffusion models and the domain LoRAs are
    devkit/tiny_families' models saved under the names the workflow uses, read by core's UNETLoader and the pack's
    Load Domain UNet. Full-size text encoders, VAEs and CLIP vision cannot be built here, so the test swaps core's
    LOADERS (only) for the test-only nodes in tests/standins/ (never shipped) - see SUBSTITUTIONS; every other node
    (CLIPTextEncode, TextEncodeQwenImageEdit, VAEEncode / VAEDecode, CLIPVisionEncode, WanImageToVideo, the shift
    and latent nodes, KSamplerAdvanced, SamplerCustomAdvanced, the pack's nodes) is the real one. Each run is done
    at the workflow's domain weight and at 0, and the pictures must differ (the domain LoRA really acts).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from indomain.client import ComfyClient
from indomain.devkit import host as host_mod
from indomain.devkit import workflow_check as check
from indomain.devkit import workflows as specs

STANDINS = host_mod.PACK_ROOT / "tests" / "standins" / "indomain_test_standins"
FILES = [f for f in specs.workflow_files() if f[0] in specs.DIT_WORKFLOWS]
# "train your domain, then sample" per trained family (issue 20)
TRAIN_FILES = [f for f in specs.workflow_files() if f[0] in specs.DIT_TRAIN_WORKFLOWS]
EXPECTED_TRAIN = {"indomain_18_train_qwen_image", "indomain_19_train_wan21", "indomain_20_train_z_image",
                  "indomain_21_train_sd35", "indomain_22_train_chroma"}
EXPECTED = {"indomain_10_qwen_image", "indomain_11_qwen_image_edit", "indomain_12_wan21_t2v", "indomain_13_wan21_i2v",
            "indomain_14_wan22_two_experts", "indomain_15_z_image", "indomain_16_sd35", "indomain_17_flux2_klein"}

# What the run test swaps in the API twin (core loader -> test-only stand-in, inputs it gets). Nothing else changes.
SUBSTITUTIONS = {
    "CLIPLoader": ("IDTestCLIPLoader", "family of the workflow; clip_name kept"),
    "TripleCLIPLoader": ("IDTestCLIPLoader", "family of the workflow"),
    "VAELoader": ("IDTestVAELoader", "family of the workflow; vae_name kept"),
    "CLIPVisionLoader": ("IDTestCLIPVisionLoader", "clip_name kept"),
    "UNETLoader": ("IDTestTinyUNETLoader", "only for families core's detection cannot rebuild at tiny size "
                                            "(Qwen-Image, Z-Image): the same file under the same name"),
}
# placeholder text encoders / VAEs / clip vision files: listed by the server (so the combos validate), never read
PLACEHOLDER_FOLDERS = {"CLIPLoader": "text_encoders", "TripleCLIPLoader": "text_encoders", "VAELoader": "vae",
                       "CLIPVisionLoader": "clip_vision"}


def _ui(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dit_files(tmp_path_factory):
    """The tiny diffusion models and domain LoRAs under the names the workflows use: {folder: {name: path}}."""
    from indomain.devkit import tiny_families as tf
    from indomain.devkit.domain import make_family_domain_lora
    from indomain.devkit.host import import_comfy

    import_comfy()
    d = tmp_path_factory.mktemp("dit_models")
    out: dict[str, dict] = {}
    for name, (folder, family, seed) in specs.DIT_FILES.items():
        ok, why = tf.available(family)
        if not ok:
            continue
        path = d / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder == "diffusion_models":
            tf.save(family, path, seed=seed)
        else:  # a text-free LoRA of that base (same family, same seed: the weights the server loads)
            make_family_domain_lora(tf.build(family, seed), path, seed=seed + 11)
        out.setdefault(folder, {})[name] = path
    placeholder = d / "placeholder.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"x": torch.zeros(1)}, str(placeholder))
    for _, ui_path, _ in FILES + TRAIN_FILES:
        for node in _ui(ui_path)["nodes"]:
            folder = PLACEHOLDER_FOLDERS.get(node["type"])
            for v in node.get("widgets_values") or []:
                if folder and isinstance(v, str) and v.endswith(".safetensors"):
                    out.setdefault(folder, {})[v] = placeholder
    return out


@pytest.fixture(scope="module")
def dit_server(tmp_path_factory, dit_files):
    base = tmp_path_factory.mktemp("dit_server")
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / STANDINS.name).symlink_to(STANDINS, target_is_directory=True)
    for folder in dit_files:
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    srv = host_mod.ComfyServer(base, models=dit_files)
    specs.write_test_images(base / "input")
    specs.write_train_images(base / "input" / specs.TRAIN_FOLDER, count=4)  # the train workflows' image_folder
    srv.start(timeout=600)  # measured over 180 s on the shared 2-core machine under load
    yield srv
    srv.stop()
    if os.environ.get("INDOMAIN_KEEP_LOGS"):
        import shutil

        (host_mod.PACK_ROOT / "artifacts").mkdir(exist_ok=True)
        shutil.copy(srv.log_path, host_mod.PACK_ROOT / "artifacts" / "dit_server.log")


@pytest.fixture(scope="module")
def object_info(dit_server):
    return dit_server.get_json("/object_info")


def test_every_family_has_its_workflow_and_twin():
    names = {f[0] for f in FILES}
    assert names == EXPECTED == set(specs.DIT_WORKFLOWS)
    for name, ui, api in FILES:
        assert api.is_file(), f"{name} has no API twin"
        types = {n["type"] for n in _ui(ui)["nodes"]}
        # the families' real core loaders, the pack's loader and the empty prompt on a domain sampler
        assert {"UNETLoader", "VAELoader", "InDomainLoadDomainUNet"} <= types
        assert types & {"CLIPLoader", "TripleCLIPLoader"}
        twin = json.loads(api.read_text())
        samplers = [n for n in twin.values() if n["class_type"] in ("InDomainKSampler", "InDomainGuider",
                                                                     "InDomainApplyGuidance")]
        assert samplers and all("empty_prompt" in n["inputs"] for n in samplers)
        for n in samplers:
            src = twin[n["inputs"]["empty_prompt"][0]]
            assert src["class_type"] == "CLIPTextEncode" and src["inputs"]["text"] == ""
    wan22 = json.loads((specs.API_DIR / "indomain_14_wan22_two_experts.json").read_text())
    adv = sorted((n for n in wan22.values() if n["class_type"] == "KSamplerAdvanced"),
                 key=lambda n: n["inputs"]["start_at_step"])
    assert [(n["inputs"]["start_at_step"], n["inputs"]["end_at_step"]) for n in adv] == [(0, 10), (10, 10000)]
    # each expert's sampler runs its own expert patched with its own domain LoRA
    doms = set()
    for n in adv:
        patch = wan22[n["inputs"]["model"][0]]
        assert patch["class_type"] == "InDomainApplyGuidance"
        doms.add(wan22[patch["inputs"]["domain_model"][0]]["inputs"]["domain_unet_name"])
    assert len(doms) == 2


@pytest.mark.parametrize("name,ui_path,api_path", FILES + TRAIN_FILES, ids=[f[0] for f in FILES + TRAIN_FILES])
def test_dit_workflow_matches_live_object_info(name, ui_path, api_path, object_info):
    ui, api = _ui(ui_path), json.loads(api_path.read_text())
    missing = sorted({n["type"] for n in ui["nodes"] if n["type"] not in check.FRONTEND_ONLY} - set(object_info))
    if missing:
        pytest.skip(f"ComfyUI {host_mod.comfyui_version()} has no {', '.join(missing)}")
    assert check.check_ui(ui, object_info) == []  # values too: the server lists every file the workflow names
    assert check.check_api(api, object_info) == []
    twin = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert check.ui_to_api(ui, object_info) == twin
    grouped = [n for n in ui["nodes"] if n["type"] in check.FRONTEND_ONLY or _inside_a_group(n, ui["groups"])]
    assert len(grouped) == len(ui["nodes"])
    notes = " ".join(n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "Note")
    steps = {n["inputs"]["steps"] for n in api.values() if "steps" in n["inputs"]}
    assert "domain_weight 2.0" in notes and all(f"{s} steps" in notes for s in steps), notes


def _inside_a_group(node, groups) -> bool:
    x, y = node["pos"]
    return any(g["bounding"][0] <= x <= g["bounding"][0] + g["bounding"][2] and
               g["bounding"][1] <= y <= g["bounding"][1] + g["bounding"][3] for g in groups)


def test_checker_catches_a_wrong_widget_count(object_info):
    """The validation above can fail: a UNETLoader with a widget dropped, an unknown type."""
    ui = _ui(next(f[1] for f in FILES if f[0] == "indomain_12_wan21_t2v"))
    bad = json.loads(json.dumps(ui))
    next(n for n in bad["nodes"] if n["type"] == "CLIPLoader")["widgets_values"].pop()
    assert any("widget values" in p for p in check.check_ui(bad, object_info))
    next(n for n in bad["nodes"] if n["type"] == "UNETLoader")["type"] = "NoSuchLoader"
    assert any("unknown node type" in p for p in check.check_ui(bad, object_info))


def tiny_run_graph(api: dict, family: str, domain_weight: float | None = None, seed: int = 3) -> dict:
    """The API twin for the tiny run: loaders swapped per SUBSTITUTIONS, 64 px, 2 steps (4 for the expert split)."""
    from indomain.devkit import tiny_families as tf

    wf = json.loads(json.dumps(api))
    for node in wf.values():
        t, inp = node["class_type"], node["inputs"]
        if t in ("CLIPLoader", "TripleCLIPLoader"):
            node["class_type"], node["inputs"] = "IDTestCLIPLoader", {"family": family,
                                                                      "clip_name": inp.get("clip_name", "")}
        elif t == "VAELoader":
            node["class_type"], node["inputs"] = "IDTestVAELoader", {"family": family, "vae_name": inp["vae_name"]}
        elif t == "CLIPVisionLoader":
            node["class_type"] = "IDTestCLIPVisionLoader"
        elif t == "UNETLoader" and not tf.loads_by_detection(family):
            node["class_type"], node["inputs"] = "IDTestTinyUNETLoader", {"unet_name": inp["unet_name"],
                                                                          "family": family}
        for key in ("width", "height"):
            if key in inp and not isinstance(inp[key], list):
                inp[key] = 64
        if "length" in inp:
            inp["length"] = 5  # 2 latent frames
        if t in ("InDomainKSampler", "Flux2Scheduler"):
            inp["steps"] = 2
        if t == "InDomainTrainDomainUNet":  # a short run at 64 px, previews every 2 steps
            inp.update(steps=4, batch_size=2, resolution=64, save_every=0, preview_every=2, preview_steps=2,
                       overwrite=True, learning_rate=1e-3, save_name=f"{inp['save_name']}_{domain_weight}")
        if t == "KSamplerAdvanced":
            inp["steps"] = 4
            inp["start_at_step" if inp["start_at_step"] else "end_at_step"] = 2
        if "seed" in inp:
            inp["seed"] = seed
        if "noise_seed" in inp:
            inp["noise_seed"] = seed
        if domain_weight is not None and "domain_weight" in inp:
            inp["domain_weight"] = domain_weight
        if "filename_prefix" in inp:
            inp["filename_prefix"] = f"dit_test/{family}_{domain_weight}"
    return wf


def _frames(path):
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return [np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(im)]


@pytest.mark.parametrize("name,api_path", [(f[0], f[2]) for f in FILES], ids=[f[0] for f in FILES])
def test_dit_api_twin_runs_with_tiny_models(name, api_path, dit_server, object_info, tmp_path):
    if host_mod.host_version_tuple() < (0, 33):
        pytest.skip(f"the DiT workflows run on the 0.33 host (issue 19); this is {host_mod.comfyui_version()}")
    family = specs.DIT_WORKFLOWS[name]
    api = json.loads(api_path.read_text())
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    assert not missing, missing
    client = ComfyClient(dit_server.url)
    video = any(n["class_type"] == "SaveAnimatedWEBP" for n in api.values())
    outs = {}
    for w_d in (0.0, specs.DOMAIN_WEIGHT):
        wf = tiny_run_graph(api, family, domain_weight=w_d)
        assert {n["class_type"] for n in wf.values()} & {"IDTestCLIPLoader", "IDTestVAELoader"}
        result = client.run(wf, out_dir=tmp_path / str(w_d), timeout=300)
        assert len(result.images) == 1, f"{name}: {len(result.images)} outputs"
        frames = _frames(result.images[0])
        # videos: 2 latent frames decode to 1 + 4 frames (the animated WebP merges identical neighbours, so 2 to 5
        # remain); images: one 64 px picture
        n_ok = 2 <= len(frames) <= 5 if video else len(frames) == 1
        assert n_ok and frames[0].shape == (64, 64, 3), (len(frames), frames[0].shape)
        outs[w_d] = np.stack(frames)
    diff = np.abs(outs[0.0] - outs[specs.DOMAIN_WEIGHT]).mean()
    assert diff > 0.05, f"{name}: domain weight {specs.DOMAIN_WEIGHT} gives the same picture as 0 ({diff})"


# ----------------------------------------------------------------------------- train your domain, then sample


def test_every_trained_family_has_its_train_workflow():
    """Qwen-Image, Wan 2.1, Z-Image, SD3.5, Chroma: the Train node gets the shifted model (Chroma: the loader's, at
    its own shift), the VAE and the encoded empty
    prompt ('clip' unconnected), trains the LoRA form on the image folder, and Domain KSampler samples its output
    with the same model and the same empty prompt."""
    assert {f[0] for f in TRAIN_FILES} == EXPECTED_TRAIN == set(specs.DIT_TRAIN_WORKFLOWS)
    for name, ui, api in TRAIN_FILES:
        assert api.is_file() and specs.thumbnail_path(name).is_file(), name
        twin = json.loads(api.read_text())
        (tid, train), = [(k, n) for k, n in twin.items() if n["class_type"] == "InDomainTrainDomainUNet"]
        inp = train["inputs"]
        assert "clip" not in inp and inp["vae"] and inp["form"] == "lora" and inp["image_folder"] == specs.TRAIN_FOLDER
        assert inp["learning_rate"] == 0.0 and inp["preview_every"] > 0
        empty = twin[inp["empty_prompt"][0]]
        assert empty["class_type"] == "CLIPTextEncode" and empty["inputs"]["text"] == ""
        assert twin[inp["model"][0]]["class_type"] == ("UNETLoader" if specs.DIT_TRAIN_WORKFLOWS[name] == "chroma"
                                                       else "ModelSamplingSD3" if "wan" in name or "sd35" in name
                                                       else "ModelSamplingAuraFlow"), name
        (ks,) = [n for n in twin.values() if n["class_type"] == "InDomainKSampler"]
        assert ks["inputs"]["domain_model"] == [tid, 0]
        assert ks["inputs"]["model"] == inp["model"] and ks["inputs"]["empty_prompt"] == inp["empty_prompt"]


PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE (protocol.py, 0.3.75 and 0.33)


@pytest.mark.parametrize("name,api_path", [(f[0], f[2]) for f in TRAIN_FILES], ids=[f[0] for f in TRAIN_FILES])
def test_dit_train_workflow_trains_then_samples_with_previews_over_the_websocket(name, api_path, dit_server,
                                                                                 object_info, tmp_path):
    """The API twin on the 0.33 server with the tiny family: 4 training steps on the image folder (the stand-in VAE
    encodes it; Wan: a video VAE, each picture a single-frame clip), previews at steps 2 and 4 arrive over the
    websocket right after the Train node's progress message of that step, the trained LoRA is saved with its
    previews, and Domain KSampler's output at domain weight 2 differs from weight 0 (the trained domain acts)."""
    import asyncio
    import io
    import struct

    from PIL import Image

    if host_mod.host_version_tuple() < (0, 33):
        pytest.skip(f"the DiT workflows run on the 0.33 host (issue 19); this is {host_mod.comfyui_version()}")
    family = specs.DIT_TRAIN_WORKFLOWS[name]
    api = json.loads(api_path.read_text())
    outputs = {}
    for w_d in (0.0, specs.DOMAIN_WEIGHT):
        wf = tiny_run_graph(api, family, domain_weight=w_d)
        tid = next(k for k, n in wf.items() if n["class_type"] == "InDomainTrainDomainUNet")
        prompt_id, events = asyncio.run(host_mod.run_and_watch(dit_server, wf))
        errors = [m for k, m in events if k == "json" and m["type"] == "execution_error"]
        assert not errors, errors[0]["data"].get("exception_message")
        previews, last_progress = [], None
        for kind, item in events:
            if kind == "json" and item["type"] == "progress" and item["data"].get("node") == tid:
                last_progress = (item["data"]["value"], item["data"]["max"])
            elif kind == "binary":
                event, _image_type = struct.unpack(">II", item[:8])
                if event == PREVIEW_IMAGE and last_progress is not None and last_progress[1] == 4:
                    previews.append((last_progress, Image.open(io.BytesIO(item[8:]))))
        train_previews = [p for p, _ in previews if p[0] in (2, 4)]
        assert train_previews[:2] == [(2, 4), (4, 4)], [p for p, _ in previews]
        assert all(np.asarray(im).std() > 0 for _, im in previews[:2])
        folder = dit_server.base / "models" / "domain_unets"
        save_name = wf[tid]["inputs"]["save_name"]
        assert (folder / f"{save_name}.safetensors").is_file()
        assert sorted(p.name for p in (folder / f"{save_name}.previews").iterdir()) == [
            "step_000002_domain.png", "step_000004_domain.png"]
        history = dit_server.get_json(f"/history/{prompt_id}")[prompt_id]
        assert history["status"]["status_str"] == "success"
        saved = [im for out in history["outputs"].values() for im in out.get("images", [])]
        assert len(saved) == 1, saved
        frames = _frames(ComfyClient(dit_server.url).download(saved[0], tmp_path / str(w_d)))
        assert frames[0].shape == (64, 64, 3)
        outputs[w_d] = np.stack(frames)
    diff = np.abs(outputs[0.0] - outputs[specs.DOMAIN_WEIGHT]).mean()
    assert diff > 0.05, f"{name}: domain weight {specs.DOMAIN_WEIGHT} gives the same picture as 0 ({diff})"
