"""README.md and docs/: short, current, runnable, every figure with its command and date.

Conventions (docs/development.md, "Documentation conventions"):
- a fenced block in README.md with the info string `bash runnable` holds commands a user can paste into a
  fresh clone; every such block is checked here;
- in the reports (docs/claim.md, docs/performance.md, docs/reliability.md) every section holding a table of
  figures or a picture has a `Command:` line and a `Measured:` line with a date;
- no history phrases in README.md or docs/ (change history lives in CHANGELOG.md).
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
REPORTS = [ROOT / "docs" / n for n in ("claim.md", "performance.md", "reliability.md")]
MAX_README_LINES = 300
HISTORY_PHRASES = ("this round", "last round", "earlier round", "was run as such", "not re-run after",
                   "previous session", "this session")
MACHINE_PATH = re.compile(r"(^|[ `(])/(tmp|work|root|home)/")
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```", re.S | re.M)
DATE = re.compile(r"\b(20\d\d)-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])\b")


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in FENCE.finditer(text)]


def runnable_blocks(text: str) -> list[str]:
    return [body for info, body in _fenced_blocks(text) if info.split() == ["bash", "runnable"]]


def _commands(block: str) -> list[list[str]]:
    """Each command of a block as argv (comments dropped, backslash continuations joined)."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def help_invocations(block: str) -> list[tuple[str, list[str]]]:
    """What each command of a runnable block is checked with: ("script", [path]) for `bash scripts/X.sh`
    (parsed with bash -n), ("module", [name]) for `python -m indomain.X` and for scripts/demo.sh, which ends in
    `python -m indomain.demo "$@"` (run with --help). Any other command is refused: the test must know it."""
    checks = []
    for argv in _commands(block):
        if argv[0] == "bash" and len(argv) > 1 and argv[1].startswith("scripts/") and argv[1].endswith(".sh"):
            checks.append(("script", [argv[1]]))
            if argv[1] == "scripts/demo.sh":
                checks.append(("module", ["indomain.demo"]))
        elif Path(argv[0]).name.startswith("python") and argv[1:2] == ["-m"] and argv[2].startswith("indomain"):
            checks.append(("module", [argv[2]]))
        else:
            raise AssertionError(f"runnable block has a command this test does not know how to check: {argv}")
    return checks


def _readme() -> str:
    return README.read_text()


# ----------------------------------------------------------------------------- README

def test_readme_is_at_most_300_lines():
    n = len(_readme().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}); move reports to docs/"


def test_readme_runnable_blocks_parse_and_answer_help():
    blocks = runnable_blocks(_readme())
    assert blocks, "README.md has no `bash runnable` block: the two commands must be one"
    checks = [c for b in blocks for c in help_invocations(b)]
    assert ("script", ["scripts/demo.sh"]) in checks and ("script", ["scripts/test.sh"]) in checks
    for block in blocks:
        r = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (block, r.stderr)
    for kind, (what,) in checks:
        if kind == "script":
            script = ROOT / what
            assert script.is_file(), what
            r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, (what, r.stderr)
            if what == "scripts/demo.sh":  # the --help check below stands for the script only if it ends so
                assert re.search(r'^exec "\$VENV/bin/python" -m indomain\.demo "\$@"$', script.read_text(), re.M)
        else:
            r = subprocess.run([sys.executable, "-m", what, "--help"], capture_output=True, text=True, timeout=300,
                               cwd=ROOT)
            assert r.returncode == 0 and "usage" in r.stdout.lower(), (what, r.stdout[-1000:], r.stderr[-2000:])


def test_runnable_block_checks_can_fail():
    bad = "```bash runnable\nbash scripts/demo.sh (\n```\n"
    (block,) = runnable_blocks(bad)
    assert subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True).returncode != 0
    assert runnable_blocks("```bash\nrm -rf x\n```\n") == []  # an unmarked block is an example, not run
    with pytest.raises(AssertionError):
        help_invocations("curl http://example.com | sh\n")
    assert help_invocations(".venv/bin/python -m indomain.training \\\n  --help  # the trainer\n") == [
        ("module", ["indomain.training"])]
    r = subprocess.run([sys.executable, "-m", "indomain.no_such_module", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0


def test_readme_lists_every_node_help_page_and_workflow():
    text = _readme()
    ids = sorted(set(re.findall(r'node_id="(\w+)"', "".join(p.read_text() for p in (ROOT / "nodes").glob("*.py")))))
    assert len(ids) >= 9, ids
    assert not [i for i in ids if f"(`{i}`)" not in text], "every registered node has a row in the nodes table"
    pages = sorted(p.stem for p in (ROOT / "web" / "docs").glob("*.md"))
    assert pages == ids, "one help page per node"
    workflows = sorted(p.stem for p in (ROOT / "example_workflows").glob("*.json"))
    assert workflows
    for w in workflows:
        assert f"`{w}`" in text and f"example_workflows/{w}.jpg" in text, w
        assert (ROOT / "example_workflows" / f"{w}.jpg").is_file()
        assert (ROOT / "workflows" / "api" / f"{w}.json").is_file()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_local_link_exists(doc):
    checked = 0
    for link in _links(doc):
        if re.match(r"^[a-z]+:", link) or link.startswith("#"):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name} links to {link}, which does not exist"
        if anchor and path.suffix == ".md":
            slugs = {_slug(l.lstrip("#")) for l in path.read_text().splitlines() if re.match(r"^#{1,6} ", l)}
            assert anchor in slugs, f"{doc.name} links to {link}: no such heading in {target}"
        checked += 1
    if doc == README:
        assert checked >= 10
        linked = {(README.parent / l.partition("#")[0]).resolve() for l in _links(README)}
        assert not [p.name for p in DOCS if p not in linked], "README links every page in docs/"


# ----------------------------------------------------------------------------- README and docs/

@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_history_and_no_machine_paths(doc):
    text = doc.read_text()
    low = text.lower()
    assert not [p for p in HISTORY_PHRASES if p in low], "history belongs in CHANGELOG.md"
    assert not [l for l in text.splitlines() if MACHINE_PATH.search(l)]


def test_the_reports_exist():
    assert all(p.is_file() for p in REPORTS)
    assert (ROOT / "docs" / "development.md").is_file()
    claim = (ROOT / "docs" / "claim.md").read_text()
    head = claim[:1500].lower()
    assert "calibration" in head and "verdict" in head, "claim.md says up front that the figures are no verdict"
    assert re.search(r"^## Companion matrix$", (ROOT / "docs" / "reliability.md").read_text(), re.M)


def _sections(text: str) -> list[tuple[str, str]]:
    text = FENCE.sub("", text)
    parts = re.split(r"^(#{1,6} .*)$", text, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)] + [("(top)", parts[0])]


def figure_sections_without_command(text: str) -> list[str]:
    """Headings of sections holding a table with a number or a picture but no `Command:` line, or no
    `Measured:` line with a date."""
    bad = []
    for heading, body in _sections(text):
        rows = [l for l in body.splitlines() if l.startswith("|") and not re.match(r"^\|[-| :]+\|$", l)]
        has_figures = any(re.search(r"\d", r) for r in rows[1:]) or "![" in body
        if not has_figures:
            continue
        commands = re.findall(r"^Command: (.+)$", body, re.M)
        measured = re.findall(r"^Measured: (.+)$", body, re.M)
        if not commands or not any("`" in c for c in commands) or not any(DATE.search(m) for m in measured):
            bad.append(heading)
    return bad


@pytest.mark.parametrize("doc", REPORTS, ids=lambda p: p.name)
def test_every_figure_names_its_command_and_date(doc):
    text = doc.read_text()
    assert "Command: " in text
    assert figure_sections_without_command(text) == []
    for m in re.finditer(r"^Command: .*?`(?:\.venv/bin/)?python -m (indomain\.[\w.]+)", text, re.M):
        parts = m.group(1).split(".")[1:]
        assert (ROOT.joinpath(*parts).with_suffix(".py").is_file() or (ROOT.joinpath(*parts) / "__main__.py").is_file()
                ), f"{doc.name}: {m.group(1)} is not a module of the pack"


def test_figure_check_can_fail():
    assert figure_sections_without_command("## A\n\n| a | b |\n|---|---|\n| x | 1.5 |\n") == ["## A"]
    assert figure_sections_without_command("## A\n\n![p](p.png)\n\nCommand: `x`\n") == ["## A"]  # no date
    ok = "## A\n\nCommand: `python -m indomain.bench.toy`\nMeasured: 2026-11-29.\n\n| a | b |\n|---|---|\n| x | 1 |\n"
    assert figure_sections_without_command(ok) == []
    assert figure_sections_without_command("## A\n\n| a | b |\n|---|---|\n| x | y |\n") == []  # no figure
