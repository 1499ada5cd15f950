"""Reading and editing API-format workflows (node id -> {class_type, inputs, _meta}); no server needed."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ComfyClientError, shown

# Workflows with this node train a model: they run for as long as training takes (no default timeout).
TRAINING_NODES = ("InDomainTrainDomainUNet",)


def load_workflow(path) -> dict:
    """Read an API-format workflow (node id -> {class_type, inputs}). Anything else (a folder, a binary or
    non-UTF-8 file, UI format, an empty object) is refused with a ComfyClientError that says what to pass."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text)
    except FileNotFoundError:
        raise ComfyClientError(f"workflow file not found: {shown(path)}") from None
    except IsADirectoryError:
        raise ComfyClientError(f"{shown(path)} is a folder; pass an API-format workflow file "
                               f"(e.g. workflows/api/indomain_2_text_guided.json)") from None
    except PermissionError:
        raise ComfyClientError(f"cannot read {shown(path)}: permission denied") from None
    except OSError as e:
        raise ComfyClientError(f"cannot read {shown(path)}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ComfyClientError(f"{shown(path)} is not a text file (not UTF-8): pass an API-format workflow JSON "
                               f"file") from None
    except json.JSONDecodeError as e:
        raise ComfyClientError(f"{shown(path)} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ComfyClientError(
            f"{shown(path)} is a UI-format workflow (what the frontend saves). The client needs the API format: "
            f"use the twin in workflows/api/, or in ComfyUI export it with 'Export (API)'.")
    if not isinstance(data, dict) or not data or \
            not all(isinstance(v, dict) and isinstance(v.get("class_type"), str)
                    and isinstance(v.get("inputs", {}), dict) for v in data.values()):
        what = "an empty workflow" if data == {} else "not an API-format workflow"
        raise ComfyClientError(f"{shown(path)} is {what} (expected {{node_id: {{class_type, inputs: {{...}}}}}} with "
                               f"at least one node).")
    return data


def node_title(workflow: dict, node_id) -> str:
    """What a person calls a node: its _meta title, else its class_type, else its id."""
    node = workflow.get(str(node_id)) or {}
    return node.get("_meta", {}).get("title") or node.get("class_type") or f"node {node_id}"


def trains(workflow: dict) -> bool:
    """True when the workflow trains a model (so it may run for hours)."""
    return any(n.get("class_type") in TRAINING_NODES for n in workflow.values())


def find_nodes(workflow: dict, ref: str) -> list[str]:
    """Node ids matching ref: a node id, an exact _meta title, or a class_type (case-sensitive)."""
    if ref in workflow:
        return [ref]
    by_title = [nid for nid, n in workflow.items() if n.get("_meta", {}).get("title") == ref]
    if by_title:
        return by_title
    return [nid for nid, n in workflow.items() if n.get("class_type") == ref]


def set_input(workflow: dict, ref: str, name: str, value) -> list[str]:
    """Set input `name` on every node matching ref (see find_nodes). Refuses unknown nodes/inputs."""
    ids = find_nodes(workflow, ref)
    if not ids:
        titles = sorted({n.get("_meta", {}).get("title", "") for n in workflow.values()} - {""})
        raise ComfyClientError(f"no node {ref!r} in the workflow: use a node id ({', '.join(sorted(workflow, key=_num))}), "
                               f"a class_type or a title ({'; '.join(titles)})")
    for nid in ids:
        inputs = workflow[nid].setdefault("inputs", {})
        if name not in inputs:
            raise ComfyClientError(f"node {nid} ({workflow[nid]['class_type']}) has no input {name!r}; "
                                   f"it has: {', '.join(inputs)}")
        if isinstance(inputs[name], list) and not isinstance(value, list):
            raise ComfyClientError(f"node {nid} input {name!r} is a link from node {inputs[name][0]}; "
                                   f"set a value on that node instead")
        inputs[name] = value
    return ids


def _num(s: str):
    return (0, int(s)) if s.isdigit() else (1, s)


def _nodes_with_input(workflow: dict, name: str, class_types: tuple[str, ...] | None = None) -> list[str]:
    return [nid for nid, n in workflow.items()
            if name in n.get("inputs", {}) and not isinstance(n["inputs"][name], list)
            and (class_types is None or n["class_type"] in class_types)]


def _text_nodes(workflow: dict, role: str) -> list[str]:
    """CLIPTextEncode nodes whose title says they are the positive / negative prompt."""
    return [nid for nid, n in workflow.items()
            if n["class_type"] == "CLIPTextEncode" and role in n.get("_meta", {}).get("title", "").lower()]


def apply_overrides(workflow: dict, *, prompt: str | None = None, negative: str | None = None, seed: int | None = None,
                    steps: int | None = None, cfg: float | None = None, domain_weight: float | None = None,
                    denoise: float | None = None, checkpoint: str | None = None, domain_unet: str | None = None,
                    controlnet: str | None = None, width: int | None = None, height: int | None = None,
                    batch_size: int | None = None, filename_prefix: str | None = None,
                    sets: list[tuple[str, str, object]] = ()) -> dict:
    """Friendly overrides by meaning (every node that has the input), then generic (node, input, value) sets.

    Raises when a friendly override matches nothing, so a typo or the wrong workflow is caught early.
    """
    def put(value, name, class_types=None, nodes=None, what=None):
        if value is None:
            return
        ids = nodes if nodes is not None else _nodes_with_input(workflow, name, class_types)
        if not ids:
            raise ComfyClientError(f"this workflow has no {what or name!r} to override")
        for nid in ids:
            workflow[nid]["inputs"][name] = value

    put(prompt, "text", nodes=_text_nodes(workflow, "positive"), what="positive prompt (CLIPTextEncode titled "
        "'Positive prompt ...')")
    put(negative, "text", nodes=_text_nodes(workflow, "negative"), what="negative prompt (CLIPTextEncode titled "
        "'Negative prompt ...')")
    if seed is not None:
        ids = _nodes_with_input(workflow, "seed") + _nodes_with_input(workflow, "noise_seed")
        if not ids:
            raise ComfyClientError("this workflow has no seed to override")
        for nid in ids:
            key = "seed" if "seed" in workflow[nid]["inputs"] else "noise_seed"
            workflow[nid]["inputs"][key] = int(seed)
    put(steps, "steps")
    put(cfg, "cfg")
    put(domain_weight, "domain_weight", what="domain_weight (Domain KSampler / Guider / Apply Domain Guidance)")
    put(denoise, "denoise")
    put(checkpoint, "ckpt_name")
    put(domain_unet, "domain_unet_name")
    put(controlnet, "control_net_name")
    put(width, "width", ("EmptyLatentImage",))
    put(height, "height", ("EmptyLatentImage",))
    put(batch_size, "batch_size", ("EmptyLatentImage",))
    put(filename_prefix, "filename_prefix")
    for ref, name, value in sets:
        set_input(workflow, ref, name, value)
    return workflow


def parse_set(text: str) -> tuple[str, str, object]:
    """'NODE.INPUT=VALUE' -> (node, input, value); VALUE is JSON when it parses (numbers, true, "..."), else a string.
    NODE may itself contain dots (a title): the input name is the part after the last dot before '='."""
    if "=" not in text:
        raise ComfyClientError(f"--set {text!r}: expected NODE.INPUT=VALUE (e.g. --set 5.steps=30)")
    lhs, raw = text.split("=", 1)
    if "." not in lhs:
        raise ComfyClientError(f"--set {text!r}: expected NODE.INPUT=VALUE (e.g. --set 5.steps=30)")
    node, name = lhs.rsplit(".", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return node.strip(), name.strip(), value


def parse_image_spec(workflow: dict, spec: str) -> tuple[str, str]:
    """'[NODE=]PATH' -> (node ref, path). Titles and paths may both contain '=', so the split is at the first '='
    whose left side names a node of this workflow; with no such '=', the whole text is the path (every LoadImage)."""
    for i, ch in enumerate(spec):
        if ch == "=" and find_nodes(workflow, spec[:i]):
            return spec[:i], spec[i + 1:]
    if "=" in spec and not Path(spec).exists():
        ref = spec.split("=", 1)[0]
        raise ComfyClientError(f"--image {shown(spec)}: there is no node {ref!r} in the workflow and no file "
                               f"{shown(spec)}; use --image NODE=PATH with a node id, title or class_type")
    return "LoadImage", spec
