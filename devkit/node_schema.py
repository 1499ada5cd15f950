"""Reading a node's input schema from /object_info, the way the frontend does (one reader for the workflow
builder and the workflow checker): input order, which inputs are widgets, and the widget slots of a saved node."""
from __future__ import annotations

# Nodes that exist only in the frontend: no /object_info entry, dropped from the API format.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def ordered_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) in the frontend's order: input_order when given, required then optional."""
    inputs = info.get("input", {})
    order = info.get("input_order") or {k: list(v) for k, v in inputs.items()}
    return [(name, inputs[sec][name], sec == "optional") for sec in ("required", "optional")
            for name in order.get(sec, [])]


def options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return not options(spec).get("forceInput") and (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES)


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def has_control_widget(name: str, spec: list) -> bool:
    """The frontend adds a 'control_after_generate' combo after seed-like INT widgets: those flagged
    control_after_generate, and (checked in the real frontend 1.32.9) any INT named seed / noise_seed."""
    return spec[0] == "INT" and (bool(options(spec).get("control_after_generate")) or name in ("seed", "noise_seed"))


def widget_slots(info: dict) -> list[tuple[str, list | None]]:
    """The widgets_values slots of a saved node, in order: (name, spec) for an input's widget,
    (name.control_after_generate, None) and ("upload", None) for the frontend's extra widgets."""
    result = []
    for name, spec, _ in ordered_inputs(info):
        if is_widget(spec):
            result.append((name, spec))
            if has_control_widget(name, spec):
                result.append((f"{name}.control_after_generate", None))
            if options(spec).get("image_upload"):
                result.append(("upload", None))
    return result
