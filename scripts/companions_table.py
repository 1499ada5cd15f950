"""Build the companion-matrix tables of docs/companions.md from the JUnit XML of tests/test_companions.py runs.

    python scripts/companions_table.py 0.3.75=/tmp/comp_h1.xml 0.33.0=/tmp/comp_h2.xml > table.md

Each argument is HOST_VERSION=JUNIT_XML (pytest -o junit_family=legacy --junitxml; a `pytest -v` log also works). Prints markdown: the summary table (one row per
companion) and the per-cell table (companion x sampling form x domain form, one column per host).
"""
from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET

FORMS = {"domain_ksampler": "Domain KSampler", "domain_guider": "Domain Guider",
         "apply_domain_guidance": "Apply Domain Guidance"}
DFORMS = {"full": "full form", "lora": "LoRA form"}


def outcome(case) -> str:
    for child in case:
        if child.tag in ("failure", "error"):
            return "FAIL"
        if child.tag == "skipped":
            msg = child.get("message", "")
            if child.get("type") == "pytest.xfail" or msg.startswith("xfail") or "lorafix" in msg:
                m = re.search(r"defect (\d)", msg)
                return f"xfail (defect {m.group(1)}: lorafix)" if m else "xfail (lorafix)"
            msg = re.sub(r"^.*?n/a: ", "n/a: ", msg)
            return msg if msg.startswith("n/a") else f"skipped: {msg}"
    for prop in case.iter("property"):
        if prop.get("name") == "outcome":
            v = prop.get("value", "")
            if v.startswith("refusal"):
                return "named refusal"
            return "pass (acted)" if "no exact reference" in v else "pass"
    return "pass"


def load_log(path: str) -> dict:
    """Fallback for a run cut short (no XML): the PASSED/FAILED/SKIPPED/XFAIL lines of `pytest -v`. A pass there
    cannot tell a named refusal from a match, nor say why a cell was skipped."""
    cells = {}
    pat = re.compile(r"test_companion\[(.+)-(domain_ksampler|domain_guider|apply_domain_guidance)-(full|lora)\] "
                     r"(PASSED|FAILED|SKIPPED|XFAIL|XPASS|ERROR)")
    for line in open(path, errors="replace"):
        m = pat.search(line)
        if m:
            word = m.group(4)
            cells[m.group(1), m.group(2), m.group(3)] = {"PASSED": "pass", "SKIPPED": "n/a (skipped)"}.get(word, word)
    return cells


def load(path: str) -> dict:
    if not path.endswith(".xml"):
        return load_log(path)
    cells = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        m = re.match(r"test_companion\[(.+)-(domain_ksampler|domain_guider|apply_domain_guidance)-(full|lora)\]$",
                     case.get("name", ""))
        if m:
            cells[(m.group(1), m.group(2), m.group(3))] = outcome(case)
    return cells


def summary(values: list[str]) -> str:
    distinct = sorted(set(values), key=values.index)
    if len(distinct) == 1:
        return distinct[0]
    return " / ".join(distinct)


def main(argv: list[str]) -> None:
    hosts = {}
    for arg in argv:
        version, path = arg.split("=", 1)
        hosts[version] = load(path)
    companions = list(dict.fromkeys(c for cells in hosts.values() for c, _, _ in cells))
    head = ["companion", *FORMS.values(), *DFORMS.values(), *(f"host {v}" for v in hosts)]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for comp in companions:
        row = [comp]
        for f in FORMS:
            row.append(summary([cells[(comp, f, d)] for cells in hosts.values() for d in DFORMS if (comp, f, d) in cells]))
        for d in DFORMS:
            row.append(summary([cells[(comp, f, d)] for cells in hosts.values() for f in FORMS if (comp, f, d) in cells]))
        for cells in hosts.values():
            row.append(summary([cells[(comp, f, d)] for f in FORMS for d in DFORMS if (comp, f, d) in cells]))
        print("| " + " | ".join(row) + " |")
    print()
    print("| companion | sampling form | domain form | " + " | ".join(f"host {v}" for v in hosts) + " |")
    print("|---|---|---|" + "---|" * len(hosts))
    for comp in companions:
        for f, fname in FORMS.items():
            for d, dname in DFORMS.items():
                print(f"| {comp} | {fname} | {dname} | "
                      + " | ".join(cells.get((comp, f, d), "not run") for cells in hosts.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
