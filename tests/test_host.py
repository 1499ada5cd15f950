"""The pack in a real ComfyUI host (0.3.75 or 0.33): in-process and through the HTTP server."""
from __future__ import annotations

import pytest

from indomain.devkit.graphs import t2i_core

PACK_NODES = {"InDomainLoadDomainUNet", "InDomainKSampler", "InDomainGuider", "InDomainApplyGuidance",
              "InDomainGuidanceTerm", "InDomainMultiGuider"}


def test_pack_loads_in_process_without_import_failure(comfy):
    assert comfy.pack_loaded, "ComfyUI's load_custom_node reported an import failure for the pack"
    assert PACK_NODES <= set(comfy.pack_nodes)
    for node_id in PACK_NODES:
        schema = comfy.node(node_id).GET_SCHEMA()
        assert schema.category == "InDomain"
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"


def test_pack_loads_in_server_and_object_info_lists_nodes(server):
    info = server.get_json("/object_info")
    assert PACK_NODES <= set(info), sorted(k for k in info if k.startswith("InDomain"))
    pack_lines = [l for l in server.log().splitlines() if "custom_nodes/indomain" in l]
    assert any("seconds:" in l for l in pack_lines), "the pack is missing from ComfyUI's import-times report"
    assert not [l for l in pack_lines if "IMPORT FAILED" in l or "Cannot import" in l], pack_lines
    # the loader's combo lists the domain UNet folder
    combo = info["InDomainLoadDomainUNet"]["input"]["required"]["domain_unet_name"]
    assert "tiny_domain.safetensors" in str(combo)


@pytest.mark.server
def test_core_t2i_graph_through_http_api(server, tmp_path):
    prompt_id = server.client.submit(t2i_core("tiny_sd15.safetensors", prefix="core_t2i"))
    entry = server.client.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["7"]["images"]
    assert images and images[0]["filename"].startswith("core_t2i")
    data = server.client.download(images[0], tmp_path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_controlnet_with_core_apply_advanced(comfy):
    graph = t2i_core("tiny_sd15.safetensors", controlnet="tiny_controlnet.safetensors", prefix="core_cn")
    plain = t2i_core("tiny_sd15.safetensors", prefix="core_plain")
    with_cn = comfy.run(graph, outputs=["5"]).output("5")["samples"]
    without = comfy.run(plain, outputs=["5"]).output("5")["samples"]
    assert with_cn.shape == without.shape == (1, 4, 8, 8)
    assert (with_cn - without).abs().max() > 1e-3, "the ControlNet had no effect on sampling"
