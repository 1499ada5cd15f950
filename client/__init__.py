"""Headless client for a running ComfyUI: submit an API-format workflow with overrides, watch it run, download
the images. Standard library only (urllib); the optional `websocket-client` package adds live per-node step
progress (polling is the fallback).

    from indomain.client import ComfyClient, load_workflow, apply_overrides

    wf = load_workflow("workflows/api/indomain_2_text_guided.json")
    apply_overrides(wf, prompt="a cat", seed=7, domain_weight=2.0, checkpoint="my_sd15.safetensors")
    result = ComfyClient("http://127.0.0.1:8188").run(wf, out_dir="out", progress=print)
    print(result.images)           # local paths of the downloaded PNGs

Command line: `python -m indomain.client --help`.

Layout: errors.py (what can go wrong, and the text for it), workflow.py (reading and editing API-format
workflows, no server), http.py (the server: submit, wait, cancel, download), progress.py (the websocket view).
"""
from __future__ import annotations

from .errors import (ComfyCancelled, ComfyClientError, ComfyConnectionError, ComfyExecutionError,
                     ComfyValidationError, format_execution_error, format_validation_error)
from .http import DEFAULT_SERVER, DEFAULT_TIMEOUT, ComfyClient, RunResult, default_timeout
from .progress import websocket_available
from .workflow import (apply_overrides, find_nodes, load_workflow, node_title, parse_image_spec, parse_set, set_input,
                       trains)

__all__ = ["ComfyClient", "ComfyClientError", "ComfyConnectionError", "ComfyValidationError", "ComfyExecutionError",
           "ComfyCancelled", "RunResult", "DEFAULT_SERVER", "DEFAULT_TIMEOUT", "default_timeout", "load_workflow",
           "apply_overrides", "set_input", "find_nodes", "parse_set", "parse_image_spec", "node_title", "trains",
           "format_validation_error", "format_execution_error", "websocket_available"]
