"""Check workflow files against a live /object_info: node types exist, links join matching types,
widget values fit their inputs, and a UI file agrees with its API twin.

It shares only the schema reader (node_schema.py) with workflow_builder; the files themselves are read
back from JSON, and the browser test checks both against the real frontend's own 'Export (API)'.
"""
from __future__ import annotations

from .node_schema import FRONTEND_ONLY, input_type, is_widget, options, ordered_inputs, widget_slots

CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def types_match(out_type: str, in_type: str) -> bool:
    if out_type == "*" or in_type == "*":
        return True
    outs, ins = set(str(out_type).split(",")), set(str(in_type).split(","))
    return bool(outs & ins)


def value_problem(name: str, spec: list, value) -> str | None:
    """Why `value` is not valid for the input, or None."""
    kind, opts = spec[0], options(spec)
    if isinstance(kind, list) or kind == "COMBO":
        choices = kind if isinstance(kind, list) else opts.get("options", [])
        return None if value in choices else f"{name}={value!r} is not one of the server's options {choices[:8]}"
    if kind == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an integer"
    elif kind == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} is not a number"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    else:
        return None
    if "min" in opts and value < opts["min"]:
        return f"{name}={value} is below the minimum {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}={value} is above the maximum {opts['max']}"
    return None


def check_ui(wf: dict, object_info: dict, check_values: bool = True) -> list[str]:
    """Problems of a UI-format workflow (empty list = fine)."""
    problems = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "version"):
        if key not in wf:
            problems.append(f"missing top-level key {key!r}")
    nodes = {n["id"]: n for n in wf.get("nodes", [])}
    for n in nodes.values():
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        if t not in object_info:
            problems.append(f"node {n['id']}: unknown node type {t!r}")
            continue
        info = object_info[t]
        slots = widget_slots(info)
        values = n.get("widgets_values", [])
        # The upload button's value is optional in saved files.
        if len(values) == len(slots) - sum(1 for s, _ in slots if s == "upload"):
            slots = [s for s in slots if s[0] != "upload"]
        if len(values) != len(slots):
            problems.append(f"node {n['id']} ({t}): {len(values)} widget values, the schema has {len(slots)} "
                            f"widgets {[s for s, _ in slots]}")
        elif check_values:
            for (name, spec), v in zip(slots, values):
                if spec is None:
                    if name.endswith("control_after_generate") and v not in CONTROL_VALUES:
                        problems.append(f"node {n['id']} ({t}): {name}={v!r} is not one of {sorted(CONTROL_VALUES)}")
                    continue
                p = value_problem(name, spec, v)
                if p:
                    problems.append(f"node {n['id']} ({t}): {p}")
        schema_inputs = {name: spec for name, spec, _ in ordered_inputs(info)}
        for i, inp in enumerate(n.get("inputs", [])):
            if inp["name"] not in schema_inputs:
                problems.append(f"node {n['id']} ({t}): input {inp['name']!r} is not in the schema")
        required = {name for name, spec, opt in ordered_inputs(info) if not opt and not is_widget(spec)}
        linked = {inp["name"] for inp in n.get("inputs", []) if inp.get("link") is not None}
        if required - linked:
            problems.append(f"node {n['id']} ({t}): required inputs not connected: {sorted(required - linked)}")
    link_ids = set()
    for link in wf.get("links", []):
        lid, src, sslot, dst, dslot, ltype = link
        link_ids.add(lid)
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: node {src if src not in nodes else dst} does not exist")
            continue
        s, d = nodes[src], nodes[dst]
        if s["type"] not in object_info or d["type"] not in object_info:
            continue
        outs = object_info[s["type"]]["output"]
        if sslot >= len(outs):
            problems.append(f"link {lid}: {s['type']} has no output {sslot}")
            continue
        if dslot >= len(d.get("inputs", [])):
            problems.append(f"link {lid}: {d['type']} #{dst} has no input slot {dslot}")
            continue
        inp = d["inputs"][dslot]
        if inp.get("link") != lid:
            problems.append(f"link {lid}: target {d['type']} #{dst} input {inp['name']!r} does not point back at it")
        schema = {name: spec for name, spec, _ in ordered_inputs(object_info[d["type"]])}
        if inp["name"] in schema:
            in_type = input_type(schema[inp["name"]])
            if not types_match(outs[sslot], in_type):
                problems.append(f"link {lid}: {s['type']} output {sslot} ({outs[sslot]}) -> {d['type']} "
                                f"{inp['name']} ({in_type}): types differ")
        if ltype != outs[sslot]:
            problems.append(f"link {lid}: declared type {ltype!r}, the output is {outs[sslot]!r}")
        if lid not in (s["outputs"][sslot].get("links") or []):
            problems.append(f"link {lid}: source {s['type']} #{src} output {sslot} does not list it")
    if link_ids and wf.get("last_link_id", 0) < max(link_ids):
        problems.append("last_link_id is smaller than a link id")
    if nodes and wf.get("last_node_id", 0) < max(nodes):
        problems.append("last_node_id is smaller than a node id")
    return problems


def ui_to_api(wf: dict, object_info: dict) -> dict:
    """What the frontend's 'Export (API)' produces for this UI file (widget values by name, links as [id, slot])."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {l[0]: l for l in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        info = object_info[n["type"]]
        inputs = {}
        slots = widget_slots(info)
        values = list(n.get("widgets_values", []))
        if len(values) != len(slots):
            slots = [s for s in slots if s[0] != "upload"]
        for (name, spec), v in zip(slots, values):
            if spec is not None:
                inputs[name] = v
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                l = links[inp["link"]]
                inputs[inp["name"]] = [str(l[1]), l[2]]
        order = [name for name, _, _ in ordered_inputs(info)]
        prompt[str(n["id"])] = {"class_type": n["type"],
                                "inputs": {k: inputs[k] for k in order if k in inputs}}
        assert nodes[n["id"]] is n
    return prompt


def check_api(prompt: dict, object_info: dict, check_values: bool = True) -> list[str]:
    problems = []
    for nid, node in prompt.items():
        t = node.get("class_type")
        if t not in object_info:
            problems.append(f"node {nid}: unknown node type {t!r}")
            continue
        info = object_info[t]
        schema = {name: (spec, opt) for name, spec, opt in ordered_inputs(info)}
        for name, v in node.get("inputs", {}).items():
            if name not in schema:
                problems.append(f"node {nid} ({t}): input {name!r} is not in the schema")
                continue
            spec, _ = schema[name]
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                src = prompt.get(v[0])
                if src is None:
                    problems.append(f"node {nid} ({t}): input {name!r} links to missing node {v[0]}")
                    continue
                outs = object_info.get(src["class_type"], {}).get("output", [])
                if v[1] >= len(outs):
                    problems.append(f"node {nid} ({t}): input {name!r} links to missing output {v[1]} of node {v[0]}")
                elif not types_match(outs[v[1]], input_type(spec)):
                    problems.append(f"node {nid} ({t}): input {name!r} ({input_type(spec)}) gets {outs[v[1]]}")
            elif check_values:
                p = value_problem(name, spec, v)
                if p:
                    problems.append(f"node {nid} ({t}): {p}")
        for name, (spec, opt) in schema.items():
            if not opt and name not in node.get("inputs", {}):
                problems.append(f"node {nid} ({t}): required input {name!r} missing")
    return problems
