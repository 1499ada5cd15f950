"""CONDITIONING helpers: find and strip the ControlNet of a conditioning, and the domain pass's conditioning.

Raw CONDITIONING is a list of [tensor, dict]; inside a sampling run ComfyUI works on processed
conds (the dicts alone). These helpers read and build both.
"""
from __future__ import annotations

CONTROL_KEYS = ("control", "control_apply_to_uncond")


def first_control(conditioning):
    """The ControlNet attached to a CONDITIONING (raw or processed), or None."""
    for c in conditioning or []:
        d = c[1] if isinstance(c, (list, tuple)) else c
        if d.get("control") is not None:
            return d["control"]
    return None


def with_control(entry: dict, control=None) -> dict:
    """A copy of one conditioning dict with its ControlNet removed, then `control` attached (if any)."""
    out = {k: v for k, v in entry.items() if k not in CONTROL_KEYS}
    if control is not None:
        out["control"] = control
    return out


def domain_conditioning(negative, positive=None, domain_on_control: bool = False):
    """The domain pass's CONDITIONING: the negative (∅) entries, whose text the null-text UNet
    ignores but whose extra inputs (SDXL's pooled/size vector `y`) it needs; ControlNet removed,
    or taken from the positive when `domain_on_control`. Works on raw and processed conds."""
    control = first_control(positive) if domain_on_control else None
    return [[c[0], with_control(c[1], control)] if isinstance(c, (list, tuple)) else with_control(c, control)
            for c in negative]
