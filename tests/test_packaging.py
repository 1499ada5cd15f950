"""Registry metadata and the pack's import hygiene."""
from __future__ import annotations

import json
import re
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


# ----------------------------------------------------------------------------- the Registry's view

# Registry rules (docs.comfy.org/registry/specifications): node id and publisher id shapes, X.Y.Z versions.
NODE_ID = re.compile(r"^[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*$")
PUBLISHER_ID = re.compile(r"^[a-z][a-z0-9-]*$")
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
ICON_MAX_PX, ICON_MAX_BYTES = 400, 100_000


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_fields_are_valid():
    """What the Registry requires and checks, field by field: name, semver version, Repository URL, publisher,
    display name, requires-comfyui as a version specifier, and the version the pack itself reports."""
    from packaging.specifiers import SpecifierSet

    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    assert NODE_ID.match(project["name"]) and len(project["name"]) < 100
    assert SEMVER.match(project["version"]), project["version"]
    assert project["description"]
    repo = project["urls"]["Repository"]
    assert re.match(r"^https://github\.com/[\w.-]+/[\w.-]+$", repo), repo
    assert PUBLISHER_ID.match(comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    assert SpecifierSet(comfy["requires-comfyui"]).contains("0.3.75")  # the oldest host the suite runs on
    assert "version" not in project.get("dynamic", [])  # the Registry does not evaluate dynamic metadata
    init = (ROOT / "__init__.py").read_text()
    assert f'__version__ = "{project["version"]}"' in init


def test_icon_is_a_small_square_image_in_the_repository():
    from PIL import Image

    data = _pyproject()
    icon_url = data["tool"]["comfy"]["Icon"]
    owner_repo = data["project"]["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert icon_url.startswith(prefix), f"Icon must point into the repository ({prefix}...)"
    path = ROOT / icon_url.removeprefix(prefix)
    assert path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif", ".svg") and path.is_file(), path
    assert path.stat().st_size <= ICON_MAX_BYTES
    with Image.open(path) as im:
        assert im.width == im.height <= ICON_MAX_PX, im.size
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch", str(path)], capture_output=True)
    assert tracked.returncode == 0, f"{path.name} is not committed"


def test_classifiers_are_valid_for_pypi_and_comfyui():
    """Each classifier is on PyPI's canonical list, and ComfyUI's own parser (comfy_config, which drops the whole
    list when one OS or accelerator entry is unknown) keeps all of them."""
    from trove_classifiers import classifiers as known

    classifiers = _pyproject()["project"]["classifiers"]
    assert classifiers and not [c for c in classifiers if c not in known]
    from indomain.devkit import host as host_mod

    code = ("import json, sys; from comfy_config import config_parser as p; "
            "c = p.extract_node_configuration(sys.argv[1]); "
            "print(json.dumps([c.project.supported_os, c.project.supported_accelerators, c.project.name, "
            "c.project.urls.repository, c.tool_comfy.publisher_id, c.tool_comfy.icon]))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120,
                         cwd=str(host_mod.comfyui_dir()))
    assert out.returncode == 0, out.stderr[-2000:]
    os_list, accelerators, name, repo, publisher, icon = json.loads(out.stdout)
    expected_os = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    expected_acc = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment :: GPU")]
    assert os_list == expected_os and accelerators == expected_acc
    assert (name, publisher) == ("indomain", _pyproject()["tool"]["comfy"]["PublisherId"]) and repo and icon


def _archive_files() -> list[str]:
    """The files `comfy node publish` would pack: git-tracked files minus the .comfyignore patterns
    (gitignore-style, as comfy-cli reads them)."""
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
    ignored = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--ignored",
                              f"--exclude-from={ROOT / '.comfyignore'}"], capture_output=True, check=True).stdout
    return sorted(set(tracked.decode().split("\0")) - set(ignored.decode().split("\0")) - {""})


def test_comfyignore_keeps_development_files_out_of_the_archive():
    files = _archive_files()
    dev = [f for f in files if f.split("/")[0] in ("tests", "bench", "devkit", "demo", "scripts", ".ci", "docs")]
    assert dev == [], dev
    assert not [f for f in files if f.lower().endswith((".png", ".gif")) and not f.startswith("web/")]
    needed = ["__init__.py", "pyproject.toml", "LICENSE", "README.md", "requirements.txt", "nodes/__init__.py",
              "sampling/__init__.py", "forms/__init__.py",
              "guidance/__init__.py", "training/__init__.py", "client/__init__.py", "web/docs/InDomainKSampler.md",
              "example_workflows/indomain_2_text_guided.json", "example_workflows/indomain_2_text_guided.jpg",
              "workflows/api/indomain_2_text_guided.json"]
    assert not [f for f in needed if f not in files], [f for f in needed if f not in files]


# ----------------------------------------------------------------------------- import layering

PACK_UNITS_SKIP = ("tests", ".venv", ".host", ".cache", "artifacts", "out", "web", "docs")


def _pack_modules() -> dict[str, Path]:
    """Every module of the pack by its dotted name (indomain.X.Y), tests excluded."""
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in PACK_UNITS_SKIP or rel.parts[0].startswith("."):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(["indomain", *parts])] = p
    return mods


def _import_graph(sources: dict[str, str] | None = None, level: int = 2) -> dict[str, set[str]]:
    """Edges between the pack's units: level 2 = top-level subpackages and modules (indomain.nodes,
    indomain.pack, ...), None = single modules. Every import counts, also the ones inside functions.
    `sources` replaces a module's text (by dotted name), to show the check can fail."""
    import ast

    mods = _pack_modules()
    unit = (lambda m: ".".join(m.split(".")[:level])) if level else (lambda m: m)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        src = (sources or {}).get(name)
        if src is None:
            src = path.read_text()
        # imports under `if TYPE_CHECKING:` are annotations, not run: blank them out (same line numbers)
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                for i in range(node.body[0].lineno - 1, node.body[-1].end_lineno):
                    lines[i] = ""
                lines[node.body[0].lineno - 1] = " " * node.body[0].col_offset + "pass"
        for _line, target in _imported_modules(path, "\n".join(lines)):
            # the longest known module the import names (a `from X import f` names X.f, which may be a module)
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != "indomain" and unit(target) != unit(name):
                graph.setdefault(unit(name), set()).add(unit(target))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(graph) | {w for ws in graph.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_the_packs_subpackages():
    """One-way layers: guidance <- forms <- sampling <- training <- nodes (and pack beside them); bench, demo and
    devkit on top. ComfyUI's own top-level `nodes` module is not the pack's `nodes/` (absolute imports never
    name the pack's packages)."""
    graph = _import_graph()
    assert "indomain.nodes" in graph and "indomain.training" in graph["indomain.nodes"]  # the walk sees the edges
    assert _cycles(graph) == []
    assert "indomain.nodes" not in graph.get("indomain.pack", set())
    assert "indomain.nodes" not in graph.get("indomain.training", set())


def test_no_import_cycle_between_single_modules():
    graph = _import_graph(level=None)
    assert "indomain.training.buckets" in graph["indomain.training.batches"]
    assert _cycles(graph) == []


def test_the_cycle_checks_can_fail():
    """Putting back either circle the layering removed is caught: a lazy import inside a function counts."""
    mods = _pack_modules()
    preview = mods["indomain.training.preview"].read_text() + "\n\ndef _f():\n    from ..nodes import loader\n"
    assert ["indomain.nodes", "indomain.training"] in _cycles(_import_graph({"indomain.training.preview": preview}))
    pack = mods["indomain.pack"].read_text() + "\nfrom .nodes import loader\n"
    assert any({"indomain.nodes", "indomain.pack"} <= set(c) for c in _cycles(_import_graph({"indomain.pack": pack})))
    outputs = mods["indomain.training.outputs"].read_text() + "\nfrom .trainer import Run\n"
    assert _cycles(_import_graph({"indomain.training.outputs": outputs}, level=None))  # outside TYPE_CHECKING it counts
    buckets = mods["indomain.training.buckets"].read_text() + "\ndef _f():\n    from .batches import TrainingData\n"
    cyc = _cycles(_import_graph({"indomain.training.buckets": buckets}, level=None))
    assert ["indomain.training.batches", "indomain.training.buckets"] in cyc
