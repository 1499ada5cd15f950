"""Find and drive a real ComfyUI: in-process (import) or as a server on 127.0.0.1.

The bundled host is the unmodified ComfyUI 0.3.75 tree that scripts/setup_host.sh
provisions under .host/ComfyUI; COMFYUI_DIR points everything at another tree (CI's second
pass uses ComfyUI 0.33.0 that way). Code here follows both: where an API changed between
them (e.g. execution caches became async) it uses what the running version offers.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from ..client import ComfyClient, ComfyConnectionError
from ..pack import DOMAIN_UNET_FOLDER, PACK_ROOT, comfyui_dir, import_comfy  # noqa: F401  (re-exported for tests)


def comfyui_version(root: Path | None = None) -> str:
    """The version a ComfyUI tree declares (comfyui_version.py), e.g. "0.3.75"; "unknown" if it has none."""
    root = comfyui_dir() if root is None else Path(root)
    try:
        text = (root / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def host_version_tuple(root: Path | None = None) -> tuple[int, ...]:
    """comfyui_version() as a tuple for comparisons, e.g. (0, 33, 0); () when unknown."""
    parts = comfyui_version(root).split(".")
    return tuple(int(p) for p in parts if p.isdigit()) if all(p.isdigit() for p in parts) else ()


class _Server:
    """The minimum PromptExecutor needs from PromptServer."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class InProcessComfy:
    """A real ComfyUI loaded in this process with the InDomain pack registered."""

    def __init__(self, models_dir: Path | None = None, output_dir: Path | None = None, default_dirs: bool = True):
        root = import_comfy()
        import folder_paths
        import nodes

        self.root = root
        if output_dir is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            folder_paths.set_output_directory(str(output_dir))
        if models_dir is not None:
            # default_dirs=False only adds search paths: where nodes *write* (e.g. the trainer) stays as it was
            add_model_dirs(Path(models_dir), is_default=default_dirs)
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        before = set(nodes.NODE_CLASS_MAPPINGS)
        self.pack_loaded = asyncio.run(nodes.load_custom_node(str(PACK_ROOT)))
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.nodes = nodes

    def node(self, class_type: str):
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def run(self, prompt: dict, outputs: list[str] | None = None) -> "RunResult":
        """Validate and execute an API-format prompt; return UI outputs and node outputs."""
        import execution

        prompt_id = str(uuid.uuid4())
        prompt = dict(prompt)
        for node_id in outputs or []:
            # a real output node downstream, so validation accepts latent/model-only graphs
            cls = self.nodes.NODE_CLASS_MAPPINGS[prompt[node_id]["class_type"]]
            if not getattr(cls, "OUTPUT_NODE", False):
                prompt[f"sink_{node_id}"] = {"class_type": "PreviewAny", "inputs": {"source": [node_id, 0]}}
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise RuntimeError(f"prompt failed validation: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
        server = _Server()
        executor = execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        executor.execute(prompt, prompt_id, {}, valid[2])
        errors = [m for m in server.messages if m[0] == "execution_error"] + [
            m for m in executor.status_messages if m[0] == "execution_error"
        ]
        if not executor.success or errors:
            raise RuntimeError(f"prompt failed: {errors[:1]}")
        node_outputs = {}
        for node_id in outputs or list(prompt):
            entry = cached_output(executor, node_id)
            if entry is not None:
                node_outputs[node_id] = getattr(entry, "outputs", entry)
        return RunResult(executor.history_result, node_outputs, server.messages)


def cached_output(executor, node_id: str):
    """A node's cached outputs after a run. ComfyUI 0.3.75's cache `get` is synchronous; newer cores
    (0.33) made it a coroutine (cache providers can be remote), so await it when it is one."""
    entry = executor.caches.outputs.get(node_id)
    if inspect.isawaitable(entry):
        entry = asyncio.run(entry)
    return entry


class RunResult:
    def __init__(self, history, node_outputs, messages):
        self.history = history
        self.node_outputs = node_outputs
        self.messages = messages

    def output(self, node_id: str, index: int = 0):
        """The index-th output of a node; ComfyUI stores one list per output (batched lists)."""
        value = self.node_outputs[node_id][index]
        return value[0] if isinstance(value, list) and len(value) == 1 else value


def add_model_dirs(models_dir: Path, is_default: bool = True) -> None:
    """Register models_dir/<kind> folders with ComfyUI's folder_paths (in-process)."""
    import folder_paths

    for kind in ("checkpoints", "controlnet", "diffusion_models", DOMAIN_UNET_FOLDER, "vae", "loras"):
        d = models_dir / kind
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(d), is_default=is_default)


# ----------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frontend_installed(python: str = sys.executable) -> bool:
    r = subprocess.run([python, "-c", "import comfyui_frontend_package"], capture_output=True)
    return r.returncode == 0


class ComfyServer:
    """A real ComfyUI server on 127.0.0.1 with its own base directory (models, custom_nodes, output).

    The pack is linked into BASE/custom_nodes/indomain; models are linked from `models` (a dict
    kind -> list of files, or kind -> {name: file}). Stopped by PID; the log is kept at BASE/server.log.
    """

    def __init__(self, base: Path, models: dict | None = None, real_frontend: bool = False,
                 extra_args: list[str] | None = None):
        self.base = Path(base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.real_frontend = real_frontend
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        (self.base / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / "indomain"
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        for kind in ("checkpoints", "controlnet", DOMAIN_UNET_FOLDER, "vae", "loras", "diffusion_models"):
            (self.base / "models" / kind).mkdir(parents=True, exist_ok=True)
        for kind, files in (models or {}).items():
            named = files.items() if isinstance(files, dict) else [(Path(f).name, f) for f in files]
            for name, f in named:
                dst = self.base / "models" / kind / name
                if not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)  # e.g. text_encoders, vae, clip_vision
                    dst.symlink_to(Path(f).resolve())
        self.log_path = self.base / "server.log"
        self.client = ComfyClient(self.url, timeout=60)

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        root = comfyui_dir()
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        if not self.real_frontend:
            stub = self.base / "frontend_stub"
            stub.mkdir(exist_ok=True)
            (stub / "index.html").write_text("<html><body>InDomain test stub frontend</body></html>")
            cmd += ["--front-end-root", str(stub)]
        cmd += self.extra_args
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        ping = ComfyClient(self.url, timeout=2)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                ping.system_stats()
                return self
            except ComfyConnectionError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI server did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- HTTP: the pack's own client (indomain.client), so tests exercise the code users run
    def get_json(self, path: str):
        return self.client.get_json(path)

    def get_bytes(self, path: str) -> bytes:
        return self.client.get_bytes(path)


logging.getLogger(__name__).addHandler(logging.NullHandler())


async def run_and_watch(server, graph: dict, timeout: float = 540.0) -> tuple[str, list]:
    """Queue `graph` on `server` (a ComfyServer) as a websocket client; return (prompt_id, [("json", message) | ("binary", bytes)]) in order,
    up to the end of the prompt."""
    import asyncio
    import json
    import uuid

    import aiohttp

    client_id = uuid.uuid4().hex
    events = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{server.url}/ws?clientId={client_id}", max_msg_size=0) as ws:
            async with session.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": client_id}) as r:
                body = await r.json()
                assert r.status == 200, body
            prompt_id = body["prompt_id"]

            async def read():
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        events.append(("binary", msg.data))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        m = json.loads(msg.data)
                        events.append(("json", m))
                        data = m.get("data", {})
                        if data.get("prompt_id") == prompt_id and (
                                m["type"] in ("execution_error", "execution_interrupted", "execution_success")
                                or (m["type"] == "executing" and data.get("node") is None)):
                            return

            await asyncio.wait_for(read(), timeout)
    return prompt_id, events
