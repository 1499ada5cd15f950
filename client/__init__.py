"""Headless client for a running ComfyUI: submit an API-format workflow with overrides, wait for it,
download the images. Standard library only (urllib), so it runs anywhere Python does.

    from indomain.client import ComfyClient, load_workflow, apply_overrides

    wf = load_workflow("workflows/api/indomain_2_text_guided.json")
    apply_overrides(wf, prompt="a cat", seed=7, domain_weight=2.0, checkpoint="my_sd15.safetensors")
    result = ComfyClient("http://127.0.0.1:8188").run(wf, out_dir="out")
    print(result.images)           # local paths of the downloaded PNGs

Command line: `python -m indomain.client --help`.
"""
from __future__ import annotations

import json
import mimetypes
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SERVER = os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188")

__all__ = ["ComfyClient", "ComfyClientError", "ComfyConnectionError", "ComfyValidationError", "ComfyExecutionError",
           "RunResult", "load_workflow", "apply_overrides", "set_input", "find_nodes", "parse_set"]


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


# ----------------------------------------------------------------------------- workflow editing


def load_workflow(path) -> dict:
    """Read an API-format workflow (node id -> {class_type, inputs}). UI-format files are refused with the fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ComfyClientError(f"workflow file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ComfyClientError(f"{path} is not valid JSON ({e})") from None
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise ComfyClientError(
            f"{path} is a UI-format workflow (what the frontend saves). The client needs the API format: use the "
            f"twin in workflows/api/, or in ComfyUI export it with 'Export (API)'.")
    if not isinstance(data, dict) or not all(isinstance(v, dict) and "class_type" in v
                                             and isinstance(v.get("inputs", {}), dict) for v in data.values()):
        raise ComfyClientError(f"{path} is not an API-format workflow (expected {{node_id: {{class_type, inputs: {{...}}}}}}).")
    return data


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


# ----------------------------------------------------------------------------- HTTP client


@dataclass
class RunResult:
    prompt_id: str
    images: list[Path] = field(default_factory=list)
    history: dict = field(default_factory=dict)
    seconds: float = 0.0


class ComfyClient:
    def __init__(self, server: str = DEFAULT_SERVER, timeout: float = 30.0):
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- transport
    def _request(self, path: str, data: bytes | None = None, headers: dict | None = None):
        req = urllib.request.Request(self.server + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ComfyConnectionError(
                f"cannot reach ComfyUI at {self.server} ({reason}). Start it (python main.py --listen) or pass "
                f"--server http://HOST:PORT (or set COMFYUI_URL).") from None

    def get_json(self, path: str):
        try:
            return json.loads(self._request(path))
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"GET {path} -> HTTP {e.code}: {e.read()[:500]!r}") from None

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    # -- prompt lifecycle
    def submit(self, workflow: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise ComfyValidationError with a readable message."""
        body = json.dumps({"prompt": workflow, "client_id": self.client_id}).encode()
        try:
            answer = json.loads(self._request("/prompt", body, {"Content-Type": "application/json"}))
        except urllib.error.HTTPError as e:
            raw = e.read().decode(errors="replace")
            try:
                err = json.loads(raw)
            except json.JSONDecodeError:
                raise ComfyValidationError(f"ComfyUI refused the workflow (HTTP {e.code}): {raw[:1000]}") from None
            raise ComfyValidationError(format_validation_error(err, workflow), err) from None
        return answer["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        data = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return data.get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.25, progress=None) -> dict:
        """Poll /history until the prompt finishes; raise ComfyExecutionError if it failed."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise ComfyExecutionError(format_execution_error(entry), _execution_error(entry))
                return entry
            if progress is not None:
                state = "running" if self._is_running(prompt_id) else "queued"
                if state != last:
                    progress(f"{prompt_id[:8]}: {state}")
                    last = state
            if time.monotonic() > deadline:
                raise ComfyExecutionError(f"prompt {prompt_id} did not finish within {timeout:.0f}s "
                                          f"(raise --timeout, or check the server's queue)")
            time.sleep(poll)

    def _is_running(self, prompt_id: str) -> bool:
        try:
            q = self.get_json("/queue")
        except ComfyClientError:
            return False
        return any(item[1] == prompt_id for item in q.get("queue_running", []))

    def download(self, image: dict, out_dir) -> Path:
        """Fetch one image entry of /history outputs via /view into out_dir (name kept, never overwritten)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        try:
            data = self._request(f"/view?{query}")
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"could not download {image['filename']}: HTTP {e.code}") from None
        target = out_dir / Path(image["filename"]).name
        stem, suffix, i = target.stem, target.suffix, 1
        while target.exists():
            target = out_dir / f"{stem}_{i}{suffix}"
            i += 1
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        return target

    def upload_image(self, path, name: str | None = None, overwrite: bool = True) -> str:
        """POST /upload/image (multipart); returns the name to put into a LoadImage node."""
        path = Path(path)
        if not path.is_file():
            raise ComfyClientError(f"image to upload not found: {path}")
        boundary = uuid.uuid4().hex
        fname = name or path.name
        ctype = mimetypes.guess_type(fname)[0] or "application/octet-stream"
        parts = [
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{fname}\"\r\n"
            f"Content-Type: {ctype}\r\n\r\n".encode() + path.read_bytes() + b"\r\n",
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"{'true' if overwrite else 'false'}\r\n".encode(),
            f"--{boundary}--\r\n".encode(),
        ]
        try:
            answer = json.loads(self._request("/upload/image", b"".join(parts),
                                              {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"upload of {path} failed: HTTP {e.code} {e.read()[:300]!r}") from None
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    def run(self, workflow: dict, out_dir=None, timeout: float = 600.0, progress=None) -> RunResult:
        """Submit, wait, download every image output (SaveImage/PreviewImage) into out_dir when given."""
        start = time.monotonic()
        prompt_id = self.submit(workflow)
        if progress:
            progress(f"submitted prompt {prompt_id}")
        entry = self.wait(prompt_id, timeout=timeout, progress=progress)
        result = RunResult(prompt_id, history=entry)
        if out_dir is not None:
            for node_id in sorted(entry.get("outputs", {}), key=_num):
                for image in entry["outputs"][node_id].get("images", []):
                    if image.get("type", "output") == "output":
                        result.images.append(self.download(image, out_dir))
        result.seconds = time.monotonic() - start
        return result


# ----------------------------------------------------------------------------- error text


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


def _execution_error(entry: dict) -> dict:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return dict(data, kind=kind)
    return {}


def format_execution_error(entry: dict) -> str:
    e = _execution_error(entry)
    if not e:
        return "the prompt failed (no error message in /history; see the server log)"
    if e.get("kind") == "execution_interrupted":
        return f"the prompt was interrupted at node {e.get('node_id')} ({e.get('node_type')})"
    return (f"node {e.get('node_id')} ({e.get('node_type')}) failed: {e.get('exception_type', '')}: "
            f"{str(e.get('exception_message', '')).strip()}")
