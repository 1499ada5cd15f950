"""The headless client (indomain.client) against the REAL ComfyUI server: overrides, runs, downloads and
the three kinds of failure (unreachable, refused at validation, failed while running)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from indomain.client import (ComfyClient, ComfyClientError, ComfyConnectionError, ComfyExecutionError,
                             ComfyValidationError, apply_overrides, load_workflow, parse_set)
from indomain.devkit import host as host_mod
from indomain.devkit import workflows as specs

TEXT = specs.API_DIR / "indomain_2_text_guided.json"
TINY = ["--checkpoint", "tiny_sd15.safetensors", "--domain-unet", "tiny_domain.safetensors"]


def _cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "indomain.client", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=str(host_mod.PACK_ROOT))


# ----------------------------------------------------------------------------- offline (no server)


def test_overrides_reach_every_matching_input():
    wf = load_workflow(TEXT)
    apply_overrides(wf, prompt="a red barn", negative="fog", seed=11, steps=7, cfg=3.0, domain_weight=1.5,
                    checkpoint="a.safetensors", domain_unet="d.safetensors", width=96, height=80,
                    sets=[("Domain KSampler (cfg 2.5, domain weight 2.0)", "denoise", 0.5), ("EmptyLatentImage", "batch_size", 2)])
    by_type = {n["class_type"]: n["inputs"] for n in wf.values() if n["class_type"] != "CLIPTextEncode"}
    texts = {n["_meta"]["title"]: n["inputs"]["text"] for n in wf.values() if n["class_type"] == "CLIPTextEncode"}
    assert sorted(texts.values()) == ["a red barn", "fog"]
    k = by_type["InDomainKSampler"]
    assert (k["seed"], k["steps"], k["cfg"], k["domain_weight"], k["denoise"]) == (11, 7, 3.0, 1.5, 0.5)
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "a.safetensors"
    assert by_type["InDomainLoadDomainUNet"]["domain_unet_name"] == "d.safetensors"
    assert (by_type["EmptyLatentImage"]["width"], by_type["EmptyLatentImage"]["height"],
            by_type["EmptyLatentImage"]["batch_size"]) == (96, 80, 2)


def test_overrides_refuse_what_is_not_there(tmp_path):
    wf = load_workflow(TEXT)
    with pytest.raises(ComfyClientError, match="no 'control_net_name'"):
        apply_overrides(wf, controlnet="cn.safetensors")
    with pytest.raises(ComfyClientError, match="has no input 'nonsense'"):
        apply_overrides(wf, sets=[("InDomainKSampler", "nonsense", 1)])
    with pytest.raises(ComfyClientError, match="no node 'NoSuchNode'"):
        apply_overrides(wf, sets=[("NoSuchNode", "seed", 1)])
    with pytest.raises(ComfyClientError, match="is a link"):
        apply_overrides(wf, sets=[("InDomainKSampler", "model", 3)])
    ui_file = specs.WORKFLOWS_DIR / "indomain_2_text_guided.json"
    with pytest.raises(ComfyClientError, match="UI-format.*API format"):
        load_workflow(ui_file)
    assert parse_set("Positive prompt.text=a cat") == ("Positive prompt", "text", "a cat")
    assert parse_set("5.cfg=3.5") == ("5", "cfg", 3.5)
    with pytest.raises(ComfyClientError, match="NODE.INPUT=VALUE"):
        parse_set("cfg=3")


def test_cli_dry_run_prints_the_final_workflow():
    r = _cli(TEXT, "--dry-run", "--seed", 5, "--set", "InDomainKSampler.domain_weight=0", *TINY)
    assert r.returncode == 0, r.stderr
    wf = json.loads(r.stdout)
    k = next(n["inputs"] for n in wf.values() if n["class_type"] == "InDomainKSampler")
    assert (k["seed"], k["domain_weight"]) == (5, 0)


def test_unreachable_server_is_a_clear_error():
    port = host_mod.free_port()  # nothing listens there
    with pytest.raises(ComfyConnectionError, match=f"cannot reach ComfyUI at http://127.0.0.1:{port}.*--server"):
        ComfyClient(f"127.0.0.1:{port}", timeout=5).run(load_workflow(TEXT))
    r = _cli(TEXT, "--server", f"http://127.0.0.1:{port}")
    assert r.returncode == 3 and "cannot reach ComfyUI" in r.stderr


# ----------------------------------------------------------------------------- on the real server


def test_cli_runs_and_downloads(server, tmp_path):
    out = tmp_path / "images"
    r = _cli(TEXT, "--server", server.url, "--out", out, "--seed", 9, "--steps", 2, "--width", 64, "--height", 64,
             "--prompt", "a red circle", "--domain-weight", 2.0, *TINY)
    assert r.returncode == 0, r.stderr
    paths = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(paths) == 1 and paths[0].endswith(".png")
    from PIL import Image

    with Image.open(paths[0]) as im:
        assert im.size == (64, 64)
    assert "submitted prompt" in r.stderr and "done in" in r.stderr


def test_same_seed_same_image_and_domain_weight_matters(server, tmp_path):
    """Through HTTP: the run is repeatable from its seed, and domain_weight changes the picture."""
    import numpy as np
    from PIL import Image

    client = ComfyClient(server.url)

    def run(weight, tag):
        wf = load_workflow(TEXT)
        apply_overrides(wf, seed=4, steps=2, width=64, height=64, domain_weight=weight,
                        checkpoint="tiny_sd15.safetensors", domain_unet="tiny_domain.safetensors",
                        filename_prefix=f"client_{tag}")
        (path,) = client.run(wf, out_dir=tmp_path / tag).images
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.int16)

    a, b, c = run(0.0, "a"), run(0.0, "b"), run(2.0, "c")
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 0.5


def test_validation_error_names_the_node_and_the_fix(server):
    wf = load_workflow(TEXT)
    apply_overrides(wf, checkpoint="no_such_model.safetensors", domain_unet="tiny_domain.safetensors")
    with pytest.raises(ComfyValidationError) as e:
        ComfyClient(server.url).submit(wf)
    msg = str(e.value)
    assert "CheckpointLoaderSimple" in msg and "ckpt_name" in msg and "no_such_model.safetensors" in msg
    assert "fix:" in msg
    assert e.value.body.get("node_errors")
    r = _cli(TEXT, "--server", server.url, "--checkpoint", "no_such_model.safetensors")
    assert r.returncode == 2 and "ckpt_name" in r.stderr


def test_execution_error_is_reported(server, tmp_path):
    """Valid at submission, fails while running: a Guidance Term with start after end raises in the node."""
    wf = load_workflow(specs.API_DIR / "indomain_5_multi_guidance.json")
    wf = specs.substitute(wf, specs.tiny_model_names())
    hint = specs.write_test_images(tmp_path)[specs.HINT_IMAGE]
    client = ComfyClient(server.url)
    client.upload_image(hint)
    apply_overrides(wf, steps=1, width=64, height=64,
                    sets=[("Term 1: text (w 2.5)", "start_percent", 0.9), ("Term 1: text (w 2.5)", "end_percent", 0.1)])
    with pytest.raises(ComfyExecutionError, match=r"InDomainGuidanceTerm.*start_percent.*swap them") as e:
        client.run(wf, timeout=300)
    assert e.value.details.get("node_type") == "InDomainGuidanceTerm"
