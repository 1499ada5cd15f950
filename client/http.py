"""Talking to a running ComfyUI over HTTP (standard library only): submit, wait, cancel, download, upload."""
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

from .errors import (ComfyCancelled, ComfyClientError, ComfyConnectionError, ComfyExecutionError,
                     ComfyValidationError, execution_error_details, format_execution_error, format_validation_error,
                     shown)
from .progress import ProgressPrinter, ProgressWatcher
from .workflow import _num, trains

DEFAULT_SERVER = os.environ.get("COMFYUI_URL", "http://127.0.0.1:8188")
# How long a run that does not train may take before the client gives up waiting (training runs wait forever).
DEFAULT_TIMEOUT = 600.0
# Polls of /history in a row that may fail (timeout, connection reset) before waiting gives up.
POLL_FAILURES_ALLOWED = 5


def default_timeout(workflow: dict) -> float | None:
    """None (no limit) for workflows that train, DEFAULT_TIMEOUT seconds otherwise."""
    return None if trains(workflow) else DEFAULT_TIMEOUT


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

    def get_bytes(self, path: str) -> bytes:
        try:
            return self._request(path)
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"GET {path} -> HTTP {e.code}: {e.read()[:500]!r}") from None

    def get_json(self, path: str):
        try:
            return json.loads(self._request(path))
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"GET {path} -> HTTP {e.code}: {e.read()[:500]!r}") from None

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    # -- prompt lifecycle
    def submit(self, workflow: dict) -> str:
        """POST /prompt; returns the prompt id. Validation errors raise ComfyValidationError with a readable message.

        All or nothing: ComfyUI queues a workflow when at least one of its outputs is valid and drops the others
        (reporting them in `node_errors`); the client then cancels what was queued and refuses the workflow, so a
        broken branch never runs half a graph. Literal `null` input values are refused before sending (the
        frontend never writes them; ComfyUI 0.3.75 passes them unchecked to combo inputs of newer nodes)."""
        nulls = [f"node {nid} ({n.get('class_type')}) input {k!r}" for nid, n in workflow.items()
                 if isinstance(n, dict) and isinstance(n.get("inputs"), dict)
                 for k, v in n["inputs"].items() if v is None]
        if nulls:
            raise ComfyValidationError("the workflow has inputs set to null: " + "; ".join(nulls[:5])
                                       + (f" (and {len(nulls) - 5} more)" if len(nulls) > 5 else "")
                                       + ". Give each a value (or a link), as ComfyUI's 'Export (API)' writes them.")
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
        prompt_id = answer["prompt_id"]
        if answer.get("node_errors"):
            action = self.cancel(prompt_id)
            err = {"error": {"message": "some outputs failed validation, so only part of the workflow would run",
                             "details": f"(the part ComfyUI queued was {action}; fix the nodes below)"},
                   "node_errors": answer["node_errors"]}
            raise ComfyValidationError(format_validation_error(err, workflow), err)
        return prompt_id

    def history(self, prompt_id: str) -> dict | None:
        data = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        return data.get(prompt_id)

    def queue(self) -> dict:
        return self.get_json("/queue")

    def _queue_state(self, prompt_id: str) -> str | None:
        """'running', 'pending' or None (not in the queue: finished, or unknown)."""
        q = self.queue()
        if any(item[1] == prompt_id for item in q.get("queue_running", [])):
            return "running"
        if any(item[1] == prompt_id for item in q.get("queue_pending", [])):
            return "pending"
        return None

    def wait(self, prompt_id: str, timeout: float | None = None, poll: float = 0.25, progress=None) -> dict:
        """Poll /history until the prompt finishes (timeout None = as long as it takes); raise
        ComfyExecutionError if it failed. `progress` gets "queued"/"running" lines (the polling fallback)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last, wait_step = None, poll
        failures = 0
        while True:
            try:
                entry = self.history(prompt_id)
                failures = 0
            except ComfyConnectionError:
                # A busy server (a long training step, a loaded machine) may miss one poll's deadline: the prompt
                # is still there. Give up only when several polls in a row fail.
                failures += 1
                if failures >= POLL_FAILURES_ALLOWED:
                    raise
                time.sleep(wait_step)
                continue
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error" or not status.get("completed"):
                    raise ComfyExecutionError(format_execution_error(entry), execution_error_details(entry))
                return entry
            if progress is not None:
                try:
                    state = "running" if self._queue_state(prompt_id) == "running" else "queued"
                except ComfyClientError:
                    state = last
                if state != last:
                    progress(f"{prompt_id[:8]}: {state}")
                    last = state
            if deadline is not None and time.monotonic() > deadline:
                raise ComfyExecutionError(
                    f"prompt {prompt_id} did not finish within {timeout:.0f}s and is still on the server "
                    f"(raise --timeout, or --timeout 0 to wait as long as it takes; cancel it in ComfyUI's queue)")
            time.sleep(wait_step)
            wait_step = min(2.0, wait_step * 1.25)  # long runs (training) need no fast polling

    def cancel(self, prompt_id: str, wait: float = 60.0) -> str:
        """Stop THIS prompt on the server: delete it from the queue when pending, interrupt it when running
        (POST /interrupt with its prompt_id, which ComfyUI 0.3.75 and 0.33 honour only for that prompt), and
        wait up to `wait` seconds until it has left the queue. Returns what happened: "removed from the queue",
        "interrupted", "already finished" or "interrupt sent, still running after ...s".

        The interrupt is sent again until the prompt stops: ComfyUI clears the interrupt flag when a prompt
        starts executing, so one sent just as the prompt moved from pending to running is lost (seen in a full
        CI run: a weight grid the client had "interrupted" ran its 25 steps and held the queue for minutes)."""
        state = self._queue_state(prompt_id)
        if state == "pending":
            self._post_json("/queue", {"delete": [prompt_id]})
            state = self._queue_state(prompt_id)  # it may have started between the two calls
            if state is None:
                return "removed from the queue"
        if state != "running":
            return "already finished"
        deadline = time.monotonic() + wait
        while state == "running":
            self._post_json("/interrupt", {"prompt_id": prompt_id})
            if time.monotonic() > deadline:
                return f"interrupt sent, still running after {wait:.0f}s"
            time.sleep(0.5)
            state = self._queue_state(prompt_id)
        return "interrupted"

    def _post_json(self, path: str, payload: dict) -> bytes:
        try:
            return self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        except urllib.error.HTTPError as e:
            raise ComfyClientError(f"POST {path} -> HTTP {e.code}: {e.read()[:300]!r}") from None

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
            raise ComfyClientError(f"image to upload not found: {shown(path)}")
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
            raise ComfyClientError(f"upload of {shown(path)} failed: HTTP {e.code} {e.read()[:300]!r}") from None
        sub = answer.get("subfolder") or ""
        return f"{sub}/{answer['name']}" if sub else answer["name"]

    def run(self, workflow: dict, out_dir=None, timeout: float | None = None, progress=None,
            watch: bool = True) -> RunResult:
        """Submit, wait, download every image output (SaveImage/PreviewImage) into out_dir when given.

        timeout: seconds, or None for the default (no limit for workflows that train, DEFAULT_TIMEOUT otherwise);
        0 = no limit. progress: a callable getting text lines; with the optional websocket-client package they
        include each node's steps (watch=False, or no package: "queued"/"running" from polling).
        Ctrl-C (KeyboardInterrupt) cancels this prompt on the server and raises ComfyCancelled."""
        start = time.monotonic()
        if timeout is None:
            timeout = default_timeout(workflow)
        elif timeout <= 0:
            timeout = None
        watcher = None
        if progress is not None and watch:
            watcher = ProgressWatcher(self.server, self.client_id, ProgressPrinter(progress, workflow))
            if not watcher.start():
                watcher = None
        prompt_id = None
        try:
            prompt_id = self.submit(workflow)
            if progress:
                progress(f"submitted prompt {prompt_id}")
            if watcher is not None:
                watcher.follow(prompt_id)
            entry = self.wait(prompt_id, timeout=timeout, progress=progress if watcher is None else None)
        except KeyboardInterrupt:
            if prompt_id is None:
                raise
            action = self.cancel(prompt_id)
            raise ComfyCancelled(f"cancelled: prompt {prompt_id} {action} on {self.server}", prompt_id,
                                 action) from None
        finally:
            if watcher is not None:
                watcher.close()
        result = RunResult(prompt_id, history=entry)
        if out_dir is not None:
            for node_id in sorted(entry.get("outputs", {}), key=_num):
                for image in entry["outputs"][node_id].get("images", []):
                    if image.get("type", "output") == "output":
                        result.images.append(self.download(image, out_dir))
        result.seconds = time.monotonic() - start
        return result
