"""Input checks the host does not (reliably) do for V3 nodes.

ComfyUI 0.3.75 validates a V3 combo input's value against its options only for V1 nodes (a V3
combo reaches `execute` with any string; 0.33 checks it). Nodes call `combo_problem` from their
`validate_inputs`, so a wrong name is refused at POST /prompt on every host, naming the choices.
"""
from __future__ import annotations

import math


def combo_problem(name: str, value, options) -> str | None:
    """None if value is one of options (or not given: a linked input is checked when it runs), else why not."""
    if value is None:
        return None
    options = list(options)
    if isinstance(value, str) and value in options:
        return None
    shown = ", ".join(repr(o) for o in options[:12]) + (f" (and {len(options) - 12} more)" if len(options) > 12 else "")
    text = repr(value) if not isinstance(value, str) or len(value) <= 80 else repr(value[:80] + "…")
    return f"{name} {text} is not one of the choices: {shown or 'none available'}."


def first_problem(*problems) -> bool | str:
    """validate_inputs' answer: True, or the first problem found."""
    return next((p for p in problems if p), True)


def check_interval(node: str, start: float, end: float, start_name: str = "domain_start_percent",
                   end_name: str = "domain_end_percent") -> None:
    """A start after the end would silently switch the term off: refuse it."""
    if start > end:
        raise ValueError(f"{node}: {start_name} ({start}) is after {end_name} ({end}), which would switch the domain "
                         f"term off for the whole run; swap them (start is the earlier part of the schedule, 0 = first "
                         f"step).")


def check_finite(node: str, **values: float) -> None:
    """ComfyUI turns the widget text "NaN" into float('nan'), which passes every min/max check; a NaN weight would
    make every sample NaN (a black picture, no error), so refuse it by name."""
    bad = [name for name, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"{node}: {', '.join(f'{n} = {values[n]}' for n in bad)} is not a finite number; set "
                         f"{'it' if len(bad) == 1 else 'them'} to a number (the widget's default is a safe start).")
