"""Fixtures on a REAL ComfyUI (in-process and as a server) with tiny deterministic models.

Nothing here fakes comfy, folder_paths or torch: the host is the ComfyUI tree provisioned by
scripts/setup_host.sh (or $COMFYUI_DIR), the models are built by devkit at test time.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from indomain.devkit import host as host_mod
from indomain.devkit import tiny_models

ARTIFACTS = Path(os.environ.get("INDOMAIN_ARTIFACTS", host_mod.PACK_ROOT / "artifacts"))


def pytest_report_header(config):
    try:
        root = host_mod.comfyui_dir()
    except FileNotFoundError as e:
        return f"ComfyUI host: none ({e})"
    return f"ComfyUI host: {host_mod.comfyui_version(root)} at {root}"


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("indomain")


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny_files() -> dict[str, Path]:
    return {"checkpoint": tiny_models.tiny_checkpoint(0), "controlnet": tiny_models.tiny_controlnet(0)}


@pytest.fixture(scope="session")
def models_dir(session_dir, tiny_files) -> Path:
    d = session_dir / "models"
    for kind in ("checkpoints", "controlnet", "domain_unets"):
        (d / kind).mkdir(parents=True, exist_ok=True)
    (d / "checkpoints" / "tiny_sd15.safetensors").symlink_to(tiny_files["checkpoint"])
    (d / "controlnet" / "tiny_controlnet.safetensors").symlink_to(tiny_files["controlnet"])
    return d


@pytest.fixture(scope="session")
def comfy(models_dir, session_dir):
    """The real ComfyUI imported in this process, with the InDomain pack loaded."""
    return host_mod.InProcessComfy(models_dir=models_dir, output_dir=session_dir / "output")


@pytest.fixture(scope="session")
def base(comfy, tiny_files):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded by ComfyUI's own loader."""
    from indomain.devkit.domain import load_checkpoint

    return load_checkpoint(tiny_files["checkpoint"])


@pytest.fixture(scope="session")
def domain_file(comfy, base, models_dir) -> Path:
    """A calibrated null-text domain UNet (weights nudged so it differs from the base)."""
    from indomain.devkit.domain import make_domain_unet

    model, clip, _ = base
    return make_domain_unet(model, clip, models_dir / "domain_unets" / "tiny_domain.safetensors", seed=0, perturb=0.05)


@pytest.fixture(scope="session")
def server_models(tiny_files, domain_file) -> dict:
    """The tiny models under the names the tests' graphs use, for ComfyServer(models=...)."""
    return {"checkpoints": {"tiny_sd15.safetensors": tiny_files["checkpoint"]},
            "controlnet": {"tiny_controlnet.safetensors": tiny_files["controlnet"]},
            "domain_unets": {"tiny_domain.safetensors": domain_file}}


@pytest.fixture(scope="session")
def server(session_dir, server_models):
    """A real ComfyUI server on 127.0.0.1 with the pack installed and the tiny models in place."""
    srv = host_mod.ComfyServer(session_dir / "server_base", models=server_models)
    srv.start()
    yield srv
    srv.stop()
    if os.environ.get("INDOMAIN_KEEP_LOGS"):
        shutil.copy(srv.log_path, ARTIFACTS / "server.log")
