"""The client's errors, and the text that turns a server's error answer into lines a person can act on."""
from __future__ import annotations

import json


class ComfyClientError(RuntimeError):
    """Base class of every error this client raises."""


class ComfyConnectionError(ComfyClientError):
    """The server could not be reached."""


class ComfyValidationError(ComfyClientError):
    """POST /prompt answered 400: the workflow did not validate. `.body` holds the server's JSON."""

    def __init__(self, message: str, body: dict | None = None):
        super().__init__(message)
        self.body = body or {}


class ComfyExecutionError(ComfyClientError):
    """The prompt was accepted but failed while running. `.details` holds the execution_error message."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class ComfyCancelled(ComfyClientError):
    """The run was stopped from this side (Ctrl-C): `.action` says what was done to the prompt on the server
    ("interrupted", "removed from the queue" or "already finished")."""

    def __init__(self, message: str, prompt_id: str, action: str):
        super().__init__(message)
        self.prompt_id = prompt_id
        self.action = action


def shown(text) -> str:
    """A path or name safe to print on any terminal: undecodable bytes (surrogate escapes) as \\x.. escapes."""
    try:
        raw = str(text).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = str(text).encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def format_validation_error(err: dict, workflow: dict | None = None) -> str:
    """Turn POST /prompt's 400 body into lines a person can act on."""
    lines = []
    top = err.get("error", {})
    if isinstance(top, dict):
        lines.append(f"ComfyUI refused the workflow: {top.get('message', '')} {top.get('details', '')}".rstrip())
    else:
        lines.append(f"ComfyUI refused the workflow: {top}")
    for nid, ne in (err.get("node_errors") or {}).items():
        ctype = ne.get("class_type") or (workflow or {}).get(nid, {}).get("class_type", "?")
        for e in ne.get("errors", []):
            extra = e.get("extra_info", {}) or {}
            name = extra.get("input_name")
            lines.append(f"  node {nid} ({ctype})" + (f" input {name!r}" if name else "") +
                         f": {e.get('message', '')}: {e.get('details', '')}".rstrip(": "))
    if "not in list" in "\n".join(lines) or "value_not_in_list" in json.dumps(err):
        lines.append("  fix: pick a file the server has (see --checkpoint/--domain-unet/--controlnet/--image), "
                     "or copy it into the server's models/ or input/ folder")
    return "\n".join(lines)


def execution_error_details(entry: dict) -> dict:
    """The execution_error / execution_interrupted message of a /history entry ({} when there is none)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return dict(data, kind=kind)
    return {}


def format_execution_error(entry: dict) -> str:
    e = execution_error_details(entry)
    if not e:
        return "the prompt failed (no error message in /history; see the server log)"
    if e.get("kind") == "execution_interrupted":
        return f"the prompt was interrupted at node {e.get('node_id')} ({e.get('node_type')})"
    return (f"node {e.get('node_id')} ({e.get('node_type')}) failed: {e.get('exception_type', '')}: "
            f"{str(e.get('exception_message', '')).strip()}")
