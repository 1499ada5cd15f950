"""Every template in example_workflows/ loads in the REAL ComfyUI frontend (comfyui-frontend-package, the version
the host pins) in headless Debian Chromium: no missing node types, no error dialog or toast, the frontend's own
'Export (API)' equals the API twin, and a screenshot per workflow lands in artifacts/browser/.

Needs `pip install comfyui-frontend-package playwright` and `apt-get install chromium` (scripts/test.sh does it;
it sets INDOMAIN_REQUIRE_BROWSER=1 so a missing piece fails instead of skipping)."""
from __future__ import annotations

import json
import os

import pytest

from indomain.devkit import browser
from indomain.devkit import host as host_mod
from indomain.devkit import workflows as specs

MISSING = browser.browser_available()
if MISSING and os.environ.get("INDOMAIN_REQUIRE_BROWSER") != "1":
    pytest.skip(f"real-browser test needs: {MISSING} (scripts/test.sh installs them)", allow_module_level=True)

FILES = specs.workflow_files()
# the frontend the host pins in its requirements.txt: 1.32.9 for ComfyUI 0.3.75, 1.49.6 for 0.33.0
FRONTEND_PINS = {"0.3.75": "1.32.9", "0.33.0": "1.49.6"}
DOCS_SHOTS = host_mod.PACK_ROOT / "docs" / "screenshots"


# Which model folder each loader's file combo lists (to serve the files the templates name).
LOADER_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet",
                  "InDomainLoadDomainUNet": "domain_unets", "InDomainExtractDomainLoRA": "domain_unets",
                  # the DiT workflows (issue 19): core's separate loaders
                  "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "TripleCLIPLoader": "text_encoders",
                  "VAELoader": "vae", "CLIPVisionLoader": "clip_vision"}


def files_the_templates_name(server_models: dict) -> dict:
    """The server holds the tiny models under the names the templates ship with (what a user who has those files
    sees): the frontend since 1.4x marks a loader whose file is not on the server as an error, which would hide
    real errors in `errored`."""
    models = {folder: dict(files) for folder, files in server_models.items()}
    stand_in = {folder: next(iter(files.values())) for folder, files in server_models.items()}
    any_file = next(iter(stand_in.values()))  # folders the tests serve nothing in: any file (never loaded here)
    for _, ui_path, _ in FILES:
        for node in json.loads(ui_path.read_text())["nodes"]:
            folder = LOADER_FOLDERS.get(node["type"])
            for value in node.get("widgets_values") or []:
                if folder and isinstance(value, str) and value.endswith(".safetensors"):
                    models.setdefault(folder, {}).setdefault(value, stand_in.get(folder, any_file))
    return models


def images_the_templates_name(input_dir) -> None:
    """Likewise for Load Image: a small picture under each file name the templates use."""
    from PIL import Image

    input_dir.mkdir(parents=True, exist_ok=True)
    for _, ui_path, _ in FILES:
        for node in json.loads(ui_path.read_text())["nodes"]:
            if node["type"] == "LoadImage" and not (input_dir / node["widgets_values"][0]).exists():
                Image.new("RGB", (64, 64), (120, 90, 60)).save(input_dir / node["widgets_values"][0])


@pytest.fixture(scope="module")
def ui_server(session_dir, server_models):
    assert MISSING is None, f"missing for the browser test: {MISSING}"
    base = session_dir / "browser_base"
    browser.skip_intro(base)
    images_the_templates_name(base / "input")
    srv = host_mod.ComfyServer(base, real_frontend=True, models=files_the_templates_name(server_models))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ui(ui_server):
    with browser.FrontendSession(ui_server.url) as session:
        yield session


def test_frontend_is_the_pinned_version(ui):
    pinned = [l for l in (host_mod.comfyui_dir() / "requirements.txt").read_text().splitlines()
              if l.startswith("comfyui-frontend-package")]
    assert pinned, "the host's requirements.txt pins no comfyui-frontend-package"
    pin = pinned[0].split("==")[1].strip()
    known = FRONTEND_PINS.get(host_mod.comfyui_version())
    assert known is None or pin == known, f"ComfyUI {host_mod.comfyui_version()} pins {pin}, expected {known}"
    version = ui.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert version == pin


def test_broken_workflow_is_detected(ui):
    """The checks can fail: an unknown node type is reported, and the frontend shows its dialog."""
    wf = json.loads(FILES[0][1].read_text())
    wf["nodes"][0]["type"] = "InDomainNoSuchNode"
    report = ui.load_workflow(wf, "broken")
    assert "InDomainNoSuchNode" in report["missing"] or any("missing" in d.lower() for d in report["dialogs"])
    ui.page.keyboard.press("Escape")


@pytest.mark.parametrize("name,ui_path,api_path", FILES, ids=[f[0] for f in FILES])
def test_workflow_loads_in_real_frontend(name, ui_path, api_path, ui, artifacts_dir):
    workflow = json.loads(ui_path.read_text())
    report = ui.load_workflow(workflow, name)
    shot = ui.screenshot(artifacts_dir / "browser" / f"{name}.png")
    assert report["count"] == len(workflow["nodes"])
    assert report["missing"] == [], f"missing node types: {report['missing']}"
    assert report["errored"] == [], f"nodes the frontend marks as errored: {report['errored']}"
    assert report["dialogs"] == [], f"dialog(s) after loading: {report['dialogs']}"
    assert report["toasts"] == [], f"toast(s) after loading: {report['toasts']}"
    # The frontend reads every widget value where the file put it: its API export equals our twin.
    assert report["promptError"] is None, report["promptError"]
    twin = json.loads(api_path.read_text())
    exported = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in report["prompt"].items()}
    assert exported == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in twin.items()}
    assert shot.stat().st_size > 10_000
    if os.environ.get("INDOMAIN_UPDATE_SCREENSHOTS") == "1":  # refresh docs/screenshots/ and the thumbnails
        _copy_to_docs(shot, name)
        specs.write_thumbnail(shot, name)


def _copy_to_docs(shot, name):
    from PIL import Image

    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    with Image.open(shot) as im:
        im = im.convert("RGB")
        im.thumbnail((1600, 1600))
        im.save(DOCS_SHOTS / f"{name}.png", optimize=True)


def test_node_help_page_opens_in_the_real_frontend(ui):
    """The Domain KSampler's help page (web/docs/InDomainKSampler.md via WEB_DIRECTORY) shows in the frontend's
    help panel, opened with the selection toolbox's Info button, picture included. Without the page the panel
    falls back to the node's one-line description, which has none of these words."""
    name, ui_path, _ = next(f for f in FILES if f[0] == "indomain_2_text_guided")
    ui.load_workflow(json.loads(ui_path.read_text()), name)
    ui.fit_view()
    page = (host_mod.PACK_ROOT / "web" / "docs" / "InDomainKSampler.md").read_text()
    expect = "Not sure which weights?"
    assert expect in page
    shown = ui.open_node_help("InDomainKSampler", expect)
    assert "domain_on_controlnet" in shown["text"] and "dpmpp_2m" in shown["text"]
    assert shown["images"] and all(i["loaded"] for i in shown["images"]), shown["images"]
    assert all("/extensions/indomain/docs/images/" in i["src"] for i in shown["images"])
    ui.page.keyboard.press("Escape")
