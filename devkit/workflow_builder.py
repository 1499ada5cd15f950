"""Build a ComfyUI workflow once, emit it twice: the UI format (what the frontend saves, for drag and
drop) and its API-format twin (what POST /prompt takes).

A spec names nodes, their widget values and their links; the node schemas (input order, which
inputs are widgets, output types) come from a live `/object_info`, so the files follow the real host.

    wf = Workflow("text_guided")
    ckpt = wf.add("CheckpointLoaderSimple", (0, 0), ckpt_name="v1-5-pruned-emaonly.safetensors")
    enc = wf.add("CLIPTextEncode", (400, 0), title="Positive prompt", text="a cat", clip=ckpt[1])
    wf.group("Models", [ckpt], color="#3f789e")
    ui, api = wf.ui(object_info), wf.api(object_info)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .node_schema import FRONTEND_ONLY, has_control_widget, is_widget, ordered_inputs


@dataclass(frozen=True)
class Out:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    title: str | None
    values: dict
    size: tuple[float, float] | None = None
    color: str | None = None
    bgcolor: str | None = None

    def __getitem__(self, slot: int) -> Out:
        return Out(self, slot)


@dataclass
class Group:
    title: str
    nodes: list[Node]
    color: str
    padding: int = 40


@dataclass
class Workflow:
    name: str
    nodes: list[Node] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)

    def add(self, type_: str, pos, title: str | None = None, size=None, color=None, bgcolor=None, **values) -> Node:
        node = Node(len(self.nodes) + 1, type_, tuple(pos), title, values, tuple(size) if size else None, color, bgcolor)
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=(360, 160), title: str = "Note") -> Node:
        return self.add("Note", pos, title=title, size=size, color="#432", bgcolor="#653", text=text)

    def group(self, title: str, nodes: list[Node], color: str = "#3f789e") -> Group:
        g = Group(title, nodes, color)
        self.groups.append(g)
        return g

    # ------------------------------------------------------------------ schema helpers
    def _info(self, node: Node, object_info: dict) -> dict:
        if node.type not in object_info:
            raise KeyError(f"{self.name}: node type {node.type!r} is not in /object_info (is its pack loaded?)")
        return object_info[node.type]

    def _check_values(self, node: Node, info: dict) -> None:
        known = {name for name, _, _ in ordered_inputs(info)} | {"control_after_generate"}
        unknown = set(node.values) - known
        if unknown:
            raise KeyError(f"{self.name}: {node.type} #{node.id} has no inputs {sorted(unknown)}")

    # ------------------------------------------------------------------ emitters
    def api(self, object_info: dict) -> dict:
        prompt = {}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                continue
            info = self._info(node, object_info)
            self._check_values(node, info)
            inputs = {}
            for name, spec, optional in ordered_inputs(info):
                if name not in node.values:
                    default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if optional and is_widget(spec) and default is not None:
                        inputs[name] = default  # as the UI file shows it (ui() below), so the twins agree
                        continue
                    if optional:
                        continue
                    raise KeyError(f"{self.name}: {node.type} #{node.id} needs a value or link for {name!r}")
                v = node.values[name]
                inputs[name] = [str(v.node.id), v.slot] if isinstance(v, Out) else v
            prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs,
                                    "_meta": {"title": node.title or info.get("display_name") or node.type}}
        return prompt

    def ui(self, object_info: dict) -> dict:
        links = []  # [id, from_node, from_slot, to_node, to_slot, type]
        out_links: dict[tuple[int, int], list[int]] = {}
        node_inputs: dict[int, list[dict]] = {}
        node_widgets: dict[int, list] = {}
        for node in self.nodes:
            if node.type in FRONTEND_ONLY:
                node_inputs[node.id] = []
                node_widgets[node.id] = [node.values["text"]]
                continue
            info = self._info(node, object_info)
            self._check_values(node, info)
            inputs, widgets = [], []
            for name, spec, optional in ordered_inputs(info):
                v = node.values.get(name)
                if is_widget(spec) and not isinstance(v, Out):
                    if v is None and optional:  # an unset optional widget shows its schema default
                        v = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                    if v is None:
                        raise KeyError(f"{self.name}: {node.type} #{node.id} needs a value for widget {name!r}")
                    widgets.append(v)
                    if has_control_widget(name, spec):
                        widgets.append(node.values.get("control_after_generate", "fixed"))
                    continue
                slot = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
                if isinstance(v, Out):
                    src_info = self._info(v.node, object_info)
                    link_type = src_info["output"][v.slot]
                    link_id = len(links) + 1
                    links.append([link_id, v.node.id, v.slot, node.id, len(inputs), link_type])
                    out_links.setdefault((v.node.id, v.slot), []).append(link_id)
                    slot["link"] = link_id
                elif not optional:
                    raise KeyError(f"{self.name}: {node.type} #{node.id} input {name!r} is not connected")
                inputs.append(slot)
            node_inputs[node.id] = inputs
            node_widgets[node.id] = widgets

        order = self._topological_order()
        ui_nodes = []
        for node in self.nodes:
            entry = {"id": node.id, "type": node.type, "pos": list(node.pos),
                     "size": list(node.size or self._default_size(node, node_inputs[node.id], node_widgets[node.id])),
                     "flags": {}, "order": order[node.id], "mode": 0,
                     "inputs": node_inputs[node.id], "outputs": [],
                     "properties": {"Node name for S&R": node.type}, "widgets_values": node_widgets[node.id]}
            if node.type not in FRONTEND_ONLY:
                info = object_info[node.type]
                for i, (otype, oname) in enumerate(zip(info["output"], info["output_name"])):
                    entry["outputs"].append({"name": oname, "type": otype,
                                             "links": out_links.get((node.id, i), []), "slot_index": i})
            else:
                entry["properties"] = {"text": ""}
            if node.title:
                entry["title"] = node.title
            if node.color:
                entry["color"] = node.color
            if node.bgcolor:
                entry["bgcolor"] = node.bgcolor
            ui_nodes.append(entry)
        return {
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": len(links),
            "nodes": ui_nodes,
            "links": links,
            "groups": [self._group_entry(g, ui_nodes) for g in self.groups],
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [40, 60]}, "indomain_workflow": self.name},
            "version": 0.4,
        }

    # ------------------------------------------------------------------ layout
    def _topological_order(self) -> dict[int, int]:
        deps = {n.id: {v.node.id for v in n.values.values() if isinstance(v, Out)} for n in self.nodes}
        order, done = {}, set()
        while len(done) < len(self.nodes):
            ready = [nid for nid in deps if nid not in done and deps[nid] <= done]
            if not ready:
                raise ValueError(f"{self.name}: the graph has a cycle")
            for nid in sorted(ready):
                order[nid] = len(order)
                done.add(nid)
        return order

    @staticmethod
    def _default_size(node: Node, inputs: list, widgets: list) -> tuple[int, int]:
        if node.type in FRONTEND_ONLY:
            return (360, 160)
        n_out = 2  # rough: most nodes have 1-3 outputs
        rows = max(len(inputs), n_out) + len(widgets)
        width = 315
        if node.type == "CLIPTextEncode":
            return (400, 160)
        if node.type == "LoadImage":
            return (315, 314)
        if node.type == "SaveImage":
            return (380, 300)
        return (width, 46 + 24 * rows)

    @staticmethod
    def _group_entry(group: Group, ui_nodes: list[dict]) -> dict:
        ids = {n.id for n in group.nodes}
        boxes = [(n["pos"][0], n["pos"][1], n["size"][0], n["size"][1]) for n in ui_nodes if n["id"] in ids]
        pad = group.padding
        x0 = min(b[0] for b in boxes) - 10
        y0 = min(b[1] for b in boxes) - pad - 30  # the node title bar sits above pos
        x1 = max(b[0] + b[2] for b in boxes) + 10
        y1 = max(b[1] + b[3] for b in boxes) + 10
        return {"title": group.title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": group.color,
                "font_size": 24, "flags": {}}
