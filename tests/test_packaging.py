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


DEV_ONLY = ("tests", "bench", "demo", "devkit")


def _imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a pack file; relative imports resolved against the pack."""
    import ast

    package = ["indomain", *path.relative_to(ROOT).parts[:-1]]
    out = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


def _devkit_imports(path: Path, source: str | None = None) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}" for line, name in _imported_modules(path, source)
            if name.split(".")[:2] == ["indomain", "devkit"] or name.split(".")[0] == "devkit"]


def test_shipped_code_never_imports_devkit():
    """The developer kit is test/demo scaffolding: nothing a user installs may need it."""
    shipped = [p for p in ROOT.rglob("*.py")
               if p.relative_to(ROOT).parts[0] not in DEV_ONLY + (".venv", ".host", ".cache", "artifacts")]
    assert any(p.parts[-2:] == ("training", "__main__.py") for p in shipped)  # the walk sees the pack
    offenders = [line for p in shipped for line in _devkit_imports(p)]
    assert not offenders, offenders


def test_devkit_import_check_catches_every_spelling():
    """The walk resolves relative imports (the old trainer's `from ..devkit.host import PACK_ROOT`), so it can fail."""
    where = ROOT / "training" / "trainer.py"
    for source in ("from ..devkit.host import PACK_ROOT", "from .. import devkit", "import indomain.devkit.host",
                   "def f():\n    from ..devkit import host\n"):
        assert _devkit_imports(where, source), source
    for source in ("from ..pack import PACK_ROOT", "from .devkit_like import x", "import devkitten"):
        assert not _devkit_imports(where, source), source
