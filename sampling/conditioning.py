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


def fill_text_free(conditioning, base_patcher):
    """CONDITIONING whose text-free entries ([None, {...}], what core's DualModelGuider uses for an unconnected
    negative) carry a zeroed text embedding of the size the base takes, as core's ConditioningZeroOut gives.
    The base needs some text input for its unconditional; a null-text domain UNet ignores it. Entries with
    text are kept as they are."""
    if not any(isinstance(c, (list, tuple)) and c[0] is None for c in conditioning or []):
        return conditioning
    import torch

    model_config = base_patcher.model.model_config
    context_dim = model_config.unet_config.get("context_dim")
    if not context_dim:
        raise ValueError("A text-free CONDITIONING ([None, {}]) reached a guider whose base MODEL takes no text "
                         "embedding; connect the conditioning this model expects.")
    out = []
    for c in conditioning:
        if not (isinstance(c, (list, tuple)) and c[0] is None):
            out.append(c)
            continue
        d = dict(c[1])
        if model_config.unet_config.get("adm_in_channels") and type(model_config).__name__.startswith("SDXL"):
            d.setdefault("pooled_output", torch.zeros(1, 1280))  # SDXL builds its y vector from it
        out.append([torch.zeros(1, 77, context_dim), d])
    return out


def with_trained_y(conds, y):
    """Processed conds whose `y` (SDXL's pooled + size vector, built from the negative at the sampling size) is
    replaced by the vector the domain model was trained with (guidance.checkpoint.trained_y). `y` None (files
    written before it was stored, models without a y input): the conds as they are."""
    if y is None:
        return conds
    import comfy.conds

    out = []
    for c in conds:
        mc = c.get("model_conds") if isinstance(c, dict) else None
        if not mc or "y" not in mc:
            out.append(c)
            continue
        out.append(dict(c, model_conds=dict(mc, y=comfy.conds.CONDRegular(y))))
    return out
