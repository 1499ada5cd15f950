"""Live progress of one prompt from ComfyUI's websocket (`/ws?clientId=...`): which node runs and its steps.

Needs the optional `websocket-client` package (what ComfyUI's own script examples use). Without it, or when the
socket cannot be opened, `ProgressWatcher.start()` returns False and the client falls back to polling.
The watcher only shows progress; whether the prompt finished is read from /history either way.
"""
from __future__ import annotations

import json
import sys
import threading
import time
import urllib.parse

from .workflow import node_title

BAR_WIDTH = 20


def websocket_available() -> bool:
    try:
        import websocket  # noqa: F401  (package websocket-client)
    except ImportError:
        return False
    return True


def websocket_url(server: str, client_id: str) -> str:
    parts = urllib.parse.urlsplit(server)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws",
                                    urllib.parse.urlencode({"clientId": client_id}), ""))


class ProgressPrinter:
    """Turns progress events into text: a bar rewritten in place on a terminal; otherwise (logs, pipes) a line for
    the first and last step and in between every 5 % or every `every_s` seconds, whichever comes first."""

    def __init__(self, say, workflow: dict, interactive: bool | None = None, every_s: float = 10.0):
        self.say = say
        self.workflow = workflow
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.current = None
        self.last_shown: dict[str, int] = {}
        self.every_s = every_s
        self.last_time = 0.0
        self.started = 0
        self.total_nodes = sum(1 for n in workflow.values() if isinstance(n, dict) and "class_type" in n)

    def node_started(self, node_id: str) -> None:
        self._end_line()
        self.current = node_id
        self.started += 1
        self.say(f"[{self.started}/{self.total_nodes}] {node_title(self.workflow, node_id)}")

    def cached(self, node_ids: list) -> None:
        """Nodes ComfyUI reuses from its cache run no code: count them so "[i/n]" stays true."""
        if node_ids:
            self.started += len(node_ids)
            self.say(f"{len(node_ids)} node(s) reused from the server's cache")

    def step(self, node_id: str, value: int, total: int) -> None:
        if total <= 0:
            return
        shown = self.last_shown.get(node_id)
        now = time.monotonic()
        if not self.interactive and shown is not None and value != total and value - shown < max(1, total // 20) \
                and now - self.last_time < self.every_s:
            return
        self.last_shown[node_id] = value
        self.last_time = now
        filled = int(BAR_WIDTH * min(value, total) / total)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"  {node_title(self.workflow, node_id)} [{bar}] step {value}/{total}"
        if self.interactive:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
        else:
            self.say(line.strip())

    def _end_line(self) -> None:
        if self.interactive and self.current is not None and self.current in self.last_shown:
            sys.stderr.write("\n")

    def finished(self) -> None:
        self._end_line()
        self.current = None


class ProgressWatcher:
    """Reads the websocket on a daemon thread and feeds one prompt's events to a ProgressPrinter.

    Open it BEFORE submitting (ComfyUI sends a prompt's messages only to sockets open at that moment)."""

    def __init__(self, server: str, client_id: str, printer: ProgressPrinter, connect_timeout: float = 10.0):
        self.url = websocket_url(server, client_id)
        self.printer = printer
        self.connect_timeout = connect_timeout
        self.prompt_id: str | None = None
        self.events: list[tuple[str, dict]] = []  # this prompt's messages, in order (for callers and tests)
        self._ws = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._early: list[tuple[str, dict]] = []  # messages that came before the prompt id was known

    def start(self) -> bool:
        if not websocket_available():
            return False
        import websocket

        try:
            self._ws = websocket.create_connection(self.url, timeout=self.connect_timeout)
        except Exception:  # any failure to open the socket: polling still works
            self._ws = None
            return False
        self._ws.settimeout(0.5)
        self._thread = threading.Thread(target=self._read, name="comfy-progress", daemon=True)
        self._thread.start()
        return True

    def follow(self, prompt_id: str) -> None:
        """From now on show this prompt's events (and any that arrived before its id was known)."""
        with self._lock:
            self.prompt_id = prompt_id
            early, self._early = self._early, []
        for kind, data in early:
            self._handle(kind, data)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass
        self.printer.finished()

    def _read(self) -> None:
        import websocket

        while not self._stop.is_set():
            try:
                frame = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:  # closed by the server or the network: polling carries on
                return
            if not isinstance(frame, str):
                continue  # binary frames are preview images
            try:
                message = json.loads(frame)
            except json.JSONDecodeError:
                continue
            kind, data = message.get("type"), message.get("data") or {}
            with self._lock:
                if self.prompt_id is None:
                    self._early.append((kind, data))
                    continue
            self._handle(kind, data)

    def _handle(self, kind: str, data: dict) -> None:
        if not isinstance(data, dict) or data.get("prompt_id") != self.prompt_id:
            return
        self.events.append((kind, data))
        if kind == "executing" and data.get("node") is not None:
            self.printer.node_started(str(data.get("display_node") or data["node"]))
        elif kind == "execution_cached":
            self.printer.cached(list(data.get("nodes") or []))
        elif kind == "progress":
            self.printer.step(str(data.get("node")), int(data.get("value", 0)), int(data.get("max", 0)))
