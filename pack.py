"""What the installed pack knows about itself and its ComfyUI, without the developer kit.

- PACK_ROOT:          this pack's folder (ComfyUI/custom_nodes/<pack> once installed)
- DOMAIN_UNET_FOLDER: the models/ sub-folder (and folder_paths kind) holding domain model files
- comfyui_dir():      the ComfyUI tree to run in ($COMFYUI_DIR, the provisioned .host/, or the one we sit in)
- import_comfy():     make that ComfyUI importable in this process (the command-line trainer needs it)

Shipped code imports this module, never `devkit` (tests/test_packaging.py checks it).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent
DOMAIN_UNET_FOLDER = "domain_unets"


def comfyui_dir() -> Path:
    """The ComfyUI tree to use: $COMFYUI_DIR, else the one this venv was provisioned for (scripts/setup_host.sh
    writes <venv>/indomain-comfyui-dir), else the bundled one, else the tree we sit in."""
    candidates = []
    if os.environ.get("COMFYUI_DIR"):
        candidates.append(Path(os.environ["COMFYUI_DIR"]))
    for marker in (Path(sys.prefix) / "indomain-comfyui-dir", PACK_ROOT / ".host" / "comfyui_dir"):
        if marker.is_file():
            candidates.append(Path(marker.read_text().strip()))
    candidates.append(PACK_ROOT / ".host" / "ComfyUI")
    # installed as ComfyUI/custom_nodes/<pack>
    candidates.append(PACK_ROOT.parents[1])
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "No ComfyUI found. Run `bash scripts/setup_host.sh` (provisions ComfyUI 0.3.75 under .host/) "
        "or set COMFYUI_DIR to your ComfyUI folder (the one with main.py)."
    )


_IMPORTED = False


def import_comfy(cpu: bool | None = None) -> Path:
    """Make the real ComfyUI importable in this process (idempotent). Returns its root.

    Order matters: CPU mode must be set before comfy.model_management is imported, and
    utils.extra_config before anything imports ComfyUI's nodes.py (it puts comfy/ on sys.path, after
    which `utils` would resolve to comfy/utils.py). ComfyUI's nodes.py itself is left to the caller
    that needs it (the in-process host does): nothing here depends on it.
    """
    global _IMPORTED
    root = comfyui_dir()
    if _IMPORTED:
        return root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import torch

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    if cpu:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import utils.extra_config  # noqa: F401
    import folder_paths  # noqa: F401

    _IMPORTED = True
    return root
