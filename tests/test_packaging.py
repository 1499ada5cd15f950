"""Registry metadata and the pack's import hygiene."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements():
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]


def test_pyproject_registry_metadata():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = data["project"]
    assert project["name"] == "indomain" and "comfyui" not in project["name"].lower()
    major, minor, patch = project["version"].split(".")
    assert all(p.isdigit() for p in (major, minor, patch))
    assert project["license"] == {"file": "LICENSE"}
    assert "GNU GENERAL PUBLIC LICENSE" in (ROOT / "LICENSE").read_text()[:200]
    assert project["requires-python"]
    assert project["dependencies"] == _requirements(), "pyproject dependencies must mirror requirements.txt"
    comfy = data["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon"} <= set(comfy)


def test_guidance_imports_without_comfyui():
    """guidance/ is plain torch: importable in a fresh interpreter with no ComfyUI on the path."""
    code = ("import sys, indomain.guidance as g; "
            "bad = [m for m in sys.modules if m == 'comfy' or m.startswith('comfy.') or m in ('folder_paths', 'nodes')]; "
            "assert not bad, bad; print(g.combine.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
