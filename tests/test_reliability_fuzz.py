"""Issue 13: the fuzz bench's 200-case version. Corrupted domain UNet files through the loader (every tenth
all the way through Load Domain UNet with the real base), mutated API workflows through the client and
the real server's POST /prompt: 0 uncaught exceptions, every case a named error (or a benign mutation that
still loads), nothing written, the server still answering. Also the refusals the fuzz first found."""
from __future__ import annotations

import pytest

from indomain.bench.fuzz import fuzz_checkpoints, fuzz_workflows, load_api_twins

COUNT = 200


def test_fuzzed_checkpoints_are_named_errors(comfy, base, domain_file, tmp_path):
    model, _, _ = base
    r = fuzz_checkpoints(COUNT, seed=13, work=tmp_path / "cases", base_model=model, real_domain=domain_file)
    assert r["outcomes"].get("uncaught", 0) == 0 and not r["failures"], r["failures"][:3]
    assert r["outcomes"]["named_error"] >= COUNT // 2, r["outcomes"]  # most mutations must be refused
    assert not r["written"], r["written"]
    kinds = {k.split(":")[0] for k in r["by_kind"] if k.endswith("named_error")}
    assert {"truncate", "header_length", "nan_inf", "zero_constants", "metadata_missing"} <= kinds, kinds


def test_fuzzed_workflows_are_refused_by_name_and_the_server_survives(server, tmp_path):
    object_info = server.get_json("/object_info")
    r = fuzz_workflows(COUNT, seed=13, server=server, workflows=load_api_twins(), object_info=object_info,
                       work=tmp_path / "wf")
    assert r["count"] == COUNT
    for late in r["refused_at_execution"]:
        print("REFUSED", late)
    assert r["outcomes"] == {"named_error": COUNT}, (r["outcomes"], r["failures"][:3], r["refused_at_execution"][:3])
    assert r["server_alive"] and r["queue_after"] == 0 and not r["written"] and r["server_log_tracebacks"] == 0


@pytest.mark.parametrize("inputs", [None, "x", 5, [1, 2]])
def test_a_node_whose_inputs_are_not_an_object_is_refused_on_reading(tmp_path, inputs):
    """Lost when the client was split into modules (the fuzz found it again: apply_overrides then crashed)."""
    import json

    from indomain.client import ComfyClientError, apply_overrides, load_workflow

    path = tmp_path / "wf.json"
    path.write_text(json.dumps({"1": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}},
                                "2": {"class_type": "KSampler", "inputs": inputs}}))
    with pytest.raises(ComfyClientError, match="not an API-format workflow"):
        apply_overrides(load_workflow(path), filename_prefix="b")


def test_a_partly_valid_workflow_is_refused_whole_and_null_inputs_before_sending(server):
    """What the workflow fuzz found queued after workflows 7-9 joined: ComfyUI 0.3.75 queues a prompt when at least
    one output validates (the weight grid has two: a broken link into one ran the other), and passes a literal
    null to a newer node's combo input unchecked. The client refuses both: all or nothing."""
    import time

    from indomain.client import ComfyClient, ComfyValidationError

    client = ComfyClient(server.url)
    wf = load_api_twins()["indomain_8_weight_grid"]
    preview = next(k for k, v in wf.items() if v["class_type"] == "PreviewImage")
    text = next(k for k, v in wf.items() if v["class_type"] == "CLIPTextEncode")
    wf[preview]["inputs"]["images"] = [text, 0]  # CONDITIONING into IMAGE: only this output is invalid
    with pytest.raises(ComfyValidationError, match=r"only part of the workflow(.|\n)*node " + preview):
        client.submit(wf)
    deadline = time.time() + 120
    while time.time() < deadline:  # what ComfyUI queued was cancelled: the queue empties without running it
        q = client.queue()
        if not q.get("queue_running") and not q.get("queue_pending"):
            break
        time.sleep(0.5)
    assert not q.get("queue_running") and not q.get("queue_pending")
    wf = load_api_twins()["indomain_2_text_guided"]
    loader = next(k for k, v in wf.items() if v["class_type"] == "InDomainLoadDomainUNet")
    wf[loader]["inputs"]["domain_unet_name"] = None
    with pytest.raises(ComfyValidationError, match=f"node {loader} \\(InDomainLoadDomainUNet\\) input 'domain_unet_name'"):
        client.submit(wf)


@pytest.mark.parametrize("node,inputs,needle", [
    ("InDomainKSampler", {"sampler_name": "no_such_sampler"}, "sampler_name 'no_such_sampler' is not one of"),
    ("InDomainKSampler", {"scheduler": "x" * 5000}, "scheduler 'xxx"),
    ("InDomainLoadDomainUNet", {"domain_unet_name": "missing.safetensors"}, "models/domain_unets"),
])
def test_v3_combo_values_are_checked_at_validation(server, node, inputs, needle):
    """ComfyUI 0.3.75 does not check V3 combo values; the nodes do (found by the fuzz: such prompts ran)."""
    from indomain.client import ComfyClient, ComfyValidationError

    wf = load_api_twins()["indomain_2_text_guided"]
    nid = next(k for k, v in wf.items() if v["class_type"] == node)
    wf[nid]["inputs"].update(inputs)
    with pytest.raises(ComfyValidationError, match=needle[:30].replace("(", r"\(")):
        ComfyClient(server.url).submit(wf)


@pytest.mark.parametrize("node", ["InDomainKSampler", "InDomainGuider", "InDomainApplyGuidance"])
def test_domain_start_after_end_is_refused(comfy, node):
    """Defect 6: start > end used to switch the domain term off silently."""
    cls = comfy.node(node)
    args = {"domain_start_percent": 0.8, "domain_end_percent": 0.2}
    if node == "InDomainKSampler":
        call = lambda: cls.execute(None, None, 0, 1, 1.0, 2.0, "euler", "normal", None, None, None, 1.0, False, **args)
    elif node == "InDomainGuider":
        call = lambda: cls.execute(None, None, None, None, 1.0, 2.0, False, **args)
    else:
        call = lambda: cls.execute(None, None, 2.0, False, **args)
    with pytest.raises(ValueError, match="domain_start_percent \\(0.8\\) is after domain_end_percent \\(0.2\\).*swap"):
        call()


@pytest.mark.parametrize("node", ["InDomainKSampler", "InDomainGuider", "InDomainApplyGuidance", "InDomainGuidanceTerm"])
def test_a_nan_weight_is_refused_by_name(comfy, node):
    """ComfyUI turns the widget text "NaN" into float('nan'), which passes its min/max checks (the fuzz found it): the
    sample would be NaN everywhere with no error. The nodes refuse it before touching a model."""
    cls = comfy.node(node)
    nan = float("nan")
    if node == "InDomainKSampler":
        call = lambda: cls.execute(None, None, 0, 1, 1.0, nan, "euler", "normal", None, None, None, 1.0, False)
    elif node == "InDomainGuider":
        call = lambda: cls.execute(None, None, None, None, 1.0, nan, False)
    elif node == "InDomainApplyGuidance":
        call = lambda: cls.execute(None, None, nan, False)
    else:
        call = lambda: cls.execute(None, None, nan, 0.0, 1.0)
    with pytest.raises(ValueError, match="weight = nan is not a finite number"):
        call()
